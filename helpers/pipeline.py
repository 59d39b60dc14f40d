"""One retrieval run end to end: dataset -> embeddings -> search -> submission -> metrics.

Used by ``python -m helpers retrieve``, the notebooks and the demo; every stage is a plain function elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import RetrievalConfig, run_name_of
from .data import DataError, RetrievalSet, load_retrieval_set
from .embedding import EmbeddingCache, extract_embeddings
from .search import check_finite
from .metrics import evaluate_rankings, write_metrics
from .models import EmbeddingModel, load_model, resolve_device
from .postprocess import RetrievalResults
from .rerank import align_by_path, build_postprocess_chain
from .run import RetrievalRun
from .settings import output_dir
from .submission import save_submission, scores_sidecar_path, write_scores

logger = logging.getLogger(__name__)

SUBMISSIONS_DIR = output_dir("submissions")
RESULTS_DIR = output_dir("results")
VISUALIZATIONS_DIR = output_dir("visualizations")


def default_run_name(data_root: str | os.PathLike, config: RetrievalConfig | Mapping[str, Any]) -> str:
    """``<dataset>_<model>`` plus every option that changes the output and differs from its default, file-name safe
    (:func:`helpers.config.run_name_of`; ``config`` may be a config or its recorded dict)."""
    return run_name_of(data_root, config)


#: ``run_retrieval`` keyword arguments of earlier versions and the config fields they set.
_ALIASES = {"use_cache": "cache", "num_workers": "workers"}


def resolve_config(config: RetrievalConfig | Mapping[str, Any] | None = None, **overrides: Any) -> RetrievalConfig:
    """``config`` (a :class:`RetrievalConfig`, its dict, or None for the defaults) with ``overrides`` applied and
    checked; ``use_cache`` and ``num_workers`` are accepted for ``cache`` and ``workers``."""
    if config is None:
        config = RetrievalConfig()
    elif isinstance(config, Mapping):
        config = RetrievalConfig.from_dict(config)
    elif not isinstance(config, RetrievalConfig):
        raise TypeError(f"config must be a RetrievalConfig, a dict or None, not {type(config).__name__} "
                        "(pass the model as model=...)")
    changes = {_ALIASES.get(key, key): value for key, value in overrides.items()}
    names = {f.name for f in dataclasses.fields(RetrievalConfig)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"run_retrieval() got unexpected keyword argument(s): {', '.join(unknown)}")
    return config.replace(**changes) if changes else config


def _split_models(model: Any) -> tuple[Any, list[EmbeddingModel | None]]:
    """Registry names for the config, and the already built models (None where a name is to be loaded)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("--model: give at least one model")
    names = [m.name if isinstance(m, EmbeddingModel) else m for m in models]
    built = [m if isinstance(m, EmbeddingModel) else None for m in models]
    return (names if len(names) > 1 else names[0]), built


def _load_embedders(config: RetrievalConfig, built: list[EmbeddingModel | None], target: Any) -> list[EmbeddingModel]:
    """The first model (a checkpoint, an object, or loaded by name with the weights and family options) and the
    other ensemble members (pretrained weights unless ``weights`` is pretrained|none: a weight file fits one)."""
    names = config.models
    if config.checkpoint is not None:
        from .training.model import load_checkpoint_model

        first = load_checkpoint_model(config.checkpoint, device=target)
    else:
        first = built[0] or load_model(names[0], weights=config.weights, device=target, **config.loader_options())
    extra_weights = config.weights if config.weights in ("pretrained", "none") else "pretrained"
    extra = [b or load_model(n, weights=extra_weights, device=target) for n, b in zip(names[1:], built[1:])]
    if config.text_modifier:
        from .text import require_text_encoder

        require_text_encoder(first)  # before any image is embedded
    return [first, *extra]


def _embed(config: RetrievalConfig, dataset: RetrievalSet, embedders: list[EmbeddingModel], target: Any):
    """(query, gallery, per-model query embeddings, per-model gallery embeddings), over the files every model
    could read. The gallery first: usually the larger set, it decides whether backend "auto" uses ONNX Runtime."""
    cache = EmbeddingCache(config.cache_dir, dtype=config.cache_dtype) if config.cache else None
    common = dict(batch_size=config.batch_size, device=target, num_workers=config.workers, cache=cache,
                  tta=config.tta, progress=config.progress, backend=config.backend,
                  precision=config.precision)
    first, extra = embedders[0], embedders[1:]
    galleries, queries = [], []
    for number, embedder in enumerate([first, *extra]):
        suffix = f" {embedder.name}" if number else ""
        galleries.append(extract_embeddings(embedder, dataset.gallery_paths, desc="gallery" + suffix, **common))
        # the queries at the precision the gallery got (auto may decide differently on another number of images)
        same = {**common, "precision": galleries[-1].precision}
        queries.append(extract_embeddings(embedder, dataset.query_paths, desc="query" + suffix, **same))
    if extra:
        queries, galleries = align_by_path(queries), align_by_path(galleries)
    query, gallery = queries[0], galleries[0]
    if len(gallery.paths) == 0:
        raise DataError(f"no gallery image of {dataset.gallery_dir} could be read")
    if len(gallery.paths) < config.k:
        logger.warning("the gallery has only %d readable images: rankings hold %d names, not %d",
                       len(gallery.paths), len(gallery.paths), config.k)
    for result, what in [(r, "query") for r in queries] + [(r, "gallery") for r in galleries]:
        check_finite(result.embeddings, result.names, what)  # a NaN or Inf embedding is named, never ranked
    query_embeddings = [r.embeddings for r in queries]
    if config.text_modifier:
        from .text import compose_query, encode_text

        text = encode_text(embedders[0], [config.text_modifier])
        query_embeddings[0] = compose_query(query_embeddings[0], text, config.text_weight)
    return query, gallery, query_embeddings, [r.embeddings for r in galleries]


