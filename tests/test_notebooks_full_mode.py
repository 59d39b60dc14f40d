"""``00_quickstart`` and ``08_competition`` in FULL mode, run with papermill as a user would, offline, on a competition
folder whose ``test/`` has no ground truth and whose test classes were never among the training classes.

The folder is built from ``../shared/datasets/imagenette-val`` (skipped where absent): 5 classes as
``training/<class>/*`` (30 images each), the 5 others as ``test/query`` (8 per class) and ``test/gallery`` (32 per
class); the ground truth stays outside the folder. The notebooks get ``-p DATA_SOURCE <folder>`` (and ``08`` ``-p
MODELS ["efficientnet-lite0"]``, whose ImageNet weights ship offline) with ``RETRIEVAL_FAST=0`` and the Hugging Face
hub offline; each must run to its end and write a valid submission, scored here against the hidden ground truth.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers.data import class_folders, list_images, split_dataset
from helpers.metrics import evaluate_rankings
from helpers.submission import load_submission, validate_submission

ROOT = Path(__file__).resolve().parents[1]
papermill = pytest.importorskip("papermill", reason="papermill is not installed (pip install -e .[test])")


@pytest.fixture(scope="module")
def competition(tmp_path_factory, imagenette_val) -> tuple[Path, dict[str, list[str]]]:
    """(folder, hidden ground truth): training and test classes disjoint, no ground truth in ``test/``."""
    base = tmp_path_factory.mktemp("full")
    classes = class_folders(imagenette_val)
    test_source = base / "test-classes"
    for folder in classes[5:]:
        target = test_source / folder.name
        target.mkdir(parents=True)
        for image in list_images(folder)[:40]:
            shutil.copy2(image, target / image.name)
    data = base / "competition"
    split_dataset(test_source, data, query_per_class=8, gallery_per_class=32, train_per_class=0)
    shutil.rmtree(data / "training", ignore_errors=True)
    for folder in classes[:5]:
        (data / "training" / folder.name).mkdir(parents=True)
        for image in list_images(folder)[:30]:
            shutil.copy2(image, data / "training" / folder.name / image.name)
    truth = json.loads((data / "test" / "ground_truth.json").read_text())
    for name in ("ground_truth.json", "labels.json"):
        (data / "test" / name).unlink()
    return data, truth


def run_full(name: str, data: Path, out: Path, monkeypatch, **parameters) -> Path:
    """Run ``notebooks/<name>`` with papermill in full mode on ``data``; its outputs under ``out``."""
    monkeypatch.setenv("RETRIEVAL_FAST", "0")
    monkeypatch.setenv("RETRIEVAL_OUTPUT_DIR", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out / name), kernel_name="python3",
                               cwd=str(ROOT / "notebooks"), parameters={"DATA_SOURCE": str(data), **parameters},
                               progress_bar=False)
    return out


def check_submission(path: Path, data: Path, truth: dict[str, list[str]]) -> dict[str, float]:
    rankings = load_submission(path)
    queries = sorted(p.name for p in (data / "test" / "query").iterdir())
    gallery = sorted(p.name for p in (data / "test" / "gallery").iterdir())
    assert validate_submission(rankings, k=10, query_names=queries, gallery_names=gallery) == []
    metrics = evaluate_rankings(rankings, truth, k=10, gallery_names=gallery).metrics
    print(f"{path.name} against the hidden ground truth: {metrics}")
    return metrics


def test_quickstart_full_mode_without_test_ground_truth(competition, tmp_path, monkeypatch):
    data, truth = competition
    out = run_full("00_quickstart.ipynb", data, tmp_path, monkeypatch)
    record = json.loads((out / "results" / "00_quickstart_efficientnet-lite0.json").read_text())
    assert record["config"]["data"] == str(data) and Path(record["config"]["scored_on"]).is_dir()
    metrics = check_submission(out / "submissions" / "00_quickstart_efficientnet-lite0.json", data, truth)
    assert metrics["hit@1"] >= 0.85, metrics


def test_competition_full_mode_without_test_ground_truth(competition, tmp_path, monkeypatch):
    data, truth = competition
    out = run_full("08_competition.ipynb", data, tmp_path, monkeypatch, MODELS=["efficientnet-lite0"],
                   BUDGET_MINUTES=10)
    held_out = json.loads((out / "runs" / "08_competition" / "validation" / "classes.json").read_text())
    assert set(held_out["held_out"]) <= {p.name for p in (data / "training").iterdir()}
    leaderboard = (out / "runs" / "08_competition" / "leaderboard.csv").read_text().splitlines()
    candidates = list((out / "runs" / "08_competition" / "candidates").glob("*.json"))
    assert len(leaderboard) - 1 == len(candidates) >= 4
    metrics = check_submission(out / "submissions" / "08_competition.json", data, truth)
    assert metrics["hit@1"] >= 0.85, metrics
