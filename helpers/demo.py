"""The embedded demo: a small labeled dataset built from images that ship inside scikit-learn, no network needed.

scikit-learn bundles the UCI handwritten digits (1,797 real scans, 8x8 grey levels, 10 classes). The demo upsamples
them to 64x64 PNG files in the competition layout (training / query / gallery, with ground truth) and runs the
default model over them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .fileio import write_json

DEMO_DIR = Path("data") / "demo"


def build_demo_dataset(
    out: str | os.PathLike = DEMO_DIR,
    query_per_class: int = 3,
    gallery_per_class: int = 12,
    train_per_class: int = 20,
    seed: int = 0,
    size: int = 64,
) -> Path:
    """Write the digits as PNG files in the competition layout under ``out`` and return ``out``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    for sub in ("training", "test"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    rng = np.random.default_rng(seed)
    labels: dict[str, dict[str, str]] = {"query": {}, "gallery": {}}
    for digit in range(10):
        indices = rng.permutation(np.nonzero(digits.target == digit)[0])
        parts = {
            "query": indices[:query_per_class],
            "gallery": indices[query_per_class : query_per_class + gallery_per_class],
            "training": indices[query_per_class + gallery_per_class :][:train_per_class],
        }
        for part, chosen in parts.items():
            for index in chosen:
                pixels = (digits.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(255 - pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
                name = f"digit{digit}_{index:04d}.png"
                folder = out / "training" / str(digit) if part == "training" else out / "test" / part
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / name)
                if part != "training":
                    labels[part][name] = str(digit)
    by_class: dict[str, list[str]] = {}
    for name, label in labels["gallery"].items():
        by_class.setdefault(label, []).append(name)
    ground_truth = {q: sorted(by_class[label]) for q, label in sorted(labels["query"].items())}
    write_json(out / "test" / "ground_truth.json", ground_truth)
    write_json(out / "test" / "labels.json", labels)
    return out


@dataclass
class DemoOutputs:
    data: Path
    submission: Path
    metrics: Path | None
    grid: Path | None
    metrics_values: dict[str, float] | None


def run_demo(
    out_data: str | os.PathLike = DEMO_DIR,
    model: str = "efficientnet-lite0",
    weights: str = "pretrained",
    device: str = "auto",
    progress: bool = True,
) -> DemoOutputs:
    """Build the demo dataset, retrieve and evaluate with the default model, write submission, metrics and grid."""
    from .pipeline import VISUALIZATIONS_DIR, run_retrieval, save_run

    data = build_demo_dataset(out_data)
    run = run_retrieval(data, model=model, weights=weights, device=device, progress=progress, run_name=f"demo_{model}")
    outputs = save_run(run, grid_out=VISUALIZATIONS_DIR / f"demo_{model}.png", grid_queries=6)
    return DemoOutputs(data, outputs.submission, outputs.metrics, outputs.grid, run.metrics)


def next_steps() -> list[str]:
    """The commands to run next on one's own data (printed at the end of ``python -m helpers demo``)."""
    return [
        "next, on your own data:",
        "  labeled photos in class folders (CLASS_DIR/<class>/<image>):",
        "    python -m helpers split --source CLASS_DIR --out data/mine",
        "    python -m helpers retrieve --data data/mine",
        "  your own queries and gallery: put them in data/test/query/ and",
        "  data/test/gallery/, then",
        "    python -m helpers retrieve",
    ]
