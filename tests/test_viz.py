"""Grids (borders against ground truth), query choice, the show verb, the HTML page (every query and image)."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from helpers.cli import main as cli_main
from helpers.data import load_retrieval_set
from helpers.html_report import build_html_report, write_html_report
from helpers.metrics import evaluate_rankings
from helpers.submission import load_submission
from helpers.viz import (CORRECT_COLOR, QUERY_COLOR, WRONG_COLOR, load_scores, pick_queries, plot_run_comparison,
                         plot_submission, scores_sidecar_path, similarities_from_model)

from .test_report import produce_runs

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, drawn_split, request) -> Path:
    return produce_runs(tmp_path_factory.getbasetemp(), drawn_split, lambda: request.getfixturevalue("lite0"))


@pytest.fixture(scope="module")
def lite_run(runs, drawn_split):
    submission = runs / "submissions" / "tiny_lite0_none.json"
    return submission, load_submission(submission), load_retrieval_set(drawn_split)


def _border(ax) -> tuple | None:
    spines = list(ax.spines.values())
    if not spines[0].get_visible():
        return None
    colors = {tuple(np.round(s.get_edgecolor(), 3)) for s in spines}
    assert len(colors) == 1
    return colors.pop()


def _rgba(color: str) -> tuple:
    return tuple(np.round(to_rgba(color), 3))


def test_grid_borders_match_the_ground_truth(lite_run):
    submission, rankings, dataset = lite_run
    scores = load_scores(scores_sidecar_path(submission))
    queries = pick_queries(list(rankings), 6, labels=dataset.labels)
    fig = plot_submission(rankings, dataset.query_dir, dataset.gallery_dir, queries,
                          ground_truth=dataset.ground_truth, scores=scores)
    n_cols = 11
    assert len(fig.axes) == len(queries) * n_cols
    n_red = 0
    for row, query in enumerate(queries):
        relevant = set(dataset.ground_truth[query])
        assert _border(fig.axes[row * n_cols]) == _rgba(QUERY_COLOR)
        for rank, name in enumerate(rankings[query], start=1):
            ax = fig.axes[row * n_cols + rank]
            expected = CORRECT_COLOR if name in relevant else WRONG_COLOR
            n_red += name not in relevant
            assert _border(ax) == _rgba(expected), (query, rank, name)
            assert ax.get_xlabel().startswith(f"#{rank} {scores[query][rank - 1]:.3f}")
    assert n_red > 0  # the tiny split has 4 relevant names for 10 ranks: both colours are exercised
    without = plot_submission(rankings, dataset.query_dir, dataset.gallery_dir, queries[:2], k=3)
    assert len(without.axes) == 2 * 4
    assert all(_border(ax) is None for i, ax in enumerate(without.axes) if i % 4)
    assert without.axes[1].get_xlabel().startswith("#1\n")  # no scores: the rank only


def test_pick_queries_spreads_over_classes(lite_run):
    _, rankings, dataset = lite_run
    names = list(rankings)
    labels = dataset.labels["query"]
    chosen = pick_queries(names, 10, labels=dataset.labels)
    assert len(chosen) == 10 and len({labels[q] for q in chosen}) == 10
    chosen = pick_queries(names, 15, labels=dataset.labels)
    assert len(set(chosen)) == 15 and max(np.unique([labels[q] for q in chosen], return_counts=True)[1]) == 2
    derived = pick_queries(names, 10, ground_truth=dataset.ground_truth)
    assert len({labels[q] for q in derived}) == 10
    assert pick_queries(names, 4) == [names[0], names[5], names[10], names[15]]
    assert pick_queries(names, None) == names and pick_queries(names, 100) == names


def test_similarities_recomputed_with_the_model_equal_the_runs(lite_run):
    submission, rankings, dataset = lite_run
    stored = load_scores(scores_sidecar_path(submission))
    queries = list(rankings)[:3]
    recomputed = similarities_from_model(rankings, dataset.query_dir, dataset.gallery_dir, "efficientnet-lite0",
                                         queries=queries, device="cpu")
    for q in queries:
        np.testing.assert_allclose(recomputed[q], stored[q], atol=1e-4)


class _PageParser(HTMLParser):
    """Collects the query cards, their ranked cells and thumbnail classes, and the page's CSS."""

    def __init__(self):
        super().__init__()
        self.cards: list[dict] = []
        self.style = ""
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "style":
            self._in_style = True
        if tag == "div" and "q" in classes:
            self.cards.append({"query": attrs["data-query"], "attrs": attrs, "cells": [], "thumbs": []})
        if tag == "div" and "ranked" in classes:
            verdict = "ok" if "ok" in classes else "bad" if "bad" in classes else None
            self.cards[-1]["cells"].append((attrs["data-name"], int(attrs["data-rank"]), verdict))
        if tag == "span" and "t" in classes:
            self.cards[-1]["thumbs"].append(([c for c in classes if c != "t"][0], attrs["title"]))

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def test_html_page_holds_every_query_and_image(lite_run, tmp_path):
    submission, rankings, dataset = lite_run
    scores = load_scores(scores_sidecar_path(submission))
    page = write_html_report(tmp_path / "run.html", rankings, dataset.query_dir, dataset.gallery_dir,
                             ground_truth=dataset.ground_truth, scores=scores, title="lite0")
    parser = _PageParser()
    parser.feed(page.read_text())
    assert [card["query"] for card in parser.cards] == list(rankings)
    thumbs = dict(re.findall(r"\.(i\d+)\{background-image:url\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)\}",
                             parser.style))
    evaluation = evaluate_rankings(rankings, dataset.ground_truth)
    per_query = {row["query"]: row for row in evaluation.per_query}
    seen_names: dict[str, str] = {}
    for card in parser.cards:
        query, relevant = card["query"], set(dataset.ground_truth[card["query"]])
        assert [(n, r) for n, r, _ in card["cells"]] == [(n, r) for r, n in enumerate(rankings[query], start=1)]
        assert [v for _, _, v in card["cells"]] == ["ok" if n in relevant else "bad" for n in rankings[query]]
        assert [title for _, title in card["thumbs"]] == [query] + rankings[query]
        assert float(card["attrs"]["data-weighted"]) == per_query[query]["weighted_score"]
        assert float(card["attrs"]["data-top1sim"]) == pytest.approx(scores[query][0], abs=1e-4)
        for cls, title in card["thumbs"]:
            assert seen_names.setdefault(title, cls) == cls  # each image embedded once, reused by class
    assert set(seen_names.values()) == set(thumbs)
    for cls, data in list(thumbs.items())[:5]:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "JPEG" and max(image.size) <= 96
    text = page.read_text()
    assert f"<td>{evaluation.metrics['weighted_score']:.1f}</td>" in text and "sortBy('weighted'" in text
    assert "http://" not in text and "https://" not in text  # self-contained


