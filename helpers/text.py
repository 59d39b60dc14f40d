"""Text and images in one space (CLIP): text-to-image search, zero-shot classification and composed queries.

Every embedding here is L2-normalised, so a dot product is a cosine similarity. The image side always goes through
:func:`helpers.embedding.extract_embeddings` and therefore shares the on-disk cache with image retrieval.

- :func:`text_search`: rank a gallery (or any image folder) for free-text queries.
- :func:`zero_shot_classify`: label images from class names alone, with prompt-template ensembling as in CLIP
  (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 3.1.4).
- :func:`compose_query`: an image query nudged by a text modifier (normalised weighted sum).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data import DataError, list_class_folder, load_retrieval_set, report_unlisted, scan_folder
from .embedding import EmbeddingCache, EmbeddingResult, extract_embeddings, l2_normalize
from .fileio import atomic_write, slug
from .metrics import build_metrics_record, write_metrics
from .models import EmbeddingModel, ModelError, load_model, resolve_device
from .settings import output_dir

logger = logging.getLogger(__name__)

#: The model text verbs use when none is named.
DEFAULT_TEXT_MODEL = "clip-vit-b32"

#: The 18 prompt templates that CLIP published for CIFAR-10 and CIFAR-100 (Radford et al., 2021; the list in the
#: CLIP repository's ``data/prompts.md``), also used by open_clip's zero-shot benchmark for those data sets.
OPENAI_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
#: CLIP's single default prompt (Radford et al., 2021, section 3.1.4).
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"openai": OPENAI_TEMPLATES, "simple": SIMPLE_TEMPLATES}

#: CLIP's learned temperature is clipped at 100 during training (Radford et al., 2021, section 2.5); every released
#: CLIP checkpoint sits at that bound. Used only when a network does not expose its own ``logit_scale``.
CLIP_LOGIT_SCALE = 100.0

#: Weight of the text in a composed query: 0.5 is the equal-weight "image + text" sum baseline of composed image
#: retrieval (e.g. Baldrati et al., 2022, "Effective conditioned and composed image retrieval combining CLIP-based
#: features"; Saito et al., 2023, "Pic2Word").
DEFAULT_TEXT_WEIGHT = 0.5


# --------------------------------------------------------------------------------------------------------------
# Text encoder access
# --------------------------------------------------------------------------------------------------------------
def has_text_encoder(model: EmbeddingModel) -> bool:
    """True when ``model.network`` exposes ``encode_text`` and ``tokenize`` (the CLIP family)."""
    network = getattr(model, "network", None)
    return callable(getattr(network, "encode_text", None)) and callable(getattr(network, "tokenize", None))


def require_text_encoder(model: EmbeddingModel) -> None:
    """Raise :class:`ModelError` naming what to use instead when ``model`` cannot embed text."""
    if not has_text_encoder(model):
        raise ModelError(
            f"model {model.name} has no text encoder; text search and zero-shot need a CLIP model "
            f"(e.g. --model {DEFAULT_TEXT_MODEL}; list them with `python -m helpers models --family clip`)"
        )
    pool = getattr(model.network, "pool", "proj")
    if pool not in ("proj", "default"):
        raise ModelError(
            f"model {model.name} with --pool {pool} gives pre-projection image features, not CLIP's shared "
            "image-text space: use --pool proj (the default) for text search, zero-shot and composed queries"
        )


def resolve_text_model(
    model: str | EmbeddingModel,
    weights: str = "pretrained",
    device: str | torch.device = "auto",
    model_options: dict[str, Any] | None = None,
) -> EmbeddingModel:
    """A built model with a text encoder: ``model`` itself, or the registry name built with ``weights``."""
    embedder = model if isinstance(model, EmbeddingModel) else load_model(
        model, weights=weights, device=resolve_device(device), **(model_options or {})
    )
    require_text_encoder(embedder)
    return embedder


def _model_device(model: EmbeddingModel) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def tokenize(model: EmbeddingModel, texts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, context length) from the model's own tokenizer (longer texts are cut at the context length,
    77 tokens for CLIP)."""
    require_text_encoder(model)
    texts = [str(t) for t in texts]
    return model.network.tokenize(texts)


