"""The on-disk embedding cache: where it lives, what identifies a file, and shards that survive concurrent writers.

A shard holds the embeddings of one folder for one model key. A shard that loads but is inconsistent (NaN or Inf,
the wrong dimension, a different number of vectors than keys) is reported and rebuilt. Two processes that write one
shard at once merge their entries: each save takes an exclusive file lock, re-reads the shard under it, adds its own
entries and replaces the file atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .fileio import atomic_write

logger = logging.getLogger(__name__)

try:  # POSIX advisory locks; elsewhere saves still replace the file atomically but do not merge
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def default_cache_dir() -> Path:
    """``$RETRIEVAL_CACHE_DIR``, else ``~/.cache/image-retrieval/embeddings``."""
    env = os.environ.get("RETRIEVAL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "image-retrieval" / "embeddings"


def file_key(path: str | os.PathLike) -> str:
    """A file's identity for the cache: absolute path, size, modification time, inode and status-change time.

    The inode and ctime catch a file replaced by another of the same size whose mtime was put back (``cp -p``,
    rsync, tar): the replacement gets a new inode or at least a new ctime, which no user tool can set back.
    """
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` + ``.lock`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def shard_problem(keys: np.ndarray, vectors: np.ndarray, dim: int | None = None) -> str | None:
    """Why a loaded shard cannot be trusted, or ``None`` when it is consistent."""
    if keys.ndim != 1 or vectors.ndim != 2:
        return f"keys of shape {keys.shape} and vectors of shape {vectors.shape}"
    if len(keys) != len(vectors):
        return f"{len(vectors)} vectors for {len(keys)} keys"
    if dim is not None and len(vectors) and vectors.shape[1] != dim:
        return f"vectors of dimension {vectors.shape[1]}, expected {dim}"
    if not np.issubdtype(vectors.dtype, np.floating):
        return f"vectors of type {vectors.dtype}"
    if not np.isfinite(vectors).all():
        return "NaN or infinite values"
    return None


class EmbeddingCache:
    """Embeddings on disk, one shard per (model key, folder): ``root/<model key>-<dtype>/<folder hash>.npz``.

    Entries are keyed by :func:`file_key`, so a changed or replaced file is embedded again. Shards are rewritten
    atomically under a file lock, merged with what other processes wrote meanwhile. ``dtype`` (float32 or
    float16) is the storage precision; :func:`helpers.embedding.extract_embeddings` passes freshly computed
    embeddings through the same precision so that cold and warm runs agree bit for bit.
    """

    def __init__(self, root: str | os.PathLike | None = None, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError("cache dtype must be float32 or float16")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.dtype = np.dtype(dtype)

    def shard_path(self, model_key: str, folder: Path) -> Path:
        folder_hash = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
        return self.root / f"{model_key}-{self.dtype.name}" / f"{folder_hash}.npz"

    def load(self, model_key: str, folder: Path, dim: int | None = None) -> dict[str, np.ndarray]:
        """The shard's entries; ``{}`` (and a warning) for a missing, unreadable or inconsistent shard."""
        return self._read(self.shard_path(model_key, folder), dim)

    def _read(self, path: Path, dim: int | None) -> dict[str, np.ndarray]:
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as shard:
                keys, vectors = shard["keys"], shard["embeddings"]
        except Exception as exc:  # noqa: BLE001 - a broken shard is rebuilt, never fatal
            logger.warning("embedding cache %s unreadable (%s); it will be rebuilt", path, exc)
            return {}
        problem = shard_problem(keys, vectors, dim)
        if problem is not None:
            logger.warning("embedding cache %s holds %s; it will be rebuilt", path, problem)
            return {}
        return dict(zip(keys.tolist(), vectors))

    def save(self, model_key: str, folder: Path, entries: dict[str, np.ndarray]) -> None:
        """Merge ``entries`` into the shard on disk (ours win on equal keys) and replace it atomically."""
        if not entries:
            return
        dim = len(next(iter(entries.values())))
        path = self.shard_path(model_key, folder)
        with _locked(path):
            merged = self._read(path, dim)
            merged.update(entries)
            keys = sorted(merged)
            vectors = np.stack([merged[k] for k in keys]).astype(self.dtype)
            atomic_write(path, lambda f: np.savez(f, keys=np.array(keys), embeddings=vectors), mode="wb")
