"""Gallery indexes: exact search (``exact``: :func:`helpers.search.cosine_topk`; ``flat``: FAISS ``IndexFlatIP``)
and approximate FAISS indexes for large galleries (``hnsw``, ``ivf``), ``auto`` choosing by gallery size.

All indexes work on L2-normalised float32 vectors, so inner product = cosine similarity: gallery and query rows
whose L2 norm is not 1 (beyond :data:`NORM_TOLERANCE`) are normalised first, so every kind ranks by cosine whatever
the input's scale; rows holding NaN or Inf are refused with their row indices. An approximate index reports its
recall@10 against exact search on held-out queries when it is built, and every search returns ``min(k, G)`` valid
gallery indices per query: rows where an approximate index comes back short (-1) are completed by exact search.
FAISS is imported only when a FAISS index is used.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import write_bytes, write_json
from .search import check_finite, check_k, cosine_topk

logger = logging.getLogger(__name__)

INDEX_CHOICES = ("exact", "flat", "hnsw", "ivf", "auto")
#: ``auto``: exact search up to this many gallery vectors (a brute-force pass over 100k x 1k-d is well under a
#: second per query batch), HNSW above it, IVF above :data:`AUTO_IVF_ABOVE` (HNSW's graph costs memory).
AUTO_EXACT_UP_TO = 100_000
AUTO_IVF_ABOVE = 2_000_000
#: FAISS warns when k-means gets fewer than 39 training points per centroid; below that an IVF falls back.
MIN_POINTS_PER_CENTROID = 39
RECALL_SAMPLE = 1000
#: Rows whose L2 norm differs from 1 by more than this are normalised (float16 storage keeps norms within ~1e-3);
#: rows already of unit norm are used as they are, bit for bit.
NORM_TOLERANCE = 1e-3


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("FAISS indexes need the faiss-cpu package: pip install faiss-cpu") from exc
    return faiss


def _as_float32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` (float32, 2-D) with every row of non-unit norm L2-normalised (all-zero rows stay zero), so that inner
    product ranks by cosine; a ValueError naming the rows that hold NaN or Inf."""
    check_finite(x, what=what)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    off = (np.abs(norms - 1.0) > NORM_TOLERANCE) & (norms > 0)
    if not off.any():
        return x
    logger.debug("%d of %d %s vectors are not L2-normalised: normalised (cosine ranking)", int(off.sum()), len(x), what)
    x = x.copy()
    x[off] /= norms[off, None]
    return x


