"""select: the class-disjoint validation split, the candidate search, the leaderboard, the winner run on a test
folder without ground truth; split --holdout-classes; the course's ground-truth list; the dry run's name count."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest

from helpers import client
from helpers.cli import main as cli_main
from helpers.config import RetrievalConfig
from helpers.data import DataError, list_images, load_ground_truth, load_retrieval_set
from helpers.models import ModelError
from helpers.select import (Candidate, CandidateResult, ModelShelf, Search, SelectOptions, build_validation,
                            embedding_candidates, fusion_candidates, postprocess_candidates, select, trained_candidate)


def _no_truth_copy(demo_data: Path, target: Path) -> Path:
    """The demo competition folder without test/ground_truth.json (and without labels), as a real test set."""
    shutil.copytree(demo_data, target)
    (target / "test" / "ground_truth.json").unlink()
    (target / "test" / "labels.json").unlink()
    return target


def _course_shaped(demo_data: Path, target: Path) -> Path:
    """A folder shaped as the course's example set: 3 training classes, 2 queries, 6 gallery images, no ground
    truth (real digit scans of the demo)."""
    for label in ("0", "1", "2"):
        shutil.copytree(demo_data / "training" / label, target / "training" / label)
    for part, per_class in (("query", 1), ("gallery", 3)):  # two other classes, 3 and 4
        (target / "test" / part).mkdir(parents=True)
        for digit in ("3", "4"):
            for source in [p for p in list_images(demo_data / "test" / part) if p.name.startswith(f"digit{digit}_")][
                    :per_class]:
                shutil.copy2(source, target / "test" / part / source.name)
    return target


@pytest.fixture(scope="module")
def selected(demo_data, tmp_path_factory):
    """One `select --grid quick` with the offline model on a folder shaped as the course's example set."""
    root = tmp_path_factory.mktemp("select")
    data = _course_shaped(demo_data, root / "comp")
    with pytest.MonkeyPatch.context() as patch:  # the session's cache (see conftest), never the user's
        patch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "embedding-cache"))
        outcome = select(data=str(data), models=["efficientnet-lite0"], grid="quick", out=str(root / "out"),
                         device="cpu", progress=False, budget_minutes=30)
    return data, outcome


# --------------------------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------------------------
def test_split_holdout_classes_writes_a_validation_of_training_classes_only(demo_data, tmp_path, capsys):
    out = tmp_path / "split"
    assert cli_main(["split", "--source", str(demo_data / "training"), "--holdout-classes", "0.2", "--out",
                     str(out), "--seed", "3"]) == 0
    classes = json.loads((out / "validation" / "classes.json").read_text())
    training_classes = sorted(p.name for p in (demo_data / "training").iterdir())
    assert set(classes) == {"held_out", "training"}
    assert len(classes["held_out"]) == 2 and sorted(classes["held_out"] + classes["training"]) == training_classes
    labels = json.loads((out / "validation" / "test" / "labels.json").read_text())
    assert set(labels["query"].values()) | set(labels["gallery"].values()) == set(classes["held_out"])
    validation = load_retrieval_set(out / "validation")
    training_names = {p.name for c in classes["held_out"] for p in list_images(demo_data / "training" / c)}
    test_names = {p.name for part in ("query", "gallery") for p in list_images(demo_data / "test" / part)}
    names = set(validation.query_names) | set(validation.gallery_names)
    assert names <= training_names and not names & test_names  # held-out training images only, never a test image
    for query, relevant in validation.ground_truth.items():
        assert relevant and all(labels["gallery"][g] == labels["query"][query] for g in relevant)
    assert "validation" in capsys.readouterr().out


def test_validation_is_reused_when_unchanged_and_rebuilt_for_another_seed(demo_data, tmp_path):
    first, reused = build_validation(demo_data, tmp_path / "v", 0.2, seed=0)
    assert not reused
    stamp = (tmp_path / "v" / "classes.json").stat().st_mtime_ns
    again, reused = build_validation(demo_data, tmp_path / "v", 0.2, seed=0)
    assert reused and again.held_out == first.held_out
    assert (tmp_path / "v" / "classes.json").stat().st_mtime_ns == stamp
    other = [build_validation(demo_data, tmp_path / "v", 0.2, seed=s)[0].held_out for s in range(1, 6)]
    assert any(h != first.held_out for h in other)
    assert json.loads((tmp_path / "v" / "classes.json").read_text())["held_out"] == other[-1]