def encode_text(
    model: EmbeddingModel,
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """L2-normalised float32 text embeddings (N, D), batched, in inference mode (fp16 autocast on CUDA)."""
    require_text_encoder(model)
    texts = list(texts)
    if not texts:
        return np.zeros((0, model.embed_dim), dtype=np.float32)
    target = resolve_device(device) if device is not None else _model_device(model)
    if _model_device(model) != target:
        model.to(target)
    model.eval()
    chunks = []
    autocast = torch.autocast("cuda", dtype=torch.float16) if target.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for start in range(0, len(texts), batch_size):
            ids = tokenize(model, texts[start : start + batch_size]).to(target)
            emb = model.network.encode_text(ids).float()
            chunks.append(torch.nn.functional.normalize(emb, dim=-1).cpu().numpy())
    return np.concatenate(chunks).astype(np.float32)


def logit_scale(model: EmbeddingModel) -> float:
    """CLIP's learned softmax temperature ``exp(logit_scale)`` (100 for every released checkpoint).

    Read from the network (or a wrapped ``model``/``clip`` submodule): a tensor is the log of the scale (open_clip's
    convention), a plain number the scale itself; :data:`CLIP_LOGIT_SCALE` where absent.
    """
    network = model.network
    for owner in (network, getattr(network, "model", None), getattr(network, "clip", None)):
        value = getattr(owner, "logit_scale", None) if owner is not None else None
        if isinstance(value, torch.Tensor):
            # open_clip (like OpenAI's CLIP) stores the logarithm of the scale as a parameter.
            return float(value.detach().float().exp())
        if isinstance(value, (int, float)):
            return float(value)
    return CLIP_LOGIT_SCALE


# --------------------------------------------------------------------------------------------------------------
# Class names and templates
# --------------------------------------------------------------------------------------------------------------
def parse_class_list(text: str) -> list[str]:
    """``"cat, dog,sports car"`` -> ``["cat", "dog", "sports car"]`` (names with commas need a classes file)."""
    return _check_classes([part.strip() for part in text.split(",")], "--classes")


def read_class_file(path: str | os.PathLike) -> list[str]:
    """One class name per line (UTF-8; blank lines ignored; spaces and punctuation kept as they are)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"classes file not found: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return _check_classes([line.strip() for line in lines], str(path))


def _check_classes(names: list[str], source: str) -> list[str]:
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{source}: no class name given")
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise ValueError(f"{source}: class names repeat: {duplicates}")
    if len(names) < 2:
        raise ValueError(f"{source}: zero-shot classification needs at least two classes, got {names}")
    return names


def load_templates(spec: str | Sequence[str] = "openai") -> list[str]:
    """Prompt templates: ``openai`` (CLIP's 18 CIFAR templates), ``simple`` ("a photo of a {}."), a path to a file
    with one template per line, or a list of templates. Every template must contain ``{}`` (the class name)."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            templates = list(TEMPLATE_SETS[spec])
            source = spec
        else:
            path = Path(spec)
            if not path.is_file():
                raise ValueError(
                    f"--templates must be {' or '.join(TEMPLATE_SETS)} or an existing file with one template per "
                    f"line; {spec!r} is neither"
                )
            templates = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
            source = str(path)
    else:
        templates = [str(t) for t in spec]
        source = "templates"
    if not templates:
        raise ValueError(f"{source}: no template given")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ValueError(f"{source}: every template needs {{}} where the class name goes; these lack it: {missing[:3]}")
    return templates


def fill_template(template: str, name: str) -> str:
    """Put ``name`` where ``{}`` stands (literal replacement: braces elsewhere in the template are kept)."""
    return template.replace("{}", name)


def class_text_embeddings(
    model: EmbeddingModel,
    classes: Sequence[str],
    templates: Sequence[str] = OPENAI_TEMPLATES,
    batch_size: int = 256,
) -> np.ndarray:
    """One classifier vector per class (C, D), CLIP's prompt ensembling: embed every template filled with the
    class name, L2-normalise each, average, and L2-normalise the mean (Radford et al., 2021, section 3.1.4)."""
    templates = list(templates)
    prompts = [fill_template(t, name) for name in classes for t in templates]
    emb = encode_text(model, prompts, batch_size=batch_size)
    per_class = emb.reshape(len(classes), len(templates), -1).mean(axis=1)
    return l2_normalize(per_class)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float64 internally for stability)."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()


# --------------------------------------------------------------------------------------------------------------
# Composed queries
# --------------------------------------------------------------------------------------------------------------
def compose_query(image_emb: np.ndarray, text_emb: np.ndarray, weight: float = DEFAULT_TEXT_WEIGHT) -> np.ndarray:
    """``normalize((1 - weight) * normalize(image) + weight * normalize(text))``.

    ``image_emb`` (N, D) or (D,); ``text_emb`` (D,), (1, D) or (N, D). ``weight`` in [0, 1]: 0 keeps the image
    query, 1 is the text alone.
    """
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"text weight must be between 0 and 1, got {weight}")
    image = np.asarray(image_emb, dtype=np.float32)
    text = np.asarray(text_emb, dtype=np.float32)
    single = image.ndim == 1
    image2 = l2_normalize(np.atleast_2d(image))
    text2 = l2_normalize(np.atleast_2d(text))
    if image2.shape[1] != text2.shape[1]:
        raise ValueError(f"image embeddings have {image2.shape[1]} dimensions, text embeddings {text2.shape[1]}: "
                         "a composed query needs both from the same CLIP model")
    if text2.shape[0] not in (1, image2.shape[0]):
        raise ValueError(f"{text2.shape[0]} text embeddings for {image2.shape[0]} images: give one, or one per image")
    composed = l2_normalize((1.0 - weight) * image2 + weight * text2)
    return composed[0] if single else composed


