"""Collections: float16 shards, resumable builds (local engine and Ray Data), the index chooser, search and add."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers.collection import EngineOptions, Index, add_to_collection, build_collection, choose_index, parse_memory
from helpers.collection.chooser import IndexPlan, build_faiss, exact_topk, recall_at_10, search_plan
from helpers.collection.shards import ShardVectors, finished_shards, read_shard_table, shard_paths

from .conftest import ROOT, shared_dataset

PER_CLASS = 4


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 real photos in 4 class folders (searched recursively) and one corrupt file."""
    source = shared_dataset("imagenette-val")
    root = tmp_path_factory.mktemp("photos")
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir())[:4]:
        (root / class_dir.name).mkdir()
        for file in sorted(class_dir.iterdir())[:PER_CLASS]:
            shutil.copy(file, root / class_dir.name / file.name)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


@pytest.fixture(scope="module")
def local_build(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "index"
    build_collection(out, images=[photos], shard_size=5, options=EngineOptions(progress=False))
    return out


def all_rows(index_dir: Path) -> list[tuple[int, str]]:
    rows = []
    for number in finished_shards(index_dir):
        table = read_shard_table(index_dir, number)
        rows.extend(zip(table["root"], table["path"]))
    return rows


def vectors_by_path(index_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for number in finished_shards(index_dir):
        table = read_shard_table(index_dir, number)
        vectors = np.load(shard_paths(index_dir, number)[0])
        assert vectors.dtype == np.float16
        out.update({p: vectors[r].astype(np.float32) for p, r in zip(table["path"], table["row"]) if r >= 0})
    return out


def stamps(index_dir: Path, numbers) -> dict[str, tuple[int, int]]:
    result = {}
    for number in numbers:
        for path in shard_paths(index_dir, number):
            stat = path.stat()
            result[path.name] = (stat.st_mtime_ns, stat.st_ino)
    return result


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, **popen) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "helpers", *args], cwd=cwd or ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_first_shard(index_dir: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not finished_shards(index_dir):
        if process.poll() is not None:
            pytest.fail(f"the build ended before its first shard: {process.communicate()[1][-2000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail("no shard written in time")
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------------------
# Chooser
# ----------------------------------------------------------------------------------------------------------------
def test_parse_memory_and_chooser_follow_the_budget():
    assert parse_memory("4GB") == 4 * 2 ** 30 and parse_memory("512M") == 512 * 2 ** 20
    assert parse_memory("1.5g") == int(1.5 * 2 ** 30) and parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="memory size"):
        parse_memory("lots")
    assert choose_index(50_000, 256, "4GB").kind == "exact"
    assert choose_index(500_000, 256, "4GB").kind == "hnsw"
    plan = choose_index(1_000_000, 256, "1GB")
    assert plan.kind == "ivfpq" and plan.memory_bytes <= 2 ** 30 and 256 % plan.params["pq_m"] == 0
    assert choose_index(50_000, 256, "10MB").kind == "ivfpq"  # exact does not fit 10 MB
    with pytest.raises(ValueError, match="max-index-memory"):
        choose_index(1_000_000, 256, "1MB")


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, d))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_reach_high_recall_with_exact_rescoring(kind):
    data = clustered(3000, 16, 0)
    vectors = ShardVectors([data[:2000], data[2000:]], np.array([0, 2000, 3000]))
    plan = (IndexPlan("hnsw", {"M": 32, "efConstruction": 40, "efSearch": 128}) if kind == "hnsw"
            else IndexPlan("ivfpq", {"opq": 8, "nlist": 16, "pq_m": 8, "pq_bits": 6, "nprobe": 8, "opq_niter": 4}))
    index = build_faiss(plan, vectors)
    from helpers.collection.chooser import set_search_param

    set_search_param(index, kind, plan.params.get("efSearch", plan.params.get("nprobe")))
    queries = clustered(200, 16, 1).astype(np.float32)
    exact, exact_scores = exact_topk(queries, vectors, 10)
    brute = queries @ data.astype(np.float32).T
    np.testing.assert_allclose(exact_scores, -np.sort(-brute, axis=1)[:, :10], atol=1e-5)
    found, scores = search_plan(plan, index, vectors, queries, 10)
    assert recall_at_10(found, exact) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    np.testing.assert_allclose(scores, np.take_along_axis(brute, found, axis=1), atol=1e-5)  # re-scored exactly


# ----------------------------------------------------------------------------------------------------------------
# Local engine: shards, corrupt files, search, add
# ----------------------------------------------------------------------------------------------------------------
def test_local_build_writes_float16_shards_a_manifest_and_records_the_corrupt_file(local_build, photos):
    manifest = json.loads((local_build / "manifest.json").read_text())
    n_images = 4 * PER_CLASS
    assert manifest["counts"] == {"files": n_images + 1, "embedded": n_images, "skipped": 1}
    assert manifest["precision"] == "float16" and manifest["model"]["dim"] == 1280
    assert manifest["index"]["kind"] == "exact" and manifest["index"]["recall_at_10"] == 1.0
    assert finished_shards(local_build) == [0, 1, 2, 3]
    rows = all_rows(local_build)
    assert sorted(p for _, p in rows) == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.*"))
    tables = [read_shard_table(local_build, n) for n in finished_shards(local_build)]
    reasons = {p: r for t in tables for p, r in zip(t["path"], t["reason"])}
    assert "not an image" in reasons["broken.jpg"]
    assert sum(r is None for r in reasons.values()) == n_images
    vectors = np.stack(list(vectors_by_path(local_build).values()))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert not list((local_build / "shards").glob(".*"))  # no temporary file left


