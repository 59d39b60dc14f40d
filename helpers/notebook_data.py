"""The data a notebook runs on: a small real split in fast mode (or the embedded demo), the user's folder in full
mode, and the class names and text queries of a dataset.

Only the standard library is imported at module level (like :mod:`helpers.notebook`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .settings import shared_datasets_dir

#: Fast mode's default real dataset and the size of its split (per class): small enough for a CPU in seconds.
FAST_SOURCE = "imagenette-val"
FAST_SPLIT = {"query_per_class": 2, "gallery_per_class": 6, "train_per_class": 6}
#: The notebooks' default data folder (relative to the project root); fast mode splits its own data unless another
#: folder is given.
DEFAULT_DATA_DIR = "data"
#: Share of the training classes held out as the validation split when the test has no ground truth.
HOLDOUT_CLASSES = 0.2


def fast_dataset(
    source: str = FAST_SOURCE,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    **split: int,
) -> Path:
    """A small real dataset in the competition layout (training, query, gallery, ground truth).

    Splits ``<shared datasets>/<source>`` with :func:`helpers.data.split_dataset` (sizes: :data:`FAST_SPLIT`,
    overridable) into ``out`` (default: a new temporary folder); where that folder is absent, writes the embedded
    digits demo (:func:`helpers.demo.build_demo_dataset`) instead.
    """
    from .data import split_dataset
    from .demo import build_demo_dataset

    sizes = {**FAST_SPLIT, **split}
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="retrieval-notebook-"))
    source_dir = shared_datasets_dir() / source
    if source_dir.is_dir():
        split_dataset(source_dir, out, seed=seed, **sizes)
        print(f"fast mode: {source} split into {out}")
    else:
        build_demo_dataset(out, query_per_class=sizes["query_per_class"], gallery_per_class=sizes["gallery_per_class"],
                           train_per_class=sizes["train_per_class"], seed=seed)
        print(f"fast mode: {source_dir} is absent, using the embedded digits demo in {out}")
    return out


def notebook_data(fast: bool, data_source: str | os.PathLike = "data", source: str = FAST_SOURCE,
                  need_training: bool = False, **split: int) -> Path:
    """The folder a notebook runs on, from its ``DATA_SOURCE`` parameter.

    Fast mode with the default ``"data"``: :func:`fast_dataset` (a small split of ``source``). Otherwise (full mode,
    or another source): :func:`helpers.data_source.prepare_data`: a folder (relative paths from the current folder,
    else the project root), a folder or ``.zip`` on a mounted Google Drive, or a ``.zip`` path or URL (unpacked
    once), whose layout is checked and printed; a :class:`helpers.data.DataError` says what is missing.
    ``need_training``: the notebook trains or selects, so ``training/<class>/*`` is needed even with test labels.

    Fast mode also points the embedding cache (``$RETRIEVAL_CACHE_DIR``) at a fresh temporary folder: the cells of
    one notebook share embeddings, and randomly initialised weights never meet embeddings cached from another
    initialisation (nor fill the user's cache).
    """
    from .data_source import prepare_data

    if fast:
        os.environ["RETRIEVAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="retrieval-notebook-cache-")
        if os.fspath(data_source) == DEFAULT_DATA_DIR:
            return fast_dataset(source, **split)
    return prepare_data(data_source, need_training=need_training)


def scoring_data(data: str | os.PathLike, fraction: float = HOLDOUT_CLASSES, seed: int = 0) -> Path:
    """The folder a notebook's runs are scored on: ``data`` itself when ``test/ground_truth.json`` exists, else a
    class-disjoint validation split of ``data/training`` (:func:`helpers.select.build_validation`: a seeded share
    ``fraction`` of whole classes as query/gallery with ground truth, as the test holds unseen identities), built once
    in a temporary folder per dataset and seed and reused afterwards."""
    import hashlib

    from .data import DataError, load_retrieval_set
    from .select import build_validation

    dataset = load_retrieval_set(data)
    if dataset.ground_truth is not None:
        return Path(data)
    if dataset.training_dir is None:
        raise DataError(f"{data}: test/ground_truth.json and training/ are both missing: nothing to score runs on")
    key = hashlib.sha1(f"{Path(data).resolve()}|{fraction}|{seed}".encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / "retrieval-validation" / key
    split, reused = build_validation(dataset.training_dir, out, fraction=fraction, seed=seed, min_training=0)
    print(f"validation split of {dataset.training_dir} ({'reused' if reused else 'built'}): held-out classes "
          f"{split.held_out} -> {out}")
    return out


def class_names(data: str | os.PathLike) -> list[str]:
    """The classes of a dataset: those of ``test/labels.json``, else the ``training/`` folder names (sorted)."""
    from .data import class_folders, load_retrieval_set

    dataset = load_retrieval_set(data)
    if dataset.labels:
        return sorted(set(dataset.labels.get("gallery", {}).values()) | set(dataset.labels.get("query", {}).values()))
    if dataset.training_dir is not None:
        return [folder.name for folder in class_folders(dataset.training_dir)]
    return []


def zero_shot_classes(data: str | os.PathLike) -> list[str] | None:
    """The class names zero-shot classification chooses among: None where ``test/labels.json`` gives them (and thus
    true labels), else the ``training/`` folder names, underscores as spaces (no true labels: no accuracy)."""
    from .data import load_retrieval_set

    if load_retrieval_set(data).labels:
        return None
    return [name.replace("_", " ") for name in class_names(data)] or None


def class_text_queries(
    data: str | os.PathLike, template: str = "a photo of a {}."
) -> tuple[list[str], dict[str, list[str]]]:
    """One text query per class (``template`` filled with the class name, underscores as spaces) and, from
    ``test/labels.json``, its ground truth: every gallery image of that class (empty without labels)."""
    from .data import load_retrieval_set

    labels = load_retrieval_set(data).labels or {}
    queries, truth = [], {}
    for name in class_names(data):
        query = template.format(name.replace("_", " "))
        queries.append(query)
        relevant = sorted(g for g, label in labels.get("gallery", {}).items() if label == name)
        if relevant:
            truth[query] = relevant
    return queries, truth
