"""The post-processing chain: steps built from the config in the documented order, each equal to its algorithm
applied by hand, one results object with names and the description of what produced it."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.config import RetrievalConfig
from helpers.embedding import l2_normalize
from helpers.postprocess import PostprocessChain, RetrievalResults
from helpers.rerank import (DatabaseAugmentation, IndexSearch, KReciprocalRerank, L2Normalize, QueryExpansion,
                            ScoreFusion, alpha_query_expansion, average_query_expansion, build_postprocess_chain,
                            concat_embeddings, database_augmentation, fused_score_topk, rank_gallery, rerank_topk)
from helpers.search import cosine_topk


@pytest.fixture(scope="module")
def clustered():
    """Queries and a gallery drawn around 6 centres (a retrieval problem with structure), not normalised."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(6, 24))
    gallery = np.repeat(centres, 12, axis=0) + 0.6 * rng.normal(size=(72, 24))
    query = centres[rng.integers(0, 6, 15)] + 0.6 * rng.normal(size=(15, 24))
    return query.astype(np.float32) * 3.0, gallery.astype(np.float32) * 3.0


def _steps(config: RetrievalConfig) -> list[str]:
    return [d["step"] for d in build_postprocess_chain(config).describe()]


def test_chain_is_built_from_the_config_in_the_documented_order():
    assert _steps(RetrievalConfig()) == ["normalize", "search"]
    assert _steps(RetrievalConfig(dba=3, qe="alpha")) == ["normalize", "dba", "search", "qe"]
    assert _steps(RetrievalConfig(dba=3, qe="avg", rerank="kreciprocal")) == ["normalize", "dba", "qe", "kreciprocal"]
    assert _steps(RetrievalConfig(model=["a", "b"], dba=1)) == ["fusion", "dba", "search"]
    assert _steps(RetrievalConfig(model=["a", "b"], fusion="score")) == ["fusion"]
    described = build_postprocess_chain(RetrievalConfig(rerank="kreciprocal", qe="alpha")).describe()
    # literature defaults: Zhong et al. 2017 (k1=20, k2=6, lambda=0.3), Radenovic et al. alpha-QE (alpha=3)
    assert described[-1] == {"step": "kreciprocal", "k1": 20, "k2": 6, "lambda": 0.3}
    assert described[-2] == {"step": "qe", "mode": "alpha", "n": 5, "alpha": 3.0}


def test_each_step_equals_its_algorithm_applied_by_hand(clustered):
    query, gallery = clustered
    q, g = l2_normalize(query), l2_normalize(gallery)

    idx, val, info = rank_gallery([query], [gallery], k=10)
    ref_idx, ref_val = cosine_topk(q, g, k=10)
    assert np.array_equal(idx, ref_idx) and np.allclose(val, ref_val) and info["index"] == "exact"

    idx, _, _ = rank_gallery([query], [gallery], k=10, dba=3)
    assert np.array_equal(idx, cosine_topk(q, database_augmentation(g, k=3), k=10)[0])

    idx, _, _ = rank_gallery([query], [gallery], k=10, qe="avg", qe_k=4)
    assert np.array_equal(idx, cosine_topk(average_query_expansion(q, g, n=4), g, k=10)[0])

    idx, _, _ = rank_gallery([query], [gallery], k=10, qe="alpha", qe_k=4, qe_alpha=3.0)
    assert np.array_equal(idx, cosine_topk(alpha_query_expansion(q, g, n=4, alpha=3.0), g, k=10)[0])

    idx, val, _ = rank_gallery([query], [gallery], k=10, rerank="kreciprocal", k1=8, k2=3)
    ref_idx, ref_val = rerank_topk(q, g, k=10, k1=8, k2=3)
    assert np.array_equal(idx, ref_idx) and np.allclose(val, ref_val)

    halves = [query[:, :12], query[:, 12:]], [gallery[:, :12], gallery[:, 12:]]
    idx, _, _ = rank_gallery(*halves, k=10, fusion_weights=[0.7, 0.3])
    fused_q, fused_g = concat_embeddings(halves[0], [0.7, 0.3]), concat_embeddings(halves[1], [0.7, 0.3])
    assert np.array_equal(idx, cosine_topk(fused_q, fused_g, k=10)[0])
    idx, val, _ = rank_gallery(*halves, k=10, fusion="score", fusion_weights=[0.7, 0.3])
    ref_idx, ref_val = fused_score_topk(*halves, k=10, weights=[0.7, 0.3])
    assert np.array_equal(idx, ref_idx) and np.allclose(val, ref_val)


def test_steps_change_the_ranking(clustered):
    """Each step does something on this data (a chain that ignored a step would not pass the test above either)."""
    query, gallery = clustered
    plain, _, _ = rank_gallery([query], [gallery], k=10)
    for options in ({"dba": 3}, {"qe": "alpha", "qe_k": 4}, {"rerank": "kreciprocal", "k1": 8, "k2": 3}):
        assert not np.array_equal(rank_gallery([query], [gallery], k=10, **options)[0], plain), options


def test_results_object_names_and_description(clustered):
    query, gallery = clustered
    qn, gn = [f"q{i}.jpg" for i in range(len(query))], [f"g{i}.jpg" for i in range(len(gallery))]
    chain = PostprocessChain([L2Normalize(), DatabaseAugmentation(k=2), IndexSearch("flat"),
                              QueryExpansion("avg", n=3)])
    results = chain.run(RetrievalResults([query], [gallery], qn, gn), k=4)
    assert [s["step"] for s in results.steps] == ["normalize", "dba", "search", "qe"]
    assert results.steps == chain.describe()
    assert results.info["index"] == "flat"
    rankings = results.rankings()
    assert list(rankings) == qn and all(len(names) == 4 and set(names) <= set(gn) for names in rankings.values())
    assert rankings["q0.jpg"] == [gn[j] for j in results.indices[0]]
    assert results.score_lists()["q0.jpg"] == pytest.approx(results.scores[0].tolist())


@pytest.mark.parametrize("k", [0, -1])
def test_every_entry_point_refuses_k_below_1(clustered, k):
    query, gallery = clustered
    for options in ({}, {"rerank": "kreciprocal"}, {"qe": "avg"}, {"dba": 2}):
        with pytest.raises(ValueError, match="--k must be at least 1"):
            rank_gallery([query], [gallery], k=k, **options)
    with pytest.raises(ValueError, match="--k must be at least 1"):
        rank_gallery([query, query], [gallery, gallery], k=k, fusion="score")
    with pytest.raises(ValueError, match="--k must be at least 1"):
        build_postprocess_chain(RetrievalConfig()).run(RetrievalResults([query], [gallery]), k)
    for step in (IndexSearch(), KReciprocalRerank(), ScoreFusion()):
        with pytest.raises(ValueError, match="--k must be at least 1"):
            step(RetrievalResults([l2_normalize(query)], [l2_normalize(gallery)]), k)


def test_a_chain_that_never_ranks_is_an_error(clustered):
    query, gallery = clustered
    with pytest.raises(ValueError, match="no step that ranks"):
        PostprocessChain([L2Normalize(), DatabaseAugmentation(k=2)]).run(RetrievalResults([query], [gallery]), 5)
    with pytest.raises(ValueError, match="fuse the 2 models first"):
        PostprocessChain([IndexSearch()]).run(RetrievalResults([query, query], [gallery, gallery]), 5)