# --------------------------------------------------------------------------------------------------------------
# Image collections
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ImageCollection:
    """Images to search or classify: paths, their output names and, for class folders, their folder labels."""

    root: Path
    layout: str  # "competition" (test/gallery), "flat" or "class-folders"
    paths: list[Path]
    names: list[str]
    labels: list[str] | None = None


def collect_images(data: str | os.PathLike, part: str = "gallery") -> ImageCollection:
    """What ``data`` holds: a competition layout (``part``: ``gallery``, or ``all`` for query + gallery), a flat
    image folder, or a class-folder dataset ``DIR/<class>/<image>`` (names ``class/image``, labels = folders).

    In a competition layout, ``test/labels.json`` (written by ``split``) supplies labels where present.
    """
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    if (root / "test" / "gallery").is_dir() or (root / "gallery").is_dir():
        dataset = load_retrieval_set(root)
        parts = [("gallery", dataset.gallery_paths)]
        if part == "all":
            parts.insert(0, ("query", dataset.query_paths))
        paths = [p for _, ps in parts for p in ps]
        names = [p.name for p in paths]
        labels = None
        if dataset.labels:
            lookup = [dataset.labels.get(kind, {}) for kind, ps in parts for _ in ps]
            labels = [lk.get(n) for lk, n in zip(lookup, names)]
            if any(label is None for label in labels):
                labels = None
        if part == "all" and len(set(names)) < len(names):
            names = [f"{kind}/{p.name}" for kind, ps in parts for p in ps]
        return ImageCollection(root, "competition", paths, names, labels)
    listing = scan_folder(root)
    if listing.images:
        report_unlisted(listing.skipped)
        return ImageCollection(root, "flat", listing.images, [p.name for p in listing.images])
    if not listing.folders:
        raise DataError(f"{root} holds no image (expected images in it, {root}/<class>/<image>, or test/gallery)")
    items = list_class_folder(root)
    paths = [p for p, _ in items]
    return ImageCollection(root, "class-folders", paths, [f"{label}/{p.name}" for p, label in items],
                           [label for _, label in items])


@dataclass
class EmbedOptions:
    """How the text verbs embed images (the keyword arguments of :func:`text_search`, :func:`zero_shot_classify`
    and :func:`run_zero_shot` beside their own).

    ``use_cache``: ``None`` reads and writes the embedding cache of image retrieval, except for random weights
    (``weights="none"``), whose builds all differ under one cache key; ``True`` forces it, ``False`` skips it.
    """

    weights: str = "pretrained"
    batch_size: int = 32
    device: str = "auto"
    use_cache: bool | None = None
    cache_dir: str | os.PathLike | None = None
    cache_dtype: str = "float32"
    num_workers: int | None = None
    progress: bool = True
    model_options: dict[str, Any] | None = None

    def cache(self, model: EmbeddingModel) -> EmbeddingCache | None:
        use_cache = self.use_cache
        if use_cache is None:
            use_cache = model.weights != "none"
            if not use_cache:
                logger.info("random weights: the embedding cache is not used (every random build differs, while "
                            "the cache key only says 'none'); pass use_cache=True to force it")
        return EmbeddingCache(self.cache_dir, dtype=self.cache_dtype) if use_cache else None