def test_three_classes_are_enough_when_nothing_is_trained(demo_data, tmp_path):
    source = tmp_path / "three"
    for label in ("0", "1", "2"):
        shutil.copytree(demo_data / "training" / label, source / label)
    split, _ = build_validation(source, tmp_path / "v", 0.2, min_training=0)
    assert len(split.held_out) == 2 and len(split.training) == 1
    with pytest.raises(DataError, match="cannot hold out 2 whole classes"):
        build_validation(source, tmp_path / "w", 0.2)  # fine-tuning needs 2 classes of its own


def test_split_holdout_refuses_a_bad_share(demo_data, tmp_path, capsys):
    assert cli_main(["split", "--source", str(demo_data), "--holdout-classes", "1.5", "--out", str(tmp_path)]) == 2
    assert "error: --holdout-classes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Candidates, budget, models
# --------------------------------------------------------------------------------------------------------------
def test_quick_grid_has_at_least_four_candidates_for_one_model():
    base = RetrievalConfig(device="cpu")
    embedding = embedding_candidates("efficientnet-lite0", base, "quick")
    post = postprocess_candidates(embedding[0].config, "quick")
    assert len(embedding) + len(post) >= 4
    assert {c.config.tta for c in embedding} == {"none", "flip"} and {c.config.pool for c in embedding} == {None, "gem"}
    assert {(c.config.qe, c.config.dba, c.config.rerank) for c in post} == {
        ("alpha", 0, "none"), ("none", 3, "none"), ("none", 0, "kreciprocal")}
    assert len({c.name for c in embedding + post}) == len(embedding + post)
    default = postprocess_candidates(embedding[0].config, "default")
    assert len(default) > len(post) and {c.config.k1 for c in default} >= {10, 20, 30}
    others = [RetrievalConfig(model="resnet18"), RetrievalConfig(model="vit-b16")]
    fused = fusion_candidates([embedding[0].config] + others)
    assert [c.config.models for c in fused] == [["efficientnet-lite0", "resnet18"]] * 2 + [
        ["efficientnet-lite0", "resnet18", "vit-b16"]]


def test_budget_stops_with_the_best_so_far(tmp_path):
    class Slow(Search):
        def score(self, candidate):
            time.sleep(0.2)
            result = CandidateResult(candidate, {"weighted_score": 100.0 * len(self.results)}, 0.2,
                                     order=len(self.results))
            self.costs[candidate.embeds].append(0.2)
            self.results.append(result)
            return result

    search = Slow(tmp_path, tmp_path, shelf=None, budget_minutes=0.005, progress=False)  # 0.3 s
    candidates = [Candidate(f"c{i}", RetrievalConfig(k=i + 1)) for i in range(10)]
    done = search.run(candidates)
    assert 1 <= len(done) < 10 and search.left_out == 10 - len(done)
    assert search.best().candidate.name == done[-1].candidate.name


def test_default_models_run_on_a_cpu_offline():
    from helpers.models import get_spec
    from helpers.select import default_models

    models = default_models("cpu")
    assert models[0] == "efficientnet-lite0" and get_spec(models[0]).offline_weights


def test_models_whose_weights_cannot_be_had_are_skipped_with_their_reason(monkeypatch, caplog):
    def fake_get(self, name, pool=None):
        if name == "resnet18":
            raise ModelError("cannot fetch the pretrained weights of resnet18 (no network)")
        return object()

    monkeypatch.setattr(ModelShelf, "get", fake_get)
    shelf = ModelShelf(device="cpu")
    assert shelf.available(["resnet18", "efficientnet-lite0"]) == ["efficientnet-lite0"]
    assert shelf.skipped == [("resnet18", "cannot fetch the pretrained weights of resnet18 (no network)")]
    assert "skipped model resnet18" in caplog.text
    with pytest.raises(ModelError):
        shelf.available(["no-such-model"])


def test_trained_candidate_learns_on_the_other_classes_only(demo_data, tmp_path):
    split, _ = build_validation(demo_data, tmp_path / "validation", 0.2, seed=1)
    options = SelectOptions(data=str(demo_data), holdout_classes=0.2, seed=1, train="circle", train_epochs=1,
                            device="cpu", progress=False)
    candidate = trained_candidate("circle", demo_data, "efficientnet-lite0", RetrievalConfig(device="cpu"), split,
                                  options, tmp_path)
    assert candidate is not None and candidate.stage == "trained" and Path(candidate.config.checkpoint).is_file()
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert sorted(config["held_out"]) == split.held_out and sorted(config["classes"]) == split.training
    assert config["trainable"] == "head" and config["epochs"] == 1