def test_html_without_ground_truth_has_no_verdicts(lite_run):
    _, rankings, dataset = lite_run
    parser = _PageParser()
    parser.feed(build_html_report(rankings, dataset.query_dir, dataset.gallery_dir, queries=list(rankings)[:3], k=4))
    assert len(parser.cards) == 3 and all(len(c["cells"]) == 4 for c in parser.cards)
    assert all(v is None for c in parser.cards for _, _, v in c["cells"])


def test_show_verb_writes_pages_html_and_comparison(runs, drawn_split, tmp_path, capsys):
    submission = runs / "submissions" / "tiny_lite0_none.json"
    other = runs / "submissions" / "tiny_resnet18_random.json"
    out = tmp_path / "show"
    assert cli_main(["show", "--submission", str(submission), "--data", str(drawn_split), "--out", str(out),
                     "--queries", "all", "--per-page", "8", "--k", "5", "--html", "--compare", str(other)]) == 0
    stdout = capsys.readouterr().out
    pages = sorted(out.glob("tiny_lite0_none_grid_*.png"))
    assert len(pages) == 3  # 20 queries, 8 a page
    assert "similarities from" in stdout and "green/red borders" in stdout
    parser = _PageParser()
    parser.feed((out / "tiny_lite0_none.html").read_text())
    assert len(parser.cards) == 20
    assert list(out.glob("compare_tiny_lite0_none__vs__tiny_resnet18_random*.png"))
    compare = (out / "compare_tiny_lite0_none__vs__tiny_resnet18_random.csv").read_text()
    assert "only tiny_lite0_none" in compare

    single = tmp_path / "single"
    query = next(iter(load_submission(submission)))
    assert cli_main(["show", "--submission", str(submission), "--data", str(drawn_split), "--out", str(single),
                     "--query", query, "--ground-truth", "none"]) == 0
    assert [p.name for p in single.iterdir()] == ["tiny_lite0_none_grid.png"]
    assert "no ground truth" in capsys.readouterr().out
    assert cli_main(["show", "--submission", str(submission), "--data", str(drawn_split), "--query", "nope.jpg",
                     "--out", str(single)]) == 2
    assert "error: --query 'nope.jpg' is not in the submission" in capsys.readouterr().err