def _embed_images(model: EmbeddingModel, paths: Sequence[Path], options: EmbedOptions, device: torch.device,
                  desc: str) -> EmbeddingResult:
    return extract_embeddings(model, paths, batch_size=options.batch_size, device=device,
                              num_workers=options.num_workers, cache=options.cache(model), progress=options.progress,
                              desc=desc)


def _names_of(result: EmbeddingResult, collection: ImageCollection) -> list[str]:
    by_path = dict(zip(collection.paths, collection.names))
    return [by_path[p] for p in result.paths]


# --------------------------------------------------------------------------------------------------------------
# Text search
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TextSearchResult:
    """Rankings keyed by query text (the submission's dict format), their cosine scores, and the gallery."""

    rankings: dict[str, list[str]]
    scores: dict[str, list[float]]
    gallery: EmbeddingResult
    collection: ImageCollection
    model_name: str
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def paths_for(self, query: str) -> list[Path]:
        """The ranked files of one query as paths."""
        by_name = dict(zip(self.collection.names, self.collection.paths))
        return [by_name[n] for n in self.rankings[query]]


def text_search(
    data_or_folder: str | os.PathLike,
    queries: Sequence[str],
    model: str | EmbeddingModel = DEFAULT_TEXT_MODEL,
    k: int = 10,
    **options: Any,
) -> TextSearchResult:
    """Rank the gallery of ``data_or_folder`` (competition layout, flat folder or class folders) for every text
    query by cosine similarity of L2-normalised CLIP text and image embeddings. Repeated queries count once.

    ``options``: the fields of :class:`EmbedOptions` (``weights``, ``batch_size``, ``device``, ``use_cache``, ...).
    """
    options = EmbedOptions(**options)
    start = time.perf_counter()
    queries = [str(q) for q in queries]
    if not queries or any(not q.strip() for q in queries):
        raise ValueError("give at least one non-empty --query")
    if k < 1:
        raise ValueError("k must be at least 1")
    unique = list(dict.fromkeys(queries))
    if len(unique) < len(queries):
        logger.warning("%d repeated query text(s) searched once", len(queries) - len(unique))
    collection = collect_images(data_or_folder)
    target = resolve_device(options.device)
    t0 = time.perf_counter()
    embedder = resolve_text_model(model, options.weights, target, options.model_options)
    timings = {"load_model": time.perf_counter() - t0}
    gallery = _embed_images(embedder, collection.paths, options, target, "gallery")
    timings["embed_gallery"] = gallery.seconds
    if len(gallery.paths) == 0:
        raise DataError(f"no image of {collection.root} could be read")
    t0 = time.perf_counter()
    text = encode_text(embedder, unique, device=target)
    timings["embed_text"] = time.perf_counter() - t0

    from .search import cosine_topk

    t0 = time.perf_counter()
    indices, similarities = cosine_topk(text, gallery.embeddings, k=k)
    timings["search"] = time.perf_counter() - t0
    names = _names_of(gallery, collection)
    rankings = {q: [names[j] for j in row] for q, row in zip(unique, indices)}
    scores = {q: [float(s) for s in row] for q, row in zip(unique, similarities)}
    timings["total"] = time.perf_counter() - start
    config = {
        "task": "text-search",
        "data": str(collection.root),
        "layout": collection.layout,
        "model": embedder.name,
        "weights": embedder.weights,
        "k": k,
        "batch_size": options.batch_size,
        "device": str(target),
        "cache": "auto" if options.use_cache is None else options.use_cache,
        "model_options": {key: str(v) for key, v in embedder.options.items()},
    }
    return TextSearchResult(rankings, scores, gallery, collection, embedder.name, config, timings)


# --------------------------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ZeroShotResult:
    """Class probabilities (N, C) for the images that loaded, in input order."""

    paths: list[Path]
    classes: list[str]
    probabilities: np.ndarray
    templates: list[str]
    logit_scale: float
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    image: EmbeddingResult | None = None

    @property
    def top_k(self) -> int:
        """How many labels each prediction row lists: min(5, number of classes)."""
        return min(5, len(self.classes))

    def ranked(self) -> np.ndarray:
        """Class indices by descending probability (N, top_k); ties go to the earlier class."""
        order = np.argsort(-self.probabilities, axis=1, kind="stable")
        return order[:, : self.top_k]

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.ranked()[:, 0]]


