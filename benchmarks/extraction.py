"""Extraction: images/s including decoding, each speed option alone and together, vs a naive loop and the bound.

Measured in one run on the same images (CPU): (1) a naive loop (open, preprocess and embed one image at a time in
eager torch); (2) the previous default path (ONNX Runtime float32, full JPEG decode, min(4, cores) decoding workers
plus as many inference threads as torch has: oversubscribed); (3) each new option alone: int8, JPEG draft decoding
at the size the model needs, the thread plan (inference threads + decoding workers = cores), and one decoding
worker overlapping with inference on the other cores (the alternative plan on a small machine); (4) all together, and
(5) the default ``extract_embeddings`` (``precision="auto"``: int8 only where it agrees with float32); and the bound:
the model's FLOPs per image against this machine's float32 matrix-multiply rate measured now. Every row also
reports retrieval on the same images (every 10th image of each class a query, the rest the gallery; relevant: the
same class): hit@1 and map@10, and the minimum cosine of its embeddings with the naive loop's.

``--upscale F`` re-encodes the images F times larger (Lanczos, JPEG quality 95) in a temporary folder first, so that
draft decoding has something to skip: such photos are upscaled, not real large photos, and the table says so.

``--device cuda`` measures the GPU path instead (pinned memory, non-blocking copies, fp16 autocast, batches sized to
memory) for EfficientNet-Lite0, ResNet-50, CLIP ViT-B/32 and ViT-L/14 with random weights, against clip-retrieval's
published 1,500 images/s (ViT-B/32) and 312 (ViT-L/14) on one GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import class_folder_images, header, matmul_gflops, model_gflops, print_table, shared_dataset

#: clip-retrieval's published single-GPU embedding rates (images/s), the reference for ``--device cuda``.
CLIP_RETRIEVAL_RATES = {"clip-vit-b32": 1500, "clip-vit-l14": 312}
GPU_MODELS = ("efficientnet-lite0", "resnet50", "clip-vit-b32", "clip-vit-l14")


def naive_loop(model, paths) -> np.ndarray:
    """One image at a time: load, preprocess, forward, normalise (what early public notebooks did)."""
    import torch

    from helpers.data import load_image

    transform = model.transform()
    out = []
    with torch.inference_mode():
        for path in paths:
            x = transform(load_image(path)).unsqueeze(0)
            v = model(x)[0].float().numpy()
            out.append(v / max(np.linalg.norm(v), 1e-12))
    return np.stack(out)


def retrieval_metrics(embeddings: np.ndarray, paths: list[Path]) -> tuple[float, float]:
    """hit@1 and map@10 with every 10th image of each class as a query against the rest (same class relevant)."""
    from helpers.metrics import evaluate_rankings

    labels = [p.parent.name for p in paths]
    seen: dict[str, int] = {}
    is_query = []
    for label in labels:
        is_query.append(seen.get(label, 0) % 10 == 0)
        seen[label] = seen.get(label, 0) + 1
    q = [i for i, flag in enumerate(is_query) if flag]
    g = [i for i, flag in enumerate(is_query) if not flag]
    names = [f"{labels[i]}/{paths[i].name}" for i in range(len(paths))]
    scores = embeddings[q] @ embeddings[g].T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    rankings = {names[qi]: [names[g[j]] for j in row] for qi, row in zip(q, top)}
    truth = {names[qi]: [names[gi] for gi in g if labels[gi] == labels[qi]] for qi in q}
    metrics = evaluate_rankings(rankings, truth).metrics
    return float(metrics["hit@1"]), float(metrics["map@10"])


def upscaled_copy(paths: list[Path], factor: float, folder: Path) -> list[Path]:
    """``paths`` re-encoded ``factor`` times larger with Lanczos (JPEG quality 95), class folders kept."""
    from PIL import Image

    out = []
    for path in paths:
        target = folder / path.parent.name / (path.stem + ".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image = image.convert("RGB")
            size = (round(image.width * factor), round(image.height * factor))
            image.resize(size, Image.Resampling.LANCZOS).save(target, quality=95)
        out.append(target)
    return out


def _configurations(cores: int, torch_threads: int) -> list[tuple[str, dict]]:
    """Each row's ``extract_embeddings`` options: the previous default, each new option alone, all together."""
    previous = dict(precision="fp32", draft_size=None, num_workers=min(4, cores), threads=torch_threads)
    return [
        (f"previous default: ONNX fp32, full decode, {previous['num_workers']} workers + {torch_threads} threads",
         previous),
        ("+ int8 alone", {**previous, "precision": "int8"}),
        ("+ draft decoding alone", {**previous, "draft_size": "auto"}),
        ("+ thread plan alone (threads + workers = cores)", {**previous, "num_workers": None, "threads": None}),
        ("+ overlap alone: 1 decoding worker + the other cores inferring",
         {**previous, "num_workers": 1, "threads": max(1, cores - 1)}),
        ("all together: int8 + draft + thread plan", dict(precision="int8", draft_size="auto")),
        ("default now: precision auto + draft + thread plan", dict(precision="auto", draft_size="auto")),
    ]