def test_run_comparison_figure_borders(runs, lite_run):
    _, rankings, dataset = lite_run
    other = load_submission(runs / "submissions" / "tiny_resnet18_random.json")
    queries = list(rankings)[:2]
    fig = plot_run_comparison(rankings, other, dataset.query_dir, dataset.gallery_dir, queries,
                              ground_truth=dataset.ground_truth, names=("lite0", "random"), k=5)
    n_cols = 6
    for i, query in enumerate(queries):
        relevant = set(dataset.ground_truth[query])
        for side, ranked in enumerate((rankings[query], other[query])):
            row = 2 * i + side
            for rank, name in enumerate(ranked[:5], start=1):
                expected = CORRECT_COLOR if name in relevant else WRONG_COLOR
                assert _border(fig.axes[row * n_cols + rank]) == _rgba(expected)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_html_page_renders_in_headless_chromium(runs, lite_run, tmp_path):
    _, _, dataset = lite_run
    # the random-weight run: its queries score differently (lite0 gets every drawn query right)
    rankings = load_submission(runs / "submissions" / "tiny_resnet18_random.json")
    page = write_html_report(tmp_path / "page.html", rankings, dataset.query_dir, dataset.gallery_dir,
                             ground_truth=dataset.ground_truth, queries=list(rankings)[:4], title="chromium check")
    shot = tmp_path / "shot.png"
    def flags(profile: str) -> list[str]:
        return [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / profile}"]

    subprocess.run([*flags("profile1"), "--window-size=1200,800", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=180, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (800, 1200)
    green = np.all(np.abs(pixels - np.array([0x1A, 0x96, 0x41])) < 12, axis=-1).sum()
    red = np.all(np.abs(pixels - np.array([0xD7, 0x19, 0x1C])) < 12, axis=-1).sum()
    assert green > 500 and red > 500  # the borders were drawn: the page rendered with its embedded thumbnails
    assert pixels.std() > 30

    # the inline script sorts: #sort=weighted opens the page worst query first
    dom = subprocess.run([*flags("profile2"), "--dump-dom", page.as_uri() + "#sort=weighted"], capture_output=True,
                         text=True, timeout=180, check=False).stdout
    order = re.findall(r'class="q (?:pass|fail)" data-query="([^"]+)" data-weighted="([0-9.]+)"', dom)
    assert [q for q, _ in order] and sorted(q for q, _ in order) == sorted(list(rankings)[:4])
    weighted = [float(w) for _, w in order]
    assert weighted == sorted(weighted) and weighted != [float(w) for w in _weighted_in_page_order(page)]


def _weighted_in_page_order(page: Path) -> list[str]:
    parser = _PageParser()
    parser.feed(page.read_text())
    return [card["attrs"]["data-weighted"] for card in parser.cards]


def test_grid_has_a_colour_legend_below_the_images(lite_run):
    _, rankings, dataset = lite_run
    queries = list(rankings)[:3]
    fig = plot_submission(rankings, dataset.query_dir, dataset.gallery_dir, queries,
                          ground_truth=dataset.ground_truth, k=4)
    (legend,) = fig.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == ["query", "relevant", "not relevant"]
    colours = [_rgba_of(handle.get_edgecolor()) for handle in legend.legend_handles]
    assert colours == [_rgba(QUERY_COLOR), _rgba(CORRECT_COLOR), _rgba(WRONG_COLOR)]
    assert "#rank similarity" in legend.get_title().get_text()
    fig.canvas.draw()
    legend_top = legend.get_window_extent().y1
    assert all(ax.get_window_extent().y0 >= legend_top for ax in fig.axes)  # nothing hidden behind the legend
    without = plot_submission(rankings, dataset.query_dir, dataset.gallery_dir, queries, k=4)
    assert [text.get_text() for text in without.legends[0].get_texts()] == ["query"]


def _rgba_of(colour) -> tuple:
    return tuple(np.round(to_rgba(colour), 3))


def test_plots_never_switch_the_users_backend(lite_run, tmp_path):
    import matplotlib

    from helpers.report import plot_metric_bars
    from helpers.viz import save_figure

    _, rankings, dataset = lite_run
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        queries = list(rankings)[:2]
        fig = plot_submission(rankings, dataset.query_dir, dataset.gallery_dir, queries,
                              ground_truth=dataset.ground_truth)
        save_figure(fig, tmp_path / "grid.png")
        import pandas as pd

        plot_metric_bars(pd.DataFrame({"run": ["a", "b"], "model": ["m", "m"], "weighted_score": [1.0, 2.0]}))
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
