"""Atomic file writes: an output is either the old file or the complete new one, never half of it."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def atomic_write(path: str | os.PathLike, writer: Callable[[IO], None], mode: str = "w") -> Path:
    """Write ``path`` through ``writer(file_object)`` into a temporary file, then rename it into place.

    The temporary file lives in the destination folder so that the final ``os.replace`` is atomic.
    Parent folders are created. Returns the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as UTF-8 JSON (non-ASCII names kept as they are)."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=indent, ensure_ascii=False, default=_json_default))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write a binary file."""
    return atomic_write(path, lambda f: f.write(data), mode="wb")


def read_json(path: str | os.PathLike) -> Any:
    """Read a UTF-8 JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars and arrays, and paths."""
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def slug(text: str, limit: int = 120) -> str:
    """A file-name-safe form of ``text``: runs of characters outside ``[A-Za-z0-9._-]`` become one ``-``.

    The one place where run, report and output file names are made safe; never empty (``"run"``).
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:limit] or "run"
