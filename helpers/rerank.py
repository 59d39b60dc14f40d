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

from .config import FUSION_CHOICES, QE_CHOICES, RERANK_CHOICES, RetrievalConfig, postprocess_defaults  # noqa: F401
from .embedding import l2_normalize
from .postprocess import PostprocessChain, PostProcessor, RetrievalResults
from .search import check_finite, check_k, cosine_topk, topk_from_scores

logger = logging.getLogger(__name__)

#: Options of :func:`rank_gallery` as a run config records them, with their defaults (from
#: :class:`helpers.config.RetrievalConfig`, the only place that holds them).
POSTPROCESS_DEFAULTS = postprocess_defaults()

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
# The post-search chain as steps (helpers.postprocess), as the pipeline runs it
# --------------------------------------------------------------------------------------------------------------
class L2Normalize(PostProcessor):
    """One model's embeddings L2-normalised (the first step when there is no fusion)."""

    name = "normalize"

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        results.queries = [l2_normalize(q) for q in results.queries]
        results.galleries = [l2_normalize(g) for g in results.galleries]
        return results


class EmbeddingFusion(PostProcessor):
    """Several models' embeddings fused into one by :func:`concat_embeddings` (weighted mean of the cosines)."""

    name = "fusion"

    def __init__(self, weights: Sequence[float] | None = None):
        self.weights = None if weights is None else [float(w) for w in weights]

    def params(self) -> dict:
        return {"mode": "concat", "weights": self.weights}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        results.queries = [concat_embeddings(results.queries, self.weights)]
        results.galleries = [concat_embeddings(results.galleries, self.weights)]
        return results


class ScoreFusion(PostProcessor):
    """Ranks by the weighted sum of the models' cosine similarities (:func:`fused_score_topk`); exact search, final."""

    name = "fusion"

    def __init__(self, weights: Sequence[float] | None = None):
        self.weights = None if weights is None else [float(w) for w in weights]

    def params(self) -> dict:
        return {"mode": "score", "weights": self.weights}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        results.ranked(*fused_score_topk(results.queries, results.galleries, k=check_k(k, "--k"),
                                         weights=self.weights))
        results.info["index"] = "exact"
        return results


class DatabaseAugmentation(PostProcessor):
    """DBA (Arandjelovic and Zisserman, CVPR 2012; Gordo et al., IJCV 2017): each gallery embedding replaced by
    the normalised sum of itself and its ``k`` nearest gallery neighbours weighted by ``sim ** alpha``
    (:func:`database_augmentation`; ``alpha=0``, the plain average, as Gordo et al.)."""

    name = "dba"

    def __init__(self, k: int = 5, alpha: float = 0.0):
        self.k, self.alpha = int(k), float(alpha)

    def params(self) -> dict:
        return {"k": self.k, "alpha": self.alpha}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        results.galleries = [database_augmentation(results.gallery, k=self.k, alpha=self.alpha)]
        return results


class IndexSearch(PostProcessor):
    """Top-k by cosine similarity with a gallery index (:func:`helpers.index.build_index`: exact, flat, hnsw, ivf,
    auto); the index is kept for later steps and its kind, parameters and measured recall go into ``info``."""

    name = "search"

    def __init__(self, index: str = "exact", options: dict | None = None):
        self.index, self.options = index, dict(options or {})

    def params(self) -> dict:
        return {"index": self.index, **self.options}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        from .index import build_index

        query, gallery = results.query, results.gallery
        built = build_index(gallery, kind=self.index, recall_queries=query if len(query) else None, **self.options)
        results.searcher = built
        results.info.update(index=built.kind, index_params=built.params)
        if built.recall_at_10 is not None:
            results.info["index_recall@10"] = built.recall_at_10
        if built.message:
            results.info["index_note"] = built.message
        results.ranked(*built.search(query, k=check_k(k, "--k")))
        return results


class QueryExpansion(PostProcessor):
    """Query expansion over the ``n`` nearest gallery embeddings: average QE (Chum et al., ICCV 2007; ``alpha=0``)
    or alpha-QE (Radenovic et al., TPAMI 2019; ``alpha=3``). Neighbours come from the search step's index (exact
    search without one); an existing ranking is refreshed with the expanded queries."""

    name = "qe"

    def __init__(self, mode: str = "alpha", n: int = 5, alpha: float = 3.0):
        self.mode, self.n, self.alpha = mode, int(n), float(alpha) if mode == "alpha" else 0.0

    def params(self) -> dict:
        return {"mode": self.mode, "n": self.n, "alpha": self.alpha}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        query, gallery = results.query, results.gallery
        if results.searcher is not None:
            neighbours, _ = results.searcher.search(query, k=self.n)
        else:
            neighbours, _ = cosine_topk(query, gallery, k=self.n)
        results.queries = [_expand(query, gallery, self.n, self.alpha, neighbours)]
        if results.indices is not None:
            search = results.searcher.search if results.searcher is not None else (
                lambda q, k: cosine_topk(q, gallery, k=k))
            results.ranked(*search(results.queries[0], k=check_k(k, "--k")))
        return results


