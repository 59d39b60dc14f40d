"""Exact cosine top-k search, chunked so that memory stays bounded for large galleries.

Ties are broken deterministically: equal similarities rank the lower gallery index first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def check_k(k: int, name: str = "k") -> int:
    """``k`` as an int: integral numbers are accepted (``10.0``), anything else or ``k < 1`` raises ValueError."""
    try:
        ok = not isinstance(k, (bool, str)) and int(k) == k
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a whole number, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be at least 1, got {k}")
    return int(k)


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the rows of a 2-D array (memory-mapped ones included) holding NaN or Inf, read in blocks.

    A row sum is non-finite whenever the row holds NaN or Inf, so one cheap reduction finds the suspects (and rows
    of huge finite values whose sum overflows) and only those are inspected element by element."""
    step = max(1, 4_000_000 // max(1, x.shape[1]))
    bad = []
    for start in range(0, len(x), step):
        part = np.asarray(x[start : start + step])
        with np.errstate(over="ignore", invalid="ignore"):
            suspects = np.nonzero(~np.isfinite(part.sum(axis=1)))[0]
        bad.append(start + suspects[~np.isfinite(part[suspects]).all(axis=1)])
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, np.int64)


def nonfinite_message(rows: Sequence[int], what: str = "embedding", names: Sequence[str] | None = None) -> str:
    """The error text for embeddings with NaN or Inf: by name where ``names`` are known, else by row index."""
    rows = [int(r) for r in rows]
    shown = [names[r] for r in rows[:5]] if names is not None else rows[:5]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    label = "" if names is not None else " rows"
    return (f"{len(rows)} {what} embedding(s) contain NaN or Inf and cannot be ranked:{label} {shown}{more} "
            f"(re-extract those images or leave them out)")


def check_finite(x: np.ndarray, names: Sequence[str] | None = None, what: str = "embedding") -> None:
    """Raise ValueError naming the rows of ``x`` (by ``names`` when given) that hold NaN or Inf.

    Call it where the names of the images are known (query and gallery embeddings before a search); the search
    functions below refuse NaN and Inf similarities too but only know row indices.
    """
    rows = nonfinite_rows(x if hasattr(x, "shape") else np.asarray(x))
    if len(rows):
        raise ValueError(nonfinite_message(rows, what, names))


def _row_exact_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k of one row by (score descending, index ascending)."""
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return order[:k]


def topk_from_scores(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k indices and scores per row of a (Q, G) score matrix, ties to the lower index.

    A NaN or Inf score never ranks: one that would reach the top-k (NaN and +Inf sort first) raises ValueError
    naming the query rows and gallery columns holding NaN or Inf (an embedding with NaN or Inf behind them)."""
    k = check_k(k)
    n_gallery = scores.shape[1]
    k = min(k, n_gallery)
    probe = min(k + 1, n_gallery)
    values, indices = torch.topk(scores, probe, dim=1, largest=True, sorted=True)
    values_np = values.numpy()
    indices_np = indices.numpy()
    if not np.isfinite(values_np).all():  # torch.topk ranks NaN and +Inf first: any that would rank shows here
        rows = nonfinite_rows(scores.numpy())
        cols = nonfinite_rows(scores.numpy()[rows].T)
        raise ValueError(f"similarity scores hold NaN or Inf (query rows {rows[:5].tolist()}, gallery columns "
                         f"{cols[:5].tolist()}): an embedding with NaN or Inf cannot be ranked")
    # Sort the top-k by (score desc, index asc): stable ordering inside the list.
    top_values, top_indices = values_np[:, :k], indices_np[:, :k]
    order = np.lexsort((top_indices, -top_values), axis=1)
    top_indices = np.take_along_axis(top_indices, order, axis=1)
    top_values = np.take_along_axis(top_values, order, axis=1)
    if probe > k:
        # A tie across the k-th position: which of the tied items torch kept is unspecified, so redo those rows.
        boundary_ties = np.nonzero(values_np[:, k - 1] == values_np[:, k])[0]
        scores_np = scores.numpy()
        for row in boundary_ties:
            exact = _row_exact_topk(scores_np[row], k)
            top_indices[row] = exact
            top_values[row] = scores_np[row, exact]
    return top_indices.astype(np.int64), top_values.astype(np.float32)


