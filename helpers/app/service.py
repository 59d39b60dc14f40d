"""What the search page asks of a collection, without any web framework: rank the collection for an uploaded image,
a text or one of its own rows, and find the file behind a row id.

Every failure the user can cause is an :class:`AppError` carrying its HTTP status, so that the web layer turns it
into a 4xx JSON ``{"error": ...}``. No path from a request ever reaches the filesystem: files are found by row id
only, through the collection's own shard tables.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Results a query may ask for (``k`` from 1 to this); larger ``k`` would make a page of thumbnails nobody reads.
DEFAULT_MAX_K = 200
DEFAULT_K = 12


class AppError(Exception):
    """Bad input: ``status`` is the HTTP status (4xx), ``message`` the one line shown to the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Hit:
    """One result: the collection's row id, its name relative to the indexed folder, its cosine similarity."""

    id: int
    name: str
    score: float


@dataclass
class Answer:
    """The ranked results of one query and the seconds it took (embedding and search)."""

    hits: list[Hit]
    seconds: float


def row_files(index) -> list[Path]:
    """The file behind every row of ``index`` (a :class:`helpers.collection.Index`), in row order: each shard's
    embedded files ordered by their row, joined to the collection's root folders."""
    from ..collection.shards import read_shard_table

    roots = [Path(root) for root in index.manifest.get("roots", [])]
    files: list[Path] = []
    for number in index.shards:
        table = read_shard_table(index.index_dir, number)
        rows = sorted((row, root, path) for row, root, path in zip(table["row"], table["root"], table["path"])
                      if row >= 0)
        files.extend(roots[root] / path for _, root, path in rows)
    if len(files) != len(index.names):
        raise ValueError(f"{index.index_dir}: {len(files)} files in the shard tables for {len(index.names)} names")
    return files


def parse_k(value: Any, max_k: int, default: int = DEFAULT_K) -> int:
    """``k`` from a request (a number or its text; None: ``default``); AppError 400 outside 1..``max_k``."""
    if value is None or value == "":
        return default
    try:
        k = int(str(value).strip())
    except ValueError:
        raise AppError(400, f"k must be a whole number from 1 to {max_k}, got {str(value)[:40]!r}") from None
    if not 1 <= k <= max_k:
        raise AppError(400, f"k must be from 1 to {max_k}, got {k}")
    return k


def parse_row(value: Any, count: int) -> int:
    """A row id from a request (a whole number or its ASCII digits); AppError 400 for anything else. Whether the
    collection has that row is checked by :meth:`SearchService.file` (404)."""
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise AppError(400, f"an image id is a row number from 0 to {count - 1}, got {str(value)[:40]!r}")
    return int(text)


class SearchService:
    """A collection opened for the search page: its model loaded once, queries serialised through one lock."""

    def __init__(self, index, device: str = "auto", max_k: int = DEFAULT_MAX_K,
                 max_pixels: int | None = None) -> None:
        from ..data import DEFAULT_MAX_PIXELS
        from ..models import resolve_device
        from ..text import has_text_encoder

        self.index = index
        self.device = resolve_device(device)
        self.model = index.model(str(self.device))
        self.has_text = has_text_encoder(self.model)
        self.files = row_files(index)
        self.max_k = max_k
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def info(self) -> dict[str, Any]:
        """The manifest's summary: model, size, index kind, measured recall, and what the page may ask."""
        manifest = self.index.manifest
        model = manifest.get("model", {})
        record = manifest.get("index", {})
        return {
            "model": model.get("name"), "weights": model.get("weights"), "dim": model.get("dim"),
            "images": len(self), "counts": manifest.get("counts", {}),
            "folders": [Path(root).name for root in manifest.get("roots", [])],
            "index": {"kind": record.get("kind"), "params": record.get("params", {}),
                      "recall_at_10": record.get("recall_at_10")},
            "updated": manifest.get("updated"), "text": self.has_text, "max_k": self.max_k, "default_k": DEFAULT_K,
        }

    def file(self, row: int) -> Path:
        """The file of row ``row``; AppError 404 for an id the collection does not have."""
        if not 0 <= row < len(self.files):
            raise AppError(404, f"no image with id {row}: ids go from 0 to {len(self.files) - 1}")
        return self.files[row]

    def _rank(self, vectors: np.ndarray, k: int, started: float) -> Answer:
        rows, scores = self.index.search_vectors(np.asarray(vectors, dtype=np.float32).reshape(1, -1), k)
        hits = [Hit(int(r), self.index.names[int(r)], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        return Answer(hits, time.perf_counter() - started)

    def search_image_file(self, path: str | os.PathLike, k: int, label: str = "the upload") -> Answer:
        """Rank for the image in ``path`` (decoded by the project's robust loader, embedded with the collection's
        model and its own preprocessing); AppError 400 naming why an unreadable image is refused."""
        from ..data import ImageLoadError, load_image

        started = time.perf_counter()
        try:  # the app's own size limit and messages, before the model sees the file
            load_image(path, max_pixels=self.max_pixels, draft_size=1)
        except ImageLoadError as exc:
            raise AppError(400, f"{label} is not a usable image: {exc.reason}") from None
        with self._lock:  # the collection's own path: its draft decoding and inference precision, as its shards
            result = self.index.embed_images([path], device=str(self.device), use_cache=False)
        if result.skipped:
            raise AppError(400, f"{label} is not a usable image: {result.skipped[0][1]}")
        return self._rank(result.embeddings, k, started)

    def search_text(self, text: Any, k: int) -> Answer:
        """Rank for a text query (CLIP models); AppError 400 for an empty text or a model without text encoder."""
        from ..models import ModelError
        from ..text import encode_text

        if not isinstance(text, str) or not text.strip():
            raise AppError(400, "the text query is empty: type a few words describing the image")
        if not self.has_text:
            raise AppError(400, f"this collection's model ({self.model.name}) has no text encoder: text search "
                                "needs a collection built with a CLIP model (e.g. --model clip-vit-b32)")
        started = time.perf_counter()
        try:
            with self._lock:
                vector = encode_text(self.model, [text.strip()])
        except ModelError as exc:
            raise AppError(400, str(exc)) from None
        return self._rank(vector, k, started)

    def search_id(self, row: int, k: int) -> Answer:
        """"More like this": rank for the stored embedding of row ``row`` (AppError 404 for an unknown row)."""
        self.file(row)
        started = time.perf_counter()
        return self._rank(self.index.vectors.take(np.array([row])), k, started)

    def results_json(self, answer: Answer, query: dict[str, Any], k: int) -> dict[str, Any]:
        """The API's answer: results best first with their thumbnail and full-image URLs, and the query's time."""
        results = [{"rank": rank, "id": hit.id, "name": hit.name, "score": round(hit.score, 6),
                    "thumb": f"/thumb/{hit.id}", "image": f"/image/{hit.id}"}
                   for rank, hit in enumerate(answer.hits, start=1)]
        return {"results": results, "k": k, "time_ms": round(answer.seconds * 1000, 1), "query": query}


def search_service(index, **kwargs: Any) -> SearchService:
    """A :class:`SearchService` for ``index`` (an :class:`helpers.collection.Index` or its folder)."""
    if isinstance(index, (str, os.PathLike)):
        from ..collection import Index

        index = Index.open(index)
    return SearchService(index, **kwargs)


__all__: Sequence[str] = ["AppError", "Answer", "Hit", "SearchService", "parse_k", "parse_row", "row_files",
                          "search_service"]
