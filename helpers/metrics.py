"""Retrieval metrics against ground truth, and the metrics JSON that every run writes (one schema).

Per query (then averaged over the ground truth's queries):

- ``hit@k``: 1 if at least one relevant gallery name is in the top k;
- ``precision@10``: relevant names in the top 10 / 10;
- ``recall@10``: relevant names in the top 10 / all relevant gallery names;
- ``map@10``: sum over ranks i <= 10 where rank i is relevant of precision@i, divided by min(all relevant, 10);
- ``weighted_score``: the course server's score, +600 if rank 1 is relevant, +300 if any of the top 5 is,
  +100 if any of the top 10 is (0 to 1000).

How imperfect submissions are scored: a ground-truth query missing from the submission scores 0 on every metric;
a query the ground truth does not know is ignored; a repeated name counts only at its first rank (repeats are
misses); names past the 10th, or names not in the gallery, never count; fewer than 10 names leave the missing ranks
as misses. Every such case is listed in :attr:`EvaluationResult.problems`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import numpy as np

from .fileio import write_json

METRIC_KEYS = ("hit@1", "hit@5", "hit@10", "precision@10", "recall@10", "map@10", "weighted_score")
WEIGHTED_SCORE_POINTS = ((1, 600), (5, 300), (10, 100))
SCHEMA_VERSION = 1


def weighted_score(relevant_flags: list[bool]) -> float:
    """The course server's per-query score from the relevance of each rank (600/300/100)."""
    return float(sum(points for cutoff, points in WEIGHTED_SCORE_POINTS if any(relevant_flags[:cutoff])))


def query_metrics(
    ranked: list[str], relevant: set[str], k: int = 10, gallery: Collection[str] | None = None
) -> dict[str, float]:
    """The metrics of one query. ``ranked`` is the submitted list, ``relevant`` its ground truth.

    With ``gallery`` (the gallery's names), a name that is not in it is a miss even when the ground truth lists it.
    A ``k`` other than 1, 5 or 10 adds ``hit@k``.
    """
    cutoff = max(10, k)
    seen: set[str] = set()
    flags: list[bool] = []
    for name in ranked[:cutoff]:
        flags.append(name in relevant and name not in seen and (gallery is None or name in gallery))
        seen.add(name)
    flags += [False] * (cutoff - len(flags))
    n_relevant = len(relevant)
    hits, precision_sum = 0, 0.0
    for rank, is_relevant in enumerate(flags[:10], start=1):
        if is_relevant:
            hits += 1
            precision_sum += hits / rank
    result = {
        "hit@1": float(any(flags[:1])),
        "hit@5": float(any(flags[:5])),
        "hit@10": float(any(flags[:10])),
        "precision@10": hits / 10.0,
        "recall@10": hits / n_relevant if n_relevant else 0.0,
        "map@10": precision_sum / min(n_relevant, 10) if n_relevant else 0.0,
        "weighted_score": weighted_score(flags),
    }
    if k not in (1, 5, 10):
        result[f"hit@{k}"] = float(any(flags[:k]))
    return result


@dataclass
class EvaluationResult:
    """Averaged metrics, per-query rows and the problems found in the submission."""

    metrics: dict[str, float]
    per_query: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    n_queries: int = 0

    def per_query_frame(self):
        import pandas as pd

        return pd.DataFrame(self.per_query)


def evaluate_rankings(
    rankings: Mapping[str, list[str]],
    ground_truth: Mapping[str, Iterable[str]],
    k: int = 10,
    gallery_names: Iterable[str] | None = None,
) -> EvaluationResult:
    """Score ``rankings`` against ``ground_truth`` (see the module docstring for every rule)."""
    problems: list[str] = []
    gallery = set(gallery_names) if gallery_names is not None else None
    unknown = sorted(set(rankings) - set(ground_truth))
    if unknown:
        problems.append(f"{len(unknown)} query(ies) not in the ground truth, ignored: {unknown[:5]}")
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    no_relevant: list[str] = []
    for query, relevant in ground_truth.items():
        relevant = set(relevant)
        if not relevant:
            no_relevant.append(query)
            continue
        ranked = rankings.get(query)
        if ranked is None:
            missing.append(query)
            ranked = []
        else:
            if len(ranked) < k:
                problems.append(f"{query}: only {len(ranked)} names (expected {k}); missing ranks count as misses")
            if len(set(ranked[:k])) < len(ranked[:k]):
                problems.append(f"{query}: repeated names; only the first occurrence counts")
            if gallery is not None:
                outside = [n for n in ranked[:k] if n not in gallery]
                if outside:
                    problems.append(f"{query}: {len(outside)} name(s) not in the gallery (misses): {outside[:3]}")
        row = {"query": query, **query_metrics(list(ranked), relevant, k=k, gallery=gallery),
               "n_relevant": len(relevant)}
        row["top1"] = ranked[0] if ranked else None
        rows.append(row)
    if missing:
        problems.append(f"{len(missing)} ground-truth query(ies) missing from the submission, scored 0: {missing[:5]}")
    if no_relevant:
        problems.append(f"{len(no_relevant)} ground-truth query(ies) with no relevant image, left out: {no_relevant[:5]}")
    keys = METRIC_KEYS + ((f"hit@{k}",) if k not in (1, 5, 10) else ())
    metrics = {key: float(np.mean([r[key] for r in rows])) if rows else 0.0 for key in keys}
    return EvaluationResult(metrics=metrics, per_query=rows, problems=problems, n_queries=len(rows))


