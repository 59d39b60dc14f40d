"""Paths and settings: where outputs, caches and the shared datasets live, and every ``RETRIEVAL_*`` variable.

Output folders are resolved one way everywhere: ``<root>/submissions``, ``<root>/results``,
``<root>/visualizations`` and ``<root>/runs``, where ``root`` is the working directory unless a caller passes one
(:func:`output_dir`). The command line always uses the working directory; notebooks pass their output root
explicitly (:func:`notebook_output_root`: the project root, or a folder of its own in fast mode), so that a
notebook writes to the same place whatever folder its kernel starts in.

Environment variables (all optional):

========================== ================================== =========================================================
variable                   read by                            meaning (default)
========================== ================================== =========================================================
``RETRIEVAL_CACHE_DIR``    embedding cache, ONNX exports      embedding cache folder
                                                              (``$XDG_CACHE_HOME`` or ``~/.cache``, then
                                                              ``image-retrieval/embeddings``)
``RETRIEVAL_DATA_CACHE``   ``helpers.data_source``            where zip data sources are downloaded and unpacked
                                                              (``$XDG_CACHE_HOME`` or ``~/.cache``, then
                                                              ``image-retrieval/datasets``)
``RETRIEVAL_ONNX_DIR``     ONNX backend                       exported ONNX models (``onnx/`` in the cache folder)
``RETRIEVAL_ORT_SPIN``     ONNX backend                       ``1`` lets idle ONNX Runtime threads spin (``0``)
``RETRIEVAL_THREADS``      extraction                         inference threads (default: from the cores, with the
                                                              decoding workers never above the cores)
``RETRIEVAL_DECODE_WORKERS`` extraction                       image decoding processes (default: from the cores)
``RETRIEVAL_MAX_PIXELS``   image loading                      largest image accepted, in pixels; larger files are
                                                              refused as possible decompression bombs (89,478,485:
                                                              Pillow's own limit)
``RETRIEVAL_SERVER_URL``   ``submit.py``, ``helpers.client``  the evaluation server's URL (the course server)
``RETRIEVAL_FAST``         notebooks only (never the CLI)     ``1`` fast mode, ``0`` full mode (unset: fast where no
                                                              CUDA GPU is present)
``RETRIEVAL_OUTPUT_DIR``   notebooks only                     output root of the notebooks (fast mode: a folder of its
                                                              own, :data:`FAST_OUTPUT_NAME` in the temporary folder;
                                                              full mode: the project root)
``RETRIEVAL_SHARED_DATASETS`` tests, notebooks, benchmarks    the labeled photo datasets (``../shared/datasets``
                                                              beside the project root)
``RETRIEVAL_CLIP_CHECKPOINT`` tests                           an open_clip ViT-B-32 OpenAI checkpoint; the tests
                                                              with real CLIP weights are skipped without it
========================== ================================== =========================================================

Only the standard library is imported: notebooks read these settings before the requirements are installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "RETRIEVAL_CACHE_DIR"
ONNX_ENV = "RETRIEVAL_ONNX_DIR"
ORT_SPIN_ENV = "RETRIEVAL_ORT_SPIN"
MAX_PIXELS_ENV = "RETRIEVAL_MAX_PIXELS"
SERVER_URL_ENV = "RETRIEVAL_SERVER_URL"
FAST_ENV = "RETRIEVAL_FAST"
OUTPUT_ENV = "RETRIEVAL_OUTPUT_DIR"
SHARED_ENV = "RETRIEVAL_SHARED_DATASETS"
CLIP_CHECKPOINT_ENV = "RETRIEVAL_CLIP_CHECKPOINT"
THREADS_ENV = "RETRIEVAL_THREADS"
DECODE_WORKERS_ENV = "RETRIEVAL_DECODE_WORKERS"
DATA_CACHE_ENV = "RETRIEVAL_DATA_CACHE"
#: Every variable above: the README's table lists the same set (a test checks it).
ENVIRONMENT = (CACHE_ENV, ONNX_ENV, ORT_SPIN_ENV, THREADS_ENV, DECODE_WORKERS_ENV, MAX_PIXELS_ENV, SERVER_URL_ENV,
               FAST_ENV, OUTPUT_ENV, SHARED_ENV, CLIP_CHECKPOINT_ENV, DATA_CACHE_ENV)

#: The output folders, by kind: submissions and their scores, metrics JSONs, figures and pages, training runs.
OUTPUT_KINDS = ("submissions", "results", "visualizations", "runs")
#: Name of fast mode's own output root inside the system's temporary folder (where ``RETRIEVAL_OUTPUT_DIR`` is unset).
FAST_OUTPUT_NAME = "retrieval-fast-outputs"


def output_dir(kind: str, root: str | os.PathLike | None = None) -> Path:
    """The output folder ``kind`` (one of :data:`OUTPUT_KINDS`) under ``root``; without ``root``, relative to the
    working directory (what the command line writes to). Nothing is created."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output folder {kind!r}; expected one of {', '.join(OUTPUT_KINDS)}")
    return Path(kind) if root is None else Path(root) / kind


def output_path(kind: str, name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<kind>/<name>`` (see :func:`output_dir`)."""
    return output_dir(kind, root) / name


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: the working folder) holding ``pyproject.toml``, else
    ``start`` itself."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return start


def notebook_output_root(fast: bool, project: str | os.PathLike | None = None) -> Path:
    """Where a notebook writes its outputs: ``$RETRIEVAL_OUTPUT_DIR`` when set; else, in fast mode, a folder of its
    own (:data:`FAST_OUTPUT_NAME` in the system's temporary folder: fast runs never mix with real ones in the
    project's ``results/``); else the project root (:func:`project_root` of ``project``)."""
    env = os.environ.get(OUTPUT_ENV, "").strip()
    if env:
        return Path(env).expanduser().resolve()
    if fast:
        return Path(tempfile.gettempdir()) / FAST_OUTPUT_NAME
    return project_root(project)


def cache_dir() -> Path:
    """The embedding cache folder: ``$RETRIEVAL_CACHE_DIR``, else ``image-retrieval/embeddings`` under
    ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    explicit = os.environ.get(CACHE_ENV)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(explicit) if explicit else base / "image-retrieval" / "embeddings"


def data_cache_dir() -> Path:
    """Where zip data sources are downloaded and unpacked (:mod:`helpers.data_source`): ``$RETRIEVAL_DATA_CACHE``,
    else ``image-retrieval/datasets`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    explicit = os.environ.get(DATA_CACHE_ENV)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(explicit).expanduser() if explicit else base / "image-retrieval" / "datasets"


def shared_datasets_dir(project: str | os.PathLike | None = None) -> Path:
    """The labeled photo datasets: ``$RETRIEVAL_SHARED_DATASETS``, else ``../shared/datasets`` beside the project
    root."""
    env = os.environ.get(SHARED_ENV)
    return Path(env) if env else project_root(project).parent / "shared" / "datasets"


def env_int(name: str, minimum: int = 0, unit: str = "") -> int | None:
    """The whole number in the environment variable ``name`` (underscores allowed: ``100_000_000``), ``None`` when it
    is unset or empty; ``ValueError`` naming the variable for anything else or a value below ``minimum``."""
    value = os.environ.get(name, "").strip().replace("_", "")
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number{' of ' + unit if unit else ''}, not {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {number}")
    return number