def test_select_needs_a_training_folder(demo_data, tmp_path, capsys):
    shutil.copytree(demo_data / "test", tmp_path / "comp" / "test")
    assert cli_main(["select", "--data", str(tmp_path / "comp"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "error: training folder not found" in capsys.readouterr().err


def test_no_model_left_is_a_clear_error(demo_data, tmp_path, capsys):
    data = _no_truth_copy(demo_data, tmp_path / "comp")
    code = cli_main(["select", "--data", str(data), "--model", "efficientnet-lite0", "--weights",
                     str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "error: no model left to select from: efficientnet-lite0:" in err


# --------------------------------------------------------------------------------------------------------------
# One whole selection on a test folder without ground truth
# --------------------------------------------------------------------------------------------------------------
def test_select_validates_on_training_classes_only(selected):
    data, outcome = selected
    training = sorted(p.name for p in (data / "training").iterdir())
    assert set(outcome.split.held_out) < set(training)
    assert json.loads((outcome.validation_dir / "classes.json").read_text())["held_out"] == outcome.split.held_out
    test_names = {p.name for p in list_images(data / "test" / "query") + list_images(data / "test" / "gallery")}
    validation = load_retrieval_set(outcome.validation_dir)
    assert not (set(validation.query_names) | set(validation.gallery_names)) & test_names


def test_leaderboard_has_one_row_per_candidate_best_first(selected):
    _, outcome = selected
    assert len(outcome.results) >= 4 and all(r.metrics for r in outcome.results)
    with open(outcome.leaderboard["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(outcome.results)
    assert {r["run"] for r in rows} == {r.candidate.name for r in outcome.results}
    scores = [float(r["weighted_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0]["run"] == outcome.winner.candidate.name
    assert len(list((outcome.out_dir / "candidates").glob("*.json"))) == len(outcome.results)
    assert outcome.leaderboard["png"].stat().st_size > 0 and outcome.leaderboard["md"].read_text().count("\n|") >= 2


def test_submission_is_valid_for_the_test_folder_without_ground_truth(selected, tmp_path, monkeypatch):
    data, outcome = selected
    assert outcome.test_metrics is None and outcome.problems == []
    rankings = json.loads(outcome.submission.read_text())
    assert sorted(rankings) == load_retrieval_set(data).query_names
    assert client.check_submission(rankings, k=10, data=data) == []
    assert all(len(names) == 6 for names in rankings.values())  # the whole 6-image gallery, not 10 names
    assert outcome.grid.stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    assert client.main([str(outcome.submission), "--group", "g", "--dry-run", "--data", str(data)]) == 0
    assert outcome.send_command.startswith(f"python submit.py {outcome.submission} --group")


def test_winner_config_reruns_through_retrieve_to_the_same_submission(selected, tmp_path):
    data, outcome = selected
    assert RetrievalConfig.from_record(outcome.winner_config) == outcome.winner.candidate.config.replace(
        data=str(data), progress=True)
    again = tmp_path / "again.json"
    assert cli_main(["retrieve", "--config", str(outcome.winner_config), "--out", str(again), "--quiet"]) == 0
    assert json.loads(again.read_text()) == json.loads(outcome.submission.read_text())
    winner = json.loads(outcome.winner_config.read_text())
    assert winner["candidate"] == outcome.winner.candidate.name
    assert winner["validation_metrics"]["weighted_score"] == max(r.metrics["weighted_score"] for r in outcome.results)


# --------------------------------------------------------------------------------------------------------------
# The course's ground-truth list and the dry run's count
# --------------------------------------------------------------------------------------------------------------
def _course_list(queries: dict[str, list[str]]) -> list[dict]:
    return [{"filename": f"test_folder/query_images/{q}",
             "gallery_images": [f"test_folder/gallery_images/{g}" for g in relevant]}
            for q, relevant in queries.items()]


def test_course_ground_truth_list_is_read_as_file_names(demo_data, tmp_path, capsys):
    truth = load_ground_truth(demo_data / "test" / "ground_truth.json")
    path = tmp_path / "query_to_gallery_mapping.json"
    path.write_text(json.dumps(_course_list(truth)))
    assert load_ground_truth(path) == truth
    submission = tmp_path / "perfect.json"
    submission.write_text(json.dumps({q: relevant[:10] for q, relevant in truth.items()}))
    assert cli_main(["evaluate", "--submission", str(submission), "--ground-truth", str(path)]) == 0
    assert "hit@1" in capsys.readouterr().out
    from helpers.server import create_app

    app = create_app(path, db=tmp_path / "server.sqlite3")
    assert app.state.ground_truth == truth


def test_course_ground_truth_list_refuses_ambiguous_file_names(tmp_path, capsys):
    ambiguous = [{"filename": "a/query_images/x.jpg", "gallery_images": ["a/gallery_images/y.jpg"]},
                 {"filename": "b/query_images/z.jpg", "gallery_images": ["b/gallery_images/y.jpg"]}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ambiguous))
    with pytest.raises(DataError, match="'a/gallery_images/y.jpg' and 'b/gallery_images/y.jpg' both reduce"):
        load_ground_truth(path)
    ambiguous[1]["filename"] = "b/query_images/x.jpg"
    path.write_text(json.dumps(ambiguous))
    with pytest.raises(DataError, match="query paths"):
        load_ground_truth(path)
    path.write_text(json.dumps([{"filename": "x.jpg"}]))
    submission = tmp_path / "s.json"
    submission.write_text(json.dumps({"x.jpg": ["y.jpg"]}))
    assert cli_main(["evaluate", "--submission", str(submission), "--ground-truth", str(path)]) == 2
    assert "error: ground truth" in capsys.readouterr().err


def test_dry_run_with_data_expects_min_k_and_gallery_size_names(demo_data, tmp_path, monkeypatch, capsys):
    """The course's example set: 2 queries, 6 gallery images; a submission ranks all 6 for each query."""
    data = _course_shaped(demo_data, tmp_path / "course")
    gallery = [p.name for p in list_images(data / "test" / "gallery")]
    rankings = {p.name: gallery for p in list_images(data / "test" / "query")}
    path = tmp_path / "six.json"
    path.write_text(json.dumps(rankings))
    monkeypatch.chdir(tmp_path)
    assert client.main([str(path), "--group", "g", "--dry-run", "--data", str(data)]) == 0
    assert client.main([str(path), "--group", "g", "--dry-run"]) == client.EXIT_NOT_SENT  # no --data: 10 expected
    assert "6 names, expected 10" in capsys.readouterr().err
    path.write_text(json.dumps({q: names[:5] for q, names in rankings.items()}))
    assert client.main([str(path), "--group", "g", "--dry-run", "--data", str(data)]) == client.EXIT_NOT_SENT
    assert "5 names, expected 6" in capsys.readouterr().err


def test_submit_sends_the_winner_through_the_client_and_logs_it(selected, tmp_path, monkeypatch, capsys):
    from tests.test_client import MockCourseServer

    data, outcome = selected
    monkeypatch.setattr("helpers.select.select", lambda options: outcome)  # the selection above, not a new one
    monkeypatch.chdir(tmp_path)
    assert cli_main(["select", "--data", str(data), "--submit", "--url", "http://127.0.0.1:1/"]) == 2
    assert "--submit needs --group" in capsys.readouterr().err
    with MockCourseServer([(200, b'{"accuracy": 750.0}', 0)]) as mock:
        code = cli_main(["select", "--data", str(data), "--submit", "--group", "team", "--url", mock.url])
    assert code == 0 and "accuracy: 750.0" in capsys.readouterr().out
    sent = json.loads(mock.received[0]["body"])
    assert sent == {"groupname": "team", "images": json.loads(outcome.submission.read_text())}
    log = client.read_log(tmp_path / "submissions" / "submit_log.jsonl")
    assert log[-1]["outcome"] == "ok" and log[-1]["group"] == "team"


def test_select_runs_in_float32_unless_asked(selected, demo_data, tmp_path, capsys):
    """A competition counts rank 1: select scores and submits in float32 by default (int8 can cost hit@1)."""
    from helpers.fileio import read_json
    from helpers.select import SelectOptions

    assert SelectOptions().precision == "fp32"
    assert read_json(selected[1].winner_config)["config"]["precision"] == "fp32"
    with pytest.raises(SystemExit) as stopped:
        cli_main(["select", "--data", str(demo_data), "--precision", "int4"])
    assert stopped.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
