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


@pytest.mark.parametrize("value, kind", [("null", "null"), ("1", "int"), ("true", "bool"), ("NaN", "float"),
                                         ('["g"]', "list"), ('{"a": 1}', "dict")])
@pytest.mark.parametrize("fmt", ["dict", "list"])
def test_non_string_names_are_refused_with_their_position(tmp_path, value, kind, fmt):
    names = '["g0.jpg", "g1.jpg", ' + value + "]"
    text = f'{{"q.jpg": {names}}}' if fmt == "dict" else f'[{{"filename": "q.jpg", "samples": {names}}}]'
    path = tmp_path / "sub.json"
    path.write_text(text)
    with pytest.raises(SubmissionError, match=f"position 2: gallery names must be strings, got {kind}"):
        load_submission(path)


@pytest.mark.parametrize("query", ["null", "7", "[\"q\"]"])
def test_non_string_query_in_the_list_format_is_refused(tmp_path, query):
    path = tmp_path / "sub.json"
    path.write_text(f'[{{"filename": {query}, "samples": ["a"]}}]')
    with pytest.raises(SubmissionError, match="list entry 0: 'filename' must be a string"):
        load_submission(path)


def test_validation_names_non_string_entries_in_memory():
    problems = validate_submission({"q": ["a", None, 3, "b"], 5: ["a"]}, k=4)
    text = "\n".join(problems)
    assert "q: 2 name(s) not a string (position 1: null, position 2: int)" in text
    assert "a query name is int 5, not a string" in text


def test_repeated_keys_are_refused_in_the_dict_format(tmp_path):
    path = tmp_path / "sub.json"
    path.write_text('{"q.jpg": ["a", "b"], "r.jpg": ["c"], "q.jpg": ["d", "e"]}')
    with pytest.raises(SubmissionError, match="'q.jpg' appears twice"):
        load_submission(path)


def test_deep_nesting_is_a_clear_error_and_evaluate_exits_2(tmp_path, capsys):
    from helpers.cli import main as cli_main

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    with pytest.raises(SubmissionError, match="nested too deeply"):
        load_submission(path)
    truth = tmp_path / "gt.json"
    truth.write_text('{"q.jpg": ["a"]}')
    assert cli_main(["evaluate", "--submission", str(path), "--ground-truth", str(truth)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nested too deeply" in err and len(err.strip().splitlines()) == 1
