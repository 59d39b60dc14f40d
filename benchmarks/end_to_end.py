"""End to end: ``retrieve --no-cache`` on a real split vs a naive script, start-up included; cold/warm stages.

A split of ``imagenette-val`` (default 20 queries + 180 gallery images per class: 2,000 images) is written to a
temporary folder. Measured in one run, each as a fresh process (interpreter start-up, imports and model loading
included): (1) a naive script that opens, preprocesses and embeds one image at a time with the same model, then
ranks with one matrix product; (2) ``python -m helpers retrieve --no-cache``; (3) ``retrieve`` with an empty
embedding cache (cold) and (4) again (warm), with the run's per-stage timings from its metrics JSON. One untimed
``retrieve`` runs first so that the ONNX export and the int8 calibration that the default options build once are on
disk (as after any earlier run). The ratio to check is ``retrieve --no-cache`` over the naive script (goal: 4x on a
quiet 2-core machine). Then the retrieval metrics of float32 and int8 on the same split (the goal: hit@1 and map@10
within 0.01), computed in this process with ``extract_embeddings(precision=...)``, with the agreement that ``auto``
judged by (``--fresh-export`` calibrates on this split's gallery, e.g. ``--source ../shared/datasets/cifar10-test``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import header, print_table, shared_dataset

NAIVE_SCRIPT = r'''
import json, sys
import numpy as np, torch
from helpers.data import load_image, load_retrieval_set
from helpers.models import load_model
data, out, model_name = sys.argv[1], sys.argv[2], sys.argv[3]
dataset = load_retrieval_set(data)
model = load_model(model_name)
transform = model.transform()
def embed(paths):
    rows = []
    with torch.inference_mode():
        for p in paths:
            v = model(transform(load_image(p)).unsqueeze(0))[0].numpy()
            rows.append(v / np.linalg.norm(v))
    return np.stack(rows)
q, g = embed(dataset.query_paths), embed(dataset.gallery_paths)
top = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
names = dataset.gallery_names
json.dump({p.name: [names[j] for j in row] for p, row in zip(dataset.query_paths, top)}, open(out, "w"))
'''


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    print(f"# {seconds:7.1f} s  {' '.join(Path(c).name if c.startswith('/') else c for c in cmd[:4])} ...",
          flush=True)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def precision_rows(data: Path, model_name: str) -> list[list]:
    """hit@1 and map@10 of the split with float32, int8 and auto embeddings, and each one's difference to float32."""
    from helpers.data import load_retrieval_set
    from helpers.embedding import extract_embeddings
    from helpers.metrics import evaluate_rankings
    from helpers.models import load_model
    from helpers.search import cosine_topk

    dataset = load_retrieval_set(data)
    model = load_model(model_name, device="cpu")
    rows, reference = [], None
    for precision in ("fp32", "int8", "auto"):
        gallery = extract_embeddings(model, dataset.gallery_paths, device="cpu", precision=precision, progress=False)
        query = extract_embeddings(model, dataset.query_paths, device="cpu", precision=precision, progress=False)
        top, _ = cosine_topk(query.embeddings, gallery.embeddings, k=10)
        rankings = {q: [gallery.names[j] for j in row] for q, row in zip(query.names, top)}
        metrics = evaluate_rankings(rankings, dataset.ground_truth).metrics
        hit1, map10 = float(metrics["hit@1"]), float(metrics["map@10"])
        reference = reference or (hit1, map10)
        rows.append([f"{precision} (ran {gallery.precision})", hit1, map10, hit1 - reference[0],
                     map10 - reference[1], gallery.precision_reason])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks end-to-end", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=None, help="class-folder dataset (default: shared imagenette-val)")
    parser.add_argument("--query-per-class", type=int, default=20)
    parser.add_argument("--gallery-per-class", type=int, default=180)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-cache", action="store_true", help="leave out the cold/warm cache runs")
    parser.add_argument("--skip-precision", action="store_true", help="leave out the float32 vs int8 metrics")
    parser.add_argument("--fresh-export", action="store_true",
                        help="export and calibrate int8 in a temporary ONNX folder, so that int8 is calibrated and "
                             "judged on this split (not on the images of an earlier run)")
    args = parser.parse_args(argv)
    header("end-to-end", argv or [])

    from helpers.data import load_retrieval_set, split_dataset

    source = Path(args.source) if args.source else shared_dataset("imagenette-val")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.fresh_export:
            os.environ["RETRIEVAL_ONNX_DIR"] = env["RETRIEVAL_ONNX_DIR"] = str(tmp / "onnx")
        data = tmp / "split"
        split_dataset(source, data, train_per_class=0, query_per_class=args.query_per_class,
                      gallery_per_class=args.gallery_per_class)
        dataset = load_retrieval_set(data)
        n_images = len(dataset.query_paths) + len(dataset.gallery_paths)
        retrieve = [sys.executable, "-m", "helpers", "retrieve", "--data", str(data), "--model", args.model,
                    "--quiet", "--out", str(tmp / "sub.json"), "--metrics-out", str(tmp / "metrics.json")]
        run(retrieve + ["--cache-dir", str(tmp / "prepare-cache")], env)  # builds the export + calibration once
        rows = []
        naive_rate = None
        if not args.skip_naive:
            script = tmp / "naive.py"
            script.write_text(NAIVE_SCRIPT)
            seconds = run([sys.executable, str(script), str(data), str(tmp / "naive.json"), args.model], env)
            naive_rate = n_images / seconds
            rows.append(["naive script: one image at a time, eager torch", seconds, naive_rate, 1.0])
        seconds = run(retrieve + ["--no-cache"], env)
        rate = n_images / seconds
        rows.append(["python -m helpers retrieve --no-cache", seconds, rate, rate / naive_rate if naive_rate else None])
        if naive_rate:
            naive = json.loads((tmp / "naive.json").read_text())
            ours = json.loads((tmp / "sub.json").read_text())
            agree = sum(len(set(naive[q]) & set(ours.get(q, []))) for q in naive) / max(1, 10 * len(naive))
        precision = [] if args.skip_precision else precision_rows(data, args.model)
        stages = []
        if not args.skip_cache:
            for label in ("cold", "warm"):
                seconds = run(retrieve + ["--cache-dir", str(tmp / "cache")], env)
                timings = json.loads((tmp / "metrics.json").read_text()).get("timings", {})
                rows.append([f"retrieve with the embedding cache, {label}", seconds, n_images / seconds,
                             n_images / seconds / naive_rate if naive_rate else None])
                stages.append([label] + [timings.get(s) for s in ("load_model", "embed_gallery", "embed_query",
                                                                     "search", "total")] + [seconds])
    print_table(f"End to end on a split of {source.name}: {len(dataset.query_paths):,} queries + "
                f"{len(dataset.gallery_paths):,} gallery = {n_images:,} images, {args.model}, start-up included",
                ["command", "seconds", "images/s", "x naive"], rows)
    if naive_rate:
        print(f"\nretrieve --no-cache (default options) runs at {rate / naive_rate:.2f}x the naive script (goal: 4x)")
        print(f"top-10 overlap between the naive script's and retrieve's rankings: {agree:.4f}")
    if precision:
        print_table("Retrieval on the same split by precision (goal: int8 within 0.01 of fp32)",
                    ["precision", "hit@1", "map@10", "hit@1 - fp32", "map@10 - fp32", "why"], precision)
    if stages:
        print_table("retrieve stages (seconds, from the run's metrics JSON; process = wall time incl. start-up)",
                    ["cache", "load model", "embed gallery", "embed query", "search", "run total", "process"],
                    stages)
    return 0
