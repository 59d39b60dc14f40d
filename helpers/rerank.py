"""Post-processing of embeddings and rankings: k-reciprocal re-ranking, query expansion, DBA and model fusion.

Every function works on plain numpy arrays of L2-normalised embeddings (rows), so that it can be used outside the
pipeline. Sources:

- k-reciprocal re-ranking: Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal
  Encoding", CVPR 2017 (defaults k1=20, k2=6, lambda=0.3, as in the paper and the authors' public ``re_ranking``).
- average query expansion (AQE): Chum, Philbin, Sivic, Isard, Zisserman, "Total Recall", ICCV 2007.
- alpha query expansion (alpha-QE) and alpha-weighted DBA: Radenovic, Tolias, Chum, "Fine-tuning CNN Image
  Retrieval with No Human Annotation", TPAMI 2019 (alpha=3).
- database-side augmentation (DBA): Arandjelovic and Zisserman, "Three things everyone should know to improve
  object retrieval", CVPR 2012; Gordo, Almazan, Revaud, Larlus, "End-to-end learning of deep visual
  representations for image retrieval", IJCV 2017.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .embedding import l2_normalize
from .search import check_finite, check_k, cosine_topk, topk_from_scores

logger = logging.getLogger("helpers")

RERANK_CHOICES = ("none", "kreciprocal")
QE_CHOICES = ("none", "avg", "alpha")
FUSION_CHOICES = ("concat", "score")

#: Options of :func:`rank_gallery` as the run config and ``default_run_name`` record them, with their defaults.
POSTPROCESS_DEFAULTS = {"rerank": "none", "k1": 20, "k2": 6, "lambda": 0.3, "qe": "none", "qe_k": 5,
                        "qe_alpha": 3.0, "dba": 0, "index": "exact", "fusion": "concat", "fusion_weights": None}

#: Elements (rows x columns) of one temporary block of the chunked computations (32 MB in float64).
_BLOCK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------------------------
def _as_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d), got shape {x.shape}")
    return x


def _check_params(k1: int, k2: int, lambda_value: float) -> tuple[int, int]:
    """``(k1, k2)`` as ints (integral floats such as ``6.0`` are accepted); a ValueError naming the bad one."""
    k1, k2 = check_k(k1, "k1"), check_k(k2, "k2")
    try:
        ok = not isinstance(lambda_value, (bool, str)) and 0.0 <= float(lambda_value) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"lambda_value must be between 0 and 1, got {lambda_value!r}")
    return k1, k2


def _original_distances(x: np.ndarray, sq: np.ndarray, n_query: int, k: int):
    """One chunked pass over all N x N squared distances, never holding more than a block of rows.

    Returns the kNN table of the row-normalised squared distances (N, k) ordered by (distance, index), the row
    maxima (N,) and the query x gallery block of the normalised distances (Q, G), all in float32 as in the
    authors' code.
    """
    n = x.shape[0]
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    knn = np.empty((n, k), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float32)
    qg = np.empty((n_query, n - n_query), dtype=np.float32)
    import torch

    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        d2 = sq[r0:r1, None] + sq[None, :] - 2.0 * (x[r0:r1] @ x.T)
        np.maximum(d2, 0.0, out=d2)
        d2[np.arange(r1 - r0), np.arange(r0, r1)] = 0.0  # the distance of an image to itself
        d2 = d2.astype(np.float32)
        # The authors divide by the column maximum and transpose; the matrix being symmetric, that is each row
        # divided by its own maximum.
        m = d2.max(axis=1)
        row_max[r0:r1] = m
        od = d2 / np.where(m > 0, m, np.float32(1.0))[:, None]
        idx, _ = topk_from_scores(torch.from_numpy(-od), k)  # (distance asc, index asc)
        knn[r0:r1] = idx
        if r0 < n_query:
            q1 = min(r1, n_query)
            qg[r0:q1] = od[: q1 - r0, n_query:]
        del d2, od
    return knn, row_max, qg


def _pair_distances(x: np.ndarray, sq: np.ndarray, row_max: np.ndarray, rows: np.ndarray, cols: np.ndarray):
    """Normalised squared distances of the (row, col) pairs, computed as in :func:`_original_distances`."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(x.shape[1], 1))
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        d2 = sq[r] + sq[c] - 2.0 * np.einsum("ij,ij->i", x[r], x[c])
        np.maximum(d2, 0.0, out=d2)
        d2[r == c] = 0.0
        m = row_max[r]
        out[s : s + step] = d2.astype(np.float32) / np.where(m > 0, m, np.float32(1.0))
    return out


