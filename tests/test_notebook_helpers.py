"""helpers.notebook: the fast-mode switch, project root, Colab requirements, fast data and output checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import notebook
from helpers.data import DataError, load_retrieval_set
from helpers.notebook import (
    check_run_outputs,
    colab_requirements,
    fast_dataset,
    fast_mode,
    maybe_submit,
    notebook_data,
    output_paths,
    output_root,
    project_root,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), (" 1 ", True), ("true", True), ("no", False)])
def test_fast_mode_from_environment(monkeypatch, value, expected):
    monkeypatch.setenv("RETRIEVAL_FAST", value)
    assert fast_mode() is expected


def test_fast_mode_unset_follows_the_gpu(monkeypatch):
    monkeypatch.delenv("RETRIEVAL_FAST", raising=False)
    monkeypatch.setattr(notebook, "_cuda_available", lambda: True)
    assert fast_mode() is False
    monkeypatch.setattr(notebook, "_cuda_available", lambda: False)
    assert fast_mode() is True


def test_fast_mode_parameter_wins_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FAST", "1")
    assert fast_mode(False) is False
    assert fast_mode("0") is False
    monkeypatch.setenv("RETRIEVAL_FAST", "maybe")
    with pytest.raises(ValueError, match="RETRIEVAL_FAST must be 1"):
        fast_mode()


def test_project_root_from_a_subfolder_and_outside(tmp_path, monkeypatch):
    assert project_root(ROOT / "notebooks") == ROOT
    monkeypatch.chdir(ROOT / "notebooks")
    assert project_root() == ROOT
    assert output_paths("x", ROOT)["metrics"] == ROOT / "results" / "x.json"
    assert project_root(tmp_path) == tmp_path.resolve()


def test_output_root_keeps_fast_runs_out_of_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT / "notebooks")
    monkeypatch.delenv("RETRIEVAL_OUTPUT_DIR", raising=False)
    assert output_root(fast=False) == ROOT
    fast_root = output_root(fast=True)
    assert fast_root.name == "retrieval-fast-outputs" and ROOT not in fast_root.parents
    monkeypatch.setenv("RETRIEVAL_FAST", "1")
    assert output_paths("fast_x")["grid"] == fast_root / "visualizations" / "fast_x.png"
    monkeypatch.setenv("RETRIEVAL_OUTPUT_DIR", str(tmp_path))
    for fast in (True, False):
        assert output_root(fast) == tmp_path.resolve()
    assert output_paths("fast_x")["submission"] == tmp_path.resolve() / "submissions" / "fast_x.json"


def test_colab_requirements_keep_colab_torch_and_install_only_what_notebooks_need(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.6", "torchvision>=0.21 ; python_version>\'3\'", '
        '"timm>=1.0", "Open_Clip_Torch>=3.0", "TorchAudio"]\n'
        '[project.optional-dependencies]\nnotebooks = ["ipykernel>=6.29", "timm>=1.0"]\ntest = ["pytest>=8"]\n')
    assert colab_requirements(tmp_path) == ["timm>=1.0", "Open_Clip_Torch>=3.0", "ipykernel>=6.29"]
    kept = colab_requirements(ROOT)
    names = {line.split(">")[0].split("[")[0] for line in kept}
    assert {"timm", "open_clip_torch", "faiss-cpu", "ipykernel"} <= names
    assert not names & {"torch", "torchvision", "pytest", "nbval", "fastapi", "ray"}


def test_colab_setup_dry_run_never_installs_torch():
    commands = notebook.colab_setup(ROOT, dry_run=True)
    assert commands[-1][-3:] == ["--no-deps", "-e", str(ROOT)]
    filtered = Path(commands[0][-1]).read_text().split()
    assert "timm>=1.0" in filtered and not any(line.startswith("torch") for line in filtered)


def test_fast_dataset_is_a_real_split(tmp_path, imagenette_val, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_SHARED_DATASETS", str(imagenette_val.parent))
    out = fast_dataset(out=tmp_path / "fast")
    dataset = load_retrieval_set(out)
    assert len(dataset.query_paths) == 10 * notebook.FAST_SPLIT["query_per_class"]
    assert len(dataset.gallery_paths) == 10 * notebook.FAST_SPLIT["gallery_per_class"]
    assert len(list((out / "training").rglob("*.JPEG"))) == 10 * notebook.FAST_SPLIT["train_per_class"]
    assert set(dataset.ground_truth) == set(dataset.query_names)


def test_fast_dataset_falls_back_to_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_SHARED_DATASETS", str(tmp_path / "absent"))
    out = fast_dataset(out=tmp_path / "demo", query_per_class=1, gallery_per_class=3, train_per_class=2)
    dataset = load_retrieval_set(out)
    assert len(dataset.query_paths) == 10 and len(dataset.gallery_paths) == 30
    assert all(p.suffix == ".png" for p in dataset.query_paths)


def test_notebook_data_full_mode_checks_the_folder(tmp_path, demo_data, capsys):
    assert notebook_data(False, demo_data) == demo_data
    assert "ready" in capsys.readouterr().out
    with pytest.raises(DataError, match="data source not found"):
        notebook_data(False, tmp_path / "missing")


def test_notebook_data_unpacks_a_zip_once_and_needs_training_only_where_it_trains(tmp_path, demo_data, monkeypatch):
    import shutil

    monkeypatch.setenv("RETRIEVAL_DATA_CACHE", str(tmp_path / "cache"))
    shutil.copytree(demo_data / "test", tmp_path / "comp" / "test")
    archive = shutil.make_archive(str(tmp_path / "comp"), "zip", tmp_path, "comp")
    first = notebook_data(False, archive)
    assert (first / "test" / "query").is_dir() and tmp_path / "cache" in first.parents
    assert notebook_data(True, archive) == first  # unpacked once; fast mode with a source of its own uses it
    with pytest.raises(DataError, match="no training/ folder"):
        notebook_data(False, archive, need_training=True)


def test_scoring_data_is_a_class_disjoint_split_of_training_without_ground_truth(tmp_path, demo_data):
    import shutil

    from helpers.notebook import scoring_data

    assert scoring_data(demo_data) == demo_data  # labelled: scored on its own test
    data = tmp_path / "competition"
    shutil.copytree(demo_data, data)
    (data / "test" / "ground_truth.json").unlink()
    (data / "test" / "labels.json").unlink(missing_ok=True)
    validation = scoring_data(data, seed=3)
    held_out = json.loads((validation / "classes.json").read_text())["held_out"]
    training = {p.name for p in (data / "training").iterdir() if p.is_dir()}
    assert validation != data and len(held_out) >= 2 and set(held_out) <= training
    assert load_retrieval_set(validation).ground_truth, "the validation split must carry ground truth"
    assert scoring_data(data, seed=3) == validation  # built once, then reused


def _write_outputs(tmp_path, rankings, metrics):
    submission = tmp_path / "sub.json"
    submission.write_text(json.dumps(rankings))
    record = tmp_path / "metrics.json"
    record.write_text(json.dumps({"metrics": metrics}))
    return submission, record


def test_check_run_outputs_accepts_a_good_run_and_catches_bad_ones(tmp_path, demo_data):
    from PIL import Image

    from helpers.metrics import evaluate_rankings

    dataset = load_retrieval_set(demo_data)
    good = {q: list(dict.fromkeys(dataset.ground_truth[q] + dataset.gallery_names))[:5] for q in dataset.query_names}
    metrics = evaluate_rankings(good, dataset.ground_truth, k=5).metrics
    submission, record = _write_outputs(tmp_path, good, metrics)
    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    assert check_run_outputs(submission, demo_data, record, [tmp_path / "grid.png"], k=5) == metrics
    with pytest.raises(AssertionError, match="hit@1"):
        check_run_outputs(submission, demo_data, record, k=5, min_metrics={"hit@1": 1.01})
    with pytest.raises(AssertionError, match="invalid submission"):
        check_run_outputs(submission, demo_data, k=10)  # 5 names per query, not 10

    submission, record = _write_outputs(tmp_path, {**good, "stranger.png": dataset.gallery_names[:5]}, metrics)
    with pytest.raises(AssertionError, match="not a known query"):
        check_run_outputs(submission, demo_data, k=5)
    submission, record = _write_outputs(tmp_path, {q: ["nowhere.png"] * 5 for q in good}, metrics)
    with pytest.raises(AssertionError, match="not in the gallery"):
        check_run_outputs(submission, demo_data, k=5)
    submission, record = _write_outputs(tmp_path, good, {"hit@1": 1.5})
    with pytest.raises(AssertionError, match="outside"):
        check_run_outputs(submission, demo_data, record, k=5)
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(AssertionError, match="not a PNG"):
        check_run_outputs(submission, demo_data, grids=[tmp_path / "fake.png"], k=5)
    with pytest.raises(AssertionError, match="missing"):
        check_run_outputs(submission, demo_data, grids=[tmp_path / "absent.png"], k=5)


def test_maybe_submit_sends_nothing_without_group_and_url(tmp_path, capsys):
    assert maybe_submit(tmp_path / "absent.json", "", "http://localhost:1/") is None
    assert maybe_submit(tmp_path / "absent.json", "team", "") is None
    assert "not submitted" in capsys.readouterr().out


def test_weights_for_keeps_offline_weights_in_fast_mode():
    assert notebook.weights_for("efficientnet-lite0", fast=True) == "pretrained"
    assert notebook.weights_for("resnet18", fast=True) == "none"
    assert notebook.weights_for("resnet18", fast=False) == "pretrained"


def test_class_text_queries_from_labels(drawn_split):
    queries, truth = notebook.class_text_queries(drawn_split, template="a photo of a {}.")
    labels = load_retrieval_set(drawn_split).labels["gallery"]
    assert len(queries) == 10 and queries[0] == "a photo of a circle-cool."
    assert set(truth) == set(queries)
    for query, names in truth.items():
        assert len(names) == 4 and {labels[n] for n in names} == {query[len("a photo of a "):-1]}


def test_class_names_fall_back_to_training_folders(tmp_path):
    from helpers.demo import build_demo_dataset

    data = build_demo_dataset(tmp_path / "d", query_per_class=1, gallery_per_class=1, train_per_class=1)
    (data / "test" / "labels.json").unlink()
    assert notebook.class_names(data) == [str(d) for d in range(10)]
    assert notebook.class_text_queries(data)[1] == {}


def test_metrics_frame_ranks_runs_best_first(demo_data):
    from types import SimpleNamespace

    from helpers.metrics import build_metrics_record, evaluate_rankings

    dataset = load_retrieval_set(demo_data)
    runs = {}
    for name, good in (("bad", False), ("good", True)):
        metrics = evaluate_rankings(_rankings(dataset, good), dataset.ground_truth, k=5).metrics
        record = build_metrics_record(model_name="m", top_k=5, metrics=metrics, config={"run_name": name},
                                      runtime_seconds=1.0, extra={"run_name": name})
        runs[name] = SimpleNamespace(metrics_record=lambda record=record: record, metrics=metrics)
    table = notebook.metrics_frame(runs)
    assert list(table["run"]) == ["good", "bad"]
    assert list(table.columns) == [c for c in notebook.DISPLAY_COLUMNS if c in table.columns]
    assert table.set_index("run").loc["good", "map@10"] == pytest.approx(runs["good"].metrics["map@10"])


def _rankings(dataset, good: bool, k: int = 5) -> dict[str, list[str]]:
    """Each query's relevant images first (good) or last (bad), then the rest of the gallery."""
    out = {}
    for q in dataset.query_names:
        relevant = dataset.ground_truth[q]
        others = [g for g in dataset.gallery_names if g not in relevant]
        out[q] = ((relevant + others) if good else (others + relevant))[:k]
    return out