def _prepare(model, paths: list[Path]) -> tuple[float, str]:
    """Export for ONNX Runtime and calibrate int8 (both kept on disk for later runs), outside the timings."""
    import torch

    from helpers.embedding import _choose_precision
    from helpers.parallelism import plan_threads

    t0 = time.perf_counter()
    plan = plan_threads(len(paths), 32)
    _, reason = _choose_precision(model, paths, torch.device("cpu"), "onnx", "int8", None, "none", plan)
    return time.perf_counter() - t0, reason


def cpu_table(args, model, paths: list[Path], label: str) -> None:
    """Every CPU row on ``paths``: naive, previous default, each option alone, all together, default, bound."""
    import torch

    from helpers.embedding import extract_embeddings
    from helpers.parallelism import available_cores

    size = model.preprocessing.input_size
    for p in paths:  # the page cache holds every file for every path alike
        p.read_bytes()
    rate, flops = matmul_gflops(), model_gflops(model, size)
    bound = rate / flops
    prepare_s, reason = _prepare(model, paths)
    naive_paths = paths[: min(args.naive_limit, len(paths))]
    t0 = time.perf_counter()
    naive = naive_loop(model, naive_paths)
    naive_rate = len(naive_paths) / (time.perf_counter() - t0)
    rows = [["naive loop (1 image at a time, eager torch)", len(naive_paths), naive_rate, 1.0, naive_rate / bound,
             1.0, None, None, "fp32"]]
    choices = _configurations(available_cores(), torch.get_num_threads())
    if args.workers is not None:
        choices = [(name, {**options, "num_workers": args.workers}) for name, options in choices]
    for name, options in choices:
        result = extract_embeddings(model, paths, batch_size=args.batch_size, device="cpu", backend="onnx",
                                    progress=False, **options)
        found = {p: i for i, p in enumerate(result.paths)}
        cos = float(min((result.embeddings[found[p]] * naive[i]).sum() for i, p in enumerate(naive_paths)))
        hit1, map10 = retrieval_metrics(result.embeddings, result.paths)
        speed = len(paths) / result.seconds
        plan = result.plan.describe() if result.plan else "-"
        rows.append([f"{name} [{plan}]", len(paths), speed, speed / naive_rate, speed / bound, cos, hit1, map10,
                     result.precision])
    rows.append([f"compute bound: {flops:.3f} GFLOP/image at {rate:.0f} GFLOP/s float32 matmul", None, bound,
                 bound / naive_rate, 1.0, None, None, None, None])
    print_table(f"Extraction, {args.model} at {size} px, decoding included: {label}",
                ["path", "images", "images/s", "x naive", "of bound", "min cos vs naive", "hit@1", "map@10",
                 "precision"], rows)
    print(f"\none-time preparation (ONNX export + int8 calibration, kept on disk; outside the timings): "
          f"{prepare_s:.1f} s; {reason}")
    print(f"auto chose {result.precision}: {result.precision_reason}")