class KReciprocalRerank(PostProcessor):
    """k-reciprocal re-ranking of the whole gallery (Zhong et al., CVPR 2017; k1=20, k2=6, lambda=0.3), scores
    ``1 - final distance`` (:func:`rerank_topk`). It computes exact distances: an approximate ``index`` is noted
    as unused."""

    name = "kreciprocal"

    def __init__(self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, index: str = "exact"):
        _check_params(k1, k2, lambda_value)
        self.k1, self.k2, self.lambda_value, self.index = int(k1), int(k2), float(lambda_value), index

    def params(self) -> dict:
        return {"k1": self.k1, "k2": self.k2, "lambda": self.lambda_value}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:
        if self.index not in ("exact", "auto"):
            results.info["index_note"] = (f"k-reciprocal re-ranking computes exact distances: index {self.index!r} "
                                          "is not used")
            logger.warning(results.info["index_note"])
        results.ranked(*rerank_topk(results.query, results.gallery, k=check_k(k, "--k"), k1=self.k1, k2=self.k2,
                                    lambda_value=self.lambda_value))
        results.info["index"] = "exact"
        return results


def build_postprocess_chain(config: RetrievalConfig, index_options: dict | None = None) -> PostprocessChain:
    """The steps of ``config`` in the documented order: fusion (``concat``: one embedding; ``score``: summed
    similarities, final) or normalisation -> DBA -> search with ``config.index`` (skipped with re-ranking, which
    searches exactly itself) -> query expansion -> k-reciprocal re-ranking."""
    n_models = len(config.models)
    if n_models > 1 and config.fusion == "score":
        return PostprocessChain([ScoreFusion(config.fusion_weights)])
    steps: list[PostProcessor] = [EmbeddingFusion(config.fusion_weights) if n_models > 1 else L2Normalize()]
    if config.dba:
        steps.append(DatabaseAugmentation(k=config.dba))
    if config.rerank == "none":
        steps.append(IndexSearch(config.index, index_options))
    if config.qe != "none":
        steps.append(QueryExpansion(config.qe, n=config.qe_k, alpha=config.qe_alpha))
    if config.rerank != "none":
        steps.append(KReciprocalRerank(config.k1, config.k2, config.lambda_value, index=config.index))
    return PostprocessChain(steps)


def _options_config(n_models: int, **options) -> RetrievalConfig:
    """A :class:`RetrievalConfig` holding only post-processing options (models named by position), checked."""
    if n_models < 1:
        raise ValueError("give one query and one gallery embedding array per model")
    return RetrievalConfig(model=[f"model-{i}" for i in range(n_models)], **options)


def rank_gallery(
    queries: Sequence[np.ndarray],
    galleries: Sequence[np.ndarray],
    k: int = 10,
    fusion: str = POSTPROCESS_DEFAULTS["fusion"],
    fusion_weights: Sequence[float] | None = None,
    dba: int = POSTPROCESS_DEFAULTS["dba"],
    qe: str = POSTPROCESS_DEFAULTS["qe"],
    qe_k: int = POSTPROCESS_DEFAULTS["qe_k"],
    qe_alpha: float = POSTPROCESS_DEFAULTS["qe_alpha"],
    rerank: str = POSTPROCESS_DEFAULTS["rerank"],
    k1: int = POSTPROCESS_DEFAULTS["k1"],
    k2: int = POSTPROCESS_DEFAULTS["k2"],
    lambda_value: float = POSTPROCESS_DEFAULTS["lambda"],
    index: str = POSTPROCESS_DEFAULTS["index"],
    index_options: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-k gallery indices and scores for one or several models' (query, gallery) embeddings: the chain of
    :func:`build_postprocess_chain` (fusion -> DBA -> search with ``index`` -> query expansion -> k-reciprocal
    re-ranking, scores then ``1 - final distance``). Returns (indices, scores, info) where info says what ran
    (index kind, recall). ``ValueError`` for ``k < 1`` or an invalid option."""
    if len(queries) != len(galleries) or not len(queries):
        raise ValueError("give one query and one gallery embedding array per model")
    check_k(k, "--k")
    config = _options_config(len(queries), k=k, fusion=fusion, fusion_weights=fusion_weights, dba=dba, qe=qe,
                             qe_k=qe_k, qe_alpha=qe_alpha, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value,
                             index=index)
    chain = build_postprocess_chain(config, index_options)
    results = chain.run(RetrievalResults(list(queries), list(galleries)), k)
    return results.indices, results.scores, results.info


def postprocess_config(n_models: int = 1, **options) -> dict:
    """Check :func:`rank_gallery`'s options (those of :class:`helpers.config.RetrievalConfig`) and return the ones
    that take effect, as a run config records them (:meth:`RetrievalConfig.postprocess_options`)."""
    return _options_config(n_models, **options).postprocess_options()


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
