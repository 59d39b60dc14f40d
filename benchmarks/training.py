"""Fine-tuning: closed set (CIFAR-10 classes seen in training) or open set (held-out classes); hit@1, map@10, wall times.

``--protocol open``: train on half of the classes of Imagenette and CIFAR-10, test retrieval on the other half
(see :mod:`benchmarks.training_open_set`):

    python -m benchmarks training --protocol open --device cpu      # the README's open-set tables

``--protocol closed`` (default):

Trains on ``cifar10-train-1000`` (10 classes x 1,000 images) and evaluates on a split of ``cifar10-test``
(``--query-per-class`` queries and ``--gallery-per-class`` gallery images per class). Full fine-tuning runs at
``--full-input-size`` (default: 224 px on a GPU, 128 px on a CPU, where 224 px runs at ~7 images/s); the frozen
backbone is also scored at that size, so that each trained model has its own baseline.

    python -m benchmarks training                      # all three
    python -m benchmarks training --skip-full          # frozen vs head-only only
    python -m benchmarks training --train-per-class 200 --full-epochs 3   # a quicker CPU run
    python -m benchmarks training --device cpu --skip-head --full-recipe ce --full-epochs 17 --full-lr 1e-3 \
        --full-layer-decay 0.8                        # full fine-tuning to hit@1 0.87 in 47 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))
KEYS = ("hit@1", "hit@5", "map@10", "weighted_score")


def _subset(source: Path, per_class: int, out: Path) -> Path:
    """Hard links to the first ``per_class`` images of each class (a smaller training set)."""
    from helpers.data import list_class_folder

    taken: dict[str, int] = {}
    for path, label in list_class_folder(source):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            target = out / label / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    return out


def _open_set_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("open set (--protocol open)")
    group.add_argument("--protocol", choices=("closed", "open"), default="closed")
    group.add_argument("--open-datasets", nargs="+", default=["imagenette", "cifar10"], choices=["imagenette", "cifar10"])
    group.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="class splits (default: 0 1 2)")
    group.add_argument("--losses", nargs="+", default=["circle", "ce", "arcface", "supcon"], help="head-only recipes")
    group.add_argument("--full-losses", nargs="+", default=["ce", "circle"], help="blocks:N / full fine-tuning recipes")
    group.add_argument("--blocks", type=int, default=2, help="N of blocks:N (default: 2)")
    group.add_argument("--open-train-per-class", type=int, default=60, help="training images per class, head-only")
    group.add_argument("--full-per-class", type=int, default=40, help="training images per class, fine-tuning")
    group.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default: 1; on a machine shared by many processes, 2 threads were "
                       "17x slower per head-only step than 1)")
    group.add_argument("--full-backbone-lr", type=float, default=None,
                       help="stem and neck LR of blocks:N / full fine-tuning (default: recipe)")
    group.add_argument("--open-k", type=int, default=4, help="images per class in a P-K batch of fine-tuning (P=5)")
    group.add_argument("--open-query-per-class", type=int, default=10)
    group.add_argument("--open-gallery-per-class", type=int, default=40)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks training", description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=str(DATASETS), help="folder holding cifar10-train-1000 and cifar10-test")
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--query-per-class", type=int, default=20)
    parser.add_argument("--gallery-per-class", type=int, default=100)
    parser.add_argument("--train-per-class", type=int, default=None, help="default: all 1,000")
    parser.add_argument("--head-epochs", type=int, default=20)
    parser.add_argument("--full-epochs", type=int, default=10)
    parser.add_argument("--full-input-size", type=int, default=None, help="default: 224 on GPU, 128 on CPU")
    parser.add_argument("--head-lr", type=float, default=None, help="head LR of head-only training (default: recipe)")
    parser.add_argument("--full-recipe", default="circle",
                        help="recipe of full fine-tuning (default: circle; ce converges several times faster on a CPU budget)")
    parser.add_argument("--full-lr", type=float, default=None, help="top backbone LR of full fine-tuning (default: recipe)")
    parser.add_argument("--full-layer-decay", type=float, default=None, help="LLRD of full fine-tuning (default: recipe)")
    parser.add_argument("--no-grad-checkpointing", action="store_true", help="full fine-tuning on GPU without it")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-head", action="store_true", help="no head-only run (frozen vs full fine-tuning only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=None, help="image decoding processes (default: CPUs - 1, max 8)")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    _open_set_options(parser)
    args = parser.parse_args(argv)
    if args.protocol == "open":
        from .training_open_set import run_open_set

        work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-open-set-"))
        args.full_input_size = args.full_input_size or 96
        args.workers = args.workers if args.workers is not None else 0
        import torch

        torch.set_num_threads(args.threads)
        os.environ.setdefault("RETRIEVAL_CACHE_DIR", str(work / "cache"))
        return run_open_set(args, work)

    import torch

    from helpers.data import split_dataset
    from helpers.models import resolve_device
    from helpers.pipeline import run_retrieval
    from helpers.training import make_config, train

    datasets = Path(args.datasets)
    train_src, test_src = datasets / "cifar10-train-1000", datasets / "cifar10-test"
    for folder in (train_src, test_src):
        if not folder.is_dir():
            print(f"skipped: {folder} is absent (set --datasets or RETRIEVAL_SHARED_DATASETS)")
            return 0
    device = resolve_device(args.device)
    full_size = args.full_input_size or (224 if device.type == "cuda" else 128)
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-training-"))
    os.environ.setdefault("RETRIEVAL_CACHE_DIR", str(work / "cache"))
    split = work / "cifar10-test-split"
    split_dataset(test_src, split, train_per_class=0, query_per_class=args.query_per_class,
                  gallery_per_class=args.gallery_per_class, seed=0)
    if args.train_per_class:
        train_src = _subset(train_src, args.train_per_class, work / f"train-{args.train_per_class}")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else None
    print(f"device: {device}{f' ({gpu})' if gpu else ''}; train: {train_src}; test split: {args.query_per_class} "
          f"query + {args.gallery_per_class} gallery per class")

    rows: list[tuple[str, int, dict, float, float]] = []

    def retrieve(label: str, size: int, train_seconds: float, **kwargs) -> dict:
        t0 = time.perf_counter()
        run = run_retrieval(split, device=str(device), progress=False, use_cache=False, num_workers=workers,
                            backend="torch", **kwargs)
        seconds = time.perf_counter() - t0
        rows.append((label, size, run.metrics, train_seconds, seconds))
        print(f"{label:<34} {size:>4}px  hit@1 {run.metrics['hit@1']:.4f}  map@10 {run.metrics['map@10']:.4f}  "
              f"weighted {run.metrics['weighted_score']:.1f}  train {train_seconds:.0f}s  retrieve {seconds:.0f}s",
              flush=True)
        return run.metrics

    frozen = retrieve("frozen backbone", 224, 0.0, model=args.model)

    head_metrics = None
    if not args.skip_head:
        t0 = time.perf_counter()
        head = train(make_config("circle", data=str(train_src), model=args.model, trainable="head",
                                 epochs=args.head_epochs, out=str(work / "run-head"), device=str(device),
                                 num_workers=workers, progress=False, head_lr=args.head_lr))
        head_seconds = time.perf_counter() - t0
        head_metrics = retrieve(f"head-only circle ({head.epochs_run} ep)", 224, head_seconds,
                                checkpoint=head.best_path)

    full_metrics = frozen_small = None
    if not args.skip_full:
        if full_size != 224:
            from helpers.models import load_model
            from helpers.training.model import feature_preprocessing

            base = load_model(args.model, device=device)
            base.preprocessing = feature_preprocessing(base, full_size)
            frozen_small = retrieve("frozen backbone", full_size, 0.0, model=base)
        t0 = time.perf_counter()
        full = train(make_config(args.full_recipe, data=str(train_src), model=args.model, trainable="all",
                                 epochs=args.full_epochs, input_size=full_size, out=str(work / "run-full"),
                                 device=str(device), num_workers=workers, progress=False, lr=args.full_lr,
                                 layer_decay=args.full_layer_decay,
                                 grad_checkpointing=False if args.no_grad_checkpointing else None))
        full_seconds = time.perf_counter() - t0
        full_metrics = retrieve(f"full fine-tuning {args.full_recipe} ({full.epochs_run} ep)", full_size, full_seconds,
                                checkpoint=full.best_path)

    print()
    print("| method | input | " + " | ".join(KEYS) + " | train s | retrieve s |")
    print("|---|---|" + "---|" * len(KEYS) + "---|---|")
    for label, size, metrics, train_s, ret_s in rows:
        values = " | ".join(f"{metrics[k]:.1f}" if k == "weighted_score" else f"{metrics[k]:.4f}" for k in KEYS)
        print(f"| {label} | {size} px | {values} | {train_s:.0f} | {ret_s:.0f} |")
    print()
    if head_metrics is not None:
        print(f"head-only vs frozen: hit@1 {head_metrics['hit@1'] - frozen['hit@1']:+.4f} (target >= +0.10), "
              f"weighted_score {head_metrics['weighted_score'] - frozen['weighted_score']:+.1f} (target >= +60)")
    if full_metrics is not None:
        base_full = frozen_small or frozen
        print(f"full fine-tuning: hit@1 {full_metrics['hit@1']:.4f} (target >= 0.85), "
              f"{full_metrics['hit@1'] - base_full['hit@1']:+.4f} over the frozen backbone at {full_size} px")
    print(f"run folders: {work}")
    return 0