def gpu_table(args, paths: list[Path]) -> None:
    """Images/s on ``args.device`` for each model with random weights: decoding included, and inference alone."""
    import torch

    from helpers.embedding import extract_embeddings
    from helpers.models import load_model

    rows = []
    for name in args.models.split(","):
        model = load_model(name, weights="none", device=args.device).eval()
        size = model.preprocessing.input_size
        batch = args.batch_size if args.batch_size else None
        result = extract_embeddings(model, paths, batch_size=batch, device=args.device, precision="fp32",
                                    progress=False)
        x = torch.randn(args.gpu_batch, 3, size, size, device=args.device)
        cuda = torch.device(args.device).type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), autocast:
            model(x)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.gpu_repeats):
                model(x)
            if cuda:
                torch.cuda.synchronize()
        infer = args.gpu_batch * args.gpu_repeats / (time.perf_counter() - t0)
        reference = CLIP_RETRIEVAL_RATES.get(name)
        speed = len(paths) / result.seconds
        rows.append([name, size, len(paths), speed, infer, reference, speed / reference if reference else None])
    print_table(f"Extraction on {args.device} (random weights, fp16 autocast on CUDA, batches sized to memory)",
                ["model", "input", "images", "images/s with decoding", "images/s inference only",
                 "clip-retrieval img/s", "x clip-retrieval"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks extraction", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="class-folder dataset (default: ../shared/datasets/imagenette-val)")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--limit", type=int, default=500, help="images for the batched paths (default: %(default)s)")
    parser.add_argument("--naive-limit", type=int, default=100,
                        help="images for the naive loop, a subset of the same (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes for every row (default: each "
                                                                   "row's own)")
    parser.add_argument("--upscale", type=float, default=1.0,
                        help="re-encode the photos this many times larger first (Lanczos; default: as they are)")
    parser.add_argument("--device", default="cpu", help="cpu (every option) or cuda (the GPU table)")
    parser.add_argument("--models", default=",".join(GPU_MODELS), help="models of the GPU table")
    parser.add_argument("--gpu-table", action="store_true",
                        help="the GPU table's measurements on --device cpu (tests its code path without a GPU)")
    parser.add_argument("--gpu-batch", type=int, default=256, help="batch of the inference-only GPU figure")
    parser.add_argument("--gpu-repeats", type=int, default=20)
    parser.add_argument("--onnx-dir", default=None, help="keep the export and int8 calibration here (default: a "
                                                         "temporary folder, so no calibration outlives the run)")
    args = parser.parse_args(argv)
    header("extraction", argv or [])
    if args.onnx_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return _run(args, Path(tmp))
    return _run(args, Path(args.onnx_dir))


def _run(args, onnx_folder: Path) -> int:
    import os

    saved = os.environ.get("RETRIEVAL_ONNX_DIR")
    os.environ["RETRIEVAL_ONNX_DIR"] = str(onnx_folder)
    try:
        return _tables(args)
    finally:
        if saved is None:
            os.environ.pop("RETRIEVAL_ONNX_DIR", None)
        else:
            os.environ["RETRIEVAL_ONNX_DIR"] = saved


def _tables(args) -> int:
    from helpers.models import load_model

    data = Path(shared_dataset("imagenette-val") if args.data is None else args.data)
    paths = class_folder_images(data, args.limit)
    if args.device != "cpu" or args.gpu_table:
        gpu_table(args, paths)
        return 0
    model = load_model(args.model, device="cpu")
    if args.upscale == 1.0:
        cpu_table(args, model, paths, f"{len(paths)} photos of {data.name} as they are")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        large = upscaled_copy(paths, args.upscale, Path(tmp))
        cpu_table(args, model, large, f"{len(paths)} photos of {data.name} re-encoded {args.upscale:g}x larger "
                                      "with Lanczos (upscaled, not real large photos)")
    return 0