def test_search_by_image_returns_the_image_first(local_build, photos, tmp_path):
    query = sorted(photos.rglob("*.JPEG"))[5]
    out = tmp_path / "ranked.json"
    process = cli("index", "search", "--index", str(local_build), "--image", str(query), "--k", "5",
                  "--out", str(out))
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    ranked = json.loads(out.read_text())
    assert ranked[query.name][0] == query.relative_to(photos).as_posix() and len(ranked[query.name]) == 5
    scores = json.loads((tmp_path / "ranked.scores.json").read_text())[query.name]
    assert scores[0] == pytest.approx(1.0, abs=2e-3) and scores == sorted(scores, reverse=True)


def test_add_embeds_only_new_files_and_search_finds_them(local_build, photos, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(local_build, copy)
    before = stamps(copy, finished_shards(copy))
    source = shared_dataset("imagenette-val") / sorted(os.listdir(shared_dataset("imagenette-val")))[5]
    new_folder = tmp_path / "more"
    new_folder.mkdir()
    new_files = [Path(shutil.copy(f, new_folder / f.name)) for f in sorted(source.iterdir())[:3]]
    result = add_to_collection(copy, images=[new_folder], options=EngineOptions(progress=False))
    assert result.embedded == 3 and result.new_shards == [4]
    assert stamps(copy, [0, 1, 2, 3]) == before
    index = Index.open(copy)
    assert len(index) == 4 * PER_CLASS + 3
    found = index.search(images=new_files, k=3)
    for file in new_files:
        assert found.rankings[file.name][0] == f"{new_folder.name}/{file.name}"
    again = add_to_collection(copy, options=EngineOptions(progress=False))  # rescan: nothing new
    assert again.embedded == 0 and again.new_shards == []


def test_retrieve_with_index_ranks_a_competition_against_a_prebuilt_gallery(local_build, photos, tmp_path):
    from helpers.collection import retrieve_with_index

    files = sorted(photos.rglob("*.JPEG"))
    (tmp_path / "test" / "query").mkdir(parents=True)
    picks = files[::5]
    for file in picks:
        shutil.copy(file, tmp_path / "test" / "query" / file.name)
    truth = {f.name: [f.relative_to(photos).as_posix()] for f in picks}
    (tmp_path / "test" / "ground_truth.json").write_text(json.dumps(truth))
    run = retrieve_with_index(tmp_path, local_build, k=10, progress=False)
    assert set(run.rankings) == set(truth)
    assert run.metrics["hit@1"] == 1.0
    assert all(len(names) == 10 and len(set(names)) == 10 for names in run.rankings.values())


def test_retrieve_index_dir_writes_the_submission_scores_and_metrics(local_build, photos, tmp_path, capsys):
    from helpers.cli import main
    from helpers.submission import load_scores, load_submission, scores_sidecar_path

    files = sorted(photos.rglob("*.JPEG"))[::4]
    (tmp_path / "test" / "query").mkdir(parents=True)
    for file in files:
        shutil.copy(file, tmp_path / "test" / "query" / file.name)
    truth = {f.name: [f.relative_to(photos).as_posix()] for f in files}
    (tmp_path / "test" / "ground_truth.json").write_text(json.dumps(truth))
    out, metrics = tmp_path / "sub.json", tmp_path / "metrics.json"
    assert main(["retrieve", "--data", str(tmp_path), "--index-dir", str(local_build), "--k", "5", "--out", str(out),
                 "--metrics-out", str(metrics), "--quiet"]) == 0
    rankings = load_submission(out)
    assert {q: names[0] for q, names in rankings.items()} == {q: names[0] for q, names in truth.items()}
    assert all(len(names) == 5 for names in rankings.values())
    scores = load_scores(scores_sidecar_path(out))
    assert all(s[0] >= s[-1] for s in scores.values())
    record = json.loads(metrics.read_text())
    assert record["metrics"]["hit@1"] == 1.0 and record["config"]["index_dir"] == str(local_build)
    assert "submission:" in capsys.readouterr().out


def test_killed_build_resumes_without_recomputing_finished_shards(photos, tmp_path):
    out = tmp_path / "index"
    process = cli("index", "build", "--images", str(photos), "--out", str(out), "--shard-size", "2",
                  "--batch-size", "1", "--quiet")
    wait_for_first_shard(out, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = finished_shards(out)
    assert 1 <= len(done) < 9, "the build was not stopped part-way"
    before = stamps(out, done)
    result = build_collection(out, images=[photos], shard_size=2, options=EngineOptions(progress=False))
    assert stamps(out, done) == before  # finished shards untouched
    rows = all_rows(out)
    assert len(rows) == len(set(rows)) == 4 * PER_CLASS + 1  # every image exactly once
    assert result.embedded + sum(2 for _ in done) >= 4 * PER_CLASS - 1
    assert not list((out / "shards").glob(".*"))
    assert Index.open(out).manifest["counts"]["embedded"] == 4 * PER_CLASS


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    from helpers.cli import main

    assert main(["index", "search", "--index", str(tmp_path), "--text", "x"]) == 2
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["index", "build", "--images", str(tmp_path), "--out", str(tmp_path / "i"), "--engine", "ray"]) == 2


def test_ray_missing_error_names_the_extra(tmp_path, monkeypatch, capsys):
    from helpers.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["index", "build", "--images", str(tmp_path), "--out", str(tmp_path / "i"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cbir-toolkit[scale]" in err[0] and err[0].startswith("error:")


# ----------------------------------------------------------------------------------------------------------------
# Ray engine (a local Ray started inside the test, 2 CPUs)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture()
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'cbir-toolkit[scale]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_engine_gives_the_local_engine_vectors(local_ray, local_build, photos, tmp_path):
    out = tmp_path / "index"
    build_collection(out, images=[photos], shard_size=5, options=EngineOptions(engine="ray", progress=False))
    assert local_ray.is_initialized()  # a Ray the caller started is left running
    local, remote = vectors_by_path(local_build), vectors_by_path(out)
    assert sorted(local) == sorted(remote) and len(local) == 4 * PER_CLASS
    assert max(np.abs(local[p] - remote[p]).max() for p in local) <= 1e-3
    tables = [read_shard_table(out, n) for n in finished_shards(out)]
    assert [r for t in tables for p, r in zip(t["path"], t["reason"]) if p == "broken.jpg"][0].startswith("not an")


def leftover_processes(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc (Linux)")
def test_interrupted_ray_build_leaves_no_process_and_resumes(photos, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'cbir-toolkit[scale]')")
    out = tmp_path / "index"
    tag = f"scale-test-{uuid.uuid4().hex}"
    process = cli("index", "build", "--images", str(photos), "--out", str(out), "--shard-size", "2",
                  "--batch-size", "1", "--engine", "ray", "--quiet", env={"CBIR_TEST_TAG": tag})
    wait_for_first_shard(out, process)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    deadline = time.time() + 30
    while leftover_processes(tag) and time.time() < deadline:
        time.sleep(0.5)
    assert leftover_processes(tag) == []
    done = finished_shards(out)
    assert 1 <= len(done) < 9
    before = stamps(out, done)
    process = cli("index", "build", "--images", str(photos), "--out", str(out), "--shard-size", "2",
                  "--engine", "ray", "--quiet")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    assert stamps(out, done) == before
    rows = all_rows(out)
    assert len(rows) == len(set(rows)) == 4 * PER_CLASS + 1


def test_precision_is_one_per_collection_and_the_ray_engine_refuses_int8(local_build, photos):
    with pytest.raises(ValueError, match="needs --engine local"):
        EngineOptions(engine="ray", precision="int8").check()
    assert json.loads((local_build / "manifest.json").read_text())["inference_precision"] == "fp32"
    with pytest.raises(ValueError, match="--precision fp32"):
        build_collection(local_build, images=[photos], shard_size=5,
                         options=EngineOptions(progress=False, precision="int8"))
    with pytest.raises(ValueError, match="--precision fp32"):
        add_to_collection(local_build, images=[photos], options=EngineOptions(progress=False, precision="auto"))


def test_auto_precision_is_decided_once_per_collection_and_used_for_queries(monkeypatch, tmp_path):
    """The first part embedded decides ``auto``; later parts and the query embedding use that precision."""
    import types

    import helpers.embedding as embedding
    from helpers.collection.engine_local import embed_local
    from helpers.collection.index import Index

    asked, told = [], []

    def fake_extract(model, files, precision="auto", **options):
        asked.append(precision)
        return types.SimpleNamespace(paths=list(files), embeddings=np.ones((len(files), 4), np.float32), skipped=[],
                                     precision="int8" if precision == "auto" else precision)

    monkeypatch.setattr(embedding, "extract_embeddings", fake_extract)
    model = types.SimpleNamespace(embed_dim=4)
    entries = [types.SimpleNamespace(file=tmp_path / f"{i}.jpg") for i in range(3)]
    monkeypatch.setattr("helpers.collection.engine_local.STEP", 1)
    embed_local(model, [(0, entries[:2]), (1, entries[2:])], lambda *a: None, lambda n: None, precision="auto",
                on_precision=told.append)
    assert asked == ["auto", "int8", "int8"] and told == ["int8"]
    collection = Index.__new__(Index)
    for manifest, expected in (({"inference_precision": "auto", "inference_precision_used": "int8"}, "int8"),
                               ({"inference_precision": "auto"}, "fp32"), ({"inference_precision": "int8"}, "int8"),
                               ({}, "fp32")):
        collection.manifest = manifest
        assert collection.inference_precision == expected
