"""Small helpers the notebooks call, so that each notebook stays a list of parameters, calls and assertions.

- :func:`fast_mode`: the ``RETRIEVAL_FAST`` switch (``1`` fast, ``0`` full; unset: fast without a GPU);
- :func:`choose_device`, :func:`in_colab`, :func:`colab_setup` (clone + install, never reinstalling torch);
- :func:`output_root` and :func:`output_paths`: outputs go to ``<root>/submissions``, ``results``,
  ``visualizations`` and ``runs``, where ``root`` is ``$RETRIEVAL_OUTPUT_DIR``, else (fast mode) a folder of its own,
  else the project root, whatever the kernel's working folder (:mod:`helpers.settings`);
- :func:`notebook_data`: a small real split of ``../shared/datasets`` (else the embedded demo) in fast mode, the
  user's folder in full mode;
- :func:`save_outputs`, :func:`metrics_frame`, :func:`check_run_outputs`: write, tabulate and check a run's files.

Only the standard library is imported at module level: :func:`colab_setup` must run before the requirements are in.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

# FAST_ENV, OUTPUT_ENV, SHARED_ENV, project_root and shared_datasets_dir are also used from here by notebooks.
from .settings import (FAST_ENV, OUTPUT_ENV, SHARED_ENV, notebook_output_root, output_dir,  # noqa: F401
                       project_root, shared_datasets_dir)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from matplotlib.figure import Figure

    from .pipeline import RetrievalRun, RunOutputs

#: Packages Colab already ships (and that must not be replaced by a pip resolve): filtered out of requirements.txt.
COLAB_KEEP = ("torch", "torchvision", "torchaudio")
#: Fast mode's default real dataset and the size of its split (per class): small enough for a CPU in seconds.
FAST_SOURCE = "imagenette-val"
FAST_SPLIT = {"query_per_class": 2, "gallery_per_class": 6, "train_per_class": 6}
#: Range of every metric in the metrics JSON (weighted_score is the course server's 0..1000 points).
METRIC_RANGES = {"weighted_score": (0.0, 1000.0)}
#: Columns notebooks show when comparing runs.
DISPLAY_COLUMNS = ("run", "model", "weights", "pooling", "finetuned", "hit@1", "hit@5", "precision@10", "map@10",
                   "weighted_score", "runtime_s")


# --------------------------------------------------------------------------------------------------------------
# Mode, device, environment
# --------------------------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def fast_mode(value: bool | str | None = None) -> bool:
    """Whether the notebook runs in fast mode.

    ``value`` (a notebook parameter) wins when given; else ``$RETRIEVAL_FAST``: ``1`` fast, ``0`` full; unset or
    empty: fast where no CUDA GPU is present, full where one is.
    """
    if value is None:
        value = os.environ.get(FAST_ENV, "").strip()
        if value == "":
            return not _cuda_available()
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "fast"):
        return True
    if text in ("0", "false", "no", "full"):
        return False
    raise ValueError(f"{FAST_ENV} must be 1 (fast) or 0 (full), not {value!r}")


def choose_device(device: str = "auto") -> str:
    """The device every cell uses (``auto``: CUDA, else MPS, else CPU), as a string such as ``"cuda"``."""
    from .models import resolve_device

    return str(resolve_device(device))


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def _requirement_name(line: str) -> str:
    name = line.split(";", 1)[0]
    for sep in ("[", "=", "<", ">", "!", "~", " "):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def colab_requirements(root: str | os.PathLike = ".", extras: Sequence[str] = ("notebooks",),
                       keep: Sequence[str] = COLAB_KEEP) -> list[str]:
    """The project's dependencies (``pyproject.toml``) and those of ``extras`` (the notebooks' own), minus ``keep``
    (torch, torchvision: Colab's builds stay): what a notebook needs on Colab, and nothing for tests or servers."""
    import tomllib

    project = tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    return [line for line in dict.fromkeys(lines) if _requirement_name(line) not in keep]


def colab_setup(root: str | os.PathLike = ".", dry_run: bool = False) -> list[list[str]]:
    """Install what the notebooks need (the dependencies and the ``notebooks`` extra) without touching torch, then
    the project itself without its dependencies.

    Returns the pip commands (run unless ``dry_run``). Called by each notebook's Colab-only cell after the clone.
    """
    root = Path(root).resolve()
    filtered = Path(tempfile.gettempdir()) / "requirements-colab.txt"
    filtered.write_text("\n".join(colab_requirements(root)) + "\n", encoding="utf-8")
    commands = [
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(filtered)],
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(root)],
    ]
    if not dry_run:
        for command in commands:
            subprocess.run(command, check=True)
    return commands


