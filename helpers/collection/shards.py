"""Shards on disk and the manifest of a collection folder.

``INDEX_DIR/shards/NNNNN.npy`` holds the float16, L2-normalised embeddings of the shard's readable files and
``INDEX_DIR/shards/NNNNN.parquet`` one row per file: ``root`` (which folder of the manifest's ``roots``), ``path``
(relative to it), ``size`` and ``mtime_ns`` (with the absolute path, the identity the embedding cache uses),
``row`` (its row in the ``.npy``, -1 for a skipped file) and ``reason`` (why it was skipped, else null). Each file
is written to a temporary name and renamed into place, the ``.parquet`` last: a shard whose ``.parquet`` exists is
finished and is never rewritten. ``manifest.json`` describes the whole folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write, read_json, write_json
from .sources import Entry

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
PRECISION = "float16"
FORMAT_VERSION = 1


def shard_dir(index_dir: str | os.PathLike) -> Path:
    return Path(index_dir) / SHARDS


def shard_paths(index_dir: str | os.PathLike, number: int) -> tuple[Path, Path]:
    """(``.npy``, ``.parquet``) of shard ``number``."""
    base = shard_dir(index_dir) / f"{number:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".parquet")


def finished_shards(index_dir: str | os.PathLike) -> list[int]:
    """Numbers of the finished shards (their ``.parquet`` exists), ascending."""
    folder = shard_dir(index_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.stem) for p in folder.glob("*.parquet") if p.stem.isdigit())


def clean_unfinished(index_dir: str | os.PathLike) -> int:
    """Remove what an interrupted build left: temporary files and ``.npy`` files without their ``.parquet``."""
    folder = shard_dir(index_dir)
    removed = 0
    if not folder.is_dir():
        return 0
    done = set(finished_shards(index_dir))
    for path in folder.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        orphan = path.suffix == ".npy" and path.stem.isdigit() and int(path.stem) not in done
        if stale_tmp or orphan:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d unfinished shard file(s) of an interrupted build", removed)
    return removed


def _file_identity(file: Path) -> tuple[int, int]:
    try:
        stat = file.stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def write_shard(index_dir: str | os.PathLike, number: int, entries: Sequence[Entry], vectors: np.ndarray,
                reasons: Sequence[str | None]) -> dict[str, int]:
    """Write shard ``number``: ``vectors`` (one row per entry; rows of skipped entries are ignored) and
    ``reasons`` (None for an embedded file). Returns its counts. Refuses to rewrite a finished shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    npy, parquet = shard_paths(index_dir, number)
    if parquet.exists():
        raise FileExistsError(f"shard {parquet} is finished and is never rewritten")
    ok = [i for i, reason in enumerate(reasons) if reason is None]
    rows = np.full(len(entries), -1, dtype=np.int64)
    rows[ok] = np.arange(len(ok))
    kept = np.asarray(vectors, dtype=np.float32)[ok] if ok else np.zeros((0, np.shape(vectors)[-1]), np.float32)
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    stored = (kept / np.maximum(norms, 1e-12)).astype(np.float16)
    identities = [_file_identity(entry.file) for entry in entries]
    table = pa.table({
        "root": pa.array([e.root for e in entries], pa.int32()),
        "path": pa.array([e.path for e in entries], pa.string()),
        "size": pa.array([s for s, _ in identities], pa.int64()),
        "mtime_ns": pa.array([m for _, m in identities], pa.int64()),
        "row": pa.array(rows, pa.int64()),
        "reason": pa.array(list(reasons), pa.string()),
    })
    atomic_write(npy, lambda f: np.save(f, stored, allow_pickle=False), mode="wb")
    atomic_write(parquet, lambda f: pq.write_table(table, f), mode="wb")
    return {"number": number, "files": len(entries), "embedded": len(ok), "skipped": len(entries) - len(ok)}


def read_shard_table(index_dir: str | os.PathLike, number: int) -> dict[str, list]:
    """The columns of shard ``number``'s ``.parquet`` as lists."""
    import pyarrow.parquet as pq

    return pq.read_table(shard_paths(index_dir, number)[1]).to_pydict()


def indexed_keys(index_dir: str | os.PathLike, numbers: Sequence[int] | None = None) -> set[tuple[int, str]]:
    """``(root, path)`` of every file in the finished shards (embedded or skipped)."""
    keys: set[tuple[int, str]] = set()
    for number in finished_shards(index_dir) if numbers is None else numbers:
        table = read_shard_table(index_dir, number)
        keys.update(zip(table["root"], table["path"]))
    return keys


@dataclass
class ShardVectors:
    """The embeddings of some shards, memory-mapped, addressed by one global row number (shards in order)."""

    arrays: list[np.ndarray]
    offsets: np.ndarray

    @classmethod
    def open(cls, index_dir: str | os.PathLike, numbers: Sequence[int]) -> "ShardVectors":
        arrays = [np.load(shard_paths(index_dir, n)[0], mmap_mode="r", allow_pickle=False) for n in numbers]
        offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
        return cls(arrays, offsets)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.arrays[0].shape[1]) if self.arrays else 0

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any shape) as float32, shape ``ids.shape + (dim,)``."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            local = flat[mask] - self.offsets[s]
            order = np.argsort(local)
            rows = np.empty_like(order)
            rows[order] = np.arange(len(order))
            out[mask] = np.asarray(self.arrays[s][local[order]], dtype=np.float32)[rows]
        return out.reshape(ids.shape + (self.dim,))

    def chunks(self, size: int = 65536):
        """(start, float32 block) over every row, in order."""
        start = 0
        for array in self.arrays:
            for begin in range(0, len(array), size):
                block = np.asarray(array[begin:begin + size], dtype=np.float32)
                yield start + begin, block
            start += len(array)

    def load(self) -> np.ndarray:
        """Every row as one float32 array."""
        if not self.arrays:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([np.asarray(a, dtype=np.float32) for a in self.arrays])


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's manifest, or None where there is none."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not a readable manifest ({exc})") from None


def write_manifest(index_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically."""
    return write_json(Path(index_dir) / MANIFEST, manifest)
