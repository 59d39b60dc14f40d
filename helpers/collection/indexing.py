"""Building, extending and reading the FAISS index of a collection folder (``INDEX_DIR/index.faiss``), described
in the manifest's ``index`` entry: kind, parameters, the shards it covers, its size and its measured recall@10."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import write_bytes
from .chooser import (IndexPlan, build_faiss, add_vectors, choose_index, exact_topk, held_out_queries, parse_memory,
                      set_search_param, tune)
from .shards import ShardVectors, finished_shards

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"


def load_faiss(index_dir: str | os.PathLike, record: dict[str, Any]):
    """The FAISS index the manifest ``record`` describes (None for exact search), search parameter set."""
    if record["kind"] == "exact":
        return None
    import faiss

    index = faiss.read_index(str(Path(index_dir) / record.get("file", INDEX_FILE)))
    param = record["params"].get("efSearch" if record["kind"] == "hnsw" else "nprobe")
    if param:
        set_search_param(index, record["kind"], param)
    return index


def _extendable(record: dict[str, Any] | None, numbers: list[int], plan: IndexPlan) -> bool:
    """An approximate index can take the new shards when it covers a prefix of them and the chooser still picks
    its kind for the new size (the IVF-PQ's training sample then stays representative)."""
    if not record or record["kind"] == "exact" or record["kind"] != plan.kind:
        return False
    covered = list(record.get("shards", []))
    return covered == numbers[: len(covered)] and len(covered) < len(numbers)


def refresh_index(index_dir: str | os.PathLike, manifest: dict[str, Any], max_memory: int | str,
                  seed: int = 0) -> dict[str, Any]:
    """Index every finished shard: extend the existing approximate index with new shards where possible, else
    choose and build anew; measure recall@10 on held-out queries; write ``index.faiss``. Returns the manifest's
    new ``index`` entry (not yet written)."""
    numbers = finished_shards(index_dir)
    vectors = ShardVectors.open(index_dir, numbers)
    n, d = len(vectors), vectors.dim or int(manifest["model"]["dim"])
    record = manifest.get("index")
    if n == 0:
        return {"kind": "exact", "params": {}, "shards": numbers, "vectors": 0, "recall_at_10": None}
    if record and record.get("vectors") == n and record.get("shards") == numbers:
        return record  # nothing new: the index on disk stands, whatever memory limit is given now
    plan = choose_index(n, d, max_memory)
    start = time.perf_counter()
    if _extendable(record, numbers, plan):
        index = load_faiss(index_dir, record)
        add_vectors(index, vectors, start=int(record["vectors"]))
        plan = IndexPlan(record["kind"], dict(record["params"]), plan.memory_bytes)
        how = "extended"
    else:
        index = None if plan.kind == "exact" else build_faiss(plan, vectors, seed=seed)
        how = "built"
    build_seconds = time.perf_counter() - start
    queries = held_out_queries(vectors, seed=seed)
    query_vectors = vectors.take(queries)
    k = min(10, n - 1)
    recall = None
    if k >= 1:
        exact, _ = exact_topk(query_vectors, vectors, k + 1)
        exact = np.stack([row[row != q][:k] for row, q in zip(exact, queries)])
        recall = tune(plan, index, vectors, query_vectors, exact, exclude=queries)
    size = 0
    if index is not None:
        import faiss

        serialized = faiss.serialize_index(index)  # once: a large HNSW is GBs
        size = len(serialized)
        write_bytes(Path(index_dir) / INDEX_FILE, serialized)
    logger.info("%s a %s index over %d vectors in %.1f s; recall@10 on %d held-out queries: %s", how, plan.kind,
                n, build_seconds, len(queries), "n/a" if recall is None else f"{recall:.4f}")
    return {
        "kind": plan.kind, "params": plan.params, "file": INDEX_FILE if index is not None else None,
        "shards": numbers, "vectors": n, "dim": d, "memory_bytes": size or n * d * 4,
        "estimated_memory_bytes": plan.memory_bytes, "max_index_memory": parse_memory(max_memory),
        "recall_at_10": recall, "recall_queries": len(queries), "recall_note":
            "each query is a collection vector left out of its own results; share of the exact top 10 found",
        "build_seconds": round(build_seconds, 3),
        "rescored": plan.kind != "exact",
    }
