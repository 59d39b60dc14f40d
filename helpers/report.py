"""Compare runs and look at where they fail.

- :func:`load_results`: every metrics JSON of the project's schema in a folder as one pandas DataFrame (one row a
  run); malformed or foreign JSON files are listed in ``skipped`` and left out, never fatal.
- :func:`comparison_table`, :func:`grouped_views`, :func:`plot_metric_bars`: the table, the views grouped by model,
  pooling, fine-tuning and re-ranking/TTA options, and bar charts.
- :func:`failure_analysis`: worst queries, per-class scores and the most confused class pairs of one submission.
- :func:`compare_runs`: two submissions on the same queries, what one gets right that the other misses.
- :func:`write_report`: all of it into one folder (``python -m helpers report``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .data import DataError, load_ground_truth
from .fileio import read_json, slug, write_text
from .metrics import METRIC_KEYS, SCHEMA_VERSION, evaluate_rankings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

#: Metrics drawn as bar charts by :func:`write_report`.
PLOT_METRICS = ("weighted_score", "hit@1", "map@10")
#: ``config`` keys read as re-ranking options (and keys starting with one of ``RERANK_PREFIXES``).
#: Metrics JSONs of this project that are not retrieval runs (``helpers.text``): left out quietly.
OTHER_TASKS = ("zero-shot", "text-search")
RERANK_KEYS = ("rerank", "reranking", "query_expansion", "qe", "alpha_qe", "k_reciprocal", "dba", "ensemble",
               "fusion", "diffusion")
RERANK_PREFIXES = ("rerank", "qe_", "dba", "k_reciprocal", "fusion", "ensemble")
#: Columns of the comparison table, in order (config columns that differ between runs are appended).
TABLE_COLUMNS = ("run", "model", "dataset", "weights", "pooling", "finetuned", "loss", "epochs", "tta", "rerank",
                 "top_k", *METRIC_KEYS, "n_queries", "runtime_s", "timestamp", "file")
#: Grouped views: name -> column grouped on.
GROUPINGS = {"model": "model", "pooling": "pooling", "finetuning": "finetuning", "options": "options"}
_CONFIG_COVERED = {"model", "weights", "tta", "run_name", "data", "device", "cache", "cache_dtype", "batch_size",
                   "model_options", "k"}


# ----------------------------------------------------------------------------------------------------------------
# Loading metrics JSON files
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedResults:
    """The runs found in a results folder: ``frame`` (one row a run), the raw ``records``, the ``skipped`` files."""

    frame: "pd.DataFrame"
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def schema_problem(raw: Any) -> str | None:
    """Why ``raw`` (a parsed JSON value) is not a metrics JSON of this project, or None when it is."""
    if not isinstance(raw, dict):
        return f"a JSON {type(raw).__name__}, not an object: not a metrics JSON of this project"
    missing = [key for key in ("model_name", "metrics") if key not in raw]
    if missing:
        return f"no {' or '.join(repr(m) for m in missing)} key: not a metrics JSON of this project"
    metrics = raw["metrics"]
    if not isinstance(metrics, dict):
        return "'metrics' is not an object"
    if not any(isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)
               for key in METRIC_KEYS):
        return f"'metrics' holds none of {', '.join(METRIC_KEYS)} (a run that was not evaluated?)"
    if "config" in raw and not isinstance(raw["config"], dict):
        return "'config' is not an object"
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        return f"schema_version {version!r} is newer than this toolkit's ({SCHEMA_VERSION}): update the toolkit"
    return None


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _rerank_options(config: Mapping[str, Any]) -> str:
    """The post-processing options of a run that take effect and differ from their defaults
    (:func:`helpers.config.recorded_postprocess_changes`), and re-ranking keys of other records."""
    from .config import POSTPROCESS_KEYS, recorded_postprocess_changes

    pairs = dict(recorded_postprocess_changes(config))
    for key, value in config.items():
        if key not in POSTPROCESS_KEYS and (key in RERANK_KEYS or key.startswith(RERANK_PREFIXES)):
            pairs[key] = value
    parts = []
    for key in sorted(pairs):
        value = pairs[key]
        if value in (None, False, "", "none", 0) or value == [] or value == {}:
            continue
        parts.append(key if value is True else f"{key}={value}")
    return ", ".join(parts) or "none"


def record_row(record: Mapping[str, Any], path: Path | None = None) -> dict[str, Any]:
    """One table row from a metrics record: the fixed columns, the metrics, and ``config.<key>`` for each config key."""
    config = record.get("config") or {}
    metrics = record.get("metrics") or {}
    data = config.get("data")
    run = record.get("run_name") or config.get("run_name") or (path.stem if path else record.get("model_name"))
    finetuned = bool(record.get("is_finetuned"))
    loss = _text(record.get("loss_function"))
    weights = _text(config.get("weights")) or ("fine-tuned" if finetuned else None)
    if weights and weights not in ("pretrained", "none"):
        weights = Path(weights).name
    tta = _text(config.get("tta")) or "none"
    rerank = _rerank_options(config)
    row: dict[str, Any] = {
        "run": str(run),
        "model": _text(record.get("model_name")) or "unknown",
        "dataset": Path(str(data)).resolve().name if data else None,
        "weights": weights,
        "pooling": _text(record.get("pooling_type")) or "default",
        "finetuned": finetuned,
        "loss": loss,
        "epochs": record.get("num_epochs"),
        "tta": tta,
        "rerank": rerank,
        "top_k": record.get("top_k"),
        "n_queries": record.get("n_queries"),
        "runtime_s": record.get("runtime_seconds"),
        "timestamp": record.get("timestamp"),
        "file": str(path) if path else None,
    }
    for key in METRIC_KEYS:
        value = metrics.get(key)
        row[key] = float(value) if isinstance(value, (int, float)) else None
    for key, value in metrics.items():
        if key not in row and isinstance(value, (int, float)):
            row[key] = float(value)
    row["finetuning"] = f"fine-tuned ({loss})" if finetuned and loss else ("fine-tuned" if finetuned else "pretrained")
    row["options"] = f"tta={tta}; rerank={rerank}"
    for key, value in config.items():
        if key not in _CONFIG_COVERED:
            row[f"config.{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return row


def load_results(results_dir: str | os.PathLike = "results", recursive: bool = True) -> LoadedResults:
    """Read every ``*.json`` under ``results_dir``; files that are not metrics JSONs of this project are skipped.

    Each skipped file is logged as a warning with its reason and kept in :attr:`LoadedResults.skipped`.
    """
    import pandas as pd

    folder = Path(results_dir)
    if not folder.is_dir():
        raise DataError(f"results folder not found: {folder} (runs write their metrics JSON to results/ by default; "
                        "pass --results DIR)")
    files = sorted(folder.rglob("*.json") if recursive else folder.glob("*.json"))
    files = [f for f in files if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)]
    records, rows, skipped = [], [], []
    for path in files:
        try:
            raw = read_json(path)
        except (ValueError, UnicodeDecodeError) as exc:
            skipped.append((path, f"malformed JSON: {exc}"))
            continue
        except OSError as exc:
            skipped.append((path, f"unreadable: {exc}"))
            continue
        if isinstance(raw, dict) and raw.get("task") in OTHER_TASKS:
            logger.info("%s: a %s record, not a retrieval run; left out of the comparison", path, raw["task"])
            continue
        problem = schema_problem(raw)
        if problem:
            skipped.append((path, problem))
            continue
        raw = dict(raw)
        raw["_path"] = str(path)
        records.append(raw)
        rows.append(record_row(raw, path))
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame = _dedupe_run_names(frame)
    return LoadedResults(frame=frame, records=records, skipped=skipped, files=files)


def _dedupe_run_names(frame: "pd.DataFrame") -> "pd.DataFrame":
    """Two files with the same run name get their file stem appended, so that each row has its own label."""
    frame = frame.copy()
    duplicated = frame["run"].duplicated(keep=False)
    if duplicated.any():
        frame.loc[duplicated, "run"] = [
            f"{run} [{Path(f).stem}]" if f else run for run, f in zip(frame.loc[duplicated, "run"],
                                                                        frame.loc[duplicated, "file"])
        ]
        still = frame["run"].duplicated(keep=False)
        frame.loc[still, "run"] = [f"{r} #{i}" for i, r in enumerate(frame.loc[still, "run"], start=1)]
    return frame


# ----------------------------------------------------------------------------------------------------------------
# Tables and plots
# ----------------------------------------------------------------------------------------------------------------
def comparison_table(frame: "pd.DataFrame", sort_by: str = "weighted_score") -> "pd.DataFrame":
    """One row a run, best first (``sort_by``, then map@10, then hit@1): the fixed columns, then every
    ``config.*`` column whose value differs between runs."""
    if frame.empty:
        return frame
    columns = [c for c in TABLE_COLUMNS if c in frame.columns]
    varying = [c for c in frame.columns if c.startswith("config.")
               and frame[c].astype(str).nunique(dropna=False) > 1]
    extra_metrics = [c for c in frame.columns if c.startswith("hit@") and c not in columns]
    table = frame[columns[:columns.index("n_queries")] + extra_metrics + columns[columns.index("n_queries"):] + varying]
    keys = [c for c in (sort_by, "map@10", "hit@1") if c in table.columns]
    if keys:
        table = table.sort_values(keys + ["run"], ascending=[False] * len(keys) + [True], na_position="last",
                                  kind="stable")
    return table.reset_index(drop=True)


def grouped_views(frame: "pd.DataFrame", metrics: Sequence[str] = PLOT_METRICS) -> dict[str, "pd.DataFrame"]:
    """Runs grouped by model, pooling, fine-tuning and options (TTA and re-ranking): count, best run, mean and max."""
    views: dict[str, pd.DataFrame] = {}
    if frame.empty:
        return views
    metrics = [m for m in metrics if m in frame.columns]
    main = metrics[0] if metrics else None
    for name, column in GROUPINGS.items():
        grouped = frame.groupby(column, dropna=False, sort=True)
        view = grouped.agg(runs=("run", "size"))
        if main:
            best = frame.loc[frame[main].fillna(float("-inf")).groupby(frame[column], dropna=False).idxmax()]
            view["best_run"] = best.set_index(column)["run"]
        for metric in metrics:
            view[f"{metric} mean"] = grouped[metric].mean()
            view[f"{metric} max"] = grouped[metric].max()
        if main:
            view = view.sort_values(f"{main} max", ascending=False, kind="stable")
        views[name] = view.reset_index()
    return views


def plot_metric_bars(frame: "pd.DataFrame", metric: str = "weighted_score", title: str | None = None) -> "Figure":
    """Horizontal bars of ``metric`` by run (best on top), coloured by model, each labelled with its value.

    Built on :class:`matplotlib.figure.Figure`, so the user's plotting backend is never switched.
    """
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if metric not in frame.columns:
        raise ValueError(f"no column {metric!r} in the results (columns: {', '.join(frame.columns)})")
    data = frame[["run", "model", metric]].dropna(subset=[metric]).sort_values(metric, kind="stable")
    models = sorted(data["model"].unique())
    palette = matplotlib.colormaps["tab10"]
    colors = [palette(models.index(m) % 10) for m in data["model"]]
    fig = Figure(figsize=(7.5, 0.9 + 0.38 * max(len(data), 1)))
    ax = fig.subplots()
    bars = ax.barh(range(len(data)), data[metric].to_numpy(), color=colors)
    ax.set_yticks(range(len(data)), [_short(r, 48) for r in data["run"]], fontsize=8)
    upper = 1000.0 if metric == "weighted_score" else 1.0
    ax.set_xlim(0, upper * 1.12)
    for bar, value in zip(bars, data[metric]):
        shown = f"{value:.1f}" if metric == "weighted_score" else f"{value:.3f}"
        ax.text(bar.get_width() + upper * 0.01, bar.get_y() + bar.get_height() / 2, shown, va="center", fontsize=7.5)
    handles = [Rectangle((0, 0), 1, 1, color=palette(i % 10)) for i in range(len(models))]
    if len(models) > 1:
        ax.legend(handles, models, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="model",
                  title_fontsize=7, frameon=False)
    ax.set_xlabel(metric)
    ax.set_title(title or f"{metric} by run", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_markdown(frame: "pd.DataFrame", floatfmt: str = ".4f") -> str:
    """A Markdown table (pandas + tabulate); empty frames give a one-line note."""
    if frame.empty:
        return "_(nothing)_"
    return frame.to_markdown(index=False, floatfmt=floatfmt)


# ----------------------------------------------------------------------------------------------------------------
# Failure analysis
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ClassLabels:
    """The class of each query and gallery name; ``derived`` when read off the ground truth, not labels.json."""

    query: dict[str, str]
    gallery: dict[str, str]
    derived: bool = False


def _group_name(names: Sequence[str], index: int) -> str:
    prefix = os.path.commonprefix(sorted(names)) if len(names) > 1 else ""
    prefix = re.sub(r"[_\-.\s]+$", "", prefix)
    return prefix if len(prefix) >= 3 else f"group{index:02d}"


def class_labels(ground_truth: Mapping[str, Sequence[str]],
                 labels: Mapping[str, Mapping[str, str]] | None = None) -> ClassLabels:
    """Query and gallery classes: from ``labels`` (``test/labels.json`` as written by ``split``) when given,
    otherwise derived from the ground truth: queries with the same set of relevant names form one class (named by
    the common prefix of those names, else ``groupNN``), and a gallery name takes the class whose set holds it."""
    if labels and isinstance(labels.get("query"), Mapping) and isinstance(labels.get("gallery"), Mapping):
        return ClassLabels(dict(labels["query"]), dict(labels["gallery"]), derived=False)
    groups: dict[frozenset, list[str]] = {}
    for query, relevant in ground_truth.items():
        groups.setdefault(frozenset(relevant), []).append(query)
    query_class: dict[str, str] = {}
    gallery_class: dict[str, str] = {}
    used: set[str] = set()
    for index, (relevant, queries) in enumerate(sorted(groups.items(), key=lambda kv: sorted(kv[0])), start=1):
        name = _group_name(sorted(relevant), index)
        if name in used:
            name = f"{name}#{index}"
        used.add(name)
        for query in queries:
            query_class[query] = name
        for gallery_name in relevant:
            gallery_class.setdefault(gallery_name, name)
    return ClassLabels(query_class, gallery_class, derived=True)


@dataclass
class FailureAnalysis:
    """Per-query scores with classes, the worst queries, per-class scores and the most confused class pairs."""

    per_query: "pd.DataFrame"
    worst: "pd.DataFrame"
    per_class: "pd.DataFrame"
    confusions: "pd.DataFrame"
    classes_derived: bool = False

    def summary_markdown(self, n: int = 10) -> str:
        note = (" (classes derived from the ground truth: no labels.json)" if self.classes_derived else "")
        worst_cols = [c for c in ("query", "class", "weighted_score", "map@10", "hit@1", "top1", "top1_class",
                                  "n_relevant") if c in self.worst.columns]
        return "\n".join([
            f"Worst {min(n, len(self.worst))} queries{note}:", "", to_markdown(self.worst[worst_cols].head(n)), "",
            "Per class (worst first):", "", to_markdown(self.per_class), "",
            "Most confused class pairs (names of the other class within the first R ranks, R = number of relevant "
            "names; both directions):", "",
            to_markdown(self.confusions.head(n)),
        ])


def failure_analysis(
    rankings: Mapping[str, Sequence[str]],
    ground_truth: Mapping[str, Sequence[str]],
    labels: Mapping[str, Mapping[str, str]] | None = None,
    k: int = 10,
    n_worst: int = 10,
) -> FailureAnalysis:
    """Where a submission fails: needs ground truth; ``labels`` (``test/labels.json``) names the classes.

    ``worst``: the ``n_worst`` queries with the lowest weighted score, then map@10. ``per_class``: mean metrics of the
    queries of each class, worst first. ``confusions``: unordered class pairs, most confused first: ``in_top_r`` counts
    the names of one class ranked within the first R places of a query of the other, R being the query's number of
    relevant names (capped at k; a perfect ranking fills them all with relevant names), split by direction in
    ``a_to_b`` / ``b_to_a``; ``at_rank1`` those at rank 1; ``in_top_k`` every wrong name of the pair in the top-k.
    """
    import pandas as pd

    evaluation = evaluate_rankings({q: list(r) for q, r in rankings.items()}, ground_truth, k=k)
    classes = class_labels(ground_truth, labels)
    per_query = pd.DataFrame(evaluation.per_query)
    if per_query.empty:
        raise DataError("no query of the submission has ground truth with relevant images: nothing to analyse")
    per_query.insert(1, "class", [classes.query.get(q) for q in per_query["query"]])
    per_query["top1_class"] = [classes.gallery.get(t) if t else None for t in per_query["top1"]]
    worst = per_query.sort_values(["weighted_score", "map@10", "query"], kind="stable").head(n_worst)

    metric_cols = [m for m in METRIC_KEYS if m in per_query.columns]
    per_class = (per_query.groupby("class", dropna=False)[metric_cols].mean()
                 .assign(queries=per_query.groupby("class", dropna=False).size())
                 .sort_values(["weighted_score", "map@10"], kind="stable").reset_index())
    per_class = per_class[["class", "queries", *metric_cols]]

    in_top_r: Counter = Counter()
    in_top_k: Counter = Counter()
    at_rank1: Counter = Counter()
    for query, relevant in ground_truth.items():
        source = classes.query.get(query)
        if source is None or query not in rankings or not relevant:
            continue
        relevant = set(relevant)
        top_r = min(len(relevant), k)
        for rank, name in enumerate(list(rankings[query])[:k], start=1):
            target = classes.gallery.get(name)
            if name in relevant or target is None or target == source:
                continue
            in_top_k[(source, target)] += 1
            if rank <= top_r:
                in_top_r[(source, target)] += 1
            if rank == 1:
                at_rank1[(source, target)] += 1
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    for (source, target), count in in_top_k.items():
        a, b = sorted((source, target))
        entry = pairs.setdefault((a, b), {"class_a": a, "class_b": b, "in_top_r": 0, "a_to_b": 0, "b_to_a": 0,
                                          "at_rank1": 0, "in_top_k": 0})
        entry["in_top_r"] += in_top_r[(source, target)]
        entry["a_to_b" if source == a else "b_to_a"] += in_top_r[(source, target)]
        entry["at_rank1"] += at_rank1[(source, target)]
        entry["in_top_k"] += count
    columns = ["class_a", "class_b", "in_top_r", "a_to_b", "b_to_a", "at_rank1", "in_top_k"]
    confusions = pd.DataFrame(list(pairs.values()), columns=columns)
    confusions = confusions.sort_values(["in_top_r", "at_rank1", "in_top_k", "class_a", "class_b"],
                                        ascending=[False, False, False, True, True], kind="stable")
    confusions = confusions.reset_index(drop=True)
    return FailureAnalysis(per_query.reset_index(drop=True), worst.reset_index(drop=True), per_class, confusions,
                           classes.derived)


# ----------------------------------------------------------------------------------------------------------------
# Two runs side by side
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunComparison:
    """Per-query outcome of two runs (``frame``) and the count of each outcome (``counts``)."""

    name_a: str
    name_b: str
    frame: "pd.DataFrame"
    counts: dict[str, int]

    def only(self, which: str) -> list[str]:
        """The queries only run ``a`` or only run ``b`` gets right at rank 1."""
        label = f"only {self.name_a}" if which == "a" else f"only {self.name_b}"
        return list(self.frame.loc[self.frame["outcome"] == label, "query"])

    def summary(self) -> str:
        return ", ".join(f"{label}: {count}" for label, count in self.counts.items())

    def differing(self) -> list[str]:
        """The queries worth looking at, most telling first: those right at rank 1 in only one run (or, without
        ground truth, with a different top-1), then those whose weighted score or AP@10 differ, largest first."""
        frame = self.frame
        first = frame["outcome"].isin([f"only {self.name_a}", f"only {self.name_b}", "different top-1"])
        chosen = list(frame.loc[first, "query"])
        if "delta_map10" in frame.columns:
            rest = frame.loc[~first].assign(_size=frame["delta_weighted"].abs() * 10 + frame["delta_map10"].abs())
            rest = rest[rest["_size"] > 0].sort_values(["_size", "query"], ascending=[False, True], kind="stable")
            chosen += list(rest["query"])
        return chosen


def compare_runs(
    rankings_a: Mapping[str, Sequence[str]],
    rankings_b: Mapping[str, Sequence[str]],
    ground_truth: Mapping[str, Sequence[str]] | None = None,
    name_a: str = "A",
    name_b: str = "B",
    k: int = 10,
) -> RunComparison:
    """Compare two submissions on the queries they share.

    With ground truth, a query is "right" when rank 1 is relevant; the outcome is ``both right``, ``only <a>``,
    ``only <b>`` or ``both wrong``, with both runs' weighted score and map@10 and their difference (b - a). Without
    ground truth the outcome says whether the two top-1 names agree (``same top-1`` / ``different top-1``).
    """
    import pandas as pd

    if name_a == name_b:
        name_b = f"{name_b} (2)"
    shared = [q for q in rankings_a if q in rankings_b]
    if not shared:
        raise DataError(f"{name_a} and {name_b} have no query in common: they are not runs on the same queries")
    rows = []
    for query in shared:
        ranked_a, ranked_b = list(rankings_a[query]), list(rankings_b[query])
        row: dict[str, Any] = {"query": query, "top1_a": ranked_a[0] if ranked_a else None,
                               "top1_b": ranked_b[0] if ranked_b else None}
        relevant = set(ground_truth.get(query, [])) if ground_truth is not None else set()
        if ground_truth is not None and relevant:
            from .metrics import query_metrics

            ma, mb = query_metrics(ranked_a, relevant, k=k), query_metrics(ranked_b, relevant, k=k)
            right_a, right_b = bool(ma["hit@1"]), bool(mb["hit@1"])
            row.update({"right_a": right_a, "right_b": right_b,
                        "weighted_a": ma["weighted_score"], "weighted_b": mb["weighted_score"],
                        "map10_a": ma["map@10"], "map10_b": mb["map@10"],
                        "delta_weighted": mb["weighted_score"] - ma["weighted_score"],
                        "delta_map10": mb["map@10"] - ma["map@10"]})
            row["outcome"] = ("both right" if right_a and right_b else f"only {name_a}" if right_a
                              else f"only {name_b}" if right_b else "both wrong")
        elif ground_truth is not None:
            row["outcome"] = "no ground truth"
        else:
            row["outcome"] = "same top-1" if row["top1_a"] == row["top1_b"] else "different top-1"
        rows.append(row)
    frame = pd.DataFrame(rows)
    order = ["both right", f"only {name_a}", f"only {name_b}", "both wrong", "same top-1", "different top-1",
             "no ground truth"]
    counts = {label: int((frame["outcome"] == label).sum()) for label in order if (frame["outcome"] == label).any()}
    if ground_truth is not None:
        for label in order[:4]:
            counts.setdefault(label, 0)
        counts = {label: counts[label] for label in order if label in counts}
    rank = {label: i for i, label in enumerate([f"only {name_a}", f"only {name_b}", "both wrong", "both right",
                                                "different top-1", "same top-1", "no ground truth"])}
    frame = frame.assign(_order=frame["outcome"].map(rank)).sort_values(["_order", "query"], kind="stable")
    return RunComparison(name_a, name_b, frame.drop(columns="_order").reset_index(drop=True), counts)


# ----------------------------------------------------------------------------------------------------------------
# Locating a run's submission and ground truth from its metrics record
# ----------------------------------------------------------------------------------------------------------------
def _test_dir(data: Path) -> Path:
    return data / "test" if (data / "test").is_dir() else data


def run_artifacts(record: Mapping[str, Any], results_dir: Path) -> tuple[Path | None, Path | None, Path | None]:
    """(submission, ground truth, labels.json) of a metrics record where they can be found, else None each.

    The submission: the record's ``submission`` (written by ``retrieve``) or ``config.submission`` (``evaluate``),
    else ``submissions/<run>.json`` next to the results folder or in the working folder. Ground truth and labels:
    ``config.ground_truth``, else ``<config.data>/test/ground_truth.json`` and ``labels.json``.
    """
    config = record.get("config") or {}
    run = record.get("run_name") or config.get("run_name")
    candidates = [record.get("submission"), config.get("submission")]
    if run:
        candidates += [results_dir.parent / "submissions" / f"{run}.json", Path("submissions") / f"{run}.json"]
    submission = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    ground_truth = labels = None
    if config.get("ground_truth") and Path(config["ground_truth"]).is_file():
        ground_truth = Path(config["ground_truth"])
        labels = ground_truth.with_name("labels.json")
    elif config.get("data"):
        test_dir = _test_dir(Path(config["data"]))
        ground_truth = test_dir / "ground_truth.json"
        labels = test_dir / "labels.json"
    if ground_truth is not None and not ground_truth.is_file():
        ground_truth = None
    if labels is not None and not labels.is_file():
        labels = None
    return submission, ground_truth, labels


def _image_dirs(record: Mapping[str, Any]) -> tuple[Path, Path] | None:
    """The run's query and gallery folders (from ``config.data``) when they are still there."""
    data = (record.get("config") or {}).get("data")
    if not data:
        return None
    test_dir = _test_dir(Path(data))
    query_dir, gallery_dir = test_dir / "query", test_dir / "gallery"
    return (query_dir, gallery_dir) if query_dir.is_dir() and gallery_dir.is_dir() else None


