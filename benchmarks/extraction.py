"""Extraction: images/s including decoding, project path vs a naive one-image loop vs the compute bound.

Measured in one run on the same images: (1) a naive loop (open, preprocess and embed one image at a time in eager
torch), (2) eager torch in batches through ``extract_embeddings(backend="torch")``, (3) the project's default path
``extract_embeddings`` (decoding in DataLoader workers, ONNX Runtime on the CPU), and the bound: the model's FLOPs
per image against this machine's float32 matrix-multiply rate measured now. Embeddings of every path are compared
with the naive loop's (minimum cosine).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .common import class_folder_images, header, matmul_gflops, model_gflops, print_table, shared_dataset


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks extraction", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="class-folder dataset (default: ../shared/datasets/imagenette-val)")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--limit", type=int, default=2000, help="images for the batched paths (default: %(default)s)")
    parser.add_argument("--naive-limit", type=int, default=200,
                        help="images for the naive loop, a subset of the same (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: automatic)")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--skip-torch-batched", action="store_true", help="leave out the eager batched row")
    args = parser.parse_args(argv)
    header("extraction", argv or [])

    import torch

    from helpers.embedding import extract_embeddings
    from helpers.models import load_model
    from helpers.onnx_backend import resolve_backend

    data = shared_dataset("imagenette-val") if args.data is None else args.data
    from pathlib import Path

    paths = class_folder_images(Path(data), args.limit)
    naive_paths = paths[: min(args.naive_limit, len(paths))]
    model = load_model(args.model, device="cpu")
    size = model.preprocessing.input_size
    for p in paths:  # the page cache holds every file for every path alike
        p.read_bytes()

    rate = matmul_gflops()
    flops = model_gflops(model, size)
    bound = rate / flops

    # One-time cost: export for ONNX Runtime (kept on disk for later runs), outside the timed loops.
    t0 = time.perf_counter()
    runner = resolve_backend(model, args.backend, "cpu", n_images=len(paths))
    if runner is not model:
        runner(torch.zeros(1, 3, size, size))
    prepare_s = time.perf_counter() - t0
    backend_used = "onnxruntime" if runner is not model else "torch"

    rows = []
    t0 = time.perf_counter()
    naive = naive_loop(model, naive_paths)
    naive_rate = len(naive_paths) / (time.perf_counter() - t0)
    rows.append(["naive loop (1 image at a time, eager torch)", len(naive_paths), naive_rate, 1.0, naive_rate / bound,
                 1.0])

    if not args.skip_torch_batched:
        result = extract_embeddings(model, paths, batch_size=args.batch_size, num_workers=args.workers,
                                    backend="torch", progress=False)
        cos = float((result.embeddings[: len(naive)] * naive).sum(1).min())
        rate_t = len(paths) / result.seconds
        rows.append([f"eager torch, batches of {args.batch_size}, workers, channels-last", len(paths), rate_t,
                     rate_t / naive_rate, rate_t / bound, cos])

    result = extract_embeddings(model, paths, batch_size=args.batch_size, num_workers=args.workers,
                                backend=args.backend, progress=False)
    cos = float((result.embeddings[: len(naive)] * naive).sum(1).min())
    rate_p = len(paths) / result.seconds
    rows.append([f"project: extract_embeddings (backend {args.backend} -> {backend_used})", len(paths), rate_p,
                 rate_p / naive_rate, rate_p / bound, cos])
    rows.append([f"compute bound: {flops:.3f} GFLOP/image at {rate:.0f} GFLOP/s matmul", None, bound,
                 bound / naive_rate, 1.0, None])

    print_table(f"Extraction, {args.model} at {size} px, decoding included ({Path(data).name})",
                ["path", "images", "images/s", "x naive", "of bound", "min cosine vs naive"], rows)
    print(f"\none-time preparation (ONNX export or load, outside the timings): {prepare_s:.1f} s")
    return 0