def test_plot_side_by_side_rows_per_run_and_query(demo_data):
    dataset = load_retrieval_set(demo_data)
    runs = {"good": _rankings(dataset, True), "bad": _rankings(dataset, False)}
    figure = notebook.plot_side_by_side(runs, demo_data, queries=2, k=3)
    assert len(figure.axes) == 2 * 2 * (1 + 3)
    assert [figure.axes[i * 4].get_ylabel() for i in range(4)] == ["good", "bad", "good", "bad"]
    edge = figure.axes[1].spines["top"].get_edgecolor()  # first query, run "good", rank 1: relevant (green)
    assert edge[1] > edge[0]
    del runs["bad"][dataset.query_names[0]]
    with pytest.raises(ValueError, match="not ranked by every run"):
        notebook.plot_side_by_side(runs, demo_data, queries=[dataset.query_names[0]])


def test_best_runs_on_filters_by_dataset_and_sorts(tmp_path, demo_data):
    from helpers.metrics import build_metrics_record, evaluate_rankings, write_metrics
    from helpers.submission import save_submission

    dataset = load_retrieval_set(demo_data)
    for name, good, data in (("good", True, demo_data), ("bad", False, demo_data), ("elsewhere", True, tmp_path)):
        rankings = _rankings(dataset, good)
        metrics = evaluate_rankings(rankings, dataset.ground_truth, k=5).metrics
        save_submission(tmp_path / "submissions" / f"{name}.json", rankings)
        write_metrics(tmp_path / "results" / f"{name}.json", build_metrics_record(
            model_name=name, top_k=5, metrics=metrics, config={"data": str(data), "run_name": name}))
    chosen = notebook.best_runs_on(tmp_path / "results", demo_data, n=4)
    assert list(chosen) == ["good", "bad"]
    assert chosen["good"] == _rankings(dataset, True)
    assert list(notebook.best_runs_on(tmp_path / "results", demo_data, n=1)) == ["good"]


