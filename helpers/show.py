"""Looking at one submission: query-versus-top-k PNG pages, a self-contained HTML page, and two runs side by side.

The library side of ``python -m helpers show``: :func:`show_submission` writes the files and returns what it wrote
and the notes a user should read; the CLI only prints them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import output_dir

logger = logging.getLogger(__name__)

DEFAULT_SHOW_DIR = str(output_dir("visualizations") / "show")
DEFAULT_SHOWN = 8


@dataclass
class ShowOptions:
    """What to show; ``queries`` is a count, ``None`` for all, and ``query`` names queries explicitly."""

    submission: str
    data: str = "data"
    ground_truth: str | None = None  # a file, "none" to ignore it, None for the dataset's own
    queries: int | None = DEFAULT_SHOWN
    html_queries: int | None = None
    query: list[str] | None = None
    k: int | None = None
    per_page: int = 8
    out: str | None = None
    html: bool = False
    compare: str | None = None
    scores: str | None = None
    model: str | None = None
    weights: str = "pretrained"
    device: str = "auto"
    batch_size: int = 32
    tta: str = "none"


@dataclass
class ShowOutputs:
    """The files written and the lines that tell the user what they see."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Loaded:
    rankings: dict
    dataset: Any
    ground_truth: dict | None
    labels: dict | None
    stem: str


def _load(options: ShowOptions, outputs: ShowOutputs) -> _Loaded:
    from .data import load_ground_truth, load_retrieval_set
    from .submission import load_submission

    rankings = load_submission(options.submission)
    if not rankings:
        raise ValueError(f"submission {options.submission} holds no query")
    dataset = load_retrieval_set(options.data)
    if options.ground_truth and options.ground_truth.lower() == "none":
        ground_truth = None
    else:
        ground_truth = load_ground_truth(options.ground_truth) if options.ground_truth else dataset.ground_truth
    labels = dataset.labels if ground_truth is dataset.ground_truth else None
    missing = [q for q in rankings if not (dataset.query_dir / q).exists()]
    if len(missing) == len(rankings):
        raise ValueError(f"no query of {options.submission} is in {dataset.query_dir}: is --data the dataset of "
                         "this submission?")
    if missing:
        outputs.notes.append(f"{len(missing)} query(ies) of the submission are not in {dataset.query_dir} "
                             f"(grey tiles): {missing[:3]}")
    return _Loaded(rankings, dataset, ground_truth, labels, Path(options.submission).stem)


def _chosen_queries(options: ShowOptions, run: _Loaded) -> tuple[list[str], list[str]]:
    """The queries of the PNG pages and of the HTML page."""
    from .viz import pick_queries

    if options.query:
        unknown = [q for q in options.query if q not in run.rankings]
        if unknown:
            raise ValueError(f"--query {unknown[0]!r} is not in the submission (e.g. {next(iter(run.rankings))!r})")
        return list(options.query), list(options.query)
    pick = dict(labels=run.labels, ground_truth=run.ground_truth)
    return (pick_queries(list(run.rankings), options.queries, **pick),
            pick_queries(list(run.rankings), options.html_queries, **pick))


def _similarities(options: ShowOptions, run: _Loaded, needed: list[str]) -> tuple[dict | None, str]:
    """The similarities shown under each image and where they come from."""
    from .viz import load_scores, scores_sidecar_path, similarities_from_model

    sidecar = Path(options.scores) if options.scores else scores_sidecar_path(options.submission)
    if options.scores or (sidecar.exists() and not options.model):
        return load_scores(sidecar), f"similarities from {sidecar}"
    if options.model:
        scores = similarities_from_model(run.rankings, run.dataset.query_dir, run.dataset.gallery_dir,
                                         model=options.model, weights=options.weights, queries=needed,
                                         device=options.device, batch_size=options.batch_size, tta=options.tta,
                                         progress=True)
        return scores, f"similarities recomputed with {options.model}"
    return None, "rank only (no scores file; pass --model to recompute similarities)"