# --------------------------------------------------------------------------------------------------------------
# The metrics JSON
# --------------------------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on (those installed)."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("helpers", "torch", "torchvision", "timm", "numpy", "open_clip_torch", "transformers", "faiss-cpu"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def build_metrics_record(
    *,
    model_name: str,
    top_k: int,
    metrics: Mapping[str, float] | None,
    batch_size: int | None = None,
    is_finetuned: bool = False,
    num_classes: int | None = None,
    runtime_seconds: float | None = None,
    loss_function: str | None = None,
    num_epochs: int | None = None,
    final_train_loss: float | None = None,
    pooling_type: str | None = None,
    config: Mapping[str, Any] | None = None,
    device: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics JSON of one run. Values are stored unrounded; ``top_k_accuracy`` is hit@top_k."""
    metrics = dict(metrics or {})
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model_name": model_name,
        "top_k": int(top_k),
        "top_k_accuracy": metrics.get(f"hit@{top_k}"),
        "batch_size": batch_size,
        "is_finetuned": bool(is_finetuned),
        "num_classes": num_classes,
        "runtime_seconds": runtime_seconds,
        "loss_function": loss_function,
        "num_epochs": num_epochs,
        "final_train_loss": final_train_loss,
        "pooling_type": pooling_type,
        "metrics": metrics,
        "config": dict(config or {}),
        "versions": library_versions(),
        "git_commit": _git_commit(),
        "device": device,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    return record


def write_metrics(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write a metrics JSON atomically."""
    return write_json(path, dict(record))


def format_metrics_table(metrics: Mapping[str, float]) -> str:
    """A small aligned text table, rounded for display only."""
    width = max(len(k) for k in metrics) if metrics else 0
    lines = []
    for key, value in metrics.items():
        shown = f"{value:.1f}" if key == "weighted_score" else f"{value:.4f}"
        lines.append(f"  {key:<{width}}  {shown}")
    return "\n".join(lines)


def pair_similarities(run: Any, max_pairs: int = 200_000, seed: int = 0) -> Any:
    """Cosine similarity of (query, gallery) pairs, each marked ``same class`` (relevant in the ground truth) or
    ``different class``, with a pair-level ROC AUC in ``frame.attrs["auc"]`` (1.0: every same-class pair scores
    above every different-class pair). At most ``max_pairs`` pairs, drawn at random when there are more.
    ``run``: a :class:`helpers.run.RetrievalRun`; returns a pandas DataFrame."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    truth = run.dataset.ground_truth
    if not truth:
        raise ValueError(f"{run.dataset.root} has no ground truth: same-class pairs are unknown")
    query_names, gallery_index = run.query.names, {g: j for j, g in enumerate(run.gallery.names)}
    same = np.zeros((len(query_names), len(gallery_index)), dtype=bool)
    for i, q in enumerate(query_names):
        same[i, [gallery_index[g] for g in truth.get(q, ()) if g in gallery_index]] = True
    similarity = run.query.embeddings @ run.gallery.embeddings.T
    flat = np.arange(similarity.size)
    if flat.size > max_pairs:
        flat = np.sort(np.random.default_rng(seed).choice(flat, size=max_pairs, replace=False))
    frame = pd.DataFrame({"similarity": similarity.ravel()[flat],
                          "pair": np.where(same.ravel()[flat], "same class", "different class")})
    both = frame["pair"].nunique() == 2
    frame.attrs["auc"] = float(roc_auc_score(frame["pair"] == "same class", frame["similarity"])) if both else None
    return frame
