"""Zero-shot CIFAR-10/100 top-1 with CLIP prompt ensembling, checked against open_clip's published figures.

Two modes:

- ``--dataset cifar10|cifar100 [--root DIR --download]``: the full test set through torchvision (a machine with
  internet, ideally a GPU), exported once as lossless PNG class folders, then classified by exactly the code of
  ``python -m helpers zero-shot`` (:func:`helpers.text.run_zero_shot`) with CLIP's 18 CIFAR templates. With real
  weights the top-1 is compared with open_clip's published zero-shot result and the output says whether it is
  within one point::

      python -m benchmarks zero-shot --dataset cifar10 --dataset cifar100 --download --model clip-vit-b32
      python -m benchmarks zero-shot --dataset cifar100 --download --model clip-vit-l14

- ``--folder DIR`` (default: ``../shared/datasets/cifar10-test``, ``--per-class 20``, random weights): checks the
  pipeline offline. Random weights give chance-level accuracy (1 / number of classes), which the output says.

Published figures: open_clip's zero-shot results table (``docs/openclip_results.csv``, CLIP_benchmark protocol:
the 18 CIFAR templates of the CLIP paper, class names with underscores as spaces).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

#: (model, open_clip tag, dataset) -> published zero-shot top-1 (open_clip results table).
PUBLISHED = {
    ("clip-vit-b32", "openai", "cifar10"): 0.898,
    ("clip-vit-b32", "openai", "cifar100"): 0.642,
    ("clip-vit-l14", "openai", "cifar100"): 0.758,
}
TOLERANCE = 0.01  # one point of top-1
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets")) / "cifar10-test"


def export_cifar(name: str, root: Path, download: bool, out: Path) -> tuple[Path, list[str]]:
    """The CIFAR test split as ``out/<class>/<index>.png`` (written once), and the class names (spaces)."""
    from PIL import Image
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        dataset = cls(str(root), train=False, download=download)
    except RuntimeError as exc:
        raise SystemExit(f"error: {name} not found under {root} ({exc}); add --download on a machine with internet")
    folder = out / f"{name}-test-png"
    done = folder / ".complete"
    if not done.exists():
        for label in dataset.classes:
            (folder / label).mkdir(parents=True, exist_ok=True)
        for index, (array, target) in enumerate(zip(dataset.data, dataset.targets)):
            Image.fromarray(array).save(folder / dataset.classes[target] / f"{index:05d}.png")
        done.write_text(str(len(dataset.data)))
    return folder, [c.replace("_", " ") for c in dataset.classes]


def subset_folder(source: Path, per_class: int | None, out: Path) -> tuple[Path, list[str]]:
    """The first ``per_class`` images of each class of ``source`` (hard links; the whole folder when None)."""
    from helpers.data import list_class_folder

    items = list_class_folder(source)
    classes = sorted({label for _, label in items})
    if per_class is None:
        return source, [c.replace("_", " ") for c in classes]
    folder = out / f"{source.name}-{per_class}-per-class"
    counts: dict[str, int] = {}
    for path, label in items:
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        target = folder / label / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:
                import shutil

                shutil.copy2(path, target)
    return folder, [c.replace("_", " ") for c in classes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks zero-shot", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=("cifar10", "cifar100"),
                        help="full CIFAR test set through torchvision (repeatable)")
    parser.add_argument("--root", default="data/torchvision", help="torchvision download folder (default: %(default)s)")
    parser.add_argument("--download", action="store_true", help="download CIFAR if absent (needs internet)")
    parser.add_argument("--folder", help=f"class-folder dataset instead (default without --dataset: {DEFAULT_FOLDER})")
    parser.add_argument("--per-class", type=int, default=None,
                        help="images per class from --folder (default: 20 with random weights, else all)")
    parser.add_argument("--model", default="clip-vit-b32", help="default: %(default)s")
    parser.add_argument("--pretrained", default="openai", help="open_clip weight tag (default: %(default)s)")
    parser.add_argument("--weights", default=None,
                        help="pretrained|none|PATH (default: pretrained with --dataset, none with --folder)")
    parser.add_argument("--templates", default="openai", help="openai|simple|FILE (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    parser.add_argument("--work-dir", help="where exported/subset images go (default: a temporary folder)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from helpers.models import load_model
    from helpers.text import run_zero_shot

    weights = args.weights or ("pretrained" if args.dataset else "none")
    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="zero-shot-bench-")
        work = Path(tmp.name)
    jobs: list[tuple[str, Path, list[str], bool]] = []  # (name, folder, classes, full test set)
    for name in args.dataset or []:
        folder, classes = export_cifar(name, Path(args.root), args.download, work)
        jobs.append((name, folder, classes, True))
    if args.folder or not args.dataset:
        source = Path(args.folder) if args.folder else DEFAULT_FOLDER
        if not source.is_dir():
            print(f"error: class-folder dataset {source} not found (pass --folder DIR or --dataset cifar10)",
                  file=sys.stderr)
            return 2
        per_class = args.per_class if args.per_class is not None else (20 if weights == "none" else None)
        folder, classes = subset_folder(source, per_class, work)
        jobs.append((source.name, folder, classes, False))

    options = {"pretrained": args.pretrained} if args.model.startswith("clip-") else {}
    start = time.perf_counter()
    model = load_model(args.model, weights=weights, device=args.device, **options)
    print(f"model {args.model} (--pretrained {args.pretrained}, weights {weights}) loaded in "
          f"{time.perf_counter() - start:.1f} s on {next(model.parameters()).device}")
    if weights == "none":
        print("NOTE: random weights (--weights none) check the pipeline only: their accuracy is chance level, "
              "about 1 / number of classes. Real figures need --weights pretrained (or a checkpoint file).")

    rows, verdicts = [], []
    for name, folder, classes, full in jobs:
        run = run_zero_shot(folder, classes, args.templates, model=model, batch_size=args.batch_size,
                            device=args.device, use_cache=False if args.no_cache else None, num_workers=args.workers)
        m = run.metrics
        seconds = run.timings["total"]
        row = {"dataset": name, "model": args.model, "pretrained": args.pretrained, "weights": weights,
               "templates": args.templates, "n_images": len(run.names), "n_classes": len(classes),
               "top1": m["top1_accuracy"], "top5": m["top5_accuracy"],
               "mean_per_class_recall": m["mean_per_class_recall"], "chance": 1 / len(classes),
               "seconds": seconds, "images_per_second": len(run.names) / seconds if seconds else None}
        published = PUBLISHED.get((args.model, args.pretrained, name))
        if published is not None and full and weights != "none" and args.templates == "openai":
            row["published_top1"] = published
            row["within_one_point"] = abs(row["top1"] - published) <= TOLERANCE
            verdicts.append(row["within_one_point"])
        rows.append(row)

    print(f"\n{'dataset':<28}{'images':>8}{'top-1':>8}{'top-5':>8}{'mpcr':>8}{'chance':>8}{'img/s':>8}  published")
    for r in rows:
        ref = ""
        if "published_top1" in r:
            diff = (r["top1"] - r["published_top1"]) * 100
            ref = (f"{r['published_top1']:.3f} ({diff:+.1f} points): "
                   + ("REPRODUCED within one point" if r["within_one_point"] else "NOT within one point"))
        elif weights == "none":
            ref = "random weights: chance level expected, no comparison"
        else:
            ref = "no published figure for this setting (subset, other model/tag or templates)"
        print(f"{r['dataset']:<28}{r['n_images']:>8}{r['top1']:>8.3f}{r['top5']:>8.3f}"
              f"{r['mean_per_class_recall']:>8.3f}{r['chance']:>8.3f}{r['images_per_second'] or 0:>8.1f}  {ref}")
    if args.out:
        from helpers.fileio import write_json

        print(f"results: {write_json(args.out, rows)}")
    if tmp is not None:
        tmp.cleanup()
    if verdicts and not all(verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