def _recorded(config: RetrievalConfig, dataset: RetrievalSet, embedders: list[EmbeddingModel],
              built: list[EmbeddingModel | None], results: RetrievalResults) -> tuple[RetrievalConfig, dict]:
    """The config as the run used it (built models and checkpoints by their names, ``data`` as read) and its
    recorded dict: every option plus the facts of the run (``search``, ``postprocess``)."""
    first = embedders[0]
    changes: dict[str, Any] = {"data": str(dataset.root)}
    if config.checkpoint is not None or built[0] is not None:
        names = [first.name] + config.models[1:]
        changes["model"] = names if len(names) > 1 else names[0]
    if built[0] is not None:
        changes["weights"] = str(first.weights)
        changes["model_options"] = {**first.options, **config.model_options}
    used = config.replace(**changes)
    record = used.to_dict()
    record.update(search=results.info, postprocess=results.steps)
    return used, record


def run_retrieval(
    data: str | os.PathLike | RetrievalSet | None = None,
    config: RetrievalConfig | Mapping[str, Any] | None = None,
    **overrides: Any,
) -> RetrievalRun:
    """Rank the gallery for every query of ``data`` and evaluate when ground truth exists.

    ``config``: a :class:`helpers.config.RetrievalConfig` (or its dict; None: the defaults); ``overrides`` are
    its fields as keyword arguments (``model``, ``weights``, ``k``, ``tta``, ``rerank``, ``qe``, ``dba``, ``index``,
    ``fusion``, ``text_modifier``, ``checkpoint``, ``backend``, ...; see its documentation for each), applied on
    top, so ``run_retrieval("data", model="efficientnet-lite0", k=10, tta="flip")`` works as it always did
    (``use_cache`` and ``num_workers`` stand for ``cache`` and ``workers``). ``data`` (default: ``config.data``)
    may be an already loaded :class:`helpers.data.RetrievalSet`; ``model`` may be a built
    :class:`helpers.models.EmbeddingModel` or a list (an ensemble fused by ``fusion`` with ``fusion_weights``;
    ``weights`` pretrained|none applies to every model, a weight file and the family options to the first one).
    ``checkpoint``: a training run's ``best.pt`` (its trained embedding; the metrics JSON records the training
    facts). Unreadable query images are left out of the submission; unreadable gallery images are never ranked.
    Post-processing is the chain of :func:`helpers.rerank.build_postprocess_chain` (fusion -> DBA -> search ->
    query expansion -> k-reciprocal re-ranking); its description goes into the run's config.
    """
    start = time.perf_counter()
    built: list[EmbeddingModel | None] = []
    if "model" in overrides:
        overrides["model"], built = _split_models(overrides["model"])
    if data is not None:
        overrides["data"] = str(data.root) if isinstance(data, RetrievalSet) else os.fspath(data)
    cfg = resolve_config(config, **overrides)
    built = built or [None] * len(cfg.models)
    dataset = data if isinstance(data, RetrievalSet) else load_retrieval_set(cfg.data)
    chain = build_postprocess_chain(cfg)  # checks the options before any work
    target = resolve_device(cfg.device)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    embedders = _load_embedders(cfg, built, target)
    timings["load_model"] = time.perf_counter() - t0
    query, gallery, query_embeddings, gallery_embeddings = _embed(cfg, dataset, embedders, target)
    timings["embed_query"], timings["embed_gallery"] = query.seconds, gallery.seconds
    t0 = time.perf_counter()
    results = chain.run(RetrievalResults(query_embeddings, gallery_embeddings, query.names, gallery.names), cfg.k)
    timings["search"] = time.perf_counter() - t0
    rankings, scores = results.rankings(), results.score_lists()

    evaluation = None
    if dataset.ground_truth is not None:
        evaluation = evaluate_rankings(rankings, dataset.ground_truth, k=cfg.k, gallery_names=dataset.gallery_names)
    timings["total"] = time.perf_counter() - start
    used, recorded = _recorded(cfg, dataset, embedders, built, results)
    recorded["embedding"] = gallery.info()  # the precision used and why, JPEG draft size, threads
    model_info = {"pooling_type": embedders[0].pooling, "is_finetuned": False}
    model_info.update(getattr(embedders[0], "training_info", {}) or {})
    return RetrievalRun(dataset, "+".join(e.name for e in embedders), cfg.k, rankings, scores, query, gallery,
                        evaluation, recorded, timings, model_info, settings=used, device=str(target))


@dataclass
class RunOutputs:
    """Where a run's files went."""

    submission: Path
    metrics: Path | None = None
    grid: Path | None = None


def save_run(
    run: RetrievalRun,
    out: str | os.PathLike | None = None,
    fmt: str | None = None,
    metrics_out: str | os.PathLike | None = None,
    grid_out: str | os.PathLike | None = None,
    grid_queries: int = 8,
) -> RunOutputs:
    """Write the submission (default: the run's ``out``, else ``submissions/<run>.json``) in ``fmt`` (default: the
    run's ``format``), the metrics JSON when the run was evaluated (default: ``metrics_out``, else
    ``results/<run>.json``) and, when ``grid_out`` (default: the run's ``grid``) is given, a PNG grid of the first
    queries. The similarities go beside the submission as ``<name>.scores.json`` (read by ``show``)."""
    settings = run.settings or RetrievalConfig()
    out, metrics_out, grid_out = out or settings.out, metrics_out or settings.metrics_out, grid_out or settings.grid
    name = run.run_name
    submission_path = Path(out) if out else SUBMISSIONS_DIR / f"{name}.json"
    save_submission(submission_path, run.rankings, fmt=fmt or settings.format)
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
