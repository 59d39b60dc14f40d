"""Scaling: each retrieve stage, query expansion and re-ranking, time and memory against N; a log-log plot (PNG).

Two parts, one figure:

1. ``retrieve`` stages (load model, embed gallery, embed query, search, total) on splits of ``imagenette-val`` of
   growing size (10% queries, 90% gallery), embedding cache off;
2. post-processing on N = Q + G clustered synthetic unit vectors (Q = N / 10, d = 512): exact search, alpha-QE
   (search, expand, search again) and k-reciprocal re-ranking (``helpers.rerank``), time and peak memory rise.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from .common import PeakMemory, header, print_table, shared_dataset, timed

STAGES = ("load_model", "embed_gallery", "embed_query", "search", "total")


def clustered(n: int, dim: int, seed: int, clusters: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def pipeline_part(sizes: list[int], model: str) -> dict[str, list[float]]:
    from helpers.data import split_dataset
    from helpers.pipeline import run_retrieval

    source = shared_dataset("imagenette-val")
    series: dict[str, list[float]] = {s: [] for s in STAGES}
    rows = []
    for n in sizes:
        per_class = max(2, n // 10)
        query = max(1, per_class // 10)
        with tempfile.TemporaryDirectory() as tmp:
            split_dataset(source, Path(tmp) / "split", train_per_class=0, query_per_class=query,
                          gallery_per_class=per_class - query)
            run = run_retrieval(Path(tmp) / "split", model=model, use_cache=False, progress=False)
        for s in STAGES:
            series[s].append(run.timings.get(s, float("nan")))
        total = len(run.query.paths) + len(run.gallery.paths)
        rows.append([total] + [run.timings.get(s) for s in STAGES] + [total / run.timings["total"]])
    print_table(f"retrieve stages against N (seconds; split of {source.name}, cache off, {model})",
                ["N images", *STAGES, "images/s"], rows)
    return series


def postprocess_part(sizes: list[int], dim: int) -> dict[str, list[tuple[float, float]]]:
    from helpers.rerank import alpha_query_expansion, rerank_topk
    from helpers.search import cosine_topk

    series: dict[str, list[tuple[float, float]]] = {"exact search": [], "alpha-QE": [], "k-reciprocal": []}
    rows = []
    for n in sizes:
        x = clustered(n, dim, seed=n)
        q, g = x[: n // 10], x[n // 10 :]
        row = [n]
        for name, fn in (
            ("exact search", lambda: cosine_topk(q, g, k=10)),
            ("alpha-QE", lambda: cosine_topk(alpha_query_expansion(q, g, n=5, alpha=3.0), g, k=10)),
            ("k-reciprocal", lambda: rerank_topk(q, g, k=10)),
        ):
            with PeakMemory() as mem:
                seconds, _ = timed(fn)
            series[name].append((seconds, mem.peak_mb))
            row += [seconds, mem.peak_mb]
        rows.append(row)
    print_table(f"Post-processing against N = Q + G (Q = N/10, d={dim}): seconds and peak memory rise (MiB)",
                ["N", "search s", "search MiB", "alpha-QE s", "alpha-QE MiB", "k-reciprocal s", "k-reciprocal MiB"],
                rows)
    return series


def plot(pipe_sizes, pipe, post_sizes, post, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.viz import save_figure

    panels = (1 if pipe else 0) + (1 if post else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax_i = 0
    if pipe:
        ax = axes[0][ax_i]
        ax_i += 1
        for stage, values in pipe.items():
            ax.plot(pipe_sizes, values, marker="o", label=stage)
        ax.set(xscale="log", yscale="log", xlabel="images (query + gallery)", ylabel="seconds",
               title="retrieve stages (cache off)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if post:
        ax = axes[0][ax_i]
        for name, values in post.items():
            ax.plot(post_sizes, [v[0] for v in values], marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="N = queries + gallery", ylabel="seconds",
               title="search and post-processing")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,500,1000,2000,3900", help="images per retrieve run")
    parser.add_argument("--post-sizes", default="1000,2000,5000,10000,20000", help="N for QE and re-ranking")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-post", action="store_true")
    parser.add_argument("--out", default="visualizations/benchmark_scaling.png", help="PNG path (default: %(default)s)")
    args = parser.parse_args(argv)
    header("scaling", argv or [])
    sizes = [int(s) for s in args.sizes.split(",") if s]
    post_sizes = [int(s) for s in args.post_sizes.split(",") if s]
    pipe = None if args.skip_pipeline else pipeline_part(sizes, args.model)
    post = None if args.skip_post else postprocess_part(post_sizes, args.dim)
    if pipe or post:
        print(f"\nplot: {plot(sizes, pipe, post_sizes, post, Path(args.out))}")
    return 0