def show_submission(options: ShowOptions) -> ShowOutputs:
    """Write the PNG pages (and the HTML page, and the side-by-side comparison) of one submission."""
    from .viz import save_submission_grids

    outputs = ShowOutputs(Path(options.out) if options.out else Path(DEFAULT_SHOW_DIR) / Path(options.submission).stem)
    run = _load(options, outputs)
    grid_queries, html_queries = _chosen_queries(options, run)
    needed = sorted(set(grid_queries) | (set(html_queries) if options.html else set()))
    scores, scores_from = _similarities(options, run, needed)
    common = dict(ground_truth=run.ground_truth, scores=scores, labels=run.labels, k=options.k)
    pages = save_submission_grids(run.rankings, run.dataset.query_dir, run.dataset.gallery_dir, outputs.out_dir,
                                  grid_queries, per_page=options.per_page, prefix=f"{run.stem}_grid",
                                  title=run.stem, **common)
    outputs.files += pages
    outputs.lines.append(f"{len(grid_queries)} of {len(run.rankings)} queries in {len(pages)} PNG page(s); "
                         f"{scores_from}; " + ("green/red borders from the ground truth"
                                               if run.ground_truth is not None else "no ground truth"))
    outputs.lines += [f"grid: {page}" for page in pages]
    if options.html:
        from .html_report import write_html_report

        info = {"submission": options.submission, "data": str(run.dataset.root)}
        page = write_html_report(outputs.out_dir / f"{run.stem}.html", run.rankings, run.dataset.query_dir,
                                 run.dataset.gallery_dir, ground_truth=run.ground_truth, scores=scores,
                                 queries=html_queries, k=options.k, title=run.stem, info=info)
        outputs.files.append(page)
        outputs.lines.append(f"html: {page} ({len(html_queries)} queries)")
    if options.compare:
        _compare(options, run, scores, outputs)
    return outputs


def _compare(options: ShowOptions, run: _Loaded, scores: dict | None, outputs: ShowOutputs) -> None:
    """Side-by-side pages of the queries where the two submissions differ, and a CSV of every shared query."""
    from .fileio import write_text
    from .report import compare_runs
    from .submission import load_submission
    from .viz import load_scores, plot_run_comparison, save_figure, scores_sidecar_path

    other = load_submission(options.compare)
    other_stem = Path(options.compare).stem
    other_sidecar = scores_sidecar_path(options.compare)
    other_scores = load_scores(other_sidecar) if other_sidecar.exists() else None
    comparison = compare_runs(run.rankings, other, run.ground_truth, name_a=run.stem, name_b=other_stem,
                              k=options.k or 10)
    outputs.lines.append(f"{run.stem} vs {other_stem} on {len(comparison.frame)} shared queries: "
                         f"{comparison.summary()}")
    stem = f"compare_{run.stem}__vs__{other_stem}"
    csv = write_text(outputs.out_dir / f"{stem}.csv", comparison.frame.to_csv(index=False))
    outputs.files.append(csv)
    outputs.lines.append(f"comparison: {csv}")
    if options.query:
        differ = [q for q in options.query if q in other]
    else:
        differ = comparison.differing()
        differ = differ if options.queries is None else differ[:options.queries]
    if not differ:
        outputs.lines.append("the two runs rank every shared query the same: no side-by-side grid")
    for number, start in enumerate(range(0, len(differ), options.per_page), start=1):
        chunk = differ[start: start + options.per_page]
        fig = plot_run_comparison(run.rankings, other, run.dataset.query_dir, run.dataset.gallery_dir, chunk,
                                  ground_truth=run.ground_truth, names=(run.stem, other_stem), scores_a=scores,
                                  scores_b=other_scores, k=options.k,
                                  title=f"{run.stem} (upper row) vs {other_stem} (lower row)")
        suffix = "" if len(differ) <= options.per_page else f"_{number:03d}"
        path = save_figure(fig, outputs.out_dir / f"{stem}{suffix}.png")
        outputs.files.append(path)
        outputs.lines.append(f"side by side: {path}")
