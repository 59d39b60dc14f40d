"""Extraction with the real default model: normalisation, skipped files, the cache, TTA."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers.data import list_images
from helpers.embedding import EmbeddingCache, embed_pil_images, extract_embeddings


@pytest.fixture()
def small_folder(tmp_path, tiny_split):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in list_images(tiny_split / "test" / "gallery")[:6]:
        shutil.copy2(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "zero.png").write_bytes(b"")
    return folder


def _valid(folder):
    return [p for p in list_images(folder) if p.name not in ("broken.jpg", "zero.png")]


def test_embeddings_are_normalised_float32_and_bad_files_are_skipped(lite0, small_folder):
    result = extract_embeddings(lite0, list_images(small_folder), batch_size=4, device="cpu", progress=False)
    assert result.embeddings.shape == (6, 1280) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    assert sorted(p.name for p, _ in result.skipped) == ["broken.jpg", "zero.png"]
    assert "broken.jpg" not in result.names


def test_batching_does_not_change_embeddings(lite0, small_folder):
    paths = list_images(small_folder)
    a = extract_embeddings(lite0, paths, batch_size=1, device="cpu", progress=False).embeddings
    b = extract_embeddings(lite0, paths, batch_size=8, device="cpu", progress=False).embeddings
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cold_and_warm_runs_are_identical_and_warm_reads_the_cache(lite0, small_folder, tmp_path, dtype):
    cache = EmbeddingCache(tmp_path / "cache", dtype=dtype)
    paths = list_images(small_folder)
    cold = extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    warm = extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    assert (cold.n_cached, cold.n_computed) == (0, 6)
    assert (warm.n_cached, warm.n_computed) == (6, 0)
    assert cold.embeddings.tobytes() == warm.embeddings.tobytes()


def test_a_changed_file_is_embedded_again(lite0, small_folder, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    paths = list_images(small_folder)
    extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    target = _valid(small_folder)[0]
    flipped = Image.open(target).convert("RGB").transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    flipped.save(target, format="JPEG")
    os.utime(target, ns=(1, 1))
    again = extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    assert (again.n_cached, again.n_computed) == (5, 1)


def test_the_cache_key_separates_models_and_tta(lite0, small_folder, tmp_path):
    from helpers.models import load_model

    cache = EmbeddingCache(tmp_path / "cache")
    paths = _valid(small_folder)[:2]
    extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    flip = extract_embeddings(lite0, paths, device="cpu", cache=cache, tta="flip", progress=False)
    random_model = load_model("efficientnet-lite0", weights="none")
    other = extract_embeddings(random_model, paths, device="cpu", cache=cache, progress=False)
    assert flip.n_computed == 2 and other.n_computed == 2
    another_random = load_model("efficientnet-lite0", weights="none")  # a different random initialisation
    assert extract_embeddings(another_random, paths, device="cpu", cache=cache, progress=False).n_computed == 2
    assert extract_embeddings(another_random, paths, device="cpu", cache=cache, progress=False).n_cached == 2


def test_flip_tta_is_mirror_invariant(lite0, small_folder):
    image = Image.open(_valid(small_folder)[0]).convert("RGB")
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain = embed_pil_images(lite0, [image, mirrored], device="cpu")
    tta = embed_pil_images(lite0, [image, mirrored], device="cpu", tta="flip")
    assert float(plain[0] @ plain[1]) < 0.9999  # the model itself is not mirror invariant
    np.testing.assert_allclose(tta[0], tta[1], atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The cache's identity and robustness
# ----------------------------------------------------------------------------------------------------------------
def _same_size_photos(folder, tiny_split):
    """Two different real photos as uncompressed BMPs of equal dimensions, hence of exactly equal byte size."""
    sources = list_images(tiny_split / "test" / "gallery")[:2]
    out = []
    for i, source in enumerate(sources):
        target = folder / f"same{i}.bmp"
        Image.open(source).convert("RGB").resize((96, 96)).save(target)
        out.append(target)
    assert out[0].stat().st_size == out[1].stat().st_size
    return out


def test_a_file_replaced_with_its_mtime_put_back_is_embedded_again(lite0, tiny_split, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    first, second = _same_size_photos(folder, tiny_split)
    cache = EmbeddingCache(tmp_path / "cache")
    before = extract_embeddings(lite0, [first], device="cpu", cache=cache, progress=False)
    expected = extract_embeddings(lite0, [second], device="cpu", progress=False).embeddings
    stat = first.stat()
    first.write_bytes(second.read_bytes())  # what `cp -p` or rsync do: same size, the old mtime put back
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = extract_embeddings(lite0, [first], device="cpu", cache=cache, progress=False)
    assert (after.n_cached, after.n_computed) == (0, 1)
    assert float(after.embeddings[0] @ expected[0]) > 0.9999
    assert float(after.embeddings[0] @ before.embeddings[0]) < 0.999


@pytest.mark.parametrize("damage", ["nan", "dimension", "count"])
def test_an_inconsistent_shard_is_detected_and_rebuilt(lite0, small_folder, tmp_path, damage, caplog):
    cache = EmbeddingCache(tmp_path / "cache")
    paths = _valid(small_folder)[:3]
    cold = extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    shard = next((tmp_path / "cache").rglob("*.npz"))
    with np.load(shard) as data:
        keys, vectors = data["keys"], data["embeddings"].copy()
    if damage == "nan":
        vectors[1, 7] = np.nan
    elif damage == "dimension":
        vectors = vectors[:, :100]
    else:
        vectors = vectors[:2]
    with open(shard, "wb") as handle:
        np.savez(handle, keys=keys, embeddings=vectors)
    again = extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False)
    assert (again.n_cached, again.n_computed) == (0, 3)
    assert "will be rebuilt" in caplog.text
    np.testing.assert_allclose(again.embeddings, cold.embeddings, atol=1e-6)
    assert extract_embeddings(lite0, paths, device="cpu", cache=cache, progress=False).n_cached == 3


_WRITER = r"""
import sys, numpy as np
from pathlib import Path
from helpers.embedding_cache import EmbeddingCache
root, folder, tag, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cache = EmbeddingCache(root)
for i in range(n):
    cache.save("model", folder, {f"{tag}-{i}": np.full(8, i, np.float32)})
