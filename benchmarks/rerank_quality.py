"""Re-ranking, query expansion, DBA, TTA and indexes: quality against plain cosine, and re-ranking cost vs dense.

Two parts, both printed as Markdown tables:

1. Quality. Competition-layout splits of ``imagenette-val`` and ``cifar10-test`` (``--query-per-class``,
   ``--gallery-per-class``, seed 0) embedded with the default model (``efficientnet-lite0``, ImageNet weights);
   each technique's ``hit@1``, ``map@10`` and ``weighted_score`` next to plain cosine search, and the difference.
2. Cost. k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) at N = queries + gallery = 2,000, 5,000, 10,000
   (512-d clustered unit vectors, Q = N/5): :func:`helpers.rerank.k_reciprocal` against the dense reference of
   ``tests/test_rerank.py`` (the authors' published algorithm with N x N matrices, distances from
   ``scipy.spatial.distance.cdist`` included), each in a fresh subprocess, wall time and peak resident memory
   above the process's state before the call; their ratios come from the same run. ``--sparse-only N`` adds sizes
   measured for the sparse version alone (the dense one needs O(N^2) memory), e.g. 20,000.

    python -m benchmarks rerank-quality
    python -m benchmarks rerank-quality --skip-cost --query-per-class 10 --gallery-per-class 50
    python -m benchmarks rerank-quality --skip-quality --sizes 2000 5000 10000 --sparse-only 20000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))
DATASETS = ("imagenette-val", "cifar10-test")
TECHNIQUES = {
    # name: (tta, rank_gallery options)
    "plain cosine": ("none", {}),
    "TTA flip": ("flip", {}),
    "TTA multiscale": ("multiscale", {}),
    "k-reciprocal (20, 6, 0.3)": ("none", {"rerank": "kreciprocal"}),
    "average QE (n=5)": ("none", {"qe": "avg", "qe_k": 5}),
    "alpha-QE (n=5, alpha=3)": ("none", {"qe": "alpha", "qe_k": 5}),
    "DBA (k=5) + alpha-QE": ("none", {"dba": 5, "qe": "alpha", "qe_k": 5}),
    "DBA (k=5)": ("none", {"dba": 5}),
    "flip + alpha-QE + k-reciprocal": ("flip", {"qe": "alpha", "qe_k": 5, "rerank": "kreciprocal"}),
    "HNSW index (M=32, ef=128)": ("none", {"index": "hnsw"}),
}
METRICS = ("hit@1", "map@10", "weighted_score")


# --------------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------------
def _split(name: str, query_per_class: int, gallery_per_class: int, work: Path) -> Path:
    from helpers.data import split_dataset

    out = work / f"{name}-q{query_per_class}-g{gallery_per_class}-seed0"
    if not (out / "test" / "ground_truth.json").is_file():
        split_dataset(SHARED / name, out, train_per_class=0, query_per_class=query_per_class,
                      gallery_per_class=gallery_per_class, seed=0)
    return out


def quality(datasets, query_per_class: int, gallery_per_class: int, work: Path) -> list[dict]:
    from helpers.data import load_retrieval_set
    from helpers.embedding import EmbeddingCache, extract_embeddings
    from helpers.metrics import evaluate_rankings
    from helpers.models import DEFAULT_MODEL, load_model
    from helpers.rerank import rank_gallery

    model = load_model(DEFAULT_MODEL, weights="pretrained", device="cpu")
    cache = EmbeddingCache()
    rows = []
    for name in datasets:
        if not (SHARED / name).is_dir():
            print(f"skipping {name}: {SHARED / name} is absent", file=sys.stderr)
            continue
        data = load_retrieval_set(_split(name, query_per_class, gallery_per_class, work))
        embedded = {}
        for technique, (tta, options) in TECHNIQUES.items():
            if tta not in embedded:
                q = extract_embeddings(model, data.query_paths, device="cpu", cache=cache, tta=tta, desc=f"{name} query {tta}")
                g = extract_embeddings(model, data.gallery_paths, device="cpu", cache=cache, tta=tta, desc=f"{name} gallery {tta}")
                embedded[tta] = (q, g)
            q, g = embedded[tta]
            t0 = time.perf_counter()
            idx, _, _ = rank_gallery([q.embeddings], [g.embeddings], k=10, **options)
            seconds = time.perf_counter() - t0
            names = g.names
            rankings = {qn: [names[j] for j in row] for qn, row in zip(q.names, idx)}
            metrics = evaluate_rankings(rankings, data.ground_truth, k=10).metrics
            rows.append({"dataset": name, "technique": technique, "seconds": seconds,
                         "queries": len(q.names), "gallery": len(names), **{m: metrics[m] for m in METRICS}})
    return rows


def print_quality(rows: list[dict]) -> None:
    base = {r["dataset"]: r for r in rows if r["technique"] == "plain cosine"}
    print("| data (queries x gallery) | technique | hit@1 | map@10 | weighted_score | d hit@1 | d map@10 | d score | "
          "post-processing s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base[r["dataset"]]
        d = {m: r[m] - b[m] for m in METRICS}
        print(f"| {r['dataset']} ({r['queries']} x {r['gallery']}) | {r['technique']} | {r['hit@1']:.3f} | "
              f"{r['map@10']:.3f} | {r['weighted_score']:.1f} | {d['hit@1']:+.3f} | {d['map@10']:+.3f} | "
              f"{d['weighted_score']:+.1f} | {r['seconds']:.2f} |")


# --------------------------------------------------------------------------------------------------------------
# Cost of the re-ranking (each measurement in a fresh subprocess)
# --------------------------------------------------------------------------------------------------------------
def _clustered(n: int, d: int = 512, seed: int = 0):
    import numpy as np

    from helpers.embedding import l2_normalize

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 50), d))
    return l2_normalize(centres[rng.integers(0, len(centres), n)] + 1.5 * rng.standard_normal((n, d)))


def _dense_reference():
    spec = importlib.util.spec_from_file_location("_dense_reference", ROOT / "tests" / "test_rerank.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Reset the peak resident size to the current one (Linux ``clear_refs``) and return it in kB.

    ``ru_maxrss`` cannot serve: Linux carries the parent's peak into a subprocess across fork and exec."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kb("VmRSS") or 0
    except OSError:
        return _status_kb("VmHWM") or 0


def _measure(method: str, n: int, out: str) -> dict:
    """Runs inside the subprocess: data first, then the peak RSS added by the re-ranking."""
    x = _clustered(n)
    n_query = n // 5
    query, gallery = x[:n_query], x[n_query:]
    if method == "dense":
        reference = _dense_reference()
    else:
        from helpers.rerank import k_reciprocal
    import scipy.sparse  # noqa: F401 - library imports are not part of the measurement
    import scipy.spatial.distance  # noqa: F401

    before = _start_peak()
    t0 = time.perf_counter()
    if method == "dense":
        result = reference.dense_reference(query, gallery)
    else:
        result = k_reciprocal(query, gallery)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") or 0
    import numpy as np

    np.save(out, result)
    return {"method": method, "n": n, "seconds": seconds, "extra_mb": (peak - before) / 1024, "path": out,
            "result_mb": result.nbytes / 2**20}


def _run_measure(method: str, n: int, folder: str) -> dict:
    out = os.path.join(folder, f"{method}-{n}.npy")
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.rerank_quality import _measure; "
            f"print('RESULT ' + json.dumps(_measure({method!r}, {n}, {out!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{method} N={n} failed:\n{proc.stderr[-2000:]}")


def cost(sizes, sparse_only) -> list[dict]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            dense = _run_measure("dense", n, folder)
            sparse = _run_measure("sparse", n, folder)
            diff = float(np.abs(np.load(dense["path"]) - np.load(sparse["path"])).max())
            rows.append({"n": n, "dense": dense, "sparse": sparse, "max_abs_diff": diff})
            print(f"N={n}: dense {dense['seconds']:.1f} s {dense['extra_mb']:.0f} MB, sparse {sparse['seconds']:.1f} s "
                  f"{sparse['extra_mb']:.0f} MB, max abs difference {diff:.1e}", file=sys.stderr)
        for n in sparse_only:
            rows.append({"n": n, "dense": None, "sparse": _run_measure("sparse", n, folder)})
    return rows


def print_cost(rows: list[dict]) -> None:
    print("| N (Q = N/5, 512-d) | dense s | sparse s | time ratio dense/sparse | dense extra MB | sparse extra MB | "
          "memory ratio dense/sparse | (Q, G) result MB | max abs difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, d = r["sparse"], r["dense"]
        if d is None:
            print(f"| {r['n']:,} | - | {s['seconds']:.1f} | - | - | {s['extra_mb']:.0f} | - | {s['result_mb']:.0f} | - |")
            continue
        print(f"| {r['n']:,} | {d['seconds']:.1f} | {s['seconds']:.1f} | {d['seconds'] / s['seconds']:.1f}x | "
              f"{d['extra_mb']:.0f} | {s['extra_mb']:.0f} | {d['extra_mb'] / max(s['extra_mb'], 1):.1f}x | "
              f"{s['result_mb']:.0f} | {r['max_abs_diff']:.1e} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks rerank-quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--query-per-class", type=int, default=10)
    parser.add_argument("--gallery-per-class", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "retrieval-bench-splits",
                        help="where the splits are written (reused; the embedding cache keys on their paths)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 5000, 10000])
    parser.add_argument("--sparse-only", type=int, nargs="*", default=[], metavar="N")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    import torch

    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}")
    if not args.skip_quality:
        rows = quality(args.datasets, args.query_per_class, args.gallery_per_class, args.work)
        if rows:
            print_quality(rows)
            print()
    if not args.skip_cost:
        print_cost(cost(args.sizes, args.sparse_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
