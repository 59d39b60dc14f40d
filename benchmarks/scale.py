"""Large collections: both extraction engines on real photos, and the index kinds the chooser picks at 1M vectors.

Part 1 embeds the same real images (an even spread of ``imagenette-val``) with ``index build --engine local`` and
``--engine ray`` (a local Ray started by the build, ``--workers`` actors): images per second, the Ray engine's
overhead and the largest difference between their float16 vectors. Part 2 fits a mixture to those real embeddings
(PCA to 256 dimensions, then a diagonal Gaussian mixture; not uniform random vectors, on which IVF recall means
nothing), draws ``--vectors`` vectors plus 1,000 held-out queries, and measures each index kind the chooser can pick:
build time, index size, peak memory, queries per second and recall@10 (share of the exact top 10 found).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import PeakMemory, class_folder_images, header, print_table, shared_dataset


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__)
    p.add_argument("--dataset", default="imagenette-val", help="class-folder dataset under ../shared/datasets")
    p.add_argument("--images", type=int, default=2000, help="images embedded by each engine (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="Ray embedding actors (default: %(default)s)")
    p.add_argument("--backend", default="torch", help="local engine backend (torch: the Ray actors' compute)")
    p.add_argument("--vectors", type=int, default=1_000_000, help="index size (default: %(default)s)")
    p.add_argument("--hnsw-vectors", type=int, default=200_000,
                   help="HNSW measured at this size (its build at 1M takes over 30 minutes here)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--max-index-memory", default="1GB")
    p.add_argument("--skip-engines", action="store_true", help="part 2 only (embeddings from --embeddings)")
    p.add_argument("--skip-indexes", action="store_true", help="part 1 only")
    p.add_argument("--embeddings", help="a .npy of real embeddings to fit the mixture to (default: part 1's)")
    p.add_argument("--out", help="also write the figures as JSON here")
    return p.parse_args(argv)


def engines(args, work: Path) -> tuple[list, np.ndarray]:
    """Part 1: the same images through both engines."""
    from helpers.collection import EngineOptions, build_collection
    from helpers.collection.shards import ShardVectors, finished_shards

    files = class_folder_images(shared_dataset(args.dataset), limit=args.images)
    listing = work / "images.txt"
    listing.write_text("\n".join(str(f) for f in files))
    rows, vectors = [], {}
    for engine in ("local", "ray"):
        out = work / engine
        options = EngineOptions(engine=engine, workers=args.workers, backend=args.backend, progress=False)
        start = time.perf_counter()
        result = build_collection(out, list_file=listing, shard_size=500, max_index_memory="4GB", options=options)
        seconds = time.perf_counter() - start
        vectors[engine] = ShardVectors.open(out, finished_shards(out)).load()
        rows.append([engine, len(files), result.embedded, seconds, result.embedded / seconds])
        print(f"{engine}: {result.embedded} images in {seconds:.1f} s", flush=True)
    diff = float(np.abs(vectors["local"] - vectors["ray"]).max())
    for row in rows:
        row += [row[3] / rows[0][3], diff]
    print_table("Extraction, efficientnet-lite0, 224 px (build = embed + write shards + index)",
                ["engine", "images", "embedded", "seconds", "images/s", "time vs local", "max |local - ray|"], rows)
    return rows, vectors["local"]


def mixture(real: np.ndarray, n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors and 1,000 held-out queries drawn from a diagonal Gaussian mixture fitted to the PCA of
    ``real`` (L2-normalised, float16 as the shards store them)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    reduced = PCA(n_components=min(dim, len(real) - 1), random_state=seed).fit_transform(real.astype(np.float64))
    gmm = GaussianMixture(n_components=32, covariance_type="diag", random_state=seed, reg_covar=1e-6).fit(reduced)
    rng = np.random.default_rng(seed)
    total = n + 1000
    labels = rng.choice(len(gmm.weights_), size=total, p=gmm.weights_)
    out = np.empty((total, reduced.shape[1]), dtype=np.float16)
    for start in range(0, total, 100_000):
        lab = labels[start:start + 100_000]
        x = gmm.means_[lab] + rng.standard_normal((len(lab), reduced.shape[1])) * np.sqrt(gmm.covariances_[lab])
        out[start:start + len(lab)] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    return out[:n], out[n:].astype(np.float32)


def measure(plan, data: np.ndarray, queries: np.ndarray, exact: np.ndarray) -> list:
    """Build ``plan`` over ``data``, tune it on the held-out queries, time the searches."""
    import faiss

    from helpers.collection.chooser import build_faiss, recall_at_10, search_plan, tune
    from helpers.collection.shards import ShardVectors

    vectors = ShardVectors([data], np.array([0, len(data)]))
    with PeakMemory(interval=0.2) as memory:
        start = time.perf_counter()
        index = None if plan.kind == "exact" else build_faiss(plan, vectors)
        build = time.perf_counter() - start
    recall = tune(plan, index, vectors, queries, exact)
    start = time.perf_counter()
    found, _ = search_plan(plan, index, vectors, queries, 10)
    qps = len(queries) / (time.perf_counter() - start)
    recall = recall_at_10(found, exact)
    size = len(faiss.serialize_index(index)) if index is not None else data.shape[0] * data.shape[1] * 4
    params = {k: v for k, v in plan.params.items() if k != "pq_bits"}
    return [plan.kind, len(data), json.dumps(params).replace('"', ""), build, size / 2 ** 20, memory.peak_mb,
            qps, recall]


def indexes(args, real: np.ndarray) -> list:
    """Part 2: every index kind on the fitted mixture."""
    from helpers.collection.chooser import IndexPlan, choose_index, exact_topk, hnsw_bytes
    from helpers.collection.shards import ShardVectors

    start = time.perf_counter()
    data, queries = mixture(real, args.vectors, args.dim)
    print(f"drew {len(data):,} vectors of {data.shape[1]} dims from the mixture in {time.perf_counter() - start:.0f} s",
          flush=True)
    start = time.perf_counter()
    exact, _ = exact_topk(queries, ShardVectors([data], np.array([0, len(data)])), 10)
    print(f"exact top 10 of 1,000 queries over {len(data):,} vectors: {time.perf_counter() - start:.0f} s", flush=True)
    chosen = choose_index(len(data), data.shape[1], args.max_index_memory)
    print(f"chooser under --max-index-memory {args.max_index_memory}: {chosen.kind} {chosen.params}", flush=True)
    rows = [measure(chosen, data, queries, exact)]
    print(rows[-1], flush=True)
    rows.append(measure(IndexPlan("exact"), data, queries, exact))
    print(rows[-1], flush=True)
    small = data[: args.hnsw_vectors]
    small_exact, _ = exact_topk(queries, ShardVectors([small], np.array([0, len(small)])), 10)
    hnsw = IndexPlan("hnsw", {"M": 32, "efConstruction": 40}, hnsw_bytes(len(small), small.shape[1]))
    rows.append(measure(hnsw, small, queries, small_exact))
    print(rows[-1], flush=True)
    print_table(f"Indexes over a mixture fitted to real embeddings ({data.shape[1]} dims, float16 shards; 1,000 "
                "held-out queries; IVF-PQ and HNSW re-scored exactly)",
                ["kind", "vectors", "parameters", "build s", "index MiB", "peak build MiB", "queries/s",
                 "recall@10"], rows)
    return rows


def main(argv) -> int:
    args = parse_args(argv)
    header("scale", argv)
    figures: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        if args.skip_engines:
            real = np.load(args.embeddings)
        else:
            figures["engines"], real = engines(args, Path(tmp))
        if args.embeddings and not args.skip_engines:
            np.save(args.embeddings, real)
        if not args.skip_indexes:
            figures["indexes"] = indexes(args, real)
    figures["load_after"] = os.getloadavg()
    print(f"# load average before {figures['load_before']}, after {figures['load_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str))
    return 0
