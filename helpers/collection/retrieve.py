"""Ranking a competition's queries against a prebuilt gallery index (``retrieve --index-dir INDEX_DIR``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .index import Index


@dataclass
class IndexRetrieval:
    """The submission (dict format), the similarities and, with ground truth, the evaluation."""

    rankings: dict[str, list[str]]
    scores: dict[str, list[float]]
    evaluation: Any = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def metrics(self) -> dict[str, float] | None:
        return self.evaluation.metrics if self.evaluation is not None else None


def retrieve_with_index(data: str | os.PathLike, index_dir: str | os.PathLike, k: int = 10, batch_size: int = 32,
                        device: str = "auto", use_cache: bool = True, progress: bool = True) -> IndexRetrieval:
    """Rank the gallery index of ``index_dir`` for every query of ``data/test/query`` (or ``data/query``), with the
    model the index was built with, and evaluate against ``ground_truth.json`` where it exists. Names are relative
    to the indexed folder: index the competition's ``test/gallery`` folder to get the names ``retrieve`` writes."""
    from ..data import DataError, list_images, load_ground_truth
    from ..metrics import evaluate_rankings

    start = time.perf_counter()
    root = os.fspath(data)
    candidates = [os.path.join(root, "test", "query"), os.path.join(root, "query")]
    query_dir = next((c for c in candidates if os.path.isdir(c)), None)
    if query_dir is None:
        raise DataError(f"query folder not found: {candidates[0]} (expected layout: DIR/test/query/*)")
    index = Index.open(index_dir)
    queries = list_images(query_dir)
    if not queries:
        raise DataError(f"query folder {query_dir} holds no image")
    result = index.search(images=queries, k=k, batch_size=batch_size, device=device, use_cache=use_cache,
                          progress=progress)
    gt_path = os.path.join(os.path.dirname(query_dir), "ground_truth.json")
    evaluation = None
    if os.path.isfile(gt_path):
        evaluation = evaluate_rankings(result.rankings, load_ground_truth(gt_path), k=k,
                                       gallery_names=index.names)
    config = {"data": root, "index_dir": os.fspath(index_dir), "k": k, "model": index.manifest["model"]["name"],
              "index": index.plan.kind}
    return IndexRetrieval(result.rankings, result.scores, evaluation, result.skipped, config,
                          time.perf_counter() - start)


def run_index_retrieval(config) -> tuple[IndexRetrieval, dict[str, Path]]:
    """``retrieve --index-dir``: rank ``config.data``'s queries against the prebuilt index, then write the
    submission, its scores file and (with ground truth) the metrics JSON where a plain ``retrieve`` writes them."""
    from ..metrics import build_metrics_record, write_metrics
    from ..settings import output_dir
    from ..submission import save_submission, scores_sidecar_path, write_scores

    run = retrieve_with_index(config.data, config.index_dir, k=config.k, batch_size=config.batch_size,
                              device=config.device, use_cache=config.cache, progress=config.progress)
    name = config.run_name_for()
    out = Path(config.out) if config.out else output_dir("submissions") / f"{name}.json"
    written = {"submission": save_submission(out, run.rankings, fmt=config.format)}
    write_scores(scores_sidecar_path(written["submission"]), run.scores)
    if run.evaluation is not None:
        record = build_metrics_record(model_name=run.config["model"], top_k=config.k, metrics=run.metrics,
                                      batch_size=config.batch_size, runtime_seconds=run.seconds,
                                      config={**config.to_dict(), **run.config}, device=config.device)
        metrics_path = Path(config.metrics_out) if config.metrics_out else output_dir("results") / f"{name}.json"
        written["metrics"] = write_metrics(metrics_path, record)
    return run, written
