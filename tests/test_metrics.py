"""Metrics against hand-worked examples and the scoring rules for imperfect submissions."""

from __future__ import annotations

import json

import pytest

from helpers.metrics import METRIC_KEYS, build_metrics_record, evaluate_rankings, query_metrics, write_metrics


def test_hand_worked_query():
    relevant = {"a", "b", "c"}
    ranked = ["x", "a", "y", "b", "z", "q", "w", "e", "r", "c"]
    m = query_metrics(ranked, relevant)
    assert m["hit@1"] == 0 and m["hit@5"] == 1 and m["hit@10"] == 1
    assert m["precision@10"] == pytest.approx(0.3)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["map@10"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 10) / 3)
    assert m["weighted_score"] == 400  # 300 (top 5) + 100 (top 10)


@pytest.mark.parametrize(
    "ranked, expected",
    [(["a"] + ["x"] * 9, 1000), (["x", "x2", "x3", "x4", "a"], 400), (["x%d" % i for i in range(9)] + ["a"], 100),
     (["x%d" % i for i in range(10)] + ["a"], 0)],
)
def test_weighted_score_is_the_course_servers(ranked, expected):
    assert query_metrics(ranked, {"a"})["weighted_score"] == expected


def test_map_normalises_by_min_relevant_and_ten():
    relevant = {f"g{i}" for i in range(30)}
    assert query_metrics([f"g{i}" for i in range(10)], relevant)["map@10"] == pytest.approx(1.0)
    assert query_metrics([f"g{i}" for i in range(10)], relevant)["recall@10"] == pytest.approx(10 / 30)


def test_imperfect_submissions_are_scored_by_the_documented_rules():
    ground_truth = {"q1": ["a"], "q2": ["b"], "q3": ["c"]}
    rankings = {
        "q1": ["a", "a", "x"],  # a repeat and too few names
        "q2": ["zzz", "b"],  # a name outside the gallery
        "stranger": ["a"],  # unknown query, ignored
    }  # q3 missing: scores 0
    result = evaluate_rankings(rankings, ground_truth, k=10, gallery_names=["a", "b", "c", "x"])
    assert result.n_queries == 3
    assert result.metrics["hit@1"] == pytest.approx(1 / 3)
    assert result.metrics["weighted_score"] == pytest.approx((1000 + 400 + 0) / 3)
    assert result.metrics["precision@10"] == pytest.approx((0.1 + 0.1 + 0) / 3)  # the repeat does not count twice
    text = "\n".join(result.problems)
    for needle in ("not in the ground truth", "missing from the submission", "repeated names",
                   "not in the gallery", "only 3 names"):
        assert needle in text


def test_other_k_adds_hit_at_k():
    result = evaluate_rankings({"q": ["x", "x2", "a"]}, {"q": ["a"]}, k=3)
    assert result.metrics["hit@3"] == 1.0 and set(METRIC_KEYS) <= set(result.metrics)


def test_metrics_record_schema(tmp_path):
    metrics = evaluate_rankings({"q": ["a"]}, {"q": ["a"]}).metrics
    record = build_metrics_record(model_name="m", top_k=10, metrics=metrics, batch_size=8, runtime_seconds=1.23456789)
    for key in ("model_name", "top_k", "top_k_accuracy", "batch_size", "is_finetuned", "num_classes",
                "runtime_seconds", "loss_function", "num_epochs", "final_train_loss", "pooling_type", "metrics",
                "config", "versions", "git_commit", "device", "timestamp"):
        assert key in record
    assert record["top_k_accuracy"] == metrics["hit@10"]
    path = write_metrics(tmp_path / "r" / "m.json", record)
    assert json.loads(path.read_text())["runtime_seconds"] == 1.23456789  # unrounded


def test_a_name_outside_the_gallery_never_counts_even_when_the_ground_truth_lists_it():
    # The ground truth says "a" is relevant, but "a" is not in the gallery: the documented rule makes it a miss.
    result = evaluate_rankings({"q": ["a"]}, {"q": ["a"]}, gallery_names=["b"])
    assert result.metrics["hit@1"] == 0.0 and result.metrics["weighted_score"] == 0.0
    assert result.metrics["precision@10"] == 0.0 and result.metrics["map@10"] == 0.0
    assert any("not in the gallery (misses)" in p for p in result.problems)
    # Inside the gallery the same submission is a perfect hit; without a gallery list nothing is checked.
    assert evaluate_rankings({"q": ["a"]}, {"q": ["a"]}, gallery_names=["a", "b"]).metrics["hit@1"] == 1.0
    assert evaluate_rankings({"q": ["a"]}, {"q": ["a"]}).metrics["hit@1"] == 1.0
    # A hit after an outside name still counts at its own rank.
    mixed = evaluate_rankings({"q": ["zzz", "a"]}, {"q": ["a", "zzz"]}, gallery_names=["a", "b"])
    assert mixed.metrics["hit@1"] == 0.0 and mixed.metrics["hit@5"] == 1.0
    assert query_metrics(["zzz", "a"], {"a", "zzz"}, gallery={"a"})["precision@10"] == pytest.approx(0.1)
