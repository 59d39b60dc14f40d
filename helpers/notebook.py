"""Small helpers the notebooks call, so that each notebook stays a list of parameters, calls and assertions.

- :func:`notebook_mode`: the mode (:func:`mode_reason`: the ``FAST`` parameter, else ``RETRIEVAL_FAST``; unset:
  fast without a GPU) and the device (:func:`choose_device`), printed with the reason and the GPU's name and memory;
- :func:`output_root` and :func:`output_paths`: outputs go to ``<root>/submissions``, ``results``,
  ``visualizations`` and ``runs``, where ``root`` is ``$RETRIEVAL_OUTPUT_DIR``, else (fast mode) a folder of its own,
  else the project root, whatever the kernel's working folder (:mod:`helpers.settings`);
- :func:`notebook_data`: a small real split of ``../shared/datasets`` (else the embedded demo) in fast mode, the
  user's folder in full mode;
- :func:`scored_retrieval`: a run on the test, scored on the validation split of the training classes where the
  test has no ground truth;
- :func:`save_outputs`, :func:`metrics_frame`, :func:`check_run_outputs`: write, tabulate and check a run's files.

Other concerns live in their own modules and are re-exported here, because the notebooks import what they call from
this one module: the Colab set-up (:mod:`helpers.colab`), the notebook data (:mod:`helpers.notebook_data`:
:func:`notebook_data`, :func:`fast_dataset`, class names and text queries), the plots (:mod:`helpers.viz`:
``plot_side_by_side``, ``plot_pair_similarities``) and ``pair_similarities`` (:mod:`helpers.metrics`), the last three
imported only when asked for. Only the standard library is imported at module level.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

# Re-exported for the notebooks, which import everything they call from here: the Colab set-up (helpers.colab),
# the notebook data (helpers.notebook_data), the plots (helpers.viz) and the settings (helpers.settings).
from .colab import COLAB_KEEP, colab_requirements, colab_setup, in_colab  # noqa: F401
from .notebook_data import (FAST_SOURCE, FAST_SPLIT, class_names, class_text_queries, fast_dataset,  # noqa: F401
                            notebook_data, scoring_data, zero_shot_classes)
# FAST_ENV, OUTPUT_ENV, SHARED_ENV, project_root and shared_datasets_dir are also used from here by notebooks.
from .settings import (FAST_ENV, OUTPUT_ENV, SHARED_ENV, notebook_output_root, output_dir,  # noqa: F401
                       project_root, shared_datasets_dir)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .pipeline import RetrievalRun, RunOutputs

#: Range of every metric in the metrics JSON (weighted_score is the course server's 0..1000 points).
METRIC_RANGES = {"weighted_score": (0.0, 1000.0)}
#: Columns notebooks show when comparing runs.
DISPLAY_COLUMNS = ("run", "model", "weights", "pooling", "finetuned", "hit@1", "hit@5", "precision@10", "map@10",
                   "weighted_score", "runtime_s")


#: Names the notebooks import from here that live in other modules, imported only when asked for (they need numpy,
#: pandas and matplotlib, which a Colab runtime has before the project's install cell has run).
_ELSEWHERE = {"pair_similarities": "metrics", "plot_pair_similarities": "viz", "plot_side_by_side": "viz"}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(f".{_ELSEWHERE[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------
# Mode, device, environment
# --------------------------------------------------------------------------------------------------------------
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def mode_reason(value: bool | str | None = None) -> tuple[bool, str]:
    """Whether the notebook runs in fast mode, and why (for the notebook to print).

    ``value`` (the notebook's ``FAST`` parameter) wins when given; else ``$RETRIEVAL_FAST``: ``1`` fast, ``0``
    full; unset or empty: fast where no CUDA GPU is present, full where one is.
    """
    if value is not None:
        return _parse_mode(value), f"the FAST parameter is {value!r}"
    env = os.environ.get(FAST_ENV, "").strip()
    if env:
        return _parse_mode(env), f"{FAST_ENV}={env}"
    if _cuda_available():
        return False, (f"FAST is None and {FAST_ENV} is unset, and a CUDA GPU is present (set FAST = True for a "
                       "quick check with small models)")
    return True, (f"FAST is None and {FAST_ENV} is unset, and there is no CUDA GPU (set FAST = False for the whole "
                  "job on this machine)")


def _parse_mode(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "fast"):
        return True
    if text in ("0", "false", "no", "full"):
        return False
    raise ValueError(f"{FAST_ENV} must be 1 (fast) or 0 (full) (so must the FAST parameter), not {value!r}")


def fast_mode(value: bool | str | None = None) -> bool:
    """Whether the notebook runs in fast mode (:func:`mode_reason` without the reason)."""
    return mode_reason(value)[0]


def choose_device(device: str = "auto") -> str:
    """The device every cell uses (``auto``: CUDA, else MPS, else CPU), as a string such as ``"cuda"``."""
    from .models import resolve_device

    return str(resolve_device(device))


def device_summary(device: str) -> str:
    """``device`` in words: the GPU's name and memory for CUDA, the cores for the CPU."""
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return (f"{device}: {properties.name}, {total / 2**30:.1f} GiB memory ({free / 2**30:.1f} GiB free), "
                f"{torch.cuda.device_count()} GPU(s)")
    if device == "mps":
        return "mps: Apple GPU (Metal)"
    from .parallelism import available_cores

    return f"{device}: no GPU, {available_cores()} CPU cores"


def notebook_mode(fast: bool | str | None = None, device: str = "auto") -> tuple[bool, str]:
    """Resolve the notebook's ``FAST`` and ``DEVICE`` parameters once and print the mode, why, and the device (GPU
    name and memory): ``FAST, DEVICE = notebook_mode(FAST, DEVICE)``."""
    fast, why = mode_reason(fast)
    device = choose_device(device)
    print(f"{'fast' if fast else 'full'} mode, because {why}")
    print(f"device {device_summary(device)}")
    return fast, device


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


def scored_retrieval(data: str | os.PathLike, **options: Any) -> "RetrievalRun":
    """:func:`helpers.pipeline.run_retrieval` on ``data`` with ``options``, always scored: where ``data`` has no
    ground truth (a competition's test), the same configuration also runs on the class-disjoint validation split of
    its training classes (:func:`scoring_data`) and those metrics become the run's (the config records
    ``scored_on``, the run keeps that run as ``validation_run``); the rankings, hence the submission, stay those of
    ``data``."""
    from .pipeline import run_retrieval

    run = run_retrieval(data, **options)
    if run.evaluation is None:
        validation = scoring_data(data)
        # at the precision the test's gallery got (auto decides by the number of images): the scores describe the
        # embedding of the submission
        run.validation_run = run_retrieval(validation, **{**options, "precision": run.gallery.precision})
        run.evaluation = run.validation_run.evaluation
        run.config["scored_on"] = str(validation)
    return run


def scored_runs(runs: Mapping[str, "RetrievalRun"]) -> dict[str, "RetrievalRun"]:
    """Each run of :func:`scored_retrieval` as the run that has ground truth: its validation run where the test has
    none, else itself (for plots that need same-class pairs, such as ``plot_pair_similarities``)."""
    return {name: getattr(run, "validation_run", run) for name, run in runs.items()}


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
    token: str = "",
) -> Any:
    """Send ``submission`` with :func:`helpers.client.submit` only when both ``group`` and ``url`` are set.

    Returns the client's result, or None (with a printed reason) when either is empty: notebooks never submit by
    accident. The attempt log goes to ``<root>/submissions/submit_log.jsonl`` and a copy of what was sent to
    ``<root>/submissions/sent/`` (default root: :func:`output_root`); ``token``: for a server with per-group tokens.
    """
    if not (group and url):
        print("not submitted: set GROUP_NAME and SERVER_URL in the parameters cell to send this submission")
        return None
    from .client import submit

    folder = output_dir("submissions", output_root() if root is None else root)
    return submit(submission, group, url=url, data=data, k=k, log_path=folder / "submit_log.jsonl",
                  saved_dir=folder / "sent", token=token or None)