def zero_shot_classify(
    paths: Sequence[str | os.PathLike],
    classes: Sequence[str],
    templates: str | Sequence[str] = "openai",
    model: str | EmbeddingModel = DEFAULT_TEXT_MODEL,
    **options: Any,
) -> ZeroShotResult:
    """Classify images among ``classes`` without training: cosine similarity of each L2-normalised image embedding
    to each class's template-ensembled text embedding, times CLIP's logit scale, softmax over classes.
    ``options``: the fields of :class:`EmbedOptions`."""
    options = EmbedOptions(**options)
    classes = _check_classes([str(c).strip() for c in classes], "classes")
    template_list = load_templates(templates)
    target = resolve_device(options.device)
    embedder = resolve_text_model(model, options.weights, target, options.model_options)
    image = _embed_images(embedder, [Path(p) for p in paths], options, target, "images")
    weights_matrix = class_text_embeddings(embedder, classes, template_list)
    scale = logit_scale(embedder)
    probabilities = softmax(scale * image.embeddings @ weights_matrix.T)
    return ZeroShotResult(list(image.paths), classes, probabilities.astype(np.float32), template_list, scale,
                          image.skipped, image)


def normalise_label(text: str) -> str:
    """Folder name / class name matching key: NFKC, case-folded, ``_`` and ``-`` as spaces, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("_", " ").replace("-", " ")
    return re.sub(r"\s+", " ", text).strip()


def match_labels(folder_labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class index of every folder label (exact name first, then :func:`normalise_label`); a clear error listing
    folders that match no class."""
    exact = {c: i for i, c in enumerate(classes)}
    loose: dict[str, int] = {}
    for i, c in enumerate(classes):
        loose.setdefault(normalise_label(c), i)
    indices, unmatched = [], set()
    for label in folder_labels:
        index = exact.get(label, loose.get(normalise_label(label)))
        if index is None:
            unmatched.add(label)
        indices.append(-1 if index is None else index)
    if unmatched:
        raise DataError(
            f"class folders {sorted(unmatched)[:10]} match none of the classes {list(classes)[:10]}: name the classes "
            "as the folders are named (underscores may be spaces; case is ignored), or leave out --classes to use "
            "the folder names"
        )
    return indices


def classification_metrics(probabilities: np.ndarray, true_index: Sequence[int], n_classes: int) -> dict[str, Any]:
    """Top-1 and top-5 accuracy, mean per-class recall (balanced accuracy over the classes present) and
    each class's recall, with scikit-learn."""
    from sklearn.metrics import recall_score, top_k_accuracy_score

    y_true = np.asarray(true_index)
    labels = np.arange(n_classes)
    if n_classes == 2:
        # scikit-learn reads a binary problem from the positive-class column only.
        top1 = float(np.mean(np.argmax(probabilities, axis=1) == y_true))
    else:
        top1 = float(top_k_accuracy_score(y_true, probabilities, k=1, labels=labels))
    # With five classes or fewer every label is in the top five: top-5 accuracy is 1 by definition.
    top5 = float(top_k_accuracy_score(y_true, probabilities, k=5, labels=labels)) if n_classes > 5 else 1.0
    predicted = np.argmax(probabilities, axis=1)
    present = np.unique(y_true)
    recalls = recall_score(y_true, predicted, labels=present, average=None, zero_division=0)
    return {
        "top1_accuracy": top1,
        "top5_accuracy": top5,
        "mean_per_class_recall": float(np.mean(recalls)),
        "per_class_recall": {int(c): float(r) for c, r in zip(present, recalls)},
    }


@dataclass
class ZeroShotRun:
    """A zero-shot run over a folder: the result, output names, true labels where known, and metrics."""

    result: ZeroShotResult
    collection: ImageCollection
    names: list[str]
    true_labels: list[str] | None
    metrics: dict[str, Any] | None
    model_name: str
    config: dict[str, Any]
    timings: dict[str, float]

    def predictions_frame(self):
        """pandas DataFrame: file, label_1, prob_1, ... label_k, prob_k (and true_label when labelled)."""
        import pandas as pd

        result = self.result
        ranked = result.ranked()
        rows = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"file": name}
            for j, c in enumerate(ranked[i], start=1):
                row[f"label_{j}"] = result.classes[c]
                row[f"prob_{j}"] = float(result.probabilities[i, c])
            if self.true_labels is not None:
                row["true_label"] = self.true_labels[i]
            rows.append(row)
        columns = ["file"] + [f"{p}_{j}" for j in range(1, result.top_k + 1) for p in ("label", "prob")]
        if self.true_labels is not None:
            columns.append("true_label")
        return pd.DataFrame(rows, columns=columns)

    def metrics_record(self) -> dict[str, Any]:
        """The metrics JSON (the shared schema plus zero-shot keys)."""
        metrics = dict(self.metrics or {})
        per_class = metrics.pop("per_class_recall", {})
        return build_metrics_record(
            model_name=self.model_name,
            top_k=5,
            metrics=metrics,
            batch_size=self.config.get("batch_size"),
            num_classes=len(self.result.classes),
            runtime_seconds=self.timings.get("total"),
            config=self.config,
            device=self.config.get("device"),
            extra={
                "task": "zero-shot",
                "top_k_accuracy": metrics.get("top5_accuracy"),
                "per_class_recall": {self.result.classes[c]: r for c, r in per_class.items()},
                "classes": self.result.classes,
                "templates": self.result.templates,
                "logit_scale": self.result.logit_scale,
                "n_images": len(self.names),
                "skipped_files": [f"{p}: {r}" for p, r in self.result.skipped],
                "timings": self.timings,
            },
        )


