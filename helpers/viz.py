"""Query-versus-top-k grids: each query beside its ranked gallery images, green/red borders where truth is known."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .data import ImageLoadError, load_image
from .fileio import write_bytes
from .submission import load_scores, scores_sidecar_path, write_scores  # noqa: F401  (the scores file format)

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .run import RetrievalRun

CORRECT_COLOR = "#1a9641"
WRONG_COLOR = "#d7191c"
QUERY_COLOR = "#2c7bb6"
#: Height added below a grid for its colour legend.
LEGEND_INCHES = 0.45


def _thumbnail(path: Path, size: int) -> np.ndarray:
    """A square thumbnail; an unreadable file becomes a grey tile."""
    try:
        image = load_image(path)
    except ImageLoadError:
        return np.full((size, size, 3), 128, dtype=np.uint8)
    image.thumbnail((size, size))
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    array = np.asarray(image)
    top, left = (size - array.shape[0]) // 2, (size - array.shape[1]) // 2
    canvas[top : top + array.shape[0], left : left + array.shape[1]] = array
    return canvas


def subplots_figure(n_rows: int, n_cols: int, figsize: tuple[float, float], **kwargs):
    """A :class:`matplotlib.figure.Figure` and its (n_rows, n_cols) axes, built without pyplot: the user's plotting
    backend is never switched, and a notebook shows the figure when a cell returns it."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(n_rows, n_cols, squeeze=False, **kwargs)


def _draw_tile(ax, path: Path | None, label: str, color: str | None, thumb_size: int,
               thumbs: dict | None = None) -> None:
    """One image (or an empty cell when ``path`` is None) with a caption and, when ``color`` is set, a border."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if path is None:
        return
    key = (str(path), thumb_size)
    if thumbs is not None and key in thumbs:
        image = thumbs[key]
    else:
        image = _thumbnail(Path(path), thumb_size)
        if thumbs is not None:
            thumbs[key] = image
    ax.imshow(image)
    ax.set_xlabel(label, fontsize=6.5)
    if color is not None:
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_edgecolor(color)
            spine.set_linewidth(3.5)


def _verdict_color(verdict: bool | None) -> str | None:
    return None if verdict is None else (CORRECT_COLOR if verdict else WRONG_COLOR)


def add_legend(fig: "Figure", verdicts: bool) -> None:
    """The grid's key below the images: the query's border colour, and with ``verdicts`` (ground truth known) the
    colours of relevant and not relevant results; the caption under each image is ``#rank similarity``."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="none", edgecolor=QUERY_COLOR, linewidth=2.5, label="query")]
    if verdicts:
        handles += [Patch(facecolor="none", edgecolor=CORRECT_COLOR, linewidth=2.5, label="relevant"),
                    Patch(facecolor="none", edgecolor=WRONG_COLOR, linewidth=2.5, label="not relevant")]
    fig.set_figheight(fig.get_figheight() + LEGEND_INCHES)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False,
               title="border: query / ground truth; caption: #rank similarity, file name", title_fontsize=7)


def layout_with_legend(fig: "Figure", title: str | None = None) -> None:
    """``tight_layout`` leaving room below for the legend of :func:`add_legend` (when there is one) and above for
    ``title``."""
    if title:
        fig.suptitle(title, fontsize=9)
    bottom = min(0.3, LEGEND_INCHES / fig.get_figheight()) if fig.legends else 0.0
    fig.tight_layout(rect=(0, bottom, 1, 1))


