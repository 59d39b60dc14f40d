"""Re-ranking, query expansion, DBA and fusion against naive reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.embedding import l2_normalize
from helpers.rerank import (
    alpha_query_expansion,
    average_query_expansion,
    concat_embeddings,
    database_augmentation,
    fuse_scores,
    fused_score_topk,
    k_reciprocal,
    rerank_topk,
)
from helpers.search import cosine_topk


# --------------------------------------------------------------------------------------------------------------
# An independent dense implementation of the published algorithm (Zhong et al., CVPR 2017, Sec. 3 and the
# authors' public Python ``re_ranking``), written from the paper's steps: N x N matrices and Python loops.
# The benchmark ``python -m benchmarks rerank_quality`` loads it from here as its dense reference.
# --------------------------------------------------------------------------------------------------------------
def dense_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Dense k-reciprocal re-ranking on Euclidean distance blocks; returns the (Q, G) final distances.

    Exact ties in a distance row are ordered by index (a stable sort) so that the result is well defined.
    """
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1), np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0
    )
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
    all_num = original_dist.shape[0]
    query_num = q_g_dist.shape[0]
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, axis=1, kind="stable").astype(np.int32)
    half = int(np.around(k1 / 2.0)) + 1

    def reciprocal(i, k):
        forward = initial_rank[i, :k]
        backward = initial_rank[forward, :k]
        return forward[np.where(backward == i)[0]]

    for i in range(all_num):
        r_i = reciprocal(i, k1 + 1)
        expansion = r_i
        for candidate in r_i:
            r_c = reciprocal(candidate, half)
            if len(np.intersect1d(r_c, r_i)) > 2.0 / 3 * len(r_c):
                expansion = np.append(expansion, r_c)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i] = np.mean(V[initial_rank[i, :k2]], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    # Jaccard distance through an inverted index over V's columns: sum_k min(V[i, k], V[j, k]) for every j;
    # the sum of the maxima is 2 minus that, every row of V summing to one.
    inv_index = [np.where(V[:, k] != 0)[0] for k in range(all_num)]
    jaccard = np.zeros((query_num, all_num), dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(all_num, dtype=np.float32)
        for k in np.where(V[i] != 0)[0]:
            temp_min[inv_index[k]] += np.minimum(V[i, k], V[inv_index[k], k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original_dist * lambda_value
    return final[:, query_num:]


def euclidean(a, b):
    """Plain float64 Euclidean distances (scipy), the input the authors' function receives."""
    from scipy.spatial.distance import cdist

    return cdist(a.astype(np.float64), b.astype(np.float64))


def dense_reference(query, gallery, **params):
    return dense_re_ranking(euclidean(query, gallery), euclidean(query, query), euclidean(gallery, gallery), **params)


def random_embeddings(n, d, seed):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)))


def clustered(n_clusters=8, per_cluster=12, d=32, spread=0.35, seed=0):
    """Unit vectors around random cluster centres, with their cluster labels."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_clusters, d)))
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    points = l2_normalize(centres[labels] + spread * rng.standard_normal((len(labels), d)) / np.sqrt(d) * 3)
    return points, labels


# --------------------------------------------------------------------------------------------------------------
# k-reciprocal re-ranking
# --------------------------------------------------------------------------------------------------------------
def test_k_reciprocal_equals_the_dense_algorithm_on_random_data():
    query, gallery = random_embeddings(200, 64, 1), random_embeddings(1000, 64, 2)
    expected = dense_reference(query, gallery)
    got = k_reciprocal(query, gallery)
    assert got.shape == (200, 1000) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k1,k2,lambda_value", [(5, 1, 0.3), (7, 3, 0.0), (20, 6, 0.5), (3, 10, 0.1), (45, 6, 0.3)])
def test_k_reciprocal_matches_the_reference_for_other_parameters(k1, k2, lambda_value):
    # Clustered data: many reciprocal neighbours and accepted expansions; odd k1 exercises round(k1 / 2).
    points, _ = clustered(n_clusters=6, per_cluster=15, d=16, seed=3)
    query, gallery = points[::5], np.delete(points, np.s_[::5], axis=0)
    expected = dense_reference(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    got = k_reciprocal(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_k_reciprocal_on_a_handful_of_vectors_worked_out_by_hand():
    # One query and three gallery points on a line of the circle: with k1=1 every image's k-reciprocal set is
    # itself plus its mutual nearest neighbour; lambda=0 leaves the Jaccard distance alone.
    angles = np.array([0.0, 0.1, 1.5, 1.6])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    dist = k_reciprocal(points[:1], points[1:], k1=1, k2=1, lambda_value=0.0)
    # Query 0 and gallery point 0.1 are mutual nearest neighbours: V rows share their support {0, 1}, and the
    # pair (1.5, 1.6) is disjoint from it, so its Jaccard distance is exactly 1.
    assert dist[0, 1] == pytest.approx(1.0) and dist[0, 2] == pytest.approx(1.0)
    # Within the pair, V[q] = V[g] (weights exp(-0) and exp(-d) on the same two images, each divided by its own
    # row maximum: the two rows differ only through that normalisation).
    d2 = 2 - 2 * np.cos(angles[:, None] - angles[None, :])
    w_q = np.exp(-d2[0, [0, 1]] / d2[0].max())
    w_g = np.exp(-d2[1, [0, 1]] / d2[1].max())
    v_q, v_g = w_q / w_q.sum(), w_g / w_g.sum()
    inter = np.minimum(v_q, v_g).sum()
    assert dist[0, 0] == pytest.approx(1 - inter / (2 - inter), abs=1e-6)


def test_lambda_one_keeps_the_original_order():
    query, gallery = random_embeddings(30, 16, 4), random_embeddings(200, 16, 5)
    dist = k_reciprocal(query, gallery, lambda_value=1.0)
    plain, _ = cosine_topk(query, gallery, k=200)
    reranked = np.lexsort((np.broadcast_to(np.arange(200), dist.shape), dist), axis=1)
    np.testing.assert_array_equal(reranked, plain)


def test_rerank_never_turns_a_correct_top1_into_the_farthest_item():
    points, labels = clustered(seed=7)
    q_idx = np.arange(0, len(points), 6)
    g_mask = np.ones(len(points), bool)
    g_mask[q_idx] = False
    query, gallery = points[q_idx], points[g_mask]
    q_lab, g_lab = labels[q_idx], labels[g_mask]
    plain, _ = cosine_topk(query, gallery, k=1)
    correct = g_lab[plain[:, 0]] == q_lab
    assert correct.mean() > 0.8  # the data are clustered: plain search is mostly right
    dist = k_reciprocal(query, gallery)
    order = np.argsort(dist, axis=1, kind="stable")
    farthest = order[:, -1]
    # The item plain search ranked first is never ranked last, and re-ranking keeps top-1 correct.
    assert not np.any(farthest[correct] == plain[correct, 0])
    assert (g_lab[order[:, 0]] == q_lab).mean() >= correct.mean()
    idx, scores = rerank_topk(query, gallery, k=5)
    np.testing.assert_array_equal(idx[:, 0], order[:, 0])
    assert np.all(np.diff(scores, axis=1) <= 0)  # scores = 1 - distance, best first
    np.testing.assert_allclose(scores, 1 - np.take_along_axis(dist, idx, axis=1), atol=1e-6)
    # The Jaccard term is there: most items of other clusters share no k-reciprocal neighbour with the query
    # (Jaccard distance exactly 1), so their final distance is at least 1 - lambda = 0.7, where the original term
    # alone stays <= 0.3; the query's own cluster, sharing neighbours, comes out closer than that.
    other = g_lab[None, :] != q_lab[:, None]
    assert (dist[other] >= 0.7 - 1e-6).mean() > 0.5
    assert np.all(dist[np.arange(len(dist)), farthest] >= 0.7 - 1e-6)
    assert np.all(dist[np.arange(len(dist)), order[:, 0]][correct] < 0.7)
    np.testing.assert_allclose(dist, dense_reference(query, gallery), atol=1e-5, rtol=0)


def test_expansion_sets_take_bounded_memory_whatever_k1():
    import tracemalloc

    from helpers.rerank import _expansion_pairs, _original_distances

    x = random_embeddings(1200, 16, 9).astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    knn, _, _ = _original_distances(x, sq, 100, 61)
    tracemalloc.start()
    rows, cols = _expansion_pairs(knn, 60)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # A (1024, k1+1, k1/2+1, k1+1) boolean block would be 113 MiB at k1=60; the output itself is well under 4 MiB.
    assert peak < 24 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert len(rows) == len(cols) > 1200 and np.all(np.diff(rows * 1200 + cols) > 0)  # sorted, no duplicates


def test_k_reciprocal_rejects_bad_input():
    q = random_embeddings(3, 8, 0)
    with pytest.raises(ValueError, match="same dimension"):
        k_reciprocal(q, random_embeddings(5, 4, 1))
    for bad in (2.0, -0.1, float("nan"), "0.3", None):
        with pytest.raises(ValueError, match="lambda_value must be between 0 and 1"):
            k_reciprocal(q, q, lambda_value=bad)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal(q, q, k1=0)


def test_integral_float_parameters_equal_their_int_and_others_are_refused_by_name():
    query, gallery = random_embeddings(5, 8, 0), random_embeddings(30, 8, 1)
    expected = k_reciprocal(query, gallery, k1=7, k2=6)
    np.testing.assert_array_equal(k_reciprocal(query, gallery, k1=7.0, k2=6.0), expected)
    for bad in (6.5, float("nan"), float("inf"), "6", True, None, 0, -2):
        with pytest.raises(ValueError, match="k2 must be (a whole number|at least 1)"):
            k_reciprocal(query, gallery, k2=bad)
        with pytest.raises(ValueError, match="k1 must be (a whole number|at least 1)"):
            k_reciprocal(query, gallery, k1=bad)


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_refused_by_every_top_k_function(k):
    query, gallery = random_embeddings(3, 8, 0), random_embeddings(20, 8, 1)
    with pytest.raises(ValueError, match="k must be at least 1"):
        rerank_topk(query, gallery, k=k)
    with pytest.raises(ValueError, match="k must be at least 1"):
        fused_score_topk([query], [gallery], k=k)
    with pytest.raises(ValueError, match="k must be at least 1"):
        cosine_topk(query, gallery, k=k)
    assert rerank_topk(query, gallery, k=2.0)[0].shape == (3, 2)  # an integral float is a k


def test_nan_embeddings_are_reported_not_ranked_by_rerank_and_fusion():
    query, gallery = random_embeddings(3, 8, 0), random_embeddings(20, 8, 1)
    gallery[5, 0] = np.nan
    with pytest.raises(ValueError, match=r"gallery embedding\(s\) contain NaN or Inf.*\[5\]"):
        rerank_topk(query, gallery, k=3)
    with pytest.raises(ValueError, match=r"gallery embedding\(s\) contain NaN or Inf.*\[5\]"):
        fused_score_topk([query], [gallery], k=3)


def test_k_reciprocal_with_a_gallery_smaller_than_k1():
    query, gallery = random_embeddings(4, 8, 0), random_embeddings(6, 8, 1)
    np.testing.assert_allclose(k_reciprocal(query, gallery), dense_reference(query, gallery), atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Query expansion and DBA
# --------------------------------------------------------------------------------------------------------------
def naive_expansion(query, gallery, n, alpha):
    out = []
    for q in query:
        sims = gallery @ q
        order = sorted(range(len(gallery)), key=lambda j: (-sims[j], j))[:n]
        v = q.astype(np.float64).copy()
        for j in order:
            v += (max(sims[j], 0.0) ** alpha if alpha else 1.0) * gallery[j]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_query_expansion_with_n_zero_is_the_identity():
    query, gallery = random_embeddings(20, 16, 0), random_embeddings(50, 16, 1)
    for expand in (average_query_expansion, alpha_query_expansion):
        out = expand(query, gallery, n=0)
        np.testing.assert_allclose(out, query, atol=1e-6)
        np.testing.assert_array_equal(cosine_topk(out, gallery, k=10)[0], cosine_topk(query, gallery, k=10)[0])
    np.testing.assert_allclose(database_augmentation(gallery, k=0), gallery, atol=1e-6)


def test_query_expansion_matches_the_naive_definition():
    query, gallery = random_embeddings(10, 8, 2), random_embeddings(40, 8, 3)
    np.testing.assert_allclose(average_query_expansion(query, gallery, n=3), naive_expansion(query, gallery, 3, 0),
                               atol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(query, gallery, n=4, alpha=3.0),
                               naive_expansion(query, gallery, 4, 3.0), atol=1e-6)
    # Expanding over the whole gallery reaches negative similarities: alpha-QE gives them weight 0 (max(s, 0)),
    # average QE weight 1.
    assert (query @ gallery.T).min() < -0.5
    for alpha in (0.0, 3.0):
        np.testing.assert_allclose(alpha_query_expansion(query, gallery, n=40, alpha=alpha),
                                   naive_expansion(query, gallery, 40, alpha), atol=1e-6)


def test_average_qe_on_a_worked_example():
    query = np.array([[1.0, 0.0]], np.float32)
    gallery = l2_normalize(np.array([[1.0, 1.0], [1.0, -0.2], [-1.0, 0.0]], np.float32))
    out = average_query_expansion(query, gallery, n=2)
    v = query[0] + gallery[1] + gallery[0]
    np.testing.assert_allclose(out[0], v / np.linalg.norm(v), atol=1e-6)


def test_dba_matches_the_naive_definition():
    gallery = random_embeddings(30, 8, 4)
    for alpha in (0.0, 3.0):
        expected = []
        for i, g in enumerate(gallery):
            sims = gallery @ g
            others = sorted((j for j in range(len(gallery)) if j != i), key=lambda j: (-sims[j], j))[:3]
            v = g.astype(np.float64) + sum((max(sims[j], 0) ** alpha if alpha else 1.0) * gallery[j] for j in others)
            expected.append(v / np.linalg.norm(v))
        np.testing.assert_allclose(database_augmentation(gallery, k=3, alpha=alpha), np.array(expected), atol=1e-6)


def test_qe_and_dba_never_turn_a_correct_top1_into_the_farthest_item():
    points, labels = clustered(seed=11)
    query, gallery = points[::6], np.delete(points, np.s_[::6], axis=0)
    q_lab, g_lab = labels[::6], np.delete(labels, np.s_[::6])
    plain, _ = cosine_topk(query, gallery, k=1)
    correct = g_lab[plain[:, 0]] == q_lab
    variants = {
        "avg": (average_query_expansion(query, gallery, n=5), gallery),
        "alpha": (alpha_query_expansion(query, gallery, n=5), gallery),
    }
    augmented = database_augmentation(gallery, k=5)
    variants["dba+alpha"] = (alpha_query_expansion(query, augmented, n=5), augmented)
    for name, (q, g) in variants.items():
        order, _ = cosine_topk(q, g, k=len(g))
        assert not np.any(order[correct, -1] == plain[correct, 0]), name
        assert (g_lab[order[:, 0]] == q_lab).mean() >= correct.mean(), name
    # The alpha weights are used: each neighbour weighs max(similarity, 0) ** 3 < 1, not 1 as in average QE, so
    # the expanded query stays closer to the original one, and both match the definitions.
    np.testing.assert_allclose(variants["alpha"][0], naive_expansion(query, gallery, 5, 3.0), atol=1e-6)
    np.testing.assert_allclose(variants["avg"][0], naive_expansion(query, gallery, 5, 0.0), atol=1e-6)
    np.testing.assert_allclose(variants["dba+alpha"][0], naive_expansion(query, augmented, 5, 3.0), atol=1e-6)
    closeness = {name: np.einsum("qd,qd->q", variants[name][0], query) for name in ("avg", "alpha")}
    assert np.all(closeness["alpha"] > closeness["avg"] + 1e-3)


# --------------------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------------------
def test_concat_fusion_is_the_weighted_mean_of_cosines_and_ranks_as_score_fusion():
    qa, ga = random_embeddings(12, 8, 0), random_embeddings(30, 8, 1)
    qb, gb = random_embeddings(12, 5, 2), random_embeddings(30, 5, 3)
    w = [0.6, 0.4]
    cq, cg = concat_embeddings([qa, qb], w), concat_embeddings([ga, gb], w)
    np.testing.assert_allclose(np.linalg.norm(cq, axis=1), 1.0, atol=1e-6)
    fused = fuse_scores([qa @ ga.T, qb @ gb.T], w)
    np.testing.assert_allclose(cq @ cg.T, fused / sum(w), atol=1e-6)
    idx, val = fused_score_topk([qa, qb], [ga, gb], k=5, weights=w)
    np.testing.assert_array_equal(idx, cosine_topk(cq, cg, k=5)[0])
    np.testing.assert_allclose(val, np.take_along_axis(fused, idx, axis=1), atol=1e-6)
    # A weight of zero leaves the other model alone.
    np.testing.assert_allclose(concat_embeddings([qa, qb], [1, 0])[:, :8], qa, atol=1e-6)


def test_fusion_rejects_mismatched_weights():
    a = random_embeddings(3, 4, 0)
    with pytest.raises(ValueError, match="fusion weights"):
        concat_embeddings([a, a], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        fuse_scores([a @ a.T, a @ a.T], [1.0, -1.0])


# --------------------------------------------------------------------------------------------------------------
# The retrieve pipeline and verb with these options (real images, real default model)
# --------------------------------------------------------------------------------------------------------------
def test_run_retrieval_with_rerank_qe_dba_index_and_ensembles(tiny_split, lite0):
    from helpers.pipeline import run_retrieval
    from helpers.rerank import alpha_query_expansion

    common = dict(k=10, device="cpu", progress=False)
    plain = run_retrieval(tiny_split, model=lite0, **common)
    q_emb, g_emb = plain.query.embeddings, plain.gallery.embeddings
    names = plain.gallery.names

    reranked = run_retrieval(tiny_split, model=lite0, rerank="kreciprocal", k1=8, k2=3, lambda_value=0.3, **common)
    idx, scores = rerank_topk(q_emb, g_emb, k=10, k1=8, k2=3)
    assert reranked.rankings == {q: [names[j] for j in row] for q, row in zip(plain.query.names, idx)}
    first = plain.query.names[0]
    np.testing.assert_allclose(reranked.scores[first], scores[0], atol=1e-6)  # 1 - re-ranked distance
    assert reranked.config["rerank"] == "kreciprocal" and reranked.config["k1"] == 8
    assert reranked.metrics["map@10"] >= 0.5  # a real split: re-ranking keeps it a good ranking

    expanded = run_retrieval(tiny_split, model=lite0, qe="alpha", qe_k=3, dba=2, index="flat", **common)
    augmented = database_augmentation(g_emb, k=2)
    expected, _ = cosine_topk(alpha_query_expansion(q_emb, augmented, n=3), augmented, k=10)
    assert expanded.rankings[first] == [names[j] for j in expected[0]]
    assert expanded.config["search"]["index"] == "flat"

    # An ensemble of the same model twice ranks as the model alone, by either fusion.
    twice = run_retrieval(tiny_split, model=[lite0, lite0], fusion_weights=[0.6, 0.4], **common)
    assert twice.rankings == plain.rankings and twice.config["fusion_weights"] == "0.6,0.4"
    scored = run_retrieval(tiny_split, model=[lite0, lite0], fusion="score", fusion_weights=[0.6, 0.4], **common)
    assert scored.rankings == plain.rankings
    np.testing.assert_allclose(scored.scores[first], plain.scores[first], atol=1e-5)

    run_names = {r.run_name for r in (plain, reranked, expanded, twice, scored)}
    assert len(run_names) == 5, run_names  # different options, different files
    assert all(len(set(r)) == 10 for r in expanded.rankings.values())


def test_retrieve_verb_takes_the_options_and_explains_bad_ones(tiny_split, tmp_path, capsys):
    from helpers.cli import main

    sub = tmp_path / "sub.json"
    code = main(["retrieve", "--data", str(tiny_split), "--device", "cpu", "--quiet", "--out", str(sub),
                 "--metrics-out", str(tmp_path / "m.json"), "--rerank", "kreciprocal", "--k1", "10", "--k2", "3",
                 "--lambda", "0.2", "--qe", "avg", "--qe-k", "2", "--index", "ivf"])
    assert code == 0
    import json

    record = json.loads((tmp_path / "m.json").read_text())
    assert record["config"]["lambda"] == 0.2 and record["config"]["qe"] == "avg" and record["config"]["index"] == "ivf"
    assert len(json.loads(sub.read_text())) == 20
    code = main(["retrieve", "--data", str(tiny_split), "--device", "cpu", "--quiet", "--out", str(sub),
                 "--model", "efficientnet-lite0", "--fusion-weights", "0.6,0.4"])
    assert code == 2 and "one weight per model" in capsys.readouterr().err
    code = main(["retrieve", "--data", str(tiny_split), "--device", "cpu", "--quiet", "--out", str(sub),
                 "--model", "efficientnet-lite0", "--model", "efficientnet-lite0", "--fusion", "score", "--qe", "avg"])
    assert code == 2 and "--fusion concat" in capsys.readouterr().err
