"""The local engine: the project's own extraction path (:func:`helpers.embedding.extract_embeddings`) in this
process, shard after shard."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .sources import Entry

ShardSink = Callable[[int, Sequence[Entry], np.ndarray, list], None]
#: Images per extraction call: the progress bar moves at least this often within a shard.
STEP = 512


def embed_local(model, chunks: Sequence[tuple[int, Sequence[Entry]]], on_shard: ShardSink,
                advance: Callable[[int], None], batch_size: int = 32, device: str = "auto",
                backend: str = "auto", num_workers: int | None = None, precision: str = "fp32",
                on_precision: Callable[[str], None] | None = None) -> None:
    """Embed each ``(number, entries)`` chunk and hand ``on_shard(number, entries, vectors, reasons)`` the result
    (``vectors`` one float32 row per entry, ``reasons`` None for an embedded file). ``auto`` precision is decided
    once, on the first part embedded, and kept for the rest (``on_precision`` is told which): one collection, one
    precision."""
    from ..embedding import extract_embeddings

    for number, entries in chunks:
        vectors = np.zeros((len(entries), model.embed_dim), dtype=np.float32)
        reasons: list[str | None] = ["not embedded"] * len(entries)
        for start in range(0, len(entries), STEP):
            part = entries[start:start + STEP]
            positions: dict[str, list[int]] = {}
            for offset, entry in enumerate(part):
                positions.setdefault(str(entry.file), []).append(start + offset)
            result = extract_embeddings(model, [e.file for e in part], batch_size=batch_size, device=device,
                                        num_workers=num_workers, cache=None, progress=False, backend=backend,
                                        precision=precision)
            if precision == "auto" and len(result.paths):
                precision = result.precision
                if on_precision is not None:
                    on_precision(precision)
            for path, vector in zip(result.paths, result.embeddings):
                for i in positions[str(path)]:
                    vectors[i], reasons[i] = vector, None
            for path, reason in result.skipped:
                for i in positions[str(path)]:
                    reasons[i] = reason
            advance(len(part))
        on_shard(number, entries, vectors, reasons)