def plot_retrieval_grid(
    queries: Sequence[Path],
    ranked: Sequence[Sequence[Path]],
    scores: Sequence[Sequence[float]] | None = None,
    correct: Sequence[Sequence[bool | None]] | None = None,
    thumb_size: int = 128,
    title: str | None = None,
) -> "Figure":
    """A matplotlib Figure: one row per query, the query then its ranked images with rank and similarity.

    ``correct[i][j]`` True/False draws a green/red border; None draws none (no ground truth). ``scores[i]`` may be
    None for a query whose similarities are unknown (only the rank is shown then).
    """
    n_rows = max(len(queries), 1)
    n_cols = 1 + max((len(r) for r in ranked), default=0)
    fig, axes = subplots_figure(n_rows, n_cols, (1.45 * n_cols, 1.75 * n_rows))
    thumbs: dict = {}
    for row, query in enumerate(queries):
        for col in range(n_cols):
            ax = axes[row][col]
            if col == 0:
                _draw_tile(ax, Path(query), f"query\n{_short(Path(query).name)}", QUERY_COLOR, thumb_size, thumbs)
            elif col - 1 < len(ranked[row]):
                j = col - 1
                path = Path(ranked[row][j])
                verdict = correct[row][j] if correct is not None else None
                row_scores = scores[row] if scores is not None else None
                similarity = f" {row_scores[j]:.3f}" if row_scores is not None and j < len(row_scores) else ""
                _draw_tile(ax, path, f"#{j + 1}{similarity}\n{_short(path.name)}", _verdict_color(verdict),
                           thumb_size, thumbs)
            else:
                _draw_tile(ax, None, "", None, thumb_size)
    add_legend(fig, verdicts=correct is not None and any(v is not None for row in correct for v in row))
    layout_with_legend(fig, title)
    return fig


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically (and close it where pyplot manages it)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return write_bytes(path, buffer.getvalue())


def grid_inputs(
    rankings: Mapping[str, list[str]],
    query_dir: Path,
    gallery_dir: Path,
    ground_truth: Mapping[str, list[str]] | None = None,
    queries: Sequence[str] | None = None,
) -> tuple[list[Path], list[list[Path]], list[list[bool | None]] | None]:
    """Paths and correctness flags for :func:`plot_retrieval_grid` from a submission."""
    chosen = list(queries) if queries is not None else list(rankings)
    query_paths = [query_dir / q for q in chosen]
    ranked = [[gallery_dir / g for g in rankings[q]] for q in chosen]
    correct = None
    if ground_truth is not None:
        correct = [[(g in set(ground_truth.get(q, []))) if q in ground_truth else None for g in rankings[q]]
                   for q in chosen]
    return query_paths, ranked, correct


def save_run_grid(run: "RetrievalRun", path: str | os.PathLike, max_queries: int = 8) -> Path:
    """A PNG grid of ``max_queries`` queries of a run, spread over its classes (see :func:`pick_queries`)."""
    queries = pick_queries(list(run.rankings), max_queries, labels=run.dataset.labels,
                           ground_truth=run.dataset.ground_truth)
    query_paths, ranked, correct = grid_inputs(
        run.rankings, run.dataset.query_dir, run.dataset.gallery_dir, run.dataset.ground_truth, queries
    )
    scores = [run.scores[q] for q in queries]
    fig = plot_retrieval_grid(query_paths, ranked, scores, correct, title=run.run_name)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# Choosing queries, similarity scores of a submission
# ----------------------------------------------------------------------------------------------------------------
def query_classes(
    names: Sequence[str],
    labels: Mapping[str, Mapping[str, str]] | None = None,
    ground_truth: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str] | None:
    """The class of each query name: ``labels["query"]`` (``test/labels.json``), else queries that share the same
    relevant set in ``ground_truth`` form one class; None when neither is known."""
    if labels and isinstance(labels.get("query"), Mapping):
        return {q: str(labels["query"].get(q, "?")) for q in names}
    if ground_truth:
        groups: dict[frozenset, str] = {}
        result = {}
        for q in names:
            key = frozenset(ground_truth.get(q, ()))
            result[q] = groups.setdefault(key, f"group{len(groups):03d}")
        return result
    return None


