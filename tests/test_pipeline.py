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


def test_run_name_holds_k_and_the_folder_that_holds_test(tmp_path):
    """``--k 5`` no longer replaces the k=10 run's files, and ``--data DIR/test`` is named after DIR."""
    from helpers.pipeline import default_run_name

    data = tmp_path / "birds"
    (data / "test" / "query").mkdir(parents=True)
    assert default_run_name(data, {"model": "efficientnet-lite0", "k": 10}) == "birds_efficientnet-lite0"
    assert default_run_name(data, {"model": "efficientnet-lite0", "k": 5}) == "birds_efficientnet-lite0_k-5"
    assert default_run_name(data / "test", {"model": "efficientnet-lite0", "k": 10}) == "birds_efficientnet-lite0"


def test_retrieve_config_repeats_a_run_byte_for_byte(tmp_path, demo_data, monkeypatch, capsys):
    """A run's metrics JSON holds its whole config: ``retrieve --config`` reproduces the submission and scores;
    options given override the file; runs that differ in an output option get their own files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))  # no int8 calibration from an earlier test
    first = ["retrieve", "--data", str(demo_data), "--k", "5", "--qe", "alpha", "--dba", "2", "--format", "list",
             "--quiet"]
    assert cli_main(first) == 0
    name = f"{demo_data.name}_efficientnet-lite0_k-5_qe-alpha_dba-2_format-list"
    submission, metrics = tmp_path / "submissions" / f"{name}.json", tmp_path / "results" / f"{name}.json"
    record = json.loads(metrics.read_text())
    assert record["run_name"] == name and record["config"]["k"] == 5 and record["config"]["precision"] == "auto"
    # auto keeps float32 below 200 images, and the metrics JSON says what was used and why
    assert record["config"]["embedding"]["precision"] == "fp32" and record["config"]["embedding"]["precision_reason"]
    assert [s["step"] for s in record["config"]["postprocess"]] == ["normalize", "dba", "search", "qe"]

    assert cli_main(["retrieve", "--config", str(metrics), "--out", "again.json", "--metrics-out", "again_m.json"]) == 0
    assert (tmp_path / "again.json").read_bytes() == submission.read_bytes()
    assert (tmp_path / "again.scores.json").read_bytes() == submission.with_name(f"{name}.scores.json").read_bytes()
    assert json.loads((tmp_path / "again_m.json").read_text())["metrics"] == record["metrics"]

    before = submission.read_bytes()
    assert cli_main(["retrieve", "--config", str(metrics), "--k", "3"]) == 0  # an option given overrides the file
    fewer = load_submission(tmp_path / "submissions" / f"{name.replace('k-5', 'k-3')}.json")
    assert {len(names) for names in fewer.values()} == {3} and submission.read_bytes() == before
    capsys.readouterr()


def test_run_retrieval_takes_a_config_and_todays_keywords(demo_data, lite0):
    from helpers.config import RUN_FACTS, RetrievalConfig

    common = dict(device="cpu", progress=False, num_workers=0, use_cache=False)
    by_keywords = run_retrieval(demo_data, model=lite0, k=4, tta="flip", **common)
    by_config = run_retrieval(demo_data, RetrievalConfig(k=4, tta="flip"), model=lite0, **common)
    assert by_config.rankings == by_keywords.rankings and by_config.scores == by_keywords.scores
    assert {len(names) for names in by_config.rankings.values()} == {4}
    assert by_config.config["cache"] is False and by_config.config["workers"] == 0
    stored = {key: value for key, value in by_config.config.items() if key not in RUN_FACTS}
    assert RetrievalConfig.from_dict(stored) == by_config.settings
    assert by_config.run_name == f"{demo_data.name}_efficientnet-lite0_k-4_tta-flip"
    with pytest.raises(TypeError, match="colour"):
        run_retrieval(demo_data, model=lite0, colour="red")
    with pytest.raises(ValueError, match="--k must be at least 1"):
        run_retrieval(demo_data, model=lite0, k=0, **common)


def test_queries_are_embedded_at_the_precision_the_gallery_got(demo_data, lite0, monkeypatch):
    """``auto`` decides per call (calibration needs 200 images): a small query set must not end up in another
    precision than the gallery it is compared with."""
    import helpers.pipeline as pipeline

    real = pipeline.extract_embeddings
    requested = {}

    def spy(model, paths, desc="", precision="auto", **options):
        requested[desc] = precision
        result = real(model, paths, desc=desc, precision="fp32", **options)
        if desc == "gallery" and precision == "auto":
            result.precision = "int8"  # as auto would choose after calibrating on a large gallery
        return result

    monkeypatch.setattr(pipeline, "extract_embeddings", spy)
    run_retrieval(demo_data, model=lite0, k=5, precision="auto", cache=False)
    assert requested == {"gallery": "auto", "query": "int8"}