def test_pair_similarities_auc_matches_a_naive_count():
    from types import SimpleNamespace

    import numpy as np

    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 8)), rng.normal(size=(9, 8))
    q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    queries, gallery = [f"q{i}.png" for i in range(4)], [f"g{j}.png" for j in range(9)]
    truth = {qn: [gallery[j] for j in range(9) if j % 4 == i] for i, qn in enumerate(queries)}
    run = SimpleNamespace(dataset=SimpleNamespace(ground_truth=truth, root=Path(".")),
                          query=SimpleNamespace(names=queries, embeddings=q),
                          gallery=SimpleNamespace(names=gallery, embeddings=g))
    frame = notebook.pair_similarities(run)
    assert len(frame) == 36 and (frame["pair"] == "same class").sum() == 9
    s = q @ g.T
    pos = [s[i, j] for i in range(4) for j in range(9) if j % 4 == i]
    neg = [s[i, j] for i in range(4) for j in range(9) if j % 4 != i]
    naive = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg])
    assert frame.attrs["auc"] == pytest.approx(naive)
    assert len(notebook.pair_similarities(run, max_pairs=10)) == 10


def test_clear_outputs(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("1+1")])
    nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    nb.cells[1].execution_count = 1
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    assert notebook.clear_outputs([path]) == [path]
    cleared = nbformat.read(path, as_version=4)
    assert cleared.cells[1].outputs == [] and cleared.cells[1].execution_count is None
    assert cleared.cells[1].source == "1+1"
    assert notebook.clear_outputs([path]) == []