def pick_queries(
    names: Sequence[str],
    n: int | None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
    ground_truth: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """``n`` query names spread over the classes (round robin over classes, names in order within each class);
    evenly spaced over the list when no class is known. ``n`` None or at least ``len(names)``: all, in order."""
    names = list(names)
    if n is None or n >= len(names):
        return names
    if n <= 0:
        return []
    classes = query_classes(names, labels, ground_truth)
    if classes is None:
        step = len(names) / n
        return [names[int(i * step)] for i in range(n)]
    by_class: dict[str, list[str]] = {}
    for q in names:
        by_class.setdefault(classes[q], []).append(q)
    chosen: list[str] = []
    depth = 0
    while len(chosen) < n:
        for members in by_class.values():
            if depth < len(members) and len(chosen) < n:
                chosen.append(members[depth])
        depth += 1
    order = {q: i for i, q in enumerate(names)}
    return sorted(chosen, key=lambda q: (classes[q], order[q]))


def similarities_from_model(
    rankings: Mapping[str, Sequence[str]],
    query_dir: Path,
    gallery_dir: Path,
    model: str = "efficientnet-lite0",
    weights: str = "pretrained",
    queries: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    tta: str = "none",
    progress: bool = False,
) -> dict[str, list[float]]:
    """Cosine similarity of each shown query to each of its ranked names, recomputed with ``model`` (embeddings
    come from the cache when present). A name whose image cannot be read gets NaN."""
    from .embedding import EmbeddingCache, extract_embeddings
    from .models import load_model

    chosen = list(queries) if queries is not None else list(rankings)
    embedder = load_model(model, weights=weights, device=device)
    gallery_names = sorted({g for q in chosen for g in rankings[q]})
    common = dict(batch_size=batch_size, device=device, cache=EmbeddingCache(), tta=tta, progress=progress)
    q_result = extract_embeddings(embedder, [query_dir / q for q in chosen], desc="query", **common)
    common["precision"] = q_result.precision  # both sides at one precision
    g_result = extract_embeddings(embedder, [gallery_dir / g for g in gallery_names if (gallery_dir / g).exists()],
                                  desc="gallery", **common)
    q_index = {name: i for i, name in enumerate(q_result.names)}
    g_index = {name: i for i, name in enumerate(g_result.names)}
    scores: dict[str, list[float]] = {}
    for q in chosen:
        if q not in q_index:
            continue
        vector = q_result.embeddings[q_index[q]]
        scores[q] = [float(g_result.embeddings[g_index[g]] @ vector) if g in g_index else float("nan")
                     for g in rankings[q]]
    return scores


# ----------------------------------------------------------------------------------------------------------------
# A submission as grids, two submissions side by side
# ----------------------------------------------------------------------------------------------------------------
def plot_submission(
    rankings: Mapping[str, Sequence[str]],
    query_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    queries: Sequence[str] | int | None = 8,
    ground_truth: Mapping[str, Sequence[str]] | None = None,
    scores: Mapping[str, Sequence[float]] | None = None,
    labels: Mapping[str, Mapping[str, str]] | None = None,
    k: int | None = None,
    thumb_size: int = 128,
    title: str | None = None,
) -> "Figure":
    """A grid Figure of a submission (for notebooks): ``queries`` is a list of names, or a number of queries spread
    over the classes, or None for all. Borders are green/red where ``ground_truth`` knows the query; the caption
    under each image is its rank and, when ``scores`` has it, its similarity."""
    query_dir, gallery_dir = Path(query_dir), Path(gallery_dir)
    if queries is None or isinstance(queries, int):
        queries = pick_queries(list(rankings), queries, labels=labels, ground_truth=ground_truth)
    unknown = [q for q in queries if q not in rankings]
    if unknown:
        raise ValueError(f"query(ies) not in the submission: {unknown[:5]} (it has {len(rankings)} queries)")
    cut = {q: list(rankings[q])[:k] if k else list(rankings[q]) for q in queries}
    query_paths, ranked, correct = grid_inputs(cut, query_dir, gallery_dir, ground_truth, list(queries))
    row_scores = [list(scores[q])[: len(cut[q])] if scores and q in scores else None for q in queries]
    return plot_retrieval_grid(query_paths, ranked, row_scores, correct, thumb_size=thumb_size, title=title)


def plot_run(run: "RetrievalRun", queries: Sequence[str] | int | None = 8, k: int | None = None,
             **kwargs) -> "Figure":
    """:func:`plot_submission` of a :class:`helpers.pipeline.RetrievalRun`, with its similarities and ground truth."""
    return plot_submission(run.rankings, run.dataset.query_dir, run.dataset.gallery_dir, queries,
                           ground_truth=run.dataset.ground_truth, scores=run.scores, labels=run.dataset.labels, k=k,
                           title=kwargs.pop("title", run.run_name), **kwargs)


def save_submission_grids(
    rankings: Mapping[str, Sequence[str]],
    query_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    queries: Sequence[str] | int | None = 8,
    per_page: int = 8,
    prefix: str = "grid",
    **kwargs,
) -> list[Path]:
    """:func:`plot_submission` written as PNG pages of ``per_page`` queries: ``<prefix>_001.png``, ...
    (a single page is ``<prefix>.png``). ``kwargs`` go to :func:`plot_submission`."""
    if per_page < 1:
        raise ValueError("per_page must be at least 1")
    if queries is None or isinstance(queries, int):
        queries = pick_queries(list(rankings), queries, labels=kwargs.get("labels"),
                               ground_truth=kwargs.get("ground_truth"))
    queries = list(queries)
    pages = [queries[i : i + per_page] for i in range(0, len(queries), per_page)] or [[]]
    title = kwargs.pop("title", None)
    paths = []
    for number, page in enumerate(pages, start=1):
        name = f"{prefix}.png" if len(pages) == 1 else f"{prefix}_{number:03d}.png"
        page_title = title if len(pages) == 1 or not title else f"{title} ({number}/{len(pages)})"
        fig = plot_submission(rankings, query_dir, gallery_dir, page, title=page_title, **kwargs)
        paths.append(save_figure(fig, Path(out_dir) / name))
    return paths


def plot_run_comparison(
    rankings_a: Mapping[str, Sequence[str]],
    rankings_b: Mapping[str, Sequence[str]],
    query_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    queries: Sequence[str],
    ground_truth: Mapping[str, Sequence[str]] | None = None,
    names: tuple[str, str] = ("A", "B"),
    scores_a: Mapping[str, Sequence[float]] | None = None,
    scores_b: Mapping[str, Sequence[float]] | None = None,
    k: int | None = None,
    thumb_size: int = 112,
    title: str | None = None,
) -> "Figure":
    """Two runs on the same queries: for each query, a row with run A's top-k and a row with run B's top-k, the query
    image at the start of both rows, green/red borders where ground truth is known."""
    query_dir, gallery_dir = Path(query_dir), Path(gallery_dir)
    missing = [q for q in queries if q not in rankings_a or q not in rankings_b]
    if missing:
        raise ValueError(f"query(ies) not in both submissions: {missing[:5]}")
    cut = lambda r, q: list(r[q])[:k] if k else list(r[q])  # noqa: E731
    n_cols = 1 + max([len(cut(r, q)) for q in queries for r in (rankings_a, rankings_b)], default=0)
    n_rows = max(2 * len(queries), 1)
    fig, axes = subplots_figure(n_rows, n_cols, (1.4 * n_cols, 1.7 * n_rows))
    thumbs: dict = {}
    for i, query in enumerate(queries):
        relevant = set(ground_truth[query]) if ground_truth is not None and query in ground_truth else None
        for side, (rankings, run_scores, name) in enumerate(((rankings_a, scores_a, names[0]),
                                                             (rankings_b, scores_b, names[1]))):
            row = 2 * i + side
            ranked = cut(rankings, query)
            row_scores = list(run_scores[query]) if run_scores and query in run_scores else None
            _draw_tile(axes[row][0], query_dir / query, f"query\n{_short(query)}", QUERY_COLOR, thumb_size, thumbs)
            axes[row][0].set_ylabel(_short(name, 16), fontsize=7, rotation=0, ha="right", va="center")
            for col in range(1, n_cols):
                j = col - 1
                if j >= len(ranked):
                    _draw_tile(axes[row][col], None, "", None, thumb_size)
                    continue
                verdict = None if relevant is None else ranked[j] in relevant
                similarity = f" {row_scores[j]:.3f}" if row_scores is not None and j < len(row_scores) else ""
                _draw_tile(axes[row][col], gallery_dir / ranked[j], f"#{j + 1}{similarity}\n{_short(ranked[j])}",
                           _verdict_color(verdict), thumb_size, thumbs)
    add_legend(fig, verdicts=ground_truth is not None and any(q in ground_truth for q in queries))
    layout_with_legend(fig, title)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Several runs: pair similarities, side by side
# ----------------------------------------------------------------------------------------------------------------
def plot_pair_similarities(runs: Mapping[str, "RetrievalRun"], bins: int = 40) -> "Figure":
    """One histogram panel per run: similarities of same-class against different-class pairs, AUC in the title."""
    from .metrics import pair_similarities

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
    (:func:`pick_queries`) among those every run ranked. Built on :func:`plot_retrieval_grid`.
    """
    from .data import load_retrieval_set

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