# --------------------------------------------------------------------------------------------------------------
# Folders and data
# --------------------------------------------------------------------------------------------------------------
def output_root(fast: bool | None = None, project: str | os.PathLike | None = None) -> Path:
    """The folder a notebook writes under (:func:`helpers.settings.notebook_output_root`): ``$RETRIEVAL_OUTPUT_DIR``,
    else in fast mode a folder of its own (never the project's ``results/``), else the project root.
    ``fast``: None reads :func:`fast_mode`."""
    return notebook_output_root(fast_mode() if fast is None else fast, project)


def output_paths(tag: str, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """``submission``, ``metrics`` and ``grid`` paths of a run named ``tag`` under the output root ``root``
    (default: :func:`output_root`)."""
    root = output_root() if root is None else Path(root)
    return {
        "submission": output_dir("submissions", root) / f"{tag}.json",
        "metrics": output_dir("results", root) / f"{tag}.json",
        "grid": output_dir("visualizations", root) / f"{tag}.png",
    }


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


def notebook_data(fast: bool, data_dir: str | os.PathLike = "data", source: str = FAST_SOURCE, **split: int) -> Path:
    """Fast mode: :func:`fast_dataset`; full mode: ``data_dir`` (relative to the project root), checked.

    Fast mode also points the embedding cache (``$RETRIEVAL_CACHE_DIR``) at a fresh temporary folder: the cells of
    one notebook share embeddings, and randomly initialised weights never meet embeddings cached from another
    initialisation (nor fill the user's cache).
    """
    if fast:
        os.environ["RETRIEVAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="retrieval-notebook-cache-")
        return fast_dataset(source, **split)
    from .data import load_retrieval_set

    path = Path(data_dir)
    if not path.is_absolute():
        path = project_root() / path
    dataset = load_retrieval_set(path)  # raises a DataError naming what is missing
    print(f"full mode: {len(dataset.query_paths)} queries, {len(dataset.gallery_paths)} gallery images in {path}")
    return path


def class_names(data: str | os.PathLike) -> list[str]:
    """The classes of a dataset: those of ``test/labels.json``, else the ``training/`` folder names (sorted)."""
    from .data import class_folders, load_retrieval_set

    dataset = load_retrieval_set(data)
    if dataset.labels:
        return sorted(set(dataset.labels.get("gallery", {}).values()) | set(dataset.labels.get("query", {}).values()))
    if dataset.training_dir is not None:
        return [folder.name for folder in class_folders(dataset.training_dir)]
    return []


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


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------
def save_outputs(run: "RetrievalRun", tag: str | None = None, grid_queries: int = 6,
                 root: str | os.PathLike | None = None) -> "RunOutputs":
    """Write a run's submission, metrics JSON and grid under the output root ``root`` (default:
    :func:`output_root`), named ``tag`` (default: the run's name)."""
    from .pipeline import save_run

    paths = output_paths(tag or run.run_name, root)
    return save_run(run, out=paths["submission"], metrics_out=paths["metrics"], grid_out=paths["grid"],
                    grid_queries=grid_queries)


def weights_for(model: str, fast: bool) -> str:
    """``pretrained`` in full mode; in fast mode too where the model ships its weights offline
    (``efficientnet-lite0``), else ``none`` (random initialisation: nothing to download)."""
    from .models import get_spec

    return "pretrained" if not fast or get_spec(model).offline_weights else "none"


def runs_frame(runs: Mapping[str, "RetrievalRun"] | Iterable["RetrievalRun"]) -> "pd.DataFrame":
    """Runs held in memory as the rows :func:`helpers.report.load_results` reads from ``results/``."""
    import pandas as pd

    from .report import record_row

    items = runs.values() if isinstance(runs, Mapping) else runs
    return pd.DataFrame([record_row(run.metrics_record()) for run in items])


def metrics_frame(runs: Mapping[str, "RetrievalRun"] | Iterable["RetrievalRun"],
                  columns: Sequence[str] = DISPLAY_COLUMNS) -> "pd.DataFrame":
    """The comparison table (:func:`helpers.report.comparison_table`, best first) of runs, ``columns`` only."""
    from .report import comparison_table

    table = comparison_table(runs_frame(runs))
    return table[[c for c in columns if c in table.columns]]


def pair_similarities(run: "RetrievalRun", max_pairs: int = 200_000, seed: int = 0) -> "pd.DataFrame":
    """Cosine similarity of (query, gallery) pairs, each marked ``same class`` (relevant in the ground truth) or
    ``different class``, with a pair-level ROC AUC in ``frame.attrs["auc"]`` (1.0: every same-class pair scores
    above every different-class pair). At most ``max_pairs`` pairs, drawn at random when there are more."""
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


def plot_pair_similarities(runs: Mapping[str, "RetrievalRun"], bins: int = 40) -> "Figure":
    """One histogram panel per run: similarities of same-class against different-class pairs, AUC in the title."""
    from .viz import subplots_figure

    fig, axes = subplots_figure(1, len(runs), (4.2 * len(runs), 3.0), sharey=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        frame = pair_similarities(run)
        for kind, color in (("different class", "#d7191c"), ("same class", "#1a9641")):
            values = frame.loc[frame["pair"] == kind, "similarity"]
            ax.hist(values, bins=bins, alpha=0.55, color=color, label=kind, density=True)
        auc = frame.attrs["auc"]
        ax.set_title(f"{name}: AUC {auc:.3f}" if auc is not None else name, fontsize=9)
        ax.set_xlabel("cosine similarity", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _row_labels(names: Sequence[str], limit: int = 28) -> dict[str, str]:
    """Short labels: the prefix every name shares (up to an ``_``) dropped, long ones cut at the start."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind("_") + 1]
    labels = {}
    for name in names:
        short = name[len(prefix):] or name
        labels[name] = short if len(short) <= limit else "..." + short[-(limit - 3):]
    return labels


def plot_side_by_side(
    rankings: Mapping[str, Mapping[str, Sequence[str]]],
    data: str | os.PathLike,
    queries: int | Sequence[str] = 4,
    k: int | None = None,
    scores: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    title: str | None = None,
    thumb_size: int = 112,
) -> "Figure":
    """Several runs on the same queries: per query, one row per run (named on the left), the query image then
    that run's top-k, green/red borders where ``data``'s ground truth knows the query.

    ``rankings``: run name -> submission; ``queries``: names, or how many to spread over the classes
    (:func:`helpers.viz.pick_queries`) among those every run ranked. Built on
    :func:`helpers.viz.plot_retrieval_grid`.
    """
    from .data import load_retrieval_set
    from .viz import layout_with_legend, pick_queries, plot_retrieval_grid

    if not rankings:
        raise ValueError("give at least one run to plot")
    dataset = load_retrieval_set(data)
    shared = [q for q in dataset.query_names if all(q in r for r in rankings.values())]
    if isinstance(queries, int):
        queries = pick_queries(shared, queries, labels=dataset.labels, ground_truth=dataset.ground_truth)
    missing = [q for q in queries if q not in shared]
    if missing or not queries:
        raise ValueError(f"queries not ranked by every run: {missing[:5] or 'none shared'}")
    rows = [(q, name) for q in queries for name in rankings]
    cut = {(q, name): list(rankings[name][q])[:k] if k else list(rankings[name][q]) for q, name in rows}
    truth = dataset.ground_truth
    correct = None if truth is None else [[g in truth[q] if q in truth else None for g in cut[(q, name)]]
                                          for q, name in rows]
    row_scores = [list(scores[name][q]) if scores and q in scores.get(name, {}) else None for q, name in rows]
    fig = plot_retrieval_grid([dataset.query_dir / q for q, _ in rows],
                              [[dataset.gallery_dir / g for g in cut[row]] for row in rows],
                              row_scores, correct, thumb_size=thumb_size, title=title)
    n_cols = len(fig.axes) // len(rows)
    labels = _row_labels(list(rankings))
    for index, (_, name) in enumerate(rows):
        fig.axes[index * n_cols].set_ylabel(labels[name], fontsize=7, rotation=0, ha="right", va="center")
    layout_with_legend(fig)
    return fig


def best_runs_on(
    results_dir: str | os.PathLike,
    data: str | os.PathLike,
    n: int = 4,
    sort_by: str = "weighted_score",
) -> dict[str, dict[str, list[str]]]:
    """The ``n`` best runs of ``results_dir`` (metrics JSONs) made on the dataset folder ``data``, as run name ->
    submission (found by :func:`helpers.report.run_artifacts`), best first."""
    from .report import comparison_table, load_results, run_artifacts
    from .submission import load_submission

    loaded = load_results(results_dir)
    if loaded.frame.empty:
        return {}
    by_file = {record["_path"]: record for record in loaded.records}
    target = Path(data).resolve()
    chosen: dict[str, dict[str, list[str]]] = {}
    for row in comparison_table(loaded.frame, sort_by=sort_by).itertuples(index=False):
        record = by_file.get(row.file) or {}
        record_data = (record.get("config") or {}).get("data")
        submission = run_artifacts(record, Path(results_dir))[0]
        if record_data and Path(record_data).resolve() == target and submission is not None and len(chosen) < n:
            chosen[row.run] = load_submission(submission)
    return chosen


def maybe_submit(
    submission: str | os.PathLike,
    group: str = "",
    url: str = "",
    data: str | os.PathLike | None = None,
    k: int = 10,
    root: str | os.PathLike | None = None,
) -> Any:
    """Send ``submission`` with :func:`helpers.client.submit` only when both ``group`` and ``url`` are set.

    Returns the client's result, or None (with a printed reason) when either is empty: notebooks never submit by
    accident. The attempt log goes to ``<root>/submissions/submit_log.jsonl`` (default root: :func:`output_root`).
    """
    if not (group and url):
        print("not submitted: set GROUP_NAME and SERVER_URL in the parameters cell to send this submission")
        return None
    from .client import submit

    log = output_dir("submissions", output_root() if root is None else root) / "submit_log.jsonl"
    return submit(submission, group, url=url, data=data, k=k, log_path=log)


def show_image(path: str | os.PathLike, width: int | None = 900) -> Any:
    """Display a PNG inline in a notebook (returns the object, so a cell can end with it)."""
    from IPython.display import Image

    return Image(filename=str(path), width=width)


def check_run_outputs(
    submission: str | os.PathLike,
    data: str | os.PathLike | None = None,
    metrics: str | os.PathLike | None = None,
    grids: Iterable[str | os.PathLike] = (),
    k: int = 10,
    min_metrics: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Assert that a run's files are right and return its metrics (empty without ``metrics``).

    The submission must be valid (:func:`helpers.submission.validate_submission`: ``k`` distinct names per query,
    every query of ``data`` present, every name in its gallery); every metric in the metrics JSON within its range
    (0..1, ``weighted_score`` 0..1000) and at least ``min_metrics``; every grid a non-empty PNG.
    """
    from .data import load_retrieval_set
    from .fileio import read_json
    from .submission import load_submission, validate_submission

    rankings = load_submission(submission)
    dataset = load_retrieval_set(data) if data is not None else None
    problems = validate_submission(rankings, k=k, query_names=dataset.query_names if dataset else None,
                                   gallery_names=dataset.gallery_names if dataset else None)
    assert not problems, f"invalid submission {submission}: {problems[:5]}"
    values: dict[str, float] = {}
    if metrics is not None:
        record = read_json(metrics)
        values = dict(record.get("metrics") or {})
        assert values, f"{metrics} holds no metrics"
        for key, value in values.items():
            low, high = METRIC_RANGES.get(key, (0.0, 1.0))
            assert low <= value <= high, f"{metrics}: {key} = {value} is outside [{low}, {high}]"
        for key, floor in (min_metrics or {}).items():
            assert values.get(key, float("-inf")) >= floor, f"{metrics}: {key} = {values.get(key)} < {floor}"
    for grid in grids:
        grid = Path(grid)
        assert grid.is_file() and grid.stat().st_size > 0, f"grid {grid} is missing or empty"
        assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"grid {grid} is not a PNG file"
    return values


# --------------------------------------------------------------------------------------------------------------
# Committing notebooks
# --------------------------------------------------------------------------------------------------------------
def clear_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove outputs and execution counts from notebooks in place (they are committed without); returns the files
    that changed. Command line: ``python -m helpers.notebook notebooks/*.ipynb``."""
    import nbformat

    changed = []
    for path in map(Path, paths):
        notebook = nbformat.read(path, as_version=4)
        dirty = False
        for cell in notebook.cells:
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                cell.outputs, cell.execution_count, dirty = [], None, True
        if dirty:
            nbformat.write(notebook, path)
            changed.append(path)
    return changed


if __name__ == "__main__":  # pragma: no cover - exercised through clear_outputs
    for cleared in clear_outputs(sys.argv[1:]):
        print(f"cleared {cleared}")