"""


def test_two_processes_writing_one_shard_merge_their_entries(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    writers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path), tag, "40"],
                                env=env) for tag in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    entries = EmbeddingCache(tmp_path / "cache").load("model", tmp_path, dim=8)
    assert sorted(entries) == sorted(f"{tag}-{i}" for tag in "ab" for i in range(40))


# ----------------------------------------------------------------------------------------------------------------
# Precision, draft decoding, the thread plan
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_is_calibrated_once_kept_beside_the_export_and_keyed_in_the_cache(lite0, tiny_split, tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))
    paths = list_images(tiny_split / "test" / "gallery")[:24]
    cache = EmbeddingCache(tmp_path / "cache")
    fp32 = extract_embeddings(lite0, paths, device="cpu", cache=cache, precision="fp32", progress=False)
    int8 = extract_embeddings(lite0, paths, device="cpu", cache=cache, precision="int8", progress=False)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.n_computed == len(paths)  # the cache does not hand out float32 vectors for int8
    assert "mean cosine" in int8.precision_reason and int8.info()["precision"] == "int8"
    quantised = list((tmp_path / "onnx").glob("*.int8.onnx"))
    assert len(quantised) == 1 and quantised[0].with_name(quantised[0].stem + ".json").exists()
    cosine = (fp32.embeddings * int8.embeddings).sum(1)
    assert 0.5 < cosine.mean() < 0.99999  # int8 really ran: close to float32, not identical
    stamp = quantised[0].stat().st_mtime_ns
    again = extract_embeddings(lite0, paths, device="cpu", precision="int8", progress=False)
    assert quantised[0].stat().st_mtime_ns == stamp  # reused, not calibrated again
    np.testing.assert_allclose(again.embeddings, int8.embeddings, atol=1e-5)


def test_auto_precision_keeps_fp32_for_few_images_and_says_why(lite0, small_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))  # no calibration from an earlier test
    result = extract_embeddings(lite0, _valid(small_folder), device="cpu", precision="auto", progress=False)
    assert result.precision == "fp32" and result.precision_reason


def test_int8_needs_onnx_runtime_on_the_cpu(lite0, small_folder):
    from helpers.models import ModelError

    with pytest.raises(ModelError, match="int8"):
        extract_embeddings(lite0, _valid(small_folder), device="cpu", backend="torch", precision="int8",
                           progress=False)
    with pytest.raises(ValueError, match="precision"):
        extract_embeddings(lite0, _valid(small_folder), device="cpu", precision="int4", progress=False)


def test_draft_decoding_at_the_size_the_model_needs_matches_a_full_decode(lite0, tiny_split, tmp_path):
    from helpers.embedding import resolve_draft_size

    assert resolve_draft_size(lite0) == round(224 / lite0.preprocessing.crop_pct)
    assert resolve_draft_size(lite0, None) is None
    folder = tmp_path / "large"
    folder.mkdir()
    for path in list_images(tiny_split / "test" / "gallery")[:4]:  # re-encoded 4x larger: JPEG DCT scaling applies
        image = Image.open(path).convert("RGB")
        image.resize((image.width * 4, image.height * 4), Image.Resampling.LANCZOS).save(folder / path.name,
                                                                                     quality=95)
    paths = list_images(folder)
    draft = extract_embeddings(lite0, paths, device="cpu", progress=False)
    full = extract_embeddings(lite0, paths, device="cpu", draft_size=None, progress=False)
    assert draft.draft_size == resolve_draft_size(lite0) and full.draft_size is None
    cosine = (draft.embeddings * full.embeddings).sum(1)
    assert cosine.min() > 0.98 and cosine.min() < 1 - 1e-6  # a different decode, nearly the same embedding


def test_the_thread_plan_never_oversubscribes_the_cores(monkeypatch):
    from helpers.parallelism import batch_for_memory, plan_threads

    monkeypatch.delenv("RETRIEVAL_THREADS", raising=False)
    monkeypatch.delenv("RETRIEVAL_DECODE_WORKERS", raising=False)
    for cores in (1, 2, 3, 4, 8, 16, 64):
        for n in (1, 10, 100, 10_000):
            plan = plan_threads(n, 32, cores=cores)
            assert plan.inference_threads >= 1 and plan.inference_threads + plan.decode_workers <= cores
    assert plan_threads(10, 32, cores=8).decode_workers == 0  # one batch: no worker start-up
    assert plan_threads(1000, 32, cores=2).decode_workers == 0  # decoding is a fifth of the work: both cores infer
    assert plan_threads(1000, 32, cores=4).decode_workers == 1
    assert plan_threads(1000, 32, cores=16).decode_workers == 3
    assert plan_threads(1000, 32, cores=8, threads=3).decode_workers == 5
    assert plan_threads(1000, 32, cores=8, num_workers=0).inference_threads == 8
    monkeypatch.setenv("RETRIEVAL_DECODE_WORKERS", "3")
    assert plan_threads(1000, 32, cores=8).decode_workers == 3
    monkeypatch.setenv("RETRIEVAL_DECODE_WORKERS", "many")
    with pytest.raises(ValueError, match="RETRIEVAL_DECODE_WORKERS"):
        plan_threads(1000, 32, cores=8)
    monkeypatch.delenv("RETRIEVAL_DECODE_WORKERS")
    gpu = plan_threads(10_000, 256, device_type="cuda", cores=16, num_workers=None)
    assert gpu.inference_threads == 1
    assert batch_for_memory(free_bytes=8 * 2**30, per_image_bytes=20 * 2**20) == 128
    assert batch_for_memory(free_bytes=2**20, per_image_bytes=20 * 2**20) == 8
    assert batch_for_memory(free_bytes=2**40, per_image_bytes=2**20) == 1024
