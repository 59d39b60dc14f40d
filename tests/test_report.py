"""report: aggregation of real metrics JSONs and broken ones, grouped views, charts, failure analysis, comparison."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.cli import main as cli_main
from helpers.data import load_ground_truth
from helpers.fileio import read_json
from helpers.metrics import METRIC_KEYS, evaluate_rankings
from helpers.report import (class_labels, compare_runs, comparison_table, failure_analysis, grouped_views,
                            load_results, write_report)
from helpers.submission import load_submission

RUNS = ("tiny_lite0_none", "tiny_lite0_flip", "tiny_resnet18_random")


def produce_runs(base: Path, drawn_split: Path, get_lite0) -> Path:
    """Three real runs on the drawn split, written once per test session under ``base/report_runs``:
    efficientnet-lite0 without and with flip TTA (library calls), and a randomly initialised resnet18 through the
    ``retrieve`` verb (a different model, no download). ``results/`` and ``submissions/`` as the CLI writes them."""
    from helpers.pipeline import run_retrieval, save_run

    root = base / "report_runs"
    if (root / "done").exists():
        return root
    cache = base / "embedding-cache"
    lite0 = get_lite0()
    for tta in ("none", "flip"):
        name = f"tiny_lite0_{tta}"
        run = run_retrieval(drawn_split, model=lite0, tta=tta, device="cpu", progress=False, cache_dir=cache,
                            run_name=name)
        save_run(run, out=root / "submissions" / f"{name}.json", metrics_out=root / "results" / f"{name}.json")
    code = cli_main(["retrieve", "--data", str(drawn_split), "--model", "resnet18", "--weights", "none",
                     "--device", "cpu", "--no-cache", "--quiet", "--run-name", "tiny_resnet18_random",
                     "--out", str(root / "submissions" / "tiny_resnet18_random.json"),
                     "--metrics-out", str(root / "results" / "tiny_resnet18_random.json")])
    assert code == 0
    (root / "done").write_text("ok")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, drawn_split, request) -> Path:
    return produce_runs(tmp_path_factory.getbasetemp(), drawn_split, lambda: request.getfixturevalue("lite0"))


BROKEN = {
    "malformed.json": '{"model_name": "x", "metrics": {',
    "empty.json": "",
    "a_list.json": "[1, 2, 3]",
    "not_evaluated.json": json.dumps({"model_name": "x", "metrics": {}, "config": {}}),
    "future.json": json.dumps({"schema_version": 99, "model_name": "x", "metrics": {"hit@1": 0.5}}),
    "bad_config.json": json.dumps({"model_name": "x", "metrics": {"hit@1": 0.5}, "config": [1]}),
}


@pytest.fixture()
def results_dir(runs, drawn_split, tmp_path) -> Path:
    """The real metrics JSONs beside broken and foreign JSON files (one in a subfolder, one binary)."""
    folder = tmp_path / "results"
    shutil.copytree(runs / "results", folder)
    for name, text in BROKEN.items():
        (folder / name).write_text(text)
    (folder / "nested").mkdir()
    shutil.copy(drawn_split / "test" / "ground_truth.json", folder / "nested" / "ground_truth.json")
    (folder / "binary.json").write_bytes(bytes(range(256)))
    return folder


def test_load_results_reads_real_runs_and_skips_broken_files(results_dir, caplog):
    loaded = load_results(results_dir)
    frame = loaded.frame
    assert sorted(frame["run"]) == sorted(RUNS)
    skipped = {p.name: reason for p, reason in loaded.skipped}
    assert set(skipped) == set(BROKEN) | {"ground_truth.json", "binary.json"}
    assert "malformed JSON" in skipped["malformed.json"] and "malformed JSON" in skipped["empty.json"]
    assert "not a metrics JSON" in skipped["a_list.json"] and "not a metrics JSON" in skipped["ground_truth.json"]
    assert "none of" in skipped["not_evaluated.json"] and "newer" in skipped["future.json"]
    for name in skipped:
        assert name in caplog.text
    for run in RUNS:
        record = read_json(results_dir / f"{run}.json")
        row = frame.set_index("run").loc[run]
        for key in METRIC_KEYS:
            assert row[key] == pytest.approx(record["metrics"][key])
        assert row["model"] == record["model_name"] and row["tta"] == record["config"]["tta"]
    row = frame.set_index("run")
    assert row.loc["tiny_resnet18_random", "weights"] == "none"
    assert row.loc["tiny_lite0_flip", "options"] == "tta=flip; rerank=none"


def test_comparison_table_and_grouped_views(results_dir):
    frame = load_results(results_dir).frame
    table = comparison_table(frame)
    scores = table["weighted_score"].to_numpy()
    assert len(table) == 3 and np.all(scores[:-1] >= scores[1:])
    assert table["run"].iloc[-1] == "tiny_resnet18_random"  # random weights lose to ImageNet weights
    views = grouped_views(frame)
    assert set(views) == {"model", "pooling", "finetuning", "options"}
    by_model = views["model"].set_index("model")
    assert by_model.loc["efficientnet-lite0", "runs"] == 2 and by_model.loc["resnet18", "runs"] == 1
    lite = frame[frame["model"] == "efficientnet-lite0"]
    assert by_model.loc["efficientnet-lite0", "map@10 mean"] == pytest.approx(lite["map@10"].mean())
    assert by_model.loc["efficientnet-lite0", "best_run"] == lite.loc[lite["weighted_score"].idxmax(), "run"]
    assert set(views["options"]["options"]) == {"tta=none; rerank=none", "tta=flip; rerank=none"}


def test_report_verb_writes_tables_and_charts_directly_into_out(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", "--results", str(results_dir), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "3 run(s)" in stdout and f"{len(BROKEN) + 2} file(s) skipped" in stdout
    table = pd.read_csv(out / "comparison.csv")
    assert sorted(table["run"]) == sorted(RUNS)
    markdown = (out / "comparison.md").read_text()
    assert all(f"| {run}" in markdown for run in RUNS)
    for name in ("bar_weighted_score.png", "bar_hit1.png", "bar_map10.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 300
    for view in ("model", "pooling", "finetuning", "options"):
        assert (out / f"by_{view}.csv").is_file()
    for run in RUNS:
        for part in ("worst", "per_class", "confusions"):
            assert (out / f"failures_{run}_{part}.csv").is_file()
        worst = pd.read_csv(out / f"failures_{run}_worst.csv")
        assert worst["weighted_score"].is_monotonic_increasing
        with Image.open(out / f"failures_{run}_worst.png") as image:
            assert image.height > 500  # six query rows
    assert not [p for p in out.iterdir() if p.is_dir()]
    report = (out / "report.md").read_text()
    assert "## Skipped files" in report and "malformed.json" in report and "## Failure analysis" in report
    comparisons = list(out.glob("compare_*__vs__*.csv"))
    assert len(comparisons) == 1 and comparisons[0].name.count("tiny_lite0") == 2  # the best two runs
    assert comparisons[0].with_suffix(".png").is_file() and f"]({comparisons[0].with_suffix('.png').name})" in report


def test_report_without_any_valid_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "x.json").write_text("{oops")
    assert cli_main(["report", "--results", str(tmp_path / "r"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: no metrics JSON" in err and "x.json" in err and "Traceback" not in err
    assert cli_main(["report", "--results", str(tmp_path / "missing")]) == 2
    assert "results folder not found" in capsys.readouterr().err


def _naive_confusions(rankings, ground_truth, query_class, gallery_class, k=10):
    counts = Counter()
    for query, relevant in ground_truth.items():
        r = min(len(relevant), k)
        for name in rankings[query][:r]:
            if name not in relevant and gallery_class[name] != query_class[query]:
                counts[frozenset((query_class[query], gallery_class[name]))] += 1
    return counts


def test_failure_analysis_against_a_naive_count(runs, drawn_split):
    rankings = load_submission(runs / "submissions" / "tiny_resnet18_random.json")
    ground_truth = load_ground_truth(drawn_split / "test" / "ground_truth.json")
    labels = read_json(drawn_split / "test" / "labels.json")
    analysis = failure_analysis(rankings, ground_truth, labels, n_worst=5)
    evaluation = evaluate_rankings(rankings, ground_truth)
    per_query = {row["query"]: row for row in evaluation.per_query}
    worst_scores = sorted(row["weighted_score"] for row in evaluation.per_query)[:5]
    assert list(analysis.worst["weighted_score"]) == worst_scores
    assert all(analysis.per_query.set_index("query").loc[q, "class"] == labels["query"][q] for q in ground_truth)
    for _, row in analysis.per_class.iterrows():
        members = [q for q, c in labels["query"].items() if c == row["class"]]
        assert row["queries"] == len(members)
        assert row["map@10"] == pytest.approx(np.mean([per_query[q]["map@10"] for q in members]))
    naive = _naive_confusions(rankings, ground_truth, labels["query"], labels["gallery"])
    found = {frozenset((r.class_a, r.class_b)): r.in_top_r for r in analysis.confusions.itertuples()}
    assert {pair: count for pair, count in found.items() if count} == dict(naive)
    assert analysis.confusions["in_top_r"].is_monotonic_decreasing
    assert (analysis.confusions["a_to_b"] + analysis.confusions["b_to_a"] == analysis.confusions["in_top_r"]).all()


def test_classes_derived_from_ground_truth_match_the_labels(drawn_split):
    ground_truth = load_ground_truth(drawn_split / "test" / "ground_truth.json")
    labels = read_json(drawn_split / "test" / "labels.json")
    derived = class_labels(ground_truth, None)
    assert derived.derived

    def partition(mapping):
        return {frozenset(n for n, c in mapping.items() if c == cls) for cls in set(mapping.values())}

    assert partition(derived.query) == partition(labels["query"])
    assert partition(derived.gallery) == partition(labels["gallery"])


def test_compare_runs_says_what_each_gets_right(runs, drawn_split):
    ground_truth = load_ground_truth(drawn_split / "test" / "ground_truth.json")
    a = load_submission(runs / "submissions" / "tiny_lite0_none.json")
    b = load_submission(runs / "submissions" / "tiny_resnet18_random.json")
    comparison = compare_runs(a, b, ground_truth, name_a="lite0", name_b="random")
    hits_a = {r["query"]: r["hit@1"] for r in evaluate_rankings(a, ground_truth).per_query}
    hits_b = {r["query"]: r["hit@1"] for r in evaluate_rankings(b, ground_truth).per_query}
    assert set(comparison.only("a")) == {q for q in hits_a if hits_a[q] and not hits_b[q]}
    assert set(comparison.only("b")) == {q for q in hits_a if hits_b[q] and not hits_a[q]}
    assert comparison.counts["both right"] == sum(1 for q in hits_a if hits_a[q] and hits_b[q])
    assert sum(comparison.counts.values()) == len(ground_truth)
    assert comparison.only("a") and comparison.differing()[: len(comparison.only("a"))] == comparison.only("a")
    no_truth = compare_runs(a, b, None)
    assert {r.query for r in no_truth.frame.itertuples() if r.outcome == "same top-1"} == \
        {q for q in a if a[q][0] == b[q][0]}


def test_write_report_finds_submissions_by_run_name(runs, tmp_path):
    """A metrics JSON without a ``submission`` key: found as ``submissions/<run>.json`` beside ``results/``."""
    project = tmp_path / "project"
    shutil.copytree(runs / "submissions", project / "submissions")
    record = read_json(runs / "results" / "tiny_lite0_none.json")
    record.pop("submission")
    (project / "results").mkdir()
    (project / "results" / "tiny_lite0_none.json").write_text(json.dumps(record))
    outputs = write_report(project / "results", tmp_path / "out", images=False)
    assert outputs.analysed == ["tiny_lite0_none"] and not list((tmp_path / "out").glob("failures_*.png"))
    record["run_name"] = "renamed"
    (project / "results" / "tiny_lite0_none.json").write_text(json.dumps(record))
    outputs = write_report(project / "results", tmp_path / "out2", images=False)
    assert outputs.analysed == [] and "submission was not found" in outputs.not_analysed["renamed"]