def test_in_colab_and_choose_device(monkeypatch):
    import sys
    import types

    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    assert notebook.in_colab() is False
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert notebook.in_colab() is True
    assert notebook.choose_device("cpu") == "cpu"
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert notebook.choose_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert notebook.choose_device() == "cpu"


def test_mode_reason_says_where_the_mode_comes_from(monkeypatch):
    monkeypatch.setenv("RETRIEVAL_FAST", "0")
    assert notebook.mode_reason(True) == (True, "the FAST parameter is True")
    assert notebook.mode_reason() == (False, "RETRIEVAL_FAST=0")
    monkeypatch.delenv("RETRIEVAL_FAST")
    monkeypatch.setattr(notebook, "_cuda_available", lambda: True)
    fast, why = notebook.mode_reason()
    assert fast is False and "a CUDA GPU is present" in why
    monkeypatch.setattr(notebook, "_cuda_available", lambda: False)
    fast, why = notebook.mode_reason()
    assert fast is True and "there is no CUDA GPU" in why


def test_notebook_mode_prints_the_mode_the_reason_and_the_gpu(monkeypatch, capsys):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(name="Tesla T4"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (14 * 2**30, 15 * 2**30))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("RETRIEVAL_FAST", raising=False)
    assert notebook.notebook_mode(None, "auto") == (False, "cuda")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("full mode, because FAST is None") and "CUDA GPU is present" in out[0]
    assert out[1] == "device cuda: Tesla T4, 15.0 GiB memory (14.0 GiB free), 1 GPU(s)"
    assert notebook.notebook_mode("1", "cpu") == (True, "cpu")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "fast mode, because the FAST parameter is '1'" and "no GPU" in out[1]


