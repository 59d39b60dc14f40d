"""End to end: split -> retrieve -> evaluate, through the Python API and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.cli import main as cli_main
from helpers.data import split_dataset
from helpers.pipeline import run_retrieval, save_run
from helpers.submission import load_submission, validate_submission
from tests.conftest import shared_dataset


def test_retrieve_on_real_images_is_accurate_and_reproducible(tmp_path, capsys):
    """The default model on an Imagenette split: hit@1 >= 0.9 and score >= 900, cache makes the rerun identical."""
    data = tmp_path / "split"
    split_dataset(shared_dataset("imagenette-val"), data, train_per_class=0, query_per_class=4,
                  gallery_per_class=8, seed=1)
    args = ["retrieve", "--data", str(data), "--quiet", "--cache-dir", str(tmp_path / "cache"),
            "--metrics-out", str(tmp_path / "m.json"), "--grid", str(tmp_path / "grid.png")]
    assert cli_main(args + ["--out", str(tmp_path / "a.json")]) == 0
    first = capsys.readouterr().out
    assert "0 from cache, 120 computed" in first
    assert cli_main(args + ["--out", str(tmp_path / "b.json"), "--format", "list"]) == 0
    assert "120 from cache, 0 computed" in capsys.readouterr().out

    rankings = load_submission(tmp_path / "a.json")
    gallery = [p.name for p in (data / "test" / "gallery").iterdir()]
    queries = [p.name for p in (data / "test" / "query").iterdir()]
    assert validate_submission(rankings, k=10, query_names=queries, gallery_names=gallery) == []
    assert load_submission(tmp_path / "b.json") == rankings
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert metrics["hit@1"] >= 0.9 and metrics["weighted_score"] >= 900
    assert (tmp_path / "grid.png").stat().st_size > 10_000

    assert cli_main(["evaluate", "--submission", str(tmp_path / "b.json"), "--ground-truth",
                     str(data / "test" / "ground_truth.json"), "--metrics-out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert evaluated == metrics


def test_unreadable_files_are_skipped_and_named(tmp_path, tiny_split, lite0, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_split / "test", data / "test")
    (data / "test" / "query" / "broken query.jpg").write_text("not an image")
    (data / "test" / "gallery" / "empty.png").write_bytes(b"")
    run = run_retrieval(data, model=lite0, device="cpu", use_cache=False, progress=False)
    assert "broken query.jpg" not in run.rankings and len(run.rankings) == 20
    assert all("empty.png" not in names for names in run.rankings.values())
    assert {p.name for p, _ in run.query.skipped + run.gallery.skipped} == {"broken query.jpg", "empty.png"}
    assert "broken query.jpg" in caplog.text and "empty.png" in caplog.text
    outputs = save_run(run, out=tmp_path / "s.json", metrics_out=tmp_path / "m.json")
    record = json.loads(outputs.metrics.read_text())
    assert len(record["skipped_files"]) == 2 and record["n_queries"] == 20


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert cli_main(["retrieve", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data folder not found") and "Traceback" not in err
    assert cli_main(["retrieve", "--data", str(tmp_path), "--model", "no-such-model"]) == 2


def test_models_verb_lists_the_default(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet-lite0" in out.split() and "1280" in out


def test_demo_runs_offline_in_a_fresh_folder(tmp_path):
    """``python -m helpers demo`` in a clean working directory: submission, metrics and grid appear."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "RETRIEVAL_CACHE_DIR": str(tmp_path / "cache"),
           "MPLBACKEND": "Agg", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "helpers", "demo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in ("submissions", "results", "visualizations"):
        assert any((tmp_path / folder).iterdir()), folder
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["model_name"] == "efficientnet-lite0" and 0 <= record["metrics"]["weighted_score"] <= 1000
    assert record["metrics"]["hit@10"] >= 0.5  # real ImageNet features on real digits: far above chance (0.1)
    assert "grid:" in done.stdout and Path(tmp_path, "data", "demo", "test", "ground_truth.json").exists()
