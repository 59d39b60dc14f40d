"""RetrievalConfig: defaults, checks, JSON round trip, run names, and the retrieve options generated from it."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from helpers.cli import build_parser
from helpers.cli.core import retrieve_config
from helpers.config import RetrievalConfig, cli_flag, dataset_name, json_key
from helpers.models import DEFAULT_MODEL


def _retrieve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["retrieve"]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_retrieve_option_is_a_config_field_with_the_same_default():
    options = _options(_retrieve_parser())
    fields = {cli_flag(f): f for f in dataclasses.fields(RetrievalConfig) if f.metadata.get("cli")}
    assert set(options) - {"-h", "--help", "--config"} == set(fields)
    for flag, f in fields.items():
        assert options[flag].dest == f.name, flag
    # nothing given: exactly the config's defaults
    args = build_parser().parse_args(["retrieve"])
    assert retrieve_config(args) == RetrievalConfig()
    assert RetrievalConfig().model == DEFAULT_MODEL and RetrievalConfig().k == 10


@pytest.mark.parametrize("argv, expected", [
    (["--k", "5"], {"k": 5}),
    (["--model", "a", "--model", "b", "--fusion-weights", "0.6,0.4"], {"model": ["a", "b"], "fusion_weights": [0.6, 0.4]}),
    (["--model", "resnet50"], {"model": "resnet50"}),
    (["--no-cache", "--quiet"], {"cache": False, "progress": False}),
    (["--lambda", "0.2", "--rerank", "kreciprocal", "--k1", "8"], {"lambda_value": 0.2, "rerank": "kreciprocal", "k1": 8}),
    (["--data", "x/test", "--format", "list", "--tta", "flip"], {"data": "x/test", "format": "list", "tta": "flip"}),
])
def test_options_given_set_their_field_only(argv, expected):
    config = retrieve_config(build_parser().parse_args(["retrieve", *argv]))
    assert config == RetrievalConfig(**expected)
    for name, value in expected.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize("changes, message", [
    ({"k": 0}, "--k must be at least 1"),
    ({"k": -1}, "--k must be at least 1"),
    ({"k": 2.5}, "--k must be an integer"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"tta": "rotate"}, "--tta must be one of none, flip, multiscale"),
    ({"rerank": "yes"}, "--rerank must be one of"),
    ({"index": "lsh"}, "--index must be one of"),
    ({"k1": 0}, "--k1 must be at least 1"),
    ({"k2": 6.5}, "--k2 must be an integer"),
    ({"lambda_value": 1.5}, "--lambda must be between 0 and 1"),
    ({"qe_k": 0}, "--qe-k must be at least 1"),
    ({"dba": -1}, "--dba must be at least 0"),
    ({"text_weight": 2}, "--text-weight must be between 0 and 1"),
    ({"model": ["a", "b"], "fusion_weights": [1.0]}, "--fusion-weights has 1 values for 2 --model"),
    ({"model": ["a", "b"], "fusion_weights": [0, 0]}, "--fusion-weights must be >= 0 and not all 0"),
    ({"fusion_weights": "1,x"}, "--fusion-weights expects comma-separated numbers"),
    ({"model": ["a", "b"], "fusion": "score", "qe": "avg"}, "--fusion score ranks by summed similarities"),
    ({"format": "csv"}, "--format must be one of dict, list"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"model": []}, "--model must be a model name"),
])
def test_each_bad_value_is_one_clear_error_naming_the_option(changes, message):
    with pytest.raises(ValueError, match=message):
        RetrievalConfig(**changes)


def test_bad_values_exit_2_on_the_command_line(capsys):
    from helpers.cli import main

    assert main(["retrieve", "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --k must be at least 1, got 0"


def test_json_round_trip_and_unknown_keys():
    config = RetrievalConfig(data="d", model=["efficientnet-lite0", "resnet50"], fusion_weights=[0.6, 0.4],
                             k=7, tta="flip", qe="alpha", qe_k=3, dba=2, index="flat", lambda_value=0.2,
                             pool="gem", cache=False, format="list", out="s.json", precision="fp32")
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["lambda"] == 0.2 and stored["fusion_weights"] == "0.6,0.4" and stored["precision"] == "fp32"
    assert set(stored) == {json_key(f) for f in dataclasses.fields(RetrievalConfig)}
    assert RetrievalConfig.from_dict(stored) == config
    with pytest.raises(ValueError, match="unknown retrieval config key.*colour"):
        RetrievalConfig.from_dict({**stored, "colour": "red"})


def test_from_record_reads_a_metrics_json(tmp_path):
    config = RetrievalConfig(k=5, rerank="kreciprocal")
    stored = config.replace(out="first.json", metrics_out="first_m.json", grid="g.png", run_name="first")
    record = {"metrics": {}, "config": {**stored.to_dict(), "search": {"index": "exact"},
                                        "postprocess": [{"step": "kreciprocal"}]}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(record))
    # every option but where the files went: a repeated run with other options never overwrites the first's files
    assert RetrievalConfig.from_record(path) == config
    path.write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="not a metrics JSON of a retrieve run"):
        RetrievalConfig.from_record(path)
    with pytest.raises(FileNotFoundError, match="--config"):
        RetrievalConfig.from_record(tmp_path / "missing.json")


def test_run_name_holds_every_option_that_changes_the_output(tmp_path):
    data = tmp_path / "birds"
    (data / "test" / "query").mkdir(parents=True)
    base = RetrievalConfig(data=str(data))
    assert base.run_name_for() == "birds_efficientnet-lite0"
    # the dataset is named by the folder that holds test/, also when --data points at test/ itself
    assert dataset_name(data / "test") == "birds"
    assert RetrievalConfig(data=str(data / "test")).run_name_for() == "birds_efficientnet-lite0"
    names = {base.replace(**change).run_name_for() for change in (
        {}, {"k": 5}, {"tta": "flip"}, {"weights": "none"}, {"pool": "gem"}, {"rerank": "kreciprocal"},
        {"rerank": "kreciprocal", "k1": 8}, {"qe": "alpha"}, {"qe": "alpha", "qe_k": 3}, {"dba": 2},
        {"index": "hnsw"}, {"text_modifier": "in red"}, {"format": "list"}, {"cache_dtype": "float16"},
        {"model": ["efficientnet-lite0", "resnet50"]},
    )}
    assert len(names) == 15
    assert base.replace(k=5).run_name_for() == "birds_efficientnet-lite0_k-5"
    # where files go, the hardware and the cache do not change the rankings: same name
    for change in ({"batch_size": 8}, {"device": "cpu"}, {"out": "x.json"}, {"cache": False}, {"workers": 0},
                   {"k1": 8}, {"qe_k": 3}):
        assert base.replace(**change).run_name_for() == base.run_name_for(), change
    assert base.replace(run_name="mine", k=3).run_name_for() == "mine"


def test_pipeline_and_report_use_the_config_derivation(tmp_path):
    from helpers.pipeline import default_run_name
    from helpers.report import _rerank_options

    config = RetrievalConfig(data=str(tmp_path), k=5, rerank="kreciprocal", k1=8)
    assert default_run_name(tmp_path, config.to_dict()) == config.run_name_for()
    assert _rerank_options(config.to_dict()) == "k1=8, rerank=kreciprocal"
    assert _rerank_options(RetrievalConfig(qe_k=3).to_dict()) == "none"  # qe_k without --qe takes no effect


def test_a_notebook_record_scored_on_a_validation_split_replays(tmp_path):
    """Notebooks record ``scored_on`` (the validation split of a test without ground truth): a fact of the run,
    not an option, so ``retrieve --config`` must accept the record."""
    from helpers.config import RetrievalConfig

    record = {"config": {**RetrievalConfig(k=7).to_dict(), "scored_on": str(tmp_path / "validation")}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    assert RetrievalConfig.from_record(tmp_path / "run.json").k == 7