def run_zero_shot(
    data: str | os.PathLike,
    classes: Sequence[str] | None = None,
    templates: str | Sequence[str] = "openai",
    model: str | EmbeddingModel = DEFAULT_TEXT_MODEL,
    **options: Any,
) -> ZeroShotRun:
    """Zero-shot classify every image of ``data`` (flat folder, class folders, or a competition layout's query and
    gallery). Class folders (or ``labels.json``) give true labels and thus metrics; without ``classes`` their
    folder names, underscores as spaces, are the class names. ``options``: the fields of :class:`EmbedOptions`."""
    embed = EmbedOptions(**options)
    start = time.perf_counter()
    collection = collect_images(data, part="all")
    if classes is None:
        if collection.labels is None:
            raise ValueError(f"{collection.root} is not labelled by class folders: name the classes with --classes "
                             "A,B,C or --classes-file FILE")
        classes = [label.replace("_", " ") for label in dict.fromkeys(sorted(collection.labels))]
    classes = _check_classes([str(c).strip() for c in classes], "classes")
    result = zero_shot_classify(collection.paths, classes, templates, model=model, **options)
    names = _names_of(result.image, collection)
    true_labels = metrics = None
    if collection.labels is not None:
        by_path = dict(zip(collection.paths, collection.labels))
        true_labels = [by_path[p] for p in result.paths]
        true_index = match_labels(true_labels, classes)
        true_labels = [classes[i] for i in true_index]
        if len(true_index):
            metrics = classification_metrics(result.probabilities.astype(np.float64), true_index, len(classes))
    embedder_name = model.name if isinstance(model, EmbeddingModel) else str(model)
    config = {
        "task": "zero-shot",
        "data": str(collection.root),
        "layout": collection.layout,
        "model": embedder_name,
        "weights": model.weights if isinstance(model, EmbeddingModel) else embed.weights,
        "templates": templates if isinstance(templates, str) else "custom",
        "n_templates": len(result.templates),
        "batch_size": embed.batch_size,
        "device": str(resolve_device(embed.device)),
        "cache": "auto" if embed.use_cache is None else embed.use_cache,
        "model_options": {key: str(v) for key, v in (embed.model_options or {}).items()},
    }
    timings = {"embed_images": result.image.seconds, "total": time.perf_counter() - start}
    return ZeroShotRun(result, collection, names, true_labels, metrics, embedder_name, config, timings)


@dataclass
class ZeroShotOutputs:
    predictions: Path
    metrics: Path | None = None


def save_zero_shot(run: ZeroShotRun, out_dir: str | os.PathLike) -> ZeroShotOutputs:
    """Write ``out_dir/predictions.csv`` and, when labelled, ``out_dir/metrics.json`` (both atomically)."""
    out_dir = Path(out_dir)
    frame = run.predictions_frame()
    predictions = atomic_write(out_dir / "predictions.csv", lambda f: frame.to_csv(f, index=False,
                                                                                   float_format="%.6f"))
    outputs = ZeroShotOutputs(predictions)
    if run.metrics is not None:
        outputs.metrics = write_metrics(out_dir / "metrics.json", run.metrics_record())
    return outputs


def default_zero_shot_dir(data: str | os.PathLike, model: str, templates: str) -> Path:
    """``results/zero-shot/<dataset>_<model>_<templates>`` (file-name safe)."""
    template_tag = templates if templates in TEMPLATE_SETS else Path(templates).stem
    return output_dir("results") / "zero-shot" / slug(f"{Path(data).resolve().name}_{model}_{template_tag}")