def competition_plan(fast: bool, device: str, models: Sequence[str] = (), budget_minutes: float = 30.0,
                     finetune: bool | None = None, recipe: str = "circle") -> dict[str, Any]:
    """What ``08_competition`` hands to :func:`helpers.select.select`, decided from the mode and the device, printed.

    ``models`` empty: ``select``'s defaults for the device (fast mode: ``efficientnet-lite0`` only, whose weights
    ship offline); fast mode caps the budget at 2 minutes; ``finetune`` None: on with a CUDA GPU in full mode, else
    off (head-only fine-tuning of the best model with ``recipe`` on the classes not held out)."""
    from .select import default_models

    chosen = list(models) or (["efficientnet-lite0"] if fast else default_models(device))
    budget = min(float(budget_minutes), 2.0) if fast else float(budget_minutes)
    train = finetune if finetune is not None else (not fast and device.startswith("cuda"))
    plan = {"models": chosen, "budget_minutes": budget, "train": recipe if train else None}
    why = "set by FINETUNE" if finetune is not None else ("a GPU in full mode" if train else "no GPU or fast mode")
    print(f"select: models {', '.join(chosen)}; budget {budget:g} min; fine-tuning "
          f"{'with ' + recipe if train else 'off'} ({why})")
    return plan


def save_selection(outcome: Any, tag: str, data: str | os.PathLike,
                   root: str | os.PathLike | None = None) -> "RunOutputs":
    """Copy what :func:`helpers.select.select` wrote into the notebook's output folders, named ``tag``: its
    submission (``submissions/``), the test grid (``visualizations/``) and, as ``results/<tag>.json``, the winner's
    metrics JSON from the validation split, for ``data`` (``config.scored_on`` names the split)."""
    from .fileio import read_json, write_bytes, write_json
    from .pipeline import RunOutputs

    paths = output_paths(tag, root)
    write_bytes(paths["submission"], Path(outcome.submission).read_bytes())
    record = read_json(outcome.winner.metrics_path)
    record["config"] = {**(record.get("config") or {}), "data": str(data), "scored_on": str(outcome.validation_dir)}
    record.update(run_name=tag, candidate=outcome.winner.candidate.name, submission=str(paths["submission"]))
    write_json(paths["metrics"], record)
    grid = write_bytes(paths["grid"], Path(outcome.grid).read_bytes()) if outcome.grid is not None else None
    return RunOutputs(paths["submission"], paths["metrics"], grid)


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
