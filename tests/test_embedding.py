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
