"""One retrieval run end to end: dataset -> embeddings -> search -> submission -> metrics.

Used by ``python -m helpers retrieve``, the notebooks and the demo; every stage is a plain function elsewhere.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .data import DataError, RetrievalSet, load_retrieval_set
from .embedding import EmbeddingCache, EmbeddingResult, extract_embeddings
from .metrics import EvaluationResult, build_metrics_record, evaluate_rankings, write_metrics
from .models import DEFAULT_MODEL, EmbeddingModel, load_model, resolve_device
from .rerank import POSTPROCESS_DEFAULTS, align_by_path, postprocess_config, rank_gallery
from .submission import save_submission

logger = logging.getLogger("helpers")

SUBMISSIONS_DIR = Path("submissions")
RESULTS_DIR = Path("results")
VISUALIZATIONS_DIR = Path("visualizations")


@dataclass
class RetrievalRun:
    """Everything one run produced; ``rankings`` is the submission in dict format."""

    dataset: RetrievalSet
    model_name: str
    k: int
    rankings: dict[str, list[str]]
    scores: dict[str, list[float]]
    query: EmbeddingResult
    gallery: EmbeddingResult
    evaluation: EvaluationResult | None
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float] | None:
        return self.evaluation.metrics if self.evaluation else None

    @property
    def run_name(self) -> str:
        return self.config.get("run_name") or default_run_name(self.dataset.root, self.config)

    def metrics_record(self) -> dict[str, Any]:
        """The run's metrics JSON (see :func:`helpers.metrics.build_metrics_record`)."""
        info = self.model_info
        labels = self.dataset.labels or {}
        classes = set(labels.get("query", {}).values()) | set(labels.get("gallery", {}).values())
        return build_metrics_record(
            model_name=self.model_name,
            top_k=self.k,
            metrics=self.metrics,
            batch_size=self.config.get("batch_size"),
            is_finetuned=bool(info.get("is_finetuned", False)),
            num_classes=len(classes) or None,
            runtime_seconds=self.timings.get("total"),
            loss_function=info.get("loss_function"),
            num_epochs=info.get("num_epochs"),
            final_train_loss=info.get("final_train_loss"),
            pooling_type=info.get("pooling_type"),
            config=self.config,
            device=self.config.get("device"),
            extra={
                "run_name": self.run_name,
                "timings": self.timings,
                "n_queries": len(self.rankings),
                "n_gallery": len(self.gallery.paths),
                "skipped_files": [f"{p}: {r}" for p, r in self.query.skipped + self.gallery.skipped],
                "cache": {
                    "read": self.query.n_cached + self.gallery.n_cached,
                    "computed": self.query.n_computed + self.gallery.n_computed,
                },
            },
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def default_run_name(data_root: Path, config: dict[str, Any]) -> str:
    """``<dataset>_<model>`` plus every option that differs from its default, file-name safe."""
    parts = [Path(data_root).resolve().name, str(config.get("model", DEFAULT_MODEL))]
    defaults = {"weights": "pretrained", "tta": "none", **POSTPROCESS_DEFAULTS}
    for key, default in defaults.items():
        value = config.get(key)
        if value is not None and value != default:
            parts.append(f"{key}-{Path(str(value)).name if key == 'weights' else value}")
    return _slug("_".join(parts))


def run_retrieval(
    data: str | os.PathLike | RetrievalSet = "data",
    model: str | EmbeddingModel = DEFAULT_MODEL,
    weights: str = "pretrained",
    k: int = 10,
    batch_size: int = 32,
    device: str = "auto",
    use_cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    cache_dtype: str = "float32",
    tta: str = "none",
    num_workers: int | None = None,
    progress: bool = True,
    run_name: str | None = None,
    model_options: dict[str, Any] | None = None,
    rerank: str = "none",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    qe: str = "none",
    qe_k: int = 5,
    qe_alpha: float = 3.0,
    dba: int = 0,
    index: str = "exact",
    fusion: str = "concat",
    fusion_weights: list[float] | None = None,
    text_modifier: str | None = None,
    text_weight: float = 0.5,
    checkpoint: str | os.PathLike | None = None,
    backend: str = "auto",
) -> RetrievalRun:
    """Rank the gallery for every query of ``data`` and evaluate when ground truth exists.

    ``text_modifier`` (CLIP models): composed queries, each query image's embedding plus the modifier's text
    embedding as a normalised weighted sum with ``text_weight`` (see :func:`helpers.text.compose_query`).

    ``model`` is a registry name (built with ``weights`` and ``model_options``) or an already built model.
    ``checkpoint``: a training run's ``best.pt`` (``python -m helpers train``): the trained backbone + head is used
    (its embedding, never classifier logits) and the metrics JSON records ``is_finetuned`` and the training facts.
    ``backend``: ``auto`` (ONNX Runtime on the CPU for 200+ images, else torch), ``torch`` or ``onnx`` (see
    :mod:`helpers.onnx_backend`).
    Unreadable query images are left out of the submission; unreadable gallery images are never ranked.

    Post-processing (:func:`helpers.rerank.rank_gallery`): ``rerank`` none|kreciprocal (``k1``, ``k2``,
    ``lambda_value``), ``qe`` none|avg|alpha (``qe_k``, ``qe_alpha``), ``dba`` neighbours (0: off), ``index``
    exact|flat|hnsw|ivf|auto (:mod:`helpers.index`). ``model`` may be a list: an ensemble fused by ``fusion``
    (concat|score) with ``fusion_weights``; ``weights`` pretrained|none applies to every model, a weight file and
    ``model_options`` to the first one only (the others then use pretrained weights).
    """
    start = time.perf_counter()
    dataset = data if isinstance(data, RetrievalSet) else load_retrieval_set(data)
    if k < 1:
        raise ValueError("k must be at least 1")
    target = resolve_device(device)
    timings: dict[str, float] = {}
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("give at least one model")
    model, extra_models = models[0], models[1:]
    post = dict(rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value, qe=qe, qe_k=qe_k, qe_alpha=qe_alpha,
                dba=dba, index=index, fusion=fusion, fusion_weights=fusion_weights)
    post_config = postprocess_config(n_models=len(models), **post)  # validates the options before any work

    t0 = time.perf_counter()
    if checkpoint is not None:
        from .training.model import load_checkpoint_model

        embedder = load_checkpoint_model(checkpoint, device=target)
    else:
        embedder = model if isinstance(model, EmbeddingModel) else load_model(
            model, weights=weights, device=target, **(model_options or {})
        )
    timings["load_model"] = time.perf_counter() - t0
    if text_modifier:
        from .text import require_text_encoder

        require_text_encoder(embedder)  # before any image is embedded
    cache = EmbeddingCache(cache_dir, dtype=cache_dtype) if use_cache else None

    common = dict(batch_size=batch_size, device=target, num_workers=num_workers, cache=cache, tta=tta, progress=progress,
                  backend=backend)
    # The gallery first: usually the larger set, it decides whether backend "auto" exports to ONNX Runtime.
    gallery = extract_embeddings(embedder, dataset.gallery_paths, desc="gallery", **common)
    query = extract_embeddings(embedder, dataset.query_paths, desc="query", **common)
    extra_weights = weights if weights in ("pretrained", "none") else "pretrained"  # a weight file fits one model
    extra_embedders = [m if isinstance(m, EmbeddingModel) else load_model(m, weights=extra_weights, device=target)
                       for m in extra_models]
    extra_query, extra_gallery = [], []
    if extra_embedders:
        queries = [query] + [extract_embeddings(e, dataset.query_paths, desc=f"query {e.name}", **common)
                             for e in extra_embedders]
        galleries = [gallery] + [extract_embeddings(e, dataset.gallery_paths, desc=f"gallery {e.name}", **common)
                                 for e in extra_embedders]
        (query, *extra_query), (gallery, *extra_gallery) = align_by_path(queries), align_by_path(galleries)
        extra_query, extra_gallery = [r.embeddings for r in extra_query], [r.embeddings for r in extra_gallery]
    timings["embed_query"], timings["embed_gallery"] = query.seconds, gallery.seconds
    if len(gallery.paths) == 0:
        raise DataError(f"no gallery image of {dataset.gallery_dir} could be read")
    if len(gallery.paths) < k:
        logger.warning("the gallery has only %d readable images: rankings hold %d names, not %d",
                       len(gallery.paths), len(gallery.paths), k)

    query_embeddings = query.embeddings
    if text_modifier:
        from .text import compose_query, encode_text

        query_embeddings = compose_query(query_embeddings, encode_text(embedder, [text_modifier]), text_weight)
    t0 = time.perf_counter()
    # fusion with the other models, DBA, index, query expansion and re-ranking
    indices, similarities, search_info = rank_gallery(
        [query_embeddings, *extra_query], [gallery.embeddings, *extra_gallery], k=k, **post
    )
    timings["search"] = time.perf_counter() - t0
    gallery_names = gallery.names
    rankings = {q: [gallery_names[j] for j in row] for q, row in zip(query.names, indices)}
    scores = {q: [float(s) for s in row] for q, row in zip(query.names, similarities)}

    evaluation = None
    if dataset.ground_truth is not None:
        evaluation = evaluate_rankings(rankings, dataset.ground_truth, k=k, gallery_names=dataset.gallery_names)
    timings["total"] = time.perf_counter() - start

    model_name = embedder.name
    config = {
        "data": str(dataset.root),
        "model": model_name,
        "weights": embedder.weights,
        "k": k,
        "batch_size": batch_size,
        "device": str(target),
        "tta": tta,
        "cache": use_cache,
        "cache_dtype": cache_dtype,
        "backend": backend,
        "model_options": {key: str(v) for key, v in embedder.options.items()},
    }
    if text_modifier:
        config.update(text_modifier=text_modifier, text_weight=text_weight)
    config.update(post_config, search=search_info)
    if extra_embedders:
        model_name = "+".join([embedder.name] + [e.name for e in extra_embedders])
        config["model"] = model_name
    if run_name:
        config["run_name"] = run_name
    model_info = {"pooling_type": embedder.pooling, "is_finetuned": False}
    model_info.update(getattr(embedder, "training_info", {}) or {})
    return RetrievalRun(dataset, model_name, k, rankings, scores, query, gallery, evaluation, config, timings, model_info)


@dataclass
class RunOutputs:
    """Where a run's files went."""

    submission: Path
    metrics: Path | None = None
    grid: Path | None = None


def save_run(
    run: RetrievalRun,
    out: str | os.PathLike | None = None,
    fmt: str = "dict",
    metrics_out: str | os.PathLike | None = None,
    grid_out: str | os.PathLike | None = None,
    grid_queries: int = 8,
) -> RunOutputs:
    """Write the submission (default ``submissions/<run>.json``), the metrics JSON when the run was evaluated
    (default ``results/<run>.json``) and, when ``grid_out`` is given, a PNG grid of the first queries.
    The similarities go beside the submission as ``<name>.scores.json`` (read by ``show``)."""
    name = run.run_name
    submission_path = Path(out) if out else SUBMISSIONS_DIR / f"{name}.json"
    save_submission(submission_path, run.rankings, fmt=fmt)
    from .viz import scores_sidecar_path, write_scores

    write_scores(scores_sidecar_path(submission_path), run.scores)  # similarities for `show`: <name>.scores.json
    outputs = RunOutputs(submission=submission_path)
    if run.evaluation is not None or metrics_out:
        record = run.metrics_record()
        record["submission"] = str(submission_path)  # lets `report` find the rankings for its failure analysis
        outputs.metrics = write_metrics(Path(metrics_out) if metrics_out else RESULTS_DIR / f"{name}.json", record)
    if grid_out:
        from .viz import save_run_grid

        outputs.grid = save_run_grid(run, grid_out, max_queries=grid_queries)
    return outputs