#: Elements of one temporary block of the k-reciprocal set computations (rows x neighbours x neighbours): the
#: blocks of rows are sized from the neighbourhood widths, so memory stays bounded whatever k1 and N.
_PAIR_BLOCK_ELEMENTS = 250_000


def _reciprocal_mask(table: np.ndarray) -> np.ndarray:
    """mask[i, p] = True when i is among the neighbours of its p-th neighbour table[i, p] (same table width)."""
    n, w = table.shape
    block = max(1, _PAIR_BLOCK_ELEMENTS // max(1, w * w))
    mask = np.empty(table.shape, dtype=bool)
    for r0 in range(0, n, block):
        t = table[r0 : r0 + block]
        back = table[t]  # (b, w, w)
        mask[r0 : r0 + block] = (back == np.arange(r0, r0 + len(t))[:, None, None]).any(axis=2)
    return mask


def _row_membership(values: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """in[i, ...] = values[i, ...] is one of members[i] (members < 0 are no one), per row by binary search over the
    sorted (row, member) keys: memory of the size of ``values``, not values x members."""
    offset = (np.arange(len(members), dtype=np.int64) * (n + 1))
    keys = np.sort((members + 1 + offset[:, None]).ravel())  # absent members become the row's key 0: never probed
    probe = (values + 1 + offset.reshape((-1,) + (1,) * (values.ndim - 1))).ravel()
    pos = np.minimum(np.searchsorted(keys, probe), len(keys) - 1)
    return (keys[pos] == probe).reshape(values.shape)


def _expansion_pairs(knn: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) pairs of every image's k-reciprocal expansion set R*(i, k1), without duplicates.

    R(i, k1) = the k-reciprocal neighbours among the k1+1 nearest; a candidate c in R(i, k1) adds its own
    R(c, round(k1/2)) when more than 2/3 of that set lies in R(i, k1) (the paper's Eq. 6 as in the authors' code).
    Rows are processed in blocks of about :data:`_PAIR_BLOCK_ELEMENTS` / ((k1+1) (k1/2+1)), so the temporary
    arrays stay a few MiB whatever k1 and N.
    """
    n = knn.shape[0]
    a = min(k1 + 1, knn.shape[1])
    kh = min(int(np.around(k1 / 2.0)) + 1, knn.shape[1])
    r_full = np.ascontiguousarray(knn[:, :a])
    r_half = np.ascontiguousarray(knn[:, :kh])
    recip = _reciprocal_mask(r_full)
    half = _reciprocal_mask(r_half)
    half_size = half.sum(axis=1)
    block = max(1, _PAIR_BLOCK_ELEMENTS // (a * kh))
    rows_out, cols_out = [], []
    for r0 in range(0, n, block):
        cand = r_full[r0 : r0 + block]  # (b, a)
        cmask = recip[r0 : r0 + block]  # (b, a)
        hr = r_half[cand]  # (b, a, kh): each candidate's half neighbourhood
        hm = half[cand]  # (b, a, kh): which of them are its half-reciprocal neighbours
        # Is hr[i, p, q] in R(i, k1), the row's reciprocal neighbours (non-members set to -1)?
        in_r = _row_membership(hr, np.where(cmask, cand, -1), n)
        count = (in_r & hm).sum(axis=2)
        accept = cmask & (count > 2.0 / 3 * half_size[cand])
        row_ids = np.arange(r0, r0 + len(cand))
        rows_out.append(np.broadcast_to(row_ids[:, None], cand.shape)[cmask])
        cols_out.append(cand[cmask])
        take = accept[:, :, None] & hm
        rows_out.append(np.broadcast_to(row_ids[:, None, None], hr.shape)[take])
        cols_out.append(hr[take])
    rows = np.concatenate(rows_out)
    cols = np.concatenate(cols_out)
    keys = np.unique(rows * n + cols)
    return keys // n, keys % n


def _combine_jaccard(v, n_query: int, original_qg: np.ndarray, lambda_value: float) -> np.ndarray:
    """``jaccard * (1 - lambda) + original * lambda``, written into ``original_qg`` query-chunk by query-chunk.

    The Jaccard distance 1 - sum(min)/sum(max) between the first n_query rows of V and the rest uses an inverted
    index (V by column) as the authors do: only images sharing a non-zero dimension interact, and
    ``sum(max) = 2 - sum(min)`` because every row of V sums to one.
    """
    import scipy.sparse as sp

    vq = sp.csr_matrix(v[:n_query])
    vg = sp.csc_matrix(v[n_query:])
    n_gallery = vg.shape[0]
    out = original_qg
    col_ptr, col_rows, col_vals = vg.indptr, vg.indices, vg.data
    col_len = np.diff(col_ptr)
    # Work per query row = the total length of the columns it touches; split the rows into bounded chunks.
    cumulative = np.concatenate(([0], np.cumsum(col_len[vq.indices], dtype=np.int64)))
    work = cumulative[vq.indptr[1:]] - cumulative[vq.indptr[:-1]]
    max_rows = max(1, _BLOCK_ELEMENTS // max(n_gallery, 1))
    r0 = 0
    while r0 < n_query:
        r1, total = r0, 0
        while r1 < n_query and r1 - r0 < max_rows and (r1 == r0 or total + work[r1] <= _BLOCK_ELEMENTS):
            total += work[r1]
            r1 += 1
        lo, hi = vq.indptr[r0], vq.indptr[r1]
        ent_row = np.repeat(np.arange(r1 - r0), np.diff(vq.indptr[r0 : r1 + 1]))
        ent_col, ent_val = vq.indices[lo:hi], vq.data[lo:hi]
        lengths = col_len[ent_col]
        rep = np.repeat(np.arange(len(ent_col)), lengths)
        starts = np.repeat(col_ptr[ent_col] - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        pos = starts + np.arange(len(rep))
        mins = np.minimum(ent_val[rep], col_vals[pos])
        temp = np.bincount(ent_row[rep] * n_gallery + col_rows[pos], weights=mins, minlength=(r1 - r0) * n_gallery)
        temp = temp.reshape(r1 - r0, n_gallery)
        jaccard = (1.0 - temp / (2.0 - temp)).astype(np.float32)
        del temp
        out[r0:r1] *= np.float32(lambda_value)
        out[r0:r1] += jaccard * np.float32(1 - lambda_value)
        r0 = r1
    return out


def k_reciprocal(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017): the final (Q, G) distance matrix, smaller is closer.

    Takes L2-normalised query (Q, d) and gallery (G, d) embeddings; the input distance is their Euclidean
    distance, what the authors' ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)``
    receives. It follows that algorithm step by step (squared distances divided by their maximum, k-reciprocal
    sets among the k1+1 nearest, expansion by candidates' round(k1/2)-reciprocal sets overlapping more than 2/3,
    Gaussian weights exp(-d) normalised per row, local query expansion over the k2 nearest, Jaccard distance,
    ``final = jaccard * (1 - lambda) + original * lambda``) and returns the same distances, without any dense
    N x N matrix (N = Q + G): the nearest neighbours come from a chunked exact search, the encodings V are sparse
    and the Jaccard distances are computed query-chunk by query-chunk, so memory grows about linearly with N
    (plus the (Q, G) result).

    Ties: neighbours at exactly equal distance are ordered by index (queries first, then gallery), as a stable
    sort does; the authors' ``np.argsort`` leaves the order of exact ties unspecified, so with duplicate images
    the two can pick different neighbours at the k1+1 boundary.
    """
    k1, k2 = _check_params(k1, k2, lambda_value)
    q = _as_2d("query_emb", query_emb)
    g = _as_2d("gallery_emb", gallery_emb)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb {q.shape} and gallery_emb {g.shape} must have the same dimension")
    check_finite(q, what="query")
    check_finite(g, what="gallery")
    n_query, n_gallery = len(q), len(g)
    if n_query == 0 or n_gallery == 0:
        return np.zeros((n_query, n_gallery), dtype=np.float32)
    import scipy.sparse as sp

    x = np.concatenate([q, g]).astype(np.float64)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    width = min(max(k1 + 1, k2), n)
    knn, row_max, original_qg = _original_distances(x, sq, n_query, width)

    rows, cols = _expansion_pairs(knn, k1)
    weight = np.exp(-_pair_distances(x, sq, row_max, rows, cols)).astype(np.float64)
    row_sum = np.bincount(rows, weights=weight, minlength=n)
    v = sp.csr_matrix((weight / row_sum[rows], (rows, cols)), shape=(n, n))
    del rows, cols, weight
    if k2 != 1:
        kk2 = min(k2, n)
        a = sp.csr_matrix(
            (np.full(n * kk2, 1.0 / kk2), (np.repeat(np.arange(n), kk2), knn[:, :kk2].ravel())), shape=(n, n)
        )
        v = a @ v
    v = v.astype(np.float32)
    return _combine_jaccard(v, n_query, original_qg, lambda_value)


def rerank_topk(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    k: int = 10,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery indices after :func:`k_reciprocal`, with the re-ranked similarity ``1 - distance`` as score.

    Ties (equal final distance) rank the lower gallery index first.
    """
    import torch

    k = check_k(k)
    dist = k_reciprocal(query_emb, gallery_emb, k1=k1, k2=k2, lambda_value=lambda_value)
    if dist.shape[1] == 0:
        return np.zeros((dist.shape[0], 0), np.int64), np.zeros((dist.shape[0], 0), np.float32)
    idx, neg = topk_from_scores(torch.from_numpy(-dist), k)
    return idx, (1.0 - (-neg)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Query expansion and database-side augmentation
# --------------------------------------------------------------------------------------------------------------
def _neighbours(query: np.ndarray, gallery: np.ndarray, n: int, neighbors: np.ndarray | None):
    if neighbors is not None:
        idx = np.asarray(neighbors)[:, :n]
        sims = np.einsum("qd,qnd->qn", query.astype(np.float32), gallery[idx].astype(np.float32))
        return idx, sims
    return cosine_topk(query, gallery, k=n)


def _expand(query: np.ndarray, gallery: np.ndarray, n: int, alpha: float, neighbors: np.ndarray | None):
    query = _as_2d("query", query)
    gallery = _as_2d("gallery", gallery)
    if n < 0:
        raise ValueError(f"the number of expansion neighbours must be >= 0, got {n}")
    n = min(n, len(gallery))
    if n == 0:
        return l2_normalize(query)
    idx, sims = _neighbours(query, gallery, n, neighbors)
    weights = np.maximum(sims, 0.0) ** alpha if alpha else np.ones_like(sims)
    expanded = query.astype(np.float32) + np.einsum("qn,qnd->qd", weights.astype(np.float32),
                                                    gallery[idx].astype(np.float32))
    return l2_normalize(expanded)


def average_query_expansion(
    query: np.ndarray, gallery: np.ndarray, n: int = 5, neighbors: np.ndarray | None = None
) -> np.ndarray:
    """Average query expansion (Chum et al., ICCV 2007): each query replaced by the L2-normalised mean of itself
    and its ``n`` nearest gallery embeddings; search again with the result. ``n=0`` returns the query unchanged.

    ``n`` depends on how many relevant images a query has (Gordo et al. 2017 use 1 or 2 on landmarks); 5 suits
    galleries with tens of relevant images per query. ``neighbors`` (Q, >= n) reuses an earlier search's indices.
    """
    return _expand(query, gallery, n, 0.0, neighbors)


def alpha_query_expansion(
    query: np.ndarray,
    gallery: np.ndarray,
    n: int = 5,
    alpha: float = 3.0,
    neighbors: np.ndarray | None = None,
) -> np.ndarray:
    """alpha-QE (Radenovic et al., TPAMI 2019): the query plus its ``n`` nearest gallery embeddings weighted by
    ``max(similarity, 0) ** alpha`` (the query itself has weight 1), L2-normalised. ``alpha=3`` as in the paper;
    ``alpha=0`` is average QE. ``n=0`` returns the query unchanged.
    """
    return _expand(query, gallery, n, alpha, neighbors)


def database_augmentation(gallery: np.ndarray, k: int = 5, alpha: float = 0.0) -> np.ndarray:
    """Database-side augmentation (Arandjelovic and Zisserman 2012; Gordo et al. 2017): every gallery embedding
    replaced by the L2-normalised sum of itself and its ``k`` nearest other gallery embeddings, weighted by
    ``max(similarity, 0) ** alpha`` (``alpha=0``: plain average, as in Gordo et al.; ``alpha=3``: alpha-DBA of
    Radenovic et al.). Apply to the gallery once, then search (and expand queries) against the result.
    ``k=0`` returns the gallery unchanged.
    """
    gallery = _as_2d("gallery", gallery)
    if k < 0:
        raise ValueError(f"DBA k must be >= 0, got {k}")
    k = min(k, len(gallery) - 1)
    if k <= 0:
        return l2_normalize(gallery)
    idx, _ = cosine_topk(gallery, gallery, k=k + 1)
    # Drop each image itself from its own list (normally rank 0; with duplicates it may sit lower).
    own = idx == np.arange(len(gallery))[:, None]
    has_self = own.any(axis=1)
    keep = np.where(has_self[:, None], ~own, np.arange(k + 1)[None, :] < k)
    others = idx[keep].reshape(len(gallery), k)
    return _expand(gallery, gallery, k, alpha, others)


# --------------------------------------------------------------------------------------------------------------
# Fusion of several models
# --------------------------------------------------------------------------------------------------------------
def _fusion_weights(count: int, weights: Sequence[float] | None) -> np.ndarray:
    if count < 1:
        raise ValueError("fusion needs at least one model's embeddings")
    w = np.ones(count) if weights is None else np.asarray(list(weights), dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(f"{count} models but {w.size} fusion weights; give one weight per model")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"fusion weights must be >= 0 and not all 0, got {w.tolist()}")
    return w


def concat_embeddings(embeddings: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Embedding-level fusion: each model's embeddings L2-normalised, multiplied by sqrt(weight), concatenated
    and L2-normalised again. The cosine similarity of the result is the weighted mean of the models' cosine
    similarities, sum_m w_m cos_m / sum_m w_m, so it ranks as :func:`fuse_scores` does, and it is one embedding
    that indexes, re-ranking and query expansion can use.
    """
    w = _fusion_weights(len(embeddings), weights)
    rows = {len(e) for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"every model must embed the same images; got row counts {sorted(rows)}")
    parts = [l2_normalize(e) * np.float32(np.sqrt(wi)) for e, wi in zip(embeddings, w)]
    return l2_normalize(np.concatenate(parts, axis=1))


def fuse_scores(scores: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Score-level fusion: the weighted sum ``sum_m w_m S_m`` of the models' (Q, G) similarity matrices."""
    w = _fusion_weights(len(scores), weights)
    shapes = {np.shape(s) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"score matrices must have the same shape, got {sorted(shapes)}")
    total = np.zeros(next(iter(shapes)), dtype=np.float32)
    for s, wi in zip(scores, w):
        total += np.float32(wi) * np.asarray(s, dtype=np.float32)
    return total


def fused_score_topk(
    queries: Sequence[np.ndarray],
    galleries: Sequence[np.ndarray],
    k: int = 10,
    weights: Sequence[float] | None = None,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by :func:`fuse_scores` of each model's cosine similarities, computed for ``chunk_size`` queries at
    a time (ties to the lower gallery index). Returns (indices, fused scores)."""
    import torch

    k = check_k(k)
    w = _fusion_weights(len(queries), weights)
    if len(galleries) != len(queries):
        raise ValueError("one gallery embedding array per query embedding array")
    for q, g in zip(queries, galleries):
        check_finite(q, what="query")
        check_finite(g, what="gallery")
    n_query, n_gallery = len(queries[0]), len(galleries[0])
    k_eff = min(k, n_gallery)
    out_idx = np.empty((n_query, k_eff), np.int64)
    out_val = np.empty((n_query, k_eff), np.float32)
    galleries = [l2_normalize(g) for g in galleries]
    for q0 in range(0, n_query, chunk_size):
        block = fuse_scores([l2_normalize(q[q0 : q0 + chunk_size]) @ g.T for q, g in zip(queries, galleries)], w)
        idx, val = topk_from_scores(torch.from_numpy(block), k_eff)
        out_idx[q0 : q0 + len(block)], out_val[q0 : q0 + len(block)] = idx, val
    return out_idx, out_val


# --------------------------------------------------------------------------------------------------------------
# The whole post-search chain, as the pipeline runs it
# --------------------------------------------------------------------------------------------------------------
def rank_gallery(
    queries: Sequence[np.ndarray],
    galleries: Sequence[np.ndarray],
    k: int = 10,
    fusion: str = "concat",
    fusion_weights: Sequence[float] | None = None,
    dba: int = 0,
    qe: str = "none",
    qe_k: int = 5,
    qe_alpha: float = 3.0,
    rerank: str = "none",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    index: str = "exact",
    index_options: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-k gallery indices and scores for one or several models' (query, gallery) embeddings.

    Order: fusion (``concat``: one embedding; ``score``: summed similarities, plain search only) -> DBA on the
    gallery (``dba`` neighbours) -> search with ``index`` -> query expansion (``avg``/``alpha`` over ``qe_k``
    neighbours, then search again) -> k-reciprocal re-ranking of the whole gallery (scores are then
    ``1 - final distance``). Returns (indices, scores, info) where info says what ran (index kind, recall).
    """
    from .index import build_index

    if len(queries) != len(galleries) or not queries:
        raise ValueError("give one query and one gallery embedding array per model")
    if fusion not in FUSION_CHOICES:
        raise ValueError(f"fusion must be one of {FUSION_CHOICES}, not {fusion!r}")
    if qe not in QE_CHOICES:
        raise ValueError(f"qe must be one of {QE_CHOICES}, not {qe!r}")
    if rerank not in RERANK_CHOICES:
        raise ValueError(f"rerank must be one of {RERANK_CHOICES}, not {rerank!r}")
    if qe != "none" and qe_k < 1:
        raise ValueError(f"--qe-k must be at least 1 with --qe {qe}, got {qe_k}")
    info: dict = {}
    if len(queries) > 1 and fusion == "score":
        if dba or qe != "none" or rerank != "none" or index not in ("exact", "flat", "auto"):
            raise ValueError("--fusion score ranks by summed similarities (exact search only); use --fusion concat "
                             "to combine models with --dba, --qe, --rerank or an approximate --index")
        idx, val = fused_score_topk(queries, galleries, k=k, weights=fusion_weights)
        info["index"] = "exact"
        return idx, val, info
    if len(queries) > 1:
        query, gallery = concat_embeddings(queries, fusion_weights), concat_embeddings(galleries, fusion_weights)
    else:
        query, gallery = l2_normalize(queries[0]), l2_normalize(galleries[0])
    if dba:
        gallery = database_augmentation(gallery, k=dba)
    if rerank != "none":
        if qe != "none":
            neighbours, _ = cosine_topk(query, gallery, k=qe_k)
            query = _expand(query, gallery, qe_k, qe_alpha if qe == "alpha" else 0.0, neighbours)
        if index not in ("exact", "auto"):
            info["index_note"] = f"k-reciprocal re-ranking computes exact distances: index {index!r} is not used"
            logger.warning(info["index_note"])
        idx, val = rerank_topk(query, gallery, k=k, k1=k1, k2=k2, lambda_value=lambda_value)
        info["index"] = "exact"
        return idx, val, info
    built = build_index(gallery, kind=index, recall_queries=query if len(query) else None, **(index_options or {}))
    info.update(index=built.kind, index_params=built.params)
    if built.recall_at_10 is not None:
        info["index_recall@10"] = built.recall_at_10
    if built.message:
        info["index_note"] = built.message
    if qe != "none":
        neighbours, _ = built.search(query, k=qe_k)
        query = _expand(query, gallery, qe_k, qe_alpha if qe == "alpha" else 0.0, neighbours)
    idx, val = built.search(query, k=k)
    return idx, val, info


def postprocess_config(
    n_models: int = 1,
    rerank: str = "none",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    qe: str = "none",
    qe_k: int = 5,
    qe_alpha: float = 3.0,
    dba: int = 0,
    index: str = "exact",
    fusion: str = "concat",
    fusion_weights: Sequence[float] | None = None,
) -> dict:
    """Check :func:`rank_gallery`'s options and return the ones that matter, as a run config records them
    (re-ranking parameters only with re-ranking, QE parameters only with QE, fusion only with several models)."""
    from .index import INDEX_CHOICES

    if rerank not in RERANK_CHOICES:
        raise ValueError(f"rerank must be one of {RERANK_CHOICES}, not {rerank!r}")
    if qe not in QE_CHOICES:
        raise ValueError(f"qe must be one of {QE_CHOICES}, not {qe!r}")
    if index not in INDEX_CHOICES:
        raise ValueError(f"index must be one of {INDEX_CHOICES}, not {index!r}")
    if fusion not in FUSION_CHOICES:
        raise ValueError(f"fusion must be one of {FUSION_CHOICES}, not {fusion!r}")
    if int(dba) != dba or dba < 0:
        raise ValueError(f"dba (neighbours per gallery image) must be an integer >= 0, got {dba}")
    config: dict = {"rerank": rerank, "qe": qe, "dba": int(dba), "index": index}
    if rerank != "none":
        _check_params(k1, k2, lambda_value)
        config.update(k1=int(k1), k2=int(k2), **{"lambda": float(lambda_value)})
    if qe != "none":
        if int(qe_k) != qe_k or qe_k < 1:
            raise ValueError(f"qe_k must be a positive integer with qe={qe}, got {qe_k}")
        config["qe_k"] = int(qe_k)
        if qe == "alpha":
            config["qe_alpha"] = float(qe_alpha)
    if fusion_weights is not None and n_models == 1 and len(list(fusion_weights)) != 1:
        raise ValueError(f"{len(list(fusion_weights))} fusion weights for one model; give one --model per weight")
    if n_models > 1:
        config["fusion"] = fusion
        if fusion_weights is not None:
            config["fusion_weights"] = ",".join(f"{w:g}" for w in _fusion_weights(n_models, fusion_weights))
        if fusion == "score" and (dba or qe != "none" or rerank != "none" or index not in ("exact", "flat", "auto")):
            raise ValueError("--fusion score ranks by summed similarities (exact search only); use --fusion concat "
                             "to combine models with --dba, --qe, --rerank or an approximate --index")
    return config


def align_by_path(results: Sequence) -> list:
    """Embedding results of several models over the same files (objects with ``paths`` and ``embeddings`` in
    input order, as :func:`helpers.embedding.extract_embeddings` returns), restricted to the files every model
    could read, in the same order."""
    import dataclasses

    common = set.intersection(*(set(r.paths) for r in results))
    out = []
    for r in results:
        if len(r.paths) == len(common):
            out.append(r)
            continue
        keep = [i for i, path in enumerate(r.paths) if path in common]
        out.append(dataclasses.replace(r, embeddings=r.embeddings[keep], paths=[r.paths[i] for i in keep]))
    return out
