"""A built collection, opened for search: ``Index.open(INDEX_DIR).search(images=[...] | query_dir=... |
text=[...], k=10)`` gives the submission (dict format) and the similarities, the names relative to the indexed
folders."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .chooser import IndexPlan, search_plan
from .indexing import load_faiss
from .modelref import ModelRef, check_same_model
from .shards import ShardVectors, read_manifest, read_shard_table

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Rankings ``{query: [names]}`` (the submission's dict format), their similarities, and skipped queries."""

    rankings: dict[str, list[str]]
    scores: dict[str, list[float]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def display_names(index_dir: Path, manifest: dict[str, Any], numbers: Sequence[int]) -> list[str]:
    """The name of every embedded row, in index order: the path relative to its folder, prefixed with the folder's
    name where the collection has several folders."""
    roots = manifest.get("roots", [])
    labels = _root_labels(roots)
    names: list[str] = []
    for number in numbers:
        table = read_shard_table(index_dir, number)
        rows = [(row, root, path) for row, root, path in zip(table["row"], table["root"], table["path"]) if row >= 0]
        rows.sort()
        names.extend(path if len(roots) <= 1 else f"{labels[root]}/{path}" for _, root, path in rows)
    return names


def _root_labels(roots: Sequence[str]) -> list[str]:
    labels: list[str] = []
    for root in roots:
        label = Path(root).name or "root"
        labels.append(label if label not in labels else f"{label}-{len(labels)}")
    return labels


class Index:
    """A collection folder opened for search (see :func:`helpers.collection.build_collection`)."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any]) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        record = manifest["index"]
        self.plan = IndexPlan(record["kind"], dict(record.get("params", {})), int(record.get("memory_bytes", 0)))
        self.shards = list(record.get("shards", []))
        self.vectors = ShardVectors.open(index_dir, self.shards)
        self.names = display_names(index_dir, manifest, self.shards)
        self.faiss_index = load_faiss(index_dir, record)
        self._model = None

    @classmethod
    def open(cls, index_dir: str | os.PathLike) -> "Index":
        """Open a folder written by ``index build``; a clear error where it holds no finished build."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if not manifest or not manifest.get("index"):
            raise FileNotFoundError(f"no finished index at {index_dir} (manifest.json without an index): run "
                                    "`python -m helpers index build` (again, to finish an interrupted build)")
        return cls(index_dir, manifest)

    def __len__(self) -> int:
        return len(self.names)

    def model(self, device: str = "auto"):
        """The collection's model, reloaded as it was built (checked against the recorded weights)."""
        if self._model is None:
            self._model = ModelRef.from_manifest(self.manifest["model"]).load(device)
            check_same_model(self.manifest["model"], self._model)
        return self._model

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(rows, similarities) of the top ``min(k, N)`` rows for L2-normalised ``queries`` (Q, d)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.dim:
            raise ValueError(f"queries must be (Q, {self.vectors.dim}), got {queries.shape}")
        if len(queries) == 0 or len(self) == 0:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        return search_plan(self.plan, self.faiss_index, self.vectors, queries, min(k, len(self)))

    def rank(self, query_names: Sequence[str], queries: np.ndarray, k: int = 10) -> SearchResult:
        """Rankings and similarities keyed by ``query_names``."""
        ids, scores = self.search_vectors(queries, k)
        rankings = {q: [self.names[i] for i in row] for q, row in zip(query_names, ids)}
        similarities = {q: [float(s) for s in row] for q, row in zip(query_names, scores)}
        return SearchResult(rankings, similarities)

    def embed_images(self, files: Sequence[str | os.PathLike], batch_size: int = 32, device: str = "auto",
                     use_cache: bool = True, progress: bool = False):
        """Embed query files with the collection's model (through the embedding cache, as ``retrieve``), at the
        inference precision its shards were embedded with."""
        from ..embedding import EmbeddingCache, extract_embeddings

        model = self.model(device)
        cache = EmbeddingCache() if use_cache else None
        return extract_embeddings(model, files, batch_size=batch_size, device=device, cache=cache,
                                  progress=progress, desc="queries", precision=self.inference_precision)

    @property
    def inference_precision(self) -> str:
        """``fp32`` or ``int8``: what embedded the shards (``auto`` resolved by the build; float32 where the
        manifest does not say)."""
        recorded = self.manifest.get("inference_precision_used", self.manifest.get("inference_precision", "fp32"))
        return recorded if recorded in ("fp32", "int8") else "fp32"

    def search(self, images: Sequence[str | os.PathLike] = (), query_dir: str | os.PathLike | None = None,
               text: Sequence[str] = (), k: int = 10, batch_size: int = 32, device: str = "auto",
               use_cache: bool = True, progress: bool = False) -> SearchResult:
        """Rank the collection for query images (``images``, the files of ``query_dir``) and/or ``text`` queries
        (CLIP models). Image queries are keyed by file name, text queries by their text; an unreadable query
        image is left out and listed in ``skipped``."""
        from ..data import DataError, list_images

        files = [Path(f) for f in images]
        for file in files:
            if not file.is_file():
                raise DataError(f"query image not found: {file}")
        if query_dir is not None:
            files += list_images(query_dir)
        if not files and not text:
            raise ValueError("give query images (--image / --query-dir) or --text")
        result = SearchResult({}, {})
        if files:
            embedded = self.embed_images(files, batch_size, device, use_cache, progress)
            part = self.rank([p.name for p in embedded.paths], embedded.embeddings, k)
            result.rankings.update(part.rankings)
            result.scores.update(part.scores)
            result.skipped = [(str(p), r) for p, r in embedded.skipped]
        if text:
            from ..text import encode_text

            part = self.rank(list(text), encode_text(self.model(device), list(text)), k)
            result.rankings.update(part.rankings)
            result.scores.update(part.scores)
        return result
