"""Gallery indexes: FAISS flat equals brute force, approximate indexes return k valid results, save and load."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from helpers.embedding import l2_normalize
from helpers.index import build_index, index_search, load_index, save_index
from helpers.search import cosine_topk


def unit(n, d, seed):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)))


def naive_cosine_topk(query, gallery, k):
    """Reference: float64 cosine similarities, each row fully sorted by (similarity desc, index asc)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    return np.array([sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in sims]), sims


def test_flat_equals_brute_force():
    query, gallery = unit(50, 32, 0), unit(800, 32, 1)
    expected_idx, expected_val = cosine_topk(query, gallery, k=10)
    index = build_index(gallery, kind="flat")
    idx, val = index.search(query, k=10)
    assert index.kind == "flat" and index.recall_at_10 is None
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_allclose(val, expected_val, atol=1e-5)


def test_flat_breaks_ties_like_the_exact_search():
    # Duplicated gallery rows: equal scores must rank the lower index first, also across the k-th position.
    base = unit(6, 8, 2)
    gallery = np.concatenate([base, base, base])
    query = base[:3]
    for k in (1, 2, 4):
        np.testing.assert_array_equal(build_index(gallery, kind="flat").search(query, k=k)[0],
                                      cosine_topk(query, gallery, k=k)[0])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_report_recall_and_find_near_duplicates(kind, caplog):
    gallery = unit(4000, 32, 3)
    query = l2_normalize(gallery[:100] + 0.01 * np.random.default_rng(4).standard_normal((100, 32)))
    with caplog.at_level(logging.INFO, logger="helpers"):
        index = build_index(gallery, kind=kind, nlist=16, nprobe=4)
    assert index.kind == kind
    assert 0.5 <= index.recall_at_10 <= 1.0
    assert "recall@10" in caplog.text
    idx, val = index.search(query, k=10)
    assert idx.shape == (100, 10) and (idx >= 0).all() and (idx < 4000).all()
    assert (idx[:, 0] == np.arange(100)).mean() > 0.95  # each query's near-duplicate comes first
    assert np.all(np.diff(val, axis=1) <= 1e-6)


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf", "auto"])
@pytest.mark.parametrize("n", [10, 11, 60])
def test_every_index_returns_k_valid_distinct_results_for_small_galleries(kind, n):
    gallery, query = unit(n, 16, n), unit(7, 16, 100 + n)
    idx, val, index = index_search(query, gallery, k=10, kind=kind, nlist=4, nprobe=1)
    assert idx.shape == (7, 10)
    assert ((idx >= 0) & (idx < n)).all()
    assert all(len(set(row)) == 10 for row in idx)
    # At these sizes every kind is exact (HNSW's beam of 128 covers the gallery; IVF falls back to exact search):
    # the same lists and scores as a full sort of the cosine similarities.
    expected, sims = naive_cosine_topk(query, gallery, 10)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(val, np.take_along_axis(sims, idx, axis=1), atol=1e-5)


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf", "auto"])
def test_every_kind_ranks_by_cosine_when_the_gallery_is_not_normalised(kind):
    # By inner product the long vector [10, 10] wins; by cosine [1, 0] is far closer to the query.
    idx, val, _ = index_search(np.array([[1.0, 0.05]]), np.array([[1.0, 0.0], [10.0, 10.0]]), k=2, kind=kind)
    assert idx.tolist() == [[0, 1]]
    np.testing.assert_allclose(val[0], [1 / np.hypot(1, 0.05), 1.05 / np.hypot(1, 0.05) / np.sqrt(2)], atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf"])
def test_unnormalised_galleries_and_queries_match_a_naive_cosine_reference(kind):
    rng = np.random.default_rng(12)
    scale = rng.uniform(0.05, 20.0, size=(2000, 1))  # norms from 0.05 to 20: inner product would rank by length
    gallery = rng.standard_normal((2000, 16)) * scale
    query = rng.standard_normal((40, 16)) * rng.uniform(0.1, 5.0, size=(40, 1))
    expected, sims = naive_cosine_topk(query, gallery, 10)
    index = build_index(gallery, kind=kind, nlist=8, nprobe=8, ef_search=256)
    idx, val = index.search(query, k=10)
    np.testing.assert_allclose(val, np.take_along_axis(sims, idx, axis=1), atol=1e-5)  # scores are cosines
    if kind in ("exact", "flat"):
        np.testing.assert_array_equal(idx, expected)
    else:  # approximate, all lists probed / a wide beam: nearly every true neighbour is found
        assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(idx, expected)]) >= 0.95


