"""Exact cosine top-k against a naive full sort, ties, chunking, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.embedding import l2_normalize
import torch

from helpers.search import check_finite, cosine_topk, topk_from_scores


def naive_topk(query: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Reference: full similarity matrix, each row sorted by (similarity desc, index asc)."""
    sims = query.astype(np.float64) @ gallery.astype(np.float64).T
    return np.array([sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in sims])


@pytest.mark.parametrize("chunk, gallery_chunk", [(4096, None), (7, None), (5, 13), (64, 1)])
def test_matches_naive_sort(chunk, gallery_chunk):
    rng = np.random.default_rng(0)
    query = l2_normalize(rng.normal(size=(37, 16)))
    gallery = l2_normalize(rng.normal(size=(101, 16)))
    indices, scores = cosine_topk(query, gallery, k=10, chunk_size=chunk, gallery_chunk_size=gallery_chunk)
    np.testing.assert_array_equal(indices, naive_topk(query, gallery, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(query @ gallery.T, indices, axis=1), atol=1e-6)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)


def test_ties_rank_the_lower_index_first_even_across_the_kth_position():
    rng = np.random.default_rng(1)
    base = l2_normalize(rng.normal(size=(6, 8)))
    gallery = np.concatenate([base[[3, 1, 3, 3, 1, 3, 3, 3]], base[[0, 2, 4, 5]]])  # many exact duplicates
    query = base[[3, 1]]
    for gallery_chunk in (None, 3):
        indices, _ = cosine_topk(query, gallery, k=4, gallery_chunk_size=gallery_chunk)
        assert indices[0].tolist() == [0, 2, 3, 5]
        assert indices[1].tolist()[:2] == [1, 4]
        np.testing.assert_array_equal(indices, naive_topk(query, gallery, 4))


@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("gallery_chunk", [None, 1024])
def test_two_stage_selection_of_wide_tiles_with_ties_matches_naive_sort(k, gallery_chunk, monkeypatch):
    # 2,048 rows (>= 64 (k + 1), a multiple of 16): each block is selected in two stages (group maxima first).
    # 8 vectors repeated 12 times each, spread over the gallery: for the queries equal to them, groups and scores
    # tie across the selection boundary; the other queries have no ties.
    import helpers.search as search

    rng = np.random.default_rng(4)
    base = l2_normalize(rng.normal(size=(8, 16)))
    gallery = l2_normalize(rng.normal(size=(2048, 16)))
    gallery[rng.choice(2048, size=96, replace=False)] = np.repeat(base, 12, axis=0)
    query = np.concatenate([base[:6], l2_normalize(rng.normal(size=(6, 16)))])
    two_stage = []
    amax = torch.amax
    monkeypatch.setattr(search.torch, "amax", lambda *a, **kw: two_stage.append(1) or amax(*a, **kw))
    indices, scores = cosine_topk(query, gallery, k=k, gallery_chunk_size=gallery_chunk)
    assert two_stage, "the two-stage path was not reached"
    np.testing.assert_array_equal(indices, naive_topk(query, gallery, k))
    np.testing.assert_allclose(scores, np.take_along_axis(query @ gallery.T, indices, axis=1), atol=1e-6)


def test_k_larger_than_gallery_returns_the_whole_gallery():
    rng = np.random.default_rng(2)
    query, gallery = l2_normalize(rng.normal(size=(3, 4))), l2_normalize(rng.normal(size=(5, 4)))
    indices, _ = cosine_topk(query, gallery, k=10)
    assert indices.shape == (3, 5)
    assert all(sorted(row) == list(range(5)) for row in indices.tolist())


def test_float16_and_memmap_gallery(tmp_path):
    rng = np.random.default_rng(3)
    query = l2_normalize(rng.normal(size=(20, 32)))
    gallery = l2_normalize(rng.normal(size=(300, 32))).astype(np.float16)
    path = tmp_path / "gallery.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=gallery.shape)
    mm[:] = gallery
    mm.flush()
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=gallery.shape)
    full, _ = cosine_topk(query, gallery, k=10)
    chunked, _ = cosine_topk(query, mapped, k=10, gallery_chunk_size=64)
    np.testing.assert_array_equal(full, chunked)
    np.testing.assert_array_equal(full, naive_topk(query, gallery.astype(np.float32), 10))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same d"):
        cosine_topk(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        cosine_topk(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), k=0)


def test_nan_and_inf_scores_are_never_ranked():
    scores = torch.tensor([[0.1, float("nan"), 0.3], [0.5, 0.2, 0.1], [float("inf"), 0.0, 0.2]])
    with pytest.raises(ValueError, match=r"NaN or Inf \(query rows \[0, 2\], gallery columns \[0, 1\]\)"):
        topk_from_scores(scores, 2)
    idx, val = topk_from_scores(scores[1:2], 2)  # finite rows rank as before
    assert idx.tolist() == [[0, 1]] and val[0].tolist() == pytest.approx([0.5, 0.2])


@pytest.mark.parametrize("gallery_chunk", [None, 4])
def test_embeddings_with_nan_or_inf_are_reported_by_row(gallery_chunk):
    rng = np.random.default_rng(5)
    query, gallery = l2_normalize(rng.normal(size=(6, 8))), l2_normalize(rng.normal(size=(20, 8)))
    broken = gallery.copy()
    broken[13, 2] = np.nan
    broken[17, 0] = np.inf
    with pytest.raises(ValueError, match=r"2 gallery embedding\(s\) contain NaN or Inf .* rows \[13, 17\]"):
        cosine_topk(query, broken, k=3, gallery_chunk_size=gallery_chunk)
    bad_query = query.copy()
    bad_query[4] = -np.inf
    with pytest.raises(ValueError, match=r"1 query embedding\(s\) contain NaN or Inf .* rows \[4\]"):
        cosine_topk(bad_query, gallery, k=3, chunk_size=3, gallery_chunk_size=gallery_chunk)
    # A gallery row whose similarity is -Inf for every query sorts last: it is never selected.
    last = gallery.copy()
    last[9] = 0.0
    last[9, 0] = np.inf
    positive = np.abs(query)
    positive[:, 0] *= -1
    indices, scores = cosine_topk(positive, last, k=19, gallery_chunk_size=gallery_chunk)
    assert 9 not in indices and np.isfinite(scores).all()


def test_check_finite_names_the_files():
    emb = np.ones((4, 3), np.float32)
    check_finite(emb, names=["a.jpg", "b.jpg", "c.jpg", "d.jpg"], what="gallery")  # nothing to report
    emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 gallery embedding\(s\) contain NaN or Inf .*\['c.jpg'\]"):
        check_finite(emb, names=["a.jpg", "b.jpg", "c.jpg", "d.jpg"], what="gallery")
