"""Exact cosine top-k search, chunked so that memory stays bounded for large galleries.

Ties are broken deterministically: equal similarities rank the lower gallery index first.
"""

from __future__ import annotations

import numpy as np
import torch


def _row_exact_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k of one row by (score descending, index ascending)."""
    order = np.lexsort((np.arange(scores.shape[0]), -scores))
    return order[:k]


def topk_from_scores(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k indices and scores per row of a (Q, G) score matrix, ties to the lower index."""
    n_gallery = scores.shape[1]
    k = min(k, n_gallery)
    probe = min(k + 1, n_gallery)
    values, indices = torch.topk(scores, probe, dim=1, largest=True, sorted=True)
    values_np = values.numpy()
    indices_np = indices.numpy()
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


def cosine_topk(
    query: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    chunk_size: int = 4096,
    gallery_chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of L2-normalised rows (= cosine similarity).

    Processes ``chunk_size`` queries at a time (and, with ``gallery_chunk_size``, the gallery in blocks, merging the
    partial top-k lists), so the largest temporary is chunk_size x gallery_chunk_size scores. Returns ``(indices,
    scores)`` of shape (Q, min(k, G)), best first. Works on float16 or memory-mapped galleries.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be (n, d) with the same d")
    if k < 1:
        raise ValueError("k must be at least 1")
    n_query, n_gallery = query.shape[0], gallery.shape[0]
    k_eff = min(k, n_gallery)
    out_idx = np.empty((n_query, k_eff), dtype=np.int64)
    out_val = np.empty((n_query, k_eff), dtype=np.float32)
    if n_query == 0 or n_gallery == 0:
        return out_idx[:, :0], out_val[:, :0]
    full = gallery_chunk_size is None or gallery_chunk_size >= n_gallery
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)) if full else None
    for q0 in range(0, n_query, chunk_size):
        q = torch.from_numpy(np.ascontiguousarray(query[q0 : q0 + chunk_size], dtype=np.float32))
        if g is not None:
            idx, val = topk_from_scores(q @ g.T, k_eff)
        else:
            idx, val = _blockwise_topk(q, gallery, k_eff, gallery_chunk_size)
        out_idx[q0 : q0 + len(q)] = idx
        out_val[q0 : q0 + len(q)] = val
    return out_idx, out_val


def _blockwise_topk(q: torch.Tensor, gallery: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over a gallery processed in blocks: each block's top-k candidates, merged with deterministic ties."""
    cand_idx, cand_val = [], []
    for start in range(0, gallery.shape[0], block):
        g = torch.from_numpy(np.ascontiguousarray(gallery[start : start + block], dtype=np.float32))
        idx, val = topk_from_scores(q @ g.T, min(k, g.shape[0]))
        cand_idx.append(idx + start)
        cand_val.append(val)
    all_idx = np.concatenate(cand_idx, axis=1)
    all_val = np.concatenate(cand_val, axis=1)
    order = np.lexsort((all_idx, -all_val), axis=1)[:, :k]
    return np.take_along_axis(all_idx, order, axis=1), np.take_along_axis(all_val, order, axis=1)


def rank_names(indices: np.ndarray, gallery_names: list[str]) -> list[list[str]]:
    """Map index rows to gallery names."""
    return [[gallery_names[j] for j in row] for row in indices]
