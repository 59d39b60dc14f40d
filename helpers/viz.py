"""Query-versus-top-k grids: each query beside its ranked gallery images, green/red borders where truth is known."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .data import ImageLoadError, load_image
from .fileio import write_bytes

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .pipeline import RetrievalRun

CORRECT_COLOR = "#1a9641"
WRONG_COLOR = "#d7191c"
QUERY_COLOR = "#2c7bb6"


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


def plot_retrieval_grid(
    queries: Sequence[Path],
    ranked: Sequence[Sequence[Path]],
    scores: Sequence[Sequence[float]] | None = None,
    correct: Sequence[Sequence[bool | None]] | None = None,
    thumb_size: int = 128,
    title: str | None = None,
) -> "Figure":
    """A matplotlib Figure: one row per query, the query then its ranked images with rank and similarity.

    ``correct[i][j]`` True/False draws a green/red border; None draws none (no ground truth).
    """
    import matplotlib

    if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(queries)
    n_cols = 1 + max((len(r) for r in ranked), default=0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.45 * n_cols, 1.75 * n_rows), squeeze=False)
    for row, query in enumerate(queries):
        for col in range(n_cols):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col == 0:
                path, color, label = Path(query), QUERY_COLOR, f"query\n{_short(Path(query).name)}"
            elif col - 1 < len(ranked[row]):
                j = col - 1
                path = Path(ranked[row][j])
                verdict = correct[row][j] if correct is not None else None
                color = None if verdict is None else (CORRECT_COLOR if verdict else WRONG_COLOR)
                similarity = f" {scores[row][j]:.3f}" if scores is not None else ""
                label = f"#{j + 1}{similarity}\n{_short(path.name)}"
            else:
                continue
            ax.imshow(_thumbnail(path, thumb_size))
            ax.set_xlabel(label, fontsize=6.5)
            if color is not None:
                for spine in ax.spines.values():
                    spine.set_visible(True)
                    spine.set_edgecolor(color)
                    spine.set_linewidth(3.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 3] + "..."


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
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
    """A PNG grid of the first ``max_queries`` queries of a run."""
    queries = list(run.rankings)[:max_queries]
    query_paths, ranked, correct = grid_inputs(
        run.rankings, run.dataset.query_dir, run.dataset.gallery_dir, run.dataset.ground_truth, queries
    )
    scores = [run.scores[q] for q in queries]
    fig = plot_retrieval_grid(query_paths, ranked, scores, correct, title=run.run_name)
    return save_figure(fig, path)