def test_competition_plan_by_mode_and_device(capsys):
    from helpers.select import CPU_MODELS, GPU_MODELS

    fast = notebook.competition_plan(True, "cpu", [], 30)
    assert fast == {"models": ["efficientnet-lite0"], "budget_minutes": 2.0, "train": None}
    full_gpu = notebook.competition_plan(False, "cuda", [], 45)
    assert full_gpu == {"models": list(GPU_MODELS), "budget_minutes": 45.0, "train": "circle"}
    full_cpu = notebook.competition_plan(False, "cpu", [], 45)
    assert full_cpu["models"] == list(CPU_MODELS) and full_cpu["train"] is None
    forced = notebook.competition_plan(False, "cpu", ["resnet18"], 5, finetune=True, recipe="arcface")
    assert forced == {"models": ["resnet18"], "budget_minutes": 5.0, "train": "arcface"}
    assert "fine-tuning with arcface (set by FINETUNE)" in capsys.readouterr().out


def test_save_selection_copies_the_winner_into_the_output_folders(tmp_path):
    import types

    from helpers.fileio import read_json, write_json

    submission = tmp_path / "sel" / "submission.json"
    submission.parent.mkdir()
    submission.write_text(json.dumps({"q.jpg": ["g.jpg"]}))
    grid = tmp_path / "sel" / "grid.png"
    grid.write_bytes(b"\x89PNG\r\n\x1a\nxx")
    metrics = write_json(tmp_path / "sel" / "candidates" / "001.json",
                         {"metrics": {"hit@1": 0.5}, "config": {"data": "validation", "model": "m"}})
    winner = types.SimpleNamespace(metrics_path=metrics, candidate=types.SimpleNamespace(name="m gem"))
    outcome = types.SimpleNamespace(submission=submission, grid=grid, winner=winner,
                                    validation_dir=tmp_path / "sel" / "validation")
    outputs = notebook.save_selection(outcome, "tag", tmp_path / "data", root=tmp_path / "out")
    assert outputs.submission == tmp_path / "out" / "submissions" / "tag.json"
    assert json.loads(outputs.submission.read_text()) == {"q.jpg": ["g.jpg"]}
    assert outputs.grid.read_bytes() == grid.read_bytes()
    record = read_json(outputs.metrics)
    assert record["config"] == {"data": str(tmp_path / "data"), "model": "m",
                                "scored_on": str(tmp_path / "sel" / "validation")}
    assert record["metrics"] == {"hit@1": 0.5} and record["candidate"] == "m gem"


def test_colab_links_come_from_one_setting(tmp_path):
    import shutil

    from helpers.colab import colab_links, colab_settings, main, sync_colab_links

    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("__pycache__"))
    text = (ROOT / "pyproject.toml").read_text()
    repository, branch = colab_settings(ROOT)
    (tmp_path / "pyproject.toml").write_text(text.replace(f'repository = "{repository}"', 'repository = "team/cbir"')
                                             .replace(f'branch = "{branch}"', 'branch = "dev/2"'))
    assert colab_settings(tmp_path) == ("team/cbir", "dev/2")
    changed = sync_colab_links(tmp_path)
    notebooks = sorted((tmp_path / "notebooks").glob("*.ipynb"))
    assert len(changed) == 2 * len(notebooks)
    for path in notebooks:
        links = colab_links(path.name, "team/cbir", "dev/2")
        for twin in (path, tmp_path / "notebooks" / "py" / f"{path.stem}.py"):
            source = twin.read_text()
            assert links["badge"] in source and links["clone"] in source and repository not in source
            assert '"--branch", "dev/2"' in source or '\\"--branch\\", \\"dev/2\\"' in source
    assert sync_colab_links(tmp_path) == []
    (tmp_path / "pyproject.toml").write_text(text.replace(f'repository = "{repository}"', 'repository = "no slash"'))
    assert main(["--sync", "--root", str(tmp_path)]) == 2