@dataclass
class GalleryIndex:
    """A searchable gallery. ``kind`` is what was built (after ``auto`` or a fallback), ``requested`` what was
    asked for; ``recall_at_10`` is the approximate index's recall@10 against exact search on held-out queries
    (None when exact), ``recall_note`` says which queries."""

    kind: str
    vectors: np.ndarray
    faiss_index: Any = None
    requested: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    recall_at_10: float | None = None
    message: str = ""
    recall_note: str = ""

    @property
    def size(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def search(self, query: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(indices, similarities) of shape (Q, min(k, G)), best first; always valid gallery indices."""
        query = _as_float32(query, "query")
        if query.shape[1] != self.dim:
            raise ValueError(f"query dimension {query.shape[1]} differs from the index dimension {self.dim}")
        k = check_k(k)
        query = _unit_rows(query, "query")
        if self.kind == "exact" or self.size == 0:
            return cosine_topk(query, self.vectors, k=k)
        k_eff = min(k, self.size)
        if self.kind == "flat":
            scores, idx = self.faiss_index.search(query, min(k_eff + 1, self.size))
            return _order_flat(query, self.vectors, idx.astype(np.int64), scores.astype(np.float32), k_eff)
        scores, idx = self.faiss_index.search(query, k_eff)
        idx = idx.astype(np.int64)
        short = np.nonzero((idx < 0).any(axis=1))[0]
        if len(short):
            # An approximate index can come back with fewer than k results (e.g. IVF probing sparse lists).
            logger.info("%s index returned fewer than %d results for %d queries: completed by exact search",
                        self.kind, k_eff, len(short))
            exact_idx, exact_val = cosine_topk(query[short], self.vectors, k=k_eff)
            idx[short], scores[short] = exact_idx, exact_val
        return idx, scores.astype(np.float32)


def _order_flat(query, vectors, idx, scores, k):
    """FAISS's flat results (searched with k+1) under the project's tie rule: equal scores rank the lower index
    first, and rows whose k-th and (k+1)-th scores tie are redone exactly over the whole gallery."""
    order = np.lexsort((idx, -scores), axis=1)
    idx, scores = np.take_along_axis(idx, order, axis=1), np.take_along_axis(scores, order, axis=1)
    if idx.shape[1] > k:
        for row in np.nonzero(scores[:, k - 1] == scores[:, k])[0]:
            row_scores = vectors @ query[row]
            exact = np.lexsort((np.arange(len(vectors)), -row_scores))[: idx.shape[1]]
            idx[row], scores[row] = exact, row_scores[exact]
    return idx[:, :k], scores[:, :k]


def _recall_at_10(index: GalleryIndex, sample: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """Mean overlap of the index's own top-10 with exact search's for the ``sample`` queries. ``exclude``: sorted
    gallery rows not (yet) in the index (the held-out sample itself), left out of the exact top-10 too."""
    n_excluded = 0 if exclude is None else len(exclude)
    k = min(10, index.size - n_excluded)
    if k < 1 or len(sample) == 0:
        return 1.0
    _, approx = index.faiss_index.search(sample, k)
    exact = _exact_topk_without(sample, index.vectors, k, exclude)
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx, exact))
    return hits / (k * len(sample))


def _exact_topk_without(query: np.ndarray, vectors: np.ndarray, k: int, exclude: np.ndarray | None) -> np.ndarray:
    """Exact top-k indices over the rows of ``vectors`` not in ``exclude``: a few more than k are searched and the
    excluded ones dropped, widening only for the queries that lost too many."""
    if exclude is None or len(exclude) == 0:
        return cosine_topk(query, vectors, k=k)[0]
    out = np.empty((len(query), k), dtype=np.int64)
    todo, width = np.arange(len(query)), k + 10
    while len(todo):
        width = min(width, len(vectors))
        found = cosine_topk(query[todo], vectors, k=width)[0]
        keep = ~np.isin(found, exclude)
        done = keep.sum(axis=1) >= k
        for row, cand, mask in zip(todo[done], found[done], keep[done]):
            out[row] = cand[mask][:k]
        todo, width = todo[~done], width * 4
    return out


def default_nlist(n: int) -> int:
    """IVF lists: 4 * sqrt(N) (FAISS's guideline of 4 to 16 * sqrt(N) centroids)."""
    return max(1, int(round(4 * math.sqrt(n))))


def build_index(
    gallery: np.ndarray,
    kind: str = "auto",
    hnsw_m: int = 32,
    ef_construction: int = 40,
    ef_search: int = 128,
    nlist: int | None = None,
    nprobe: int = 16,
    recall_queries: np.ndarray | None = None,
    seed: int = 0,
) -> GalleryIndex:
    """Index ``gallery`` vectors (G, d) for cosine search (rows not of unit norm are L2-normalised first; NaN or Inf
    raises ValueError naming the rows).

    - ``exact``: no index, exact chunked search (:func:`helpers.search.cosine_topk`);
    - ``flat``: FAISS ``IndexFlatIP`` (exact; same results as ``exact``);
    - ``hnsw``: ``IndexHNSWFlat`` with ``hnsw_m`` links per node (M=32; efConstruction=40 is FAISS's default) and
      ``ef_search`` (Malkov and Yashunin, TPAMI 2020);
    - ``ivf``: ``IndexIVFFlat`` with ``nlist`` k-means lists (default 4 * sqrt(G)) and ``nprobe`` probed lists
      (Jegou et al.). With fewer than 39 training vectors per list it falls back to exact search and says so;
    - ``auto``: exact up to 100,000 vectors, HNSW up to 2,000,000, IVF above.

    For an approximate index, recall@10 against exact search (the index's own results, before short rows are
    completed) is measured on held-out queries, logged and kept with what it was measured on (``recall_note``):
    ``recall_queries`` when given (up to 1,000; the queries themselves), else a random sample of up to 1,000
    gallery vectors (a tenth of a small gallery) held out of the index while measuring and added after. A gallery
    vector searched while in the index finds itself and its graph neighbours, which overstates recall (HNSW
    M=8/efSearch=16 on 20,000 random 32-d vectors: 0.77 that way, 0.39 on held-out queries).
    """
    if kind not in INDEX_CHOICES:
        raise ValueError(f"index must be one of {INDEX_CHOICES}, not {kind!r}")
    vectors = _unit_rows(_as_float32(gallery, "gallery"), "gallery")
    n = len(vectors)
    requested = kind
    if kind == "auto":
        kind = "exact" if n <= AUTO_EXACT_UP_TO else "hnsw" if n <= AUTO_IVF_ABOVE else "ivf"
    message = ""
    if kind == "ivf":
        nlist = default_nlist(n) if nlist is None else int(nlist)
        if nlist < 1:
            raise ValueError(f"nlist must be at least 1, got {nlist}")
        if n < MIN_POINTS_PER_CENTROID * nlist:
            message = (f"IVF with {nlist} lists needs at least {MIN_POINTS_PER_CENTROID * nlist} gallery vectors to "
                       f"train, the gallery has {n}: using exact search instead")
            logger.warning(message)
            kind = "exact"
    if kind == "exact" or n == 0:
        return GalleryIndex("exact", vectors, None, requested, {}, None, message)

    index, params = _new_faiss_index(kind, vectors, hnsw_m, ef_construction, ef_search, nlist, nprobe, seed)
    built = GalleryIndex(kind, vectors, index, requested, params, None, message)
    if kind == "flat":
        index.add(vectors)
        return built
    if recall_queries is not None:  # held out by nature: the queries the index is built for
        index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
        sample = _unit_rows(_as_float32(recall_queries, "recall_queries"), "recall_queries")[:RECALL_SAMPLE]
        built.recall_at_10 = _recall_at_10(built, sample)
        basis = f"{len(sample)} held-out queries (the queries given)"
    else:  # hold a random sample of the gallery out of the index, measure with it as queries, then add it
        held = np.sort(np.random.default_rng(seed).choice(n, size=min(RECALL_SAMPLE, max(1, n // 10)),
                                                          replace=False))
        rest = np.setdiff1d(np.arange(n, dtype=np.int64), held)
        _add_rows(index, vectors, rest)
        built.recall_at_10 = _recall_at_10(built, vectors[held], exclude=held)
        _add_rows(index, vectors, held)
        basis = f"{len(held)} gallery vectors held out of the index while measuring (added after)"
    built.recall_note = f"recall@10 against exact search on {basis}"
    logger.info("%s index over %d vectors %s: %s %.4f", kind, n, params, built.recall_note, built.recall_at_10)
    return built


def _add_rows(index: Any, vectors: np.ndarray, rows: np.ndarray, step: int = 65536) -> None:
    """Add ``vectors[rows]`` under their row numbers, a block at a time (no copy of the whole gallery)."""
    for start in range(0, len(rows), step):
        ids = rows[start : start + step]
        index.add_with_ids(vectors[ids], ids)


def _new_faiss_index(kind, vectors, hnsw_m, ef_construction, ef_search, nlist, nprobe, seed):
    """An empty FAISS index of ``kind`` (IVF trained on ``vectors``) and its parameters. HNSW sits in an
    ``IndexIDMap`` so that vectors can be added in any order under their gallery row numbers."""
    faiss = _faiss()
    d = vectors.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d), {}
    if kind == "hnsw":
        if hnsw_m < 2:
            raise ValueError(f"HNSW M must be at least 2, got {hnsw_m}")
        hnsw = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(ef_construction)
        hnsw.hnsw.efSearch = int(ef_search)
        return faiss.IndexIDMap(hnsw), {"M": int(hnsw_m), "efConstruction": int(ef_construction), "efSearch": int(ef_search)}
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(vectors)
    index.nprobe = max(1, min(int(nprobe), nlist))
    return index, {"nlist": nlist, "nprobe": index.nprobe}


def save_index(index: GalleryIndex, path: str | os.PathLike) -> Path:
    """Write the index to ``path`` (FAISS's serialisation, or the vectors for ``exact``) and its description to
    ``path + '.json'``, both atomically."""
    path = Path(path)
    meta = {"kind": index.kind, "requested": index.requested, "params": index.params,
            "recall_at_10": index.recall_at_10, "size": index.size, "dim": index.dim, "message": index.message,
            "recall_note": index.recall_note}
    if index.faiss_index is not None:
        faiss = _faiss()
        write_bytes(path, faiss.serialize_index(index.faiss_index).tobytes())
        # HNSW and IVF keep their own copy of the vectors; the exact completion of short rows needs them too.
        write_bytes(Path(f"{path}.vectors.npy"), _npy_bytes(index.vectors))
    else:
        write_bytes(path, _npy_bytes(index.vectors))
    write_json(Path(f"{path}.json"), meta)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_index(path: str | os.PathLike) -> GalleryIndex:
    """Read an index written by :func:`save_index`."""
    path = Path(path)
    meta_path = Path(f"{path}.json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(f"no saved index at {path} (expected {path} and {meta_path}); build one first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    kind = meta["kind"]
    if kind == "exact":
        vectors = np.load(path, allow_pickle=False)
        faiss_index = None
    else:
        faiss = _faiss()
        faiss_index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        vectors = np.load(Path(f"{path}.vectors.npy"), allow_pickle=False)
        if kind == "hnsw":
            hnsw = faiss.downcast_index(faiss_index.index) if hasattr(faiss_index, "id_map") else faiss_index
            hnsw.hnsw.efSearch = int(meta["params"].get("efSearch", hnsw.hnsw.efSearch))
        if kind == "ivf":
            faiss_index.nprobe = int(meta["params"].get("nprobe", faiss_index.nprobe))
    return GalleryIndex(kind, vectors, faiss_index, meta.get("requested", kind), meta.get("params", {}),
                        meta.get("recall_at_10"), meta.get("message", ""), meta.get("recall_note", ""))


def index_search(
    query: np.ndarray, gallery: np.ndarray, k: int = 10, kind: str = "exact", **options: Any
) -> tuple[np.ndarray, np.ndarray, GalleryIndex]:
    """Build an index of ``gallery`` and search ``query`` in it by cosine similarity (recall measured on the
    queries). Neither needs to be L2-normalised."""
    query = _unit_rows(_as_float32(query, "query"), "query")
    index = build_index(gallery, kind=kind, recall_queries=query if len(query) else None, **options)
    idx, val = index.search(query, k=k)
    return idx, val, index