def test_ivf_on_too_few_vectors_falls_back_to_exact_and_says_so(caplog):
    gallery, query = unit(100, 16, 5), unit(5, 16, 6)
    with caplog.at_level(logging.WARNING, logger="helpers"):
        index = build_index(gallery, kind="ivf", nlist=8)
    assert index.kind == "exact" and index.requested == "ivf"
    assert "exact search" in index.message and "312" in index.message
    assert "exact search" in caplog.text
    np.testing.assert_array_equal(index.search(query, k=10)[0], cosine_topk(query, gallery, k=10)[0])


def test_ivf_with_one_probe_still_returns_k_results():
    # 8 lists, 1 probed: some lists hold fewer than k vectors, the short rows are completed exactly.
    gallery = unit(400, 8, 7)
    index = build_index(gallery, kind="ivf", nlist=8, nprobe=1)
    assert index.kind == "ivf"
    idx, _ = index.search(unit(50, 8, 8), k=100)
    assert idx.shape == (50, 100) and (idx >= 0).all()
    assert all(len(set(row)) == 100 for row in idx)


def test_auto_is_exact_for_small_galleries():
    index = build_index(unit(500, 8, 9), kind="auto")
    assert index.kind == "exact" and index.requested == "auto"


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivf"])
def test_save_and_load_give_the_same_results(kind, tmp_path):
    gallery, query = unit(2000, 16, 10), unit(20, 16, 11)
    index = build_index(gallery, kind=kind, nlist=8, nprobe=2, ef_search=32)
    before = index.search(query, k=10)
    path = save_index(index, tmp_path / f"gallery.{kind}")
    loaded = load_index(path)
    assert (loaded.kind, loaded.params, loaded.recall_at_10) == (index.kind, index.params, index.recall_at_10)
    after = loaded.search(query, k=10)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)


def test_bad_input_is_explained(tmp_path):
    with pytest.raises(ValueError, match="index must be one of"):
        build_index(unit(10, 4, 0), kind="annoy")
    index = build_index(unit(10, 4, 0), kind="flat")
    with pytest.raises(ValueError, match="dimension"):
        index.search(unit(2, 5, 1), k=3)
    with pytest.raises(FileNotFoundError, match="no saved index"):
        load_index(tmp_path / "missing.index")


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw"])
def test_nan_or_inf_vectors_are_refused_with_their_rows(kind):
    gallery = unit(50, 8, 13)
    gallery[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"gallery embedding\(s\) contain NaN or Inf.*\[7\]"):
        build_index(gallery, kind=kind)
    index = build_index(unit(50, 8, 13), kind=kind)
    query = unit(3, 8, 14)
    query[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"query embedding\(s\) contain NaN or Inf.*\[1\]"):
        index.search(query, k=5)


def test_logged_recall_is_measured_on_held_out_queries(caplog):
    # A gallery vector searched while in the graph finds itself and its neighbours: a weak HNSW looks good that
    # way. The default measurement holds its sample out of the index, so it must agree with truly new queries.
    gallery, fresh = unit(5000, 32, 15), unit(500, 32, 16)
    with caplog.at_level(logging.INFO, logger="helpers"):
        default = build_index(gallery, kind="hnsw", hnsw_m=8, ef_search=16)
    given = build_index(gallery, kind="hnsw", hnsw_m=8, ef_search=16, recall_queries=fresh)
    exact, _ = cosine_topk(fresh, gallery, k=10)
    _, approx = given.faiss_index.search(fresh, 10)
    fresh_recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert given.recall_at_10 == pytest.approx(fresh_recall)
    assert abs(default.recall_at_10 - fresh_recall) < 0.08, (default.recall_at_10, fresh_recall)
    assert "500 gallery vectors held out of the index" in caplog.text and "held out" in default.recall_note
    assert "held-out queries (the queries given)" in given.recall_note
    # Held out while measuring, then added: every gallery vector is in the index under its own row number.
    assert default.faiss_index.ntotal == 5000
    np.testing.assert_array_equal(default.search(gallery[:200], k=1)[0][:, 0], np.arange(200))
