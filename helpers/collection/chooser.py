"""The FAISS index of a collection, chosen to fit a memory budget, as autofaiss does: exact search below about
100,000 vectors, an HNSW graph while its float32 vectors and links fit, then IVF-PQ with an OPQ rotation. The
approximate indexes' candidates are re-scored exactly from the memory-mapped float16 shards, and the recall@10
(share of the exact top 10 found) is measured on held-out queries; ``nprobe`` / ``efSearch`` are raised until it
reaches :data:`RECALL_TARGET`.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .shards import ShardVectors

logger = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "ivfpq")
#: Exact search up to this many vectors (as :mod:`helpers.index`'s ``auto``): a brute-force pass is fast there.
EXACT_UP_TO = 100_000
#: HNSW links per node (M=32; Malkov and Yashunin, TPAMI 2020), FAISS's default efConstruction of 40.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
EF_SEARCH_STEPS = (64, 128, 256, 512)
NPROBE_STEPS = (8, 16, 32, 64, 128, 256)
#: Candidates an IVF-PQ search re-scores exactly per query: max(RESCORE_FACTOR * k, RESCORE_MIN).
RESCORE_FACTOR, RESCORE_MIN = 10, 100
RECALL_TARGET = 0.95
#: OPQ rotation training (Ge et al., CVPR 2013): 10 alternations on up to 32,768 vectors (FAISS's defaults are 50 on
#: 65,536; the rotation converges early, and the re-scoring hides the rest of the quantisation error).
OPQ_NITER, OPQ_TRAIN_POINTS = 10, 32768
RECALL_QUERIES = 1000
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_memory(text: str | int) -> int:
    """``"4GB"``, ``"512M"``, ``"1.5G"`` or a number of bytes -> bytes (binary units: 1GB = 2^30 bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read the memory size {text!r} (examples: 4GB, 512MB, 1.5G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass
class IndexPlan:
    """What to build: ``kind`` and its ``params``, with the estimated memory in bytes."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    memory_bytes: int = 0


def hnsw_bytes(n: int, d: int, m: int = HNSW_M) -> int:
    """HNSW: float32 vectors plus 2M int32 links at level 0 (and about 1/M as many above), plus 10%."""
    return int(n * (4 * d + 2 * m * 4 * (1 + 1 / m)) * 1.1)


def ivfpq_plan(n: int, d: int, max_memory: int) -> IndexPlan | None:
    """The largest OPQ + IVF-PQ code that fits: ``m`` bytes a vector (plus an 8-byte id), ``nlist`` near sqrt(N)
    rounded to a power of two (and at least 39 training vectors a list, FAISS's minimum)."""
    nlist = 2 ** max(4, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))
    for m in (d // 4, 64, 48, 32, 24, 16, 8, 4):
        if m < 1 or d % m or m > 128:
            continue
        memory = int(n * (m + 8) * 1.1 + nlist * d * 4 + d * d * 4)
        if memory <= max_memory:
            return IndexPlan("ivfpq", {"opq": m, "nlist": nlist, "pq_m": m, "pq_bits": 8}, memory)
    return None


def choose_index(n: int, d: int, max_memory: int | str) -> IndexPlan:
    """The index for ``n`` vectors of dimension ``d`` within ``max_memory`` (bytes or ``"4GB"``)."""
    budget = parse_memory(max_memory)
    if n <= EXACT_UP_TO and n * d * 4 <= budget:
        return IndexPlan("exact", {}, n * d * 4)
    if hnsw_bytes(n, d) <= budget and n >= 2:
        return IndexPlan("hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}, hnsw_bytes(n, d))
    plan = ivfpq_plan(n, d, budget)
    if plan is None or n < 39 * 16:
        raise ValueError(f"no index of {n} vectors of dimension {d} fits in {budget / 2 ** 30:.2f} GiB "
                         f"(IVF-PQ needs at least {n * 12 / 2 ** 30:.2f} GiB); raise --max-index-memory")
    return plan


def _faiss():
    import faiss

    return faiss


def build_faiss(plan: IndexPlan, vectors: ShardVectors, seed: int = 0):
    """Train (IVF-PQ, on a sample) and fill the FAISS index of ``plan`` from ``vectors`` (added in chunks)."""
    faiss = _faiss()
    d = vectors.dim
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, plan.params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = plan.params["efConstruction"]
    elif plan.kind == "ivfpq":
        p = plan.params
        index = faiss.index_factory(d, f"OPQ{p['opq']},IVF{p['nlist']},PQ{p['pq_m']}x{p['pq_bits']}",
                                    faiss.METRIC_INNER_PRODUCT)
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter = int(p.get("opq_niter", OPQ_NITER))
        opq.max_train_points = OPQ_TRAIN_POINTS
        rng = np.random.default_rng(seed)
        n_train = min(len(vectors), max(64 * p["nlist"], 65536))
        sample = np.sort(rng.choice(len(vectors), size=n_train, replace=False))
        faiss.extract_index_ivf(index).cp.seed = seed
        index.train(np.ascontiguousarray(vectors.take(sample)))
    else:
        raise ValueError(f"no FAISS index for kind {plan.kind!r}")
    add_vectors(index, vectors)
    return index


def add_vectors(index, vectors: ShardVectors, start: int = 0) -> None:
    """Add ``vectors`` rows from ``start`` on to ``index`` (FAISS numbers them in order)."""
    for begin, block in vectors.chunks():
        if begin + len(block) <= start:
            continue
        index.add(np.ascontiguousarray(block[max(0, start - begin):]))


def set_search_param(index, kind: str, value: int) -> None:
    """``efSearch`` of an HNSW, ``nprobe`` of an IVF-PQ."""
    if kind == "hnsw":
        index.hnsw.efSearch = int(value)
    elif kind == "ivfpq":
        _faiss().extract_index_ivf(index).nprobe = int(value)


def exact_topk(queries: np.ndarray, vectors: ShardVectors, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top ``k`` over every row of ``vectors`` (chunked), best first; equal scores rank
    the lower row first."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)
    for begin, block in vectors.chunks(16384):
        scores = queries @ block.T
        kk = min(k, scores.shape[1])
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        all_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        all_ids = np.concatenate([best_ids, part + begin], axis=1)
        order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]
        best_ids = np.take_along_axis(all_ids, order, axis=1)
        best_scores = np.take_along_axis(all_scores, order, axis=1)
    return best_ids, best_scores


def rescore(queries: np.ndarray, candidates: np.ndarray, vectors: ShardVectors, k: int):
    """Exact inner products of each query with its candidate rows (-1 = none), top ``k``, best first."""
    valid = candidates >= 0
    rows = vectors.take(np.where(valid, candidates, 0))
    scores = np.einsum("qd,qcd->qc", queries.astype(np.float32), rows)
    scores[~valid] = -np.inf
    order = np.lexsort((candidates, -scores), axis=1)[:, :k]
    return np.take_along_axis(candidates, order, axis=1), np.take_along_axis(scores, order, axis=1)


def search_plan(plan: IndexPlan, index, vectors: ShardVectors, queries: np.ndarray, k: int,
                exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` rows for each query under ``plan`` (exact, HNSW, or IVF-PQ re-scored exactly). With ``exclude``
    (one row per query), that row is left out of the query's results (a held-out query)."""
    extra = 0 if exclude is None else 1
    k_all = min(k + extra, len(vectors))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if plan.kind == "exact":
        ids, scores = exact_topk(queries, vectors, k_all)
    elif plan.kind == "hnsw":
        scores, ids = index.search(queries, k_all)
        ids, scores = rescore(queries, ids.astype(np.int64), vectors, k_all)
    else:
        pool = min(len(vectors), max(RESCORE_FACTOR * k_all, RESCORE_MIN))
        _, candidates = index.search(queries, pool)
        ids, scores = rescore(queries, candidates.astype(np.int64), vectors, k_all)
    if exclude is not None:
        keep = ids != exclude[:, None]
        ids = np.stack([row[mask][:k] for row, mask in zip(ids, keep)])
        scores = np.stack([row[mask][:k] for row, mask in zip(scores, keep)])
    return ids[:, :k], scores[:, :k]


def held_out_queries(vectors: ShardVectors, n: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    """Rows used as held-out queries (each is left out of its own results)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(vectors), size=min(n, len(vectors)), replace=False))


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of the exact top 10 found in the approximate top 10."""
    k = exact.shape[1]
    return sum(len(set(a[:k]) & set(e)) for a, e in zip(found, exact)) / max(1, k * len(exact))


def tune(plan: IndexPlan, index, vectors: ShardVectors, queries: np.ndarray, exact: np.ndarray,
         exclude: np.ndarray | None = None) -> float:
    """Raise efSearch / nprobe until recall@10 reaches :data:`RECALL_TARGET` (or the last step); sets the
    chosen value in ``plan.params`` and returns the recall measured with it."""
    if plan.kind == "exact":
        return 1.0
    name, steps = ("efSearch", EF_SEARCH_STEPS) if plan.kind == "hnsw" else ("nprobe", NPROBE_STEPS)
    if plan.kind == "ivfpq":
        steps = tuple(s for s in steps if s <= plan.params["nlist"]) or (plan.params["nlist"],)
    recall = 0.0
    for value in steps:
        set_search_param(index, plan.kind, value)
        start = time.perf_counter()
        found, _ = search_plan(plan, index, vectors, queries, exact.shape[1], exclude)
        recall = recall_at_10(found, exact)
        plan.params[name] = value
        logger.info("%s %s=%d: recall@10 %.4f (%.1f queries/s)", plan.kind, name, value, recall,
                    len(queries) / max(1e-9, time.perf_counter() - start))
        if recall >= RECALL_TARGET:
            break
    return recall