def _read_scores(submission: Path) -> dict[str, list[float]] | None:
    """The similarities beside a submission (``<name>.scores.json``), or None."""
    from .viz import load_scores, scores_sidecar_path

    sidecar = scores_sidecar_path(submission)
    try:
        return load_scores(sidecar) if sidecar.is_file() else None
    except ValueError as exc:
        logger.warning("%s", exc)
        return None


def _read_labels(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        labels = read_json(path)
    except (OSError, ValueError):
        logger.warning("cannot read %s: classes are derived from the ground truth", path)
        return None
    return labels if isinstance(labels, dict) else None


# ----------------------------------------------------------------------------------------------------------------
# The whole report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReportOutputs:
    """What :func:`write_report` wrote, and the runs and skipped files it found."""

    out_dir: Path
    table: "pd.DataFrame"
    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    analysed: list[str] = field(default_factory=list)
    not_analysed: dict[str, str] = field(default_factory=dict)
    comparison: RunComparison | None = None


def write_report(
    results_dir: str | os.PathLike = "results",
    out_dir: str | os.PathLike = "visualizations/report",
    n_worst: int = 10,
    failure: bool = True,
    images: bool = True,
    n_images: int = 6,
) -> ReportOutputs:
    """Aggregate every metrics JSON in ``results_dir`` and write, directly into ``out_dir``:

    ``comparison.csv`` / ``comparison.md`` (one row a run, best first), ``by_<model|pooling|finetuning|options>.csv``,
    ``bar_weighted_score.png``, ``bar_hit1.png``, ``bar_map10.png``; where a run's submission and ground truth are
    found (see :func:`run_artifacts`), ``failures_<run>_{worst,per_class,confusions}.csv``; for the best two runs on
    the same queries ``compare_<a>__vs__<b>.csv``; and ``report.md`` with every table and the skipped files.
    With ``images`` and the run's dataset folder at hand (``config.data``), also ``failures_<run>_worst.png`` (the
    ``n_images`` worst queries beside their top-k) and ``compare_<a>__vs__<b>.png`` (the queries where they differ).
    """
    results_dir, out = Path(results_dir), Path(out_dir)
    loaded = load_results(results_dir)
    if loaded.frame.empty:
        reasons = "; ".join(f"{p.name}: {r}" for p, r in loaded.skipped[:5])
        raise DataError(f"no metrics JSON of this project's schema in {results_dir} "
                        f"({len(loaded.files)} JSON file(s) found{', skipped: ' + reasons if reasons else ''})")
    table = comparison_table(loaded.frame)
    outputs = ReportOutputs(out, table, skipped=loaded.skipped)
    lines = _write_tables_and_charts(loaded, table, outputs, results_dir)
    if failure:
        options = _AnalysisOptions(n_worst=n_worst, images=images, n_images=n_images)
        submissions = _analyse_runs(loaded, table, outputs, results_dir, options, lines)
        _compare_best_pair(table, submissions, outputs, options, lines)
    if loaded.skipped:
        lines += ["## Skipped files", ""] + [f"- `{p}`: {reason}" for p, reason in loaded.skipped] + [""]
    outputs.files.append(write_text(out / "report.md", "\n".join(lines)))
    return outputs


@dataclass
class _AnalysisOptions:
    n_worst: int
    images: bool
    n_images: int


@dataclass
class _AnalysedRun:
    rankings: dict
    ground_truth: dict
    row: Any
    dirs: tuple[Path, Path] | None
    scores: Any


def _write_tables_and_charts(loaded, table, outputs: ReportOutputs, results_dir: Path) -> list[str]:
    """The comparison table, the grouped views and the bar charts; returns the report's first Markdown lines."""
    from .viz import save_figure

    out, files = outputs.out_dir, outputs.files
    files.append(write_text(out / "comparison.csv", table.to_csv(index=False)))
    files.append(write_text(out / "comparison.md", to_markdown(table) + "\n"))
    views = grouped_views(loaded.frame)
    for name, view in views.items():
        files.append(write_text(out / f"by_{name}.csv", view.to_csv(index=False)))
    for metric in PLOT_METRICS:
        if metric in loaded.frame.columns and loaded.frame[metric].notna().any():
            fig = plot_metric_bars(loaded.frame, metric)
            files.append(save_figure(fig, out / f"bar_{metric.replace('@', '')}.png"))
    lines = [f"# Retrieval report: {len(table)} run(s) from {results_dir}", "",
             "## Runs (best weighted score first)", "", to_markdown(table.drop(columns=["file"], errors="ignore")), ""]
    for name, view in views.items():
        lines += [f"## By {name}", "", to_markdown(view), ""]
    return lines + ["## Charts", ""] + [f"![{p.stem}]({p.name})" for p in files if p.suffix == ".png"] + [""]


def _analyse_runs(loaded, table, outputs: ReportOutputs, results_dir: Path, options: _AnalysisOptions,
                  lines: list[str]) -> dict[str, _AnalysedRun]:
    """Failure analysis of every run whose submission and ground truth are found; appends to ``lines``."""
    by_file = {r["_path"]: r for r in loaded.records}
    submissions: dict[str, _AnalysedRun] = {}
    lines += ["## Failure analysis", ""]
    for _, row in table.iterrows():
        record = by_file[row["file"]]
        analysed = _analyse_one_run(record, row, outputs, results_dir, options)
        if analysed is None:
            continue
        run, (entry, section) = row["run"], analysed
        submissions[run] = entry
        lines += section
    for run, reason in outputs.not_analysed.items():
        lines.append(f"- {run}: not analysed, {reason}")
    lines.append("")
    return submissions


def _analyse_one_run(record, row, outputs: ReportOutputs, results_dir: Path, options: _AnalysisOptions):
    """One run's failure tables (and worst-queries grid); ``None`` with the reason noted when it cannot be done."""
    from .submission import SubmissionError, load_submission
    from .viz import plot_submission, save_figure

    submission_path, gt_path, labels_path = run_artifacts(record, results_dir)
    run, out = row["run"], outputs.out_dir
    if submission_path is None or gt_path is None:
        what = "submission" if submission_path is None else "ground truth"
        outputs.not_analysed[run] = f"its {what} was not found"
        return None
    try:
        rankings = load_submission(submission_path)
        ground_truth = load_ground_truth(gt_path)
        analysis = failure_analysis(rankings, ground_truth, _read_labels(labels_path),
                                    k=int(row["top_k"] or 10), n_worst=options.n_worst)
    except (SubmissionError, DataError) as exc:
        outputs.not_analysed[run] = str(exc)
        return None
    name = slug(run, 80)
    for part in ("worst", "per_class", "confusions"):
        outputs.files.append(write_text(out / f"failures_{name}_{part}.csv", getattr(analysis, part).to_csv(index=False)))
    outputs.analysed.append(run)
    dirs = _image_dirs(record) if options.images else None
    scores = _read_scores(submission_path)
    section = [f"### {run}", "", f"Submission `{submission_path}`, ground truth `{gt_path}`.", "",
               analysis.summary_markdown(options.n_worst), ""]
    if dirs is not None:
        worst = [q for q in analysis.worst["query"] if q in rankings][:options.n_images]
        fig = plot_submission(rankings, dirs[0], dirs[1], worst, ground_truth=ground_truth, scores=scores,
                              title=f"{run}: the {len(worst)} worst queries")
        path = save_figure(fig, out / f"failures_{name}_worst.png")
        outputs.files.append(path)
        section += [f"![worst queries of {run}]({path.name})", ""]
    return _AnalysedRun(rankings, ground_truth, row, dirs, scores), section


def _best_comparable_pair(table, submissions: dict[str, _AnalysedRun]) -> tuple[str, str] | None:
    """The two best-ranked analysed runs over the same queries and ground truth whose rankings differ."""
    ranked_runs = [r for r in table["run"] if r in submissions]
    for i, first in enumerate(ranked_runs):
        a = submissions[first]
        for second in ranked_runs[i + 1:]:
            b = submissions[second]
            if set(a.rankings) == set(b.rankings) and a.ground_truth == b.ground_truth and a.rankings != b.rankings:
                return first, second
    return None


def _compare_best_pair(table, submissions: dict[str, _AnalysedRun], outputs: ReportOutputs,
                       options: _AnalysisOptions, lines: list[str]) -> None:
    """The best two analysed runs on the same queries, side by side (CSV, Markdown and a grid)."""
    from .viz import plot_run_comparison, save_figure

    pair = _best_comparable_pair(table, submissions)
    if pair is None:
        return
    (a, b), out = pair, outputs.out_dir
    first, second = submissions[a], submissions[b]
    comparison = compare_runs(first.rankings, second.rankings, first.ground_truth, name_a=a, name_b=b,
                              k=int(first.row["top_k"] or 10))
    outputs.comparison = comparison
    stem = f"compare_{slug(a, 80)}__vs__{slug(b, 80)}"
    outputs.files.append(write_text(out / f"{stem}.csv", comparison.frame.to_csv(index=False)))
    differ = comparison.frame[comparison.frame["outcome"].isin([f"only {a}", f"only {b}"])]
    lines += [f"## {a} vs {b} (the best two runs on the same queries)", "", comparison.summary(), "",
              to_markdown(differ[["query", "outcome", "top1_a", "top1_b", "weighted_a", "weighted_b"]])
              if len(differ) else "No query is right at rank 1 in only one of them.", "",
              "Look at them: `python -m helpers show --submission A.json --compare B.json --data DIR`.", ""]
    chosen = comparison.differing()[:options.n_images]
    if first.dirs is not None and chosen:
        fig = plot_run_comparison(first.rankings, second.rankings, first.dirs[0], first.dirs[1], chosen,
                                  ground_truth=first.ground_truth, names=(a, b), scores_a=first.scores,
                                  scores_b=second.scores, title=f"{a} (upper row) vs {b} (lower row)")
        path = save_figure(fig, out / f"{stem}.png")
        outputs.files.append(path)
        lines += [f"![{a} vs {b}]({path.name})", ""]
