"""Both submission formats, conversion and validation."""

from __future__ import annotations

import json

import pytest

from helpers.submission import SubmissionError, load_submission, save_submission, validate_submission

RANKINGS = {"q1.jpg": [f"g{i}.jpg" for i in range(10)], "q 2 é.jpg": [f"g{i}.jpg" for i in range(10, 20)]}


@pytest.mark.parametrize("fmt", ["dict", "list"])
def test_round_trip(tmp_path, fmt):
    path = save_submission(tmp_path / f"{fmt}.json", RANKINGS, fmt=fmt)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict if fmt == "dict" else list)
    if fmt == "list":
        assert raw[0] == {"filename": "q1.jpg", "samples": RANKINGS["q1.jpg"]}
    assert load_submission(path) == RANKINGS


def test_validation_lists_every_problem():
    bad = {"q1.jpg": ["a", "a", ""], "unknown.jpg": ["a"] * 10}
    problems = validate_submission(bad, k=10, query_names=["q1.jpg", "q2.jpg"], gallery_names=["a"])
    text = "\n".join(problems)
    for needle in ("3 names, expected 10", "empty name", "duplicate", "not in the gallery", "not a known query",
                   "missing"):
        assert needle in text
    assert validate_submission(RANKINGS, k=10) == []


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"q": "g1"}', '[{"filename": "q"}]', "42"])
def test_malformed_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SubmissionError):
        load_submission(path)