#: Gallery rows per block of the fused multiply + top-k: the (chunk_size x block) score tile stays small enough to
#: be selected from while still in cache, which keeps exact search close to the cost of the multiply alone.
DEFAULT_GALLERY_BLOCK = 16384
#: Column groups of the two-stage selection in :func:`_tile_topk`.
TILE_GROUPS = 16


def cosine_topk(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    chunk_size: int = 4096,
    gallery_chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of L2-normalised rows (= cosine similarity).

    Processes ``chunk_size`` queries at a time against the gallery in blocks of ``gallery_chunk_size`` rows
    (default :data:`DEFAULT_GALLERY_BLOCK`): each block's score tile is multiplied into one reused buffer and its
    top-k taken at once, then the per-block candidates are merged. Memory stays bounded by chunk_size x block
    scores plus one float32 copy of a block, so float16 or memory-mapped galleries are read block by block, never
    loaded whole. Returns ``(indices, scores)`` of shape (Q, min(k, G)), best first; equal scores rank the lower
    gallery index first (rows with a tie across a k-th position are redone exactly).

    A NaN or Inf similarity never ranks: NaN and +Inf sort first, so one that would reach a top-k raises ValueError
    naming the query and gallery rows that hold NaN or Inf (checked on the selected scores only, at no cost to a
    normal search; a -Inf similarity ranks last and is never selected). :func:`check_finite` names the files where
    they are known.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be (n, d) with the same d")
    k = check_k(k)
    n_query, n_gallery = query.shape[0], gallery.shape[0]
    k_eff = min(k, n_gallery)
    out_idx = np.empty((n_query, k_eff), dtype=np.int64)
    out_val = np.empty((n_query, k_eff), dtype=np.float32)
    if n_query == 0 or n_gallery == 0:
        return out_idx[:, :0], out_val[:, :0]
    block = max(1, min(gallery_chunk_size or DEFAULT_GALLERY_BLOCK, n_gallery))
    chunk_size = max(1, min(chunk_size, n_query))
    in_memory_f32 = isinstance(gallery, np.ndarray) and not isinstance(gallery, np.memmap) \
        and gallery.dtype == np.float32 and gallery.flags.c_contiguous
    starts = list(range(0, n_gallery, block))
    # float32 galleries in memory are used in place; others are converted one block at a time (kept when the
    # whole gallery is a single block).
    blocks = [torch.from_numpy(np.ascontiguousarray(gallery[s : s + block], dtype=np.float32))
              for s in starts] if (in_memory_f32 or len(starts) == 1) else None
    probe = min(k_eff + 1, block)
    scores = torch.empty(chunk_size, block, dtype=torch.float32)
    cand_val = torch.empty(chunk_size, len(starts) * k_eff, dtype=torch.float32)
    cand_idx = torch.empty(chunk_size, len(starts) * k_eff, dtype=torch.int64)
    for q0 in range(0, n_query, chunk_size):
        q = torch.from_numpy(np.ascontiguousarray(query[q0 : q0 + chunk_size], dtype=np.float32))
        n = q.shape[0]
        redo = torch.zeros(n, dtype=torch.bool)
        width = 0
        for b, start in enumerate(starts):
            g = blocks[b] if blocks is not None else torch.from_numpy(
                np.ascontiguousarray(gallery[start : start + block], dtype=np.float32))
            tile = scores[:n, : g.shape[0]]
            torch.mm(q, g.T, out=tile)
            take = min(probe, g.shape[0])
            val, idx = _tile_topk(tile, take, redo)
            keep = min(k_eff, take)
            if take > keep:  # a tie across this block's k-th position: which tied items were kept is unspecified
                redo |= val[:, keep - 1] == val[:, keep]
            cand_val[:n, width : width + keep] = val[:, :keep]
            cand_idx[:n, width : width + keep] = idx[:, :keep] + start
            width += keep
        idx, val = _merge_candidates(cand_val[:n, :width], cand_idx[:n, :width], k_eff, redo)
        if not np.isfinite(val).all():  # NaN and +Inf rank first in torch.topk: any that would rank shows here
            raise ValueError(_nonfinite_search_message(query, gallery))
        rows = np.nonzero(idx[:, 0] < 0)[0]
        if len(rows):
            idx[rows], val[rows] = _exact_rows(query[q0 + rows], gallery, k_eff, block)
        out_idx[q0 : q0 + n] = idx
        out_val[q0 : q0 + n] = val
    return out_idx, out_val


def _nonfinite_search_message(query: np.ndarray, gallery: np.ndarray) -> str:
    """Why a search met a non-finite similarity: the query and gallery rows with NaN or Inf, else an overflow."""
    parts = [nonfinite_message(rows, what) for rows, what in ((nonfinite_rows(query), "query"),
                                                               (nonfinite_rows(gallery), "gallery")) if len(rows)]
    return "; ".join(parts) or "similarities overflow float32: the embeddings have huge norms (L2-normalise them)"


def _tile_topk(tile: torch.Tensor, take: int, redo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(tile, take, sorted=True)`` in two stages for wide tiles: the column maxima of ``TILE_GROUPS``
    interleaved groups, the ``take`` groups with the largest maxima (they hold the ``take`` largest scores), then
    the top-``take`` of their members; a selection pass several times cheaper than a full top-k of every row.
    Rows where group maxima tie across the selection boundary are flagged in ``redo``."""
    n, width = tile.shape
    groups = TILE_GROUPS
    if width % groups or width < 4 * groups * take or not tile.is_contiguous():
        return torch.topk(tile, take, dim=1, largest=True, sorted=True)
    span = width // groups
    maxima = torch.amax(tile.view(n, groups, span), dim=1)
    gval, gidx = torch.topk(maxima, take + 1, dim=1, largest=True, sorted=True)
    redo |= gval[:, take - 1] == gval[:, take]
    cols = (gidx[:, :take].unsqueeze(2) + span * torch.arange(groups).view(1, 1, groups)).reshape(n, -1)
    val, pos = torch.topk(torch.gather(tile, 1, cols), take, dim=1, largest=True, sorted=True)
    return val, torch.gather(cols, 1, pos)


def _merge_candidates(values: torch.Tensor, indices: torch.Tensor, k: int, redo: torch.Tensor):
    """Top-k of per-block candidates by (score desc, gallery index asc). Rows to redo exactly (a tie across a
    block's or the merged k-th position) come back with index -1 in their first column."""
    probe = min(k + 1, values.shape[1])
    top_val, pos = torch.topk(values, probe, dim=1, largest=True, sorted=True)
    top_idx = torch.gather(indices, 1, pos)
    v, i = top_val.numpy(), top_idx.numpy()
    redo = redo.numpy().copy()
    if probe > k:
        redo |= v[:, k - 1] == v[:, k]
    v, i = v[:, :k], i[:, :k]
    order = np.lexsort((i, -v), axis=1)
    i = np.take_along_axis(i, order, axis=1).astype(np.int64)
    v = np.take_along_axis(v, order, axis=1).astype(np.float32)
    i[redo, 0] = -1
    return i, v


def _exact_rows(q: np.ndarray, gallery: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of a few queries over the whole gallery by (score desc, index asc), with scores computed in
    float64 and rounded to float32, so that identical gallery vectors score identically wherever they sit."""
    q64 = torch.from_numpy(np.asarray(q, dtype=np.float64))
    rows = np.concatenate([
        (q64 @ torch.from_numpy(np.asarray(gallery[s : s + block], dtype=np.float64)).T).numpy()
        for s in range(0, gallery.shape[0], block)
    ], axis=1).astype(np.float32)
    idx = np.stack([_row_exact_topk(row, k) for row in rows])
    return idx, np.take_along_axis(rows, idx, axis=1)
