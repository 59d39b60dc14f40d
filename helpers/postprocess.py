"""Post-processing as a chain of small steps over one results object, in the spirit of Open Metric Learning's
post-processors.

A :class:`RetrievalResults` holds the query and gallery names, the embeddings the steps work on, the top-k
gallery indices and scores once a step has ranked, and ``steps``: the description of every step that produced
them. A :class:`PostProcessor` is one step (``results -> results``) with a :meth:`PostProcessor.describe` that
names it and its parameters; a :class:`PostprocessChain` runs steps in order and records them.

The steps of a retrieval run (model fusion, database-side augmentation, index search, query expansion,
k-reciprocal re-ranking) are defined beside their algorithms in :mod:`helpers.rerank`, with their literature
defaults; :func:`helpers.rerank.build_postprocess_chain` builds them from a
:class:`helpers.config.RetrievalConfig` in the documented order::

    fusion (concat: one embedding | score: summed similarities, final) -> DBA -> search -> QE -> re-ranking
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .search import check_k

logger = logging.getLogger(__name__)


@dataclass
class RetrievalResults:
    """The state a post-processing chain works on and returns.

    ``queries``/``galleries``: one (n, d) embedding array per model (one array once fused); ``indices`` and
    ``scores``: (Q, k) top-k gallery indices and similarities (None until a step ranks); ``steps``: what produced
    them, in order; ``info``: facts of the search (index kind, its recall, notes); ``searcher``: the gallery index
    a search step built, reused by later steps.
    """

    queries: list[np.ndarray]
    galleries: list[np.ndarray]
    query_names: list[str] | None = None
    gallery_names: list[str] | None = None
    indices: np.ndarray | None = None
    scores: np.ndarray | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    searcher: Any = None

    @property
    def query(self) -> np.ndarray:
        """The query embeddings of a single (or fused) model."""
        if len(self.queries) != 1:
            raise ValueError(f"this step needs one embedding per image; fuse the {len(self.queries)} models first")
        return self.queries[0]

    @property
    def gallery(self) -> np.ndarray:
        """The gallery embeddings of a single (or fused) model."""
        if len(self.galleries) != 1:
            raise ValueError(f"this step needs one embedding per image; fuse the {len(self.galleries)} models first")
        return self.galleries[0]

    def ranked(self, indices: np.ndarray, scores: np.ndarray) -> None:
        """Record a new ranking."""
        self.indices, self.scores = np.asarray(indices), np.asarray(scores)

    def rankings(self) -> dict[str, list[str]]:
        """``{query name: [gallery names, best first]}`` (needs the names and a ranking)."""
        if self.indices is None or self.query_names is None or self.gallery_names is None:
            raise ValueError("no ranking yet, or no names: run a chain with a search step on named embeddings")
        return {q: [self.gallery_names[j] for j in row] for q, row in zip(self.query_names, self.indices)}

    def score_lists(self) -> dict[str, list[float]]:
        """``{query name: [similarity of each ranked name]}``."""
        if self.scores is None or self.query_names is None:
            raise ValueError("no ranking yet, or no query names")
        return {q: [float(s) for s in row] for q, row in zip(self.query_names, self.scores)}


class PostProcessor:
    """One step of a chain: takes the results and ``k`` (names to rank per query), returns the results."""

    #: Short name of the step as its description records it.
    name = "step"

    def params(self) -> dict[str, Any]:
        """The step's parameters (JSON values)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """``{"step": name, **params}``, what the metrics JSON records."""
        return {"step": self.name, **self.params()}

    def __call__(self, results: RetrievalResults, k: int) -> RetrievalResults:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"


class PostprocessChain:
    """Steps run in order over one :class:`RetrievalResults`; each appends its description to ``results.steps``."""

    def __init__(self, steps: Sequence[PostProcessor]):
        self.steps = list(steps)

    def describe(self) -> list[dict[str, Any]]:
        """The description of every step, in order."""
        return [step.describe() for step in self.steps]

    def run(self, results: RetrievalResults, k: int) -> RetrievalResults:
        """Apply every step; ``ValueError`` for ``k < 1`` and when no step ranked."""
        k = check_k(k, "--k")
        for step in self.steps:
            results = step(results, k)
            results.steps.append(step.describe())
            logger.debug("post-processing step %s done", step.describe())
        if results.indices is None:
            raise ValueError("the post-processing chain has no step that ranks the gallery (add a search step)")
        return results

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return " -> ".join(repr(step) for step in self.steps) or "(empty chain)"
