"""One self-contained HTML page per run: every query beside its top-k as small embedded thumbnails.

The page needs no server and no network: thumbnails are base64 JPEGs inside the page (each image once, in a CSS
class, however often it is ranked), a little inline JavaScript sorts the queries by their score and filters the
failures; ``page.html#sort=weighted`` (or ``ap``, ``top1sim``, ``query``, with ``-desc`` for descending) opens it
sorted. The run's metrics are at the top. Borders are green (relevant) or red (not) where ground truth is known.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .data import ImageLoadError, load_image
from .fileio import write_text
from .metrics import evaluate_rankings, query_metrics

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 6px}.sub{color:#666;font-size:12px;margin-bottom:10px}
table.metrics{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
table.metrics td,table.metrics th{border:1px solid #ddd;padding:3px 9px;text-align:right;background:#fff}
.controls{position:sticky;top:0;background:#fafafa;padding:6px 0;border-bottom:1px solid #ddd;font-size:13px;z-index:2}
.controls button{margin-right:4px}.controls .count{color:#666;margin-left:8px}
.q{display:flex;flex-wrap:wrap;align-items:flex-start;gap:6px;padding:8px 0;border-bottom:1px solid #eee}
.qinfo{width:120px;flex:none;font-size:11px;word-break:break-all}.qinfo b{font-size:12px}
.cell{width:{T}px;flex:none;text-align:center;font-size:10px;line-height:1.25;word-break:break-all}
.t{display:block;width:{T}px;height:{T}px;background-size:contain;background-repeat:no-repeat;
background-position:center;background-color:#fff;box-sizing:border-box;border:4px solid #fff}
.query .t{border-color:#2c7bb6}.ok .t{border-color:#1a9641}.bad .t{border-color:#d7191c}
.score{display:inline-block;padding:1px 5px;border-radius:3px;background:#eee;margin-top:3px}
.fail .score{background:#f4c7c3}.pass .score{background:#c7e9c0}
"""

_SCRIPT = """
function sortBy(key, desc){
  const box=document.getElementById('queries');
  const items=[...box.children];
  items.sort((a,b)=>{
    let x=a.dataset[key], y=b.dataset[key];
    if(key!=='query'){x=parseFloat(x); y=parseFloat(y); if(isNaN(x)) x=-Infinity; if(isNaN(y)) y=-Infinity;}
    const c = x<y?-1:(x>y?1:0);
    return (desc?-c:c) || (a.dataset.query<b.dataset.query?-1:1);
  });
  items.forEach(e=>box.appendChild(e));
}
function applyHash(){
  // deep link: page.html#sort=weighted (ascending) or #sort=weighted-desc; keys: weighted, ap, top1sim, query
  const m = /sort=([a-z0-9]+)(-desc)?/.exec(location.hash);
  if(m) sortBy(m[1], !!m[2]);
}
document.addEventListener('DOMContentLoaded', applyHash);
window.addEventListener('hashchange', applyHash);
function onlyFailures(on){
  let shown=0;
  document.querySelectorAll('#queries .q').forEach(e=>{
    const hide = on && e.dataset.hit1==='1';
    e.style.display = hide ? 'none' : ''; if(!hide) shown++;});
  document.getElementById('count').textContent = shown + ' shown';
}
"""


def _thumb_data_uri(path: Path, size: int, quality: int) -> str:
    """A small JPEG thumbnail as a ``data:`` URI; an unreadable file becomes a grey tile."""
    from PIL import Image

    try:
        image = load_image(path)
        image.thumbnail((size, size))
    except (ImageLoadError, OSError):
        image = Image.new("RGB", (size, size), (150, 150, 150))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.{digits}f}"


class _Thumbs:
    """Each image once: a CSS class per path, its data URI written once in the style sheet."""

    def __init__(self) -> None:
        self.classes: dict[Path, str] = {}

    def css_class(self, path: Path) -> str:
        return self.classes.setdefault(path, f"i{len(self.classes)}")

    def css(self, size: int, quality: int) -> str:
        return "\n".join(f".{cls}{{background-image:url({_thumb_data_uri(path, size, quality)})}}"
                         for path, cls in self.classes.items())


def _query_card(query: str, ranked: list[str], query_dir: Path, gallery_dir: Path, relevant: set | None,
                row_scores: list | None, metric_k: int, has_ground_truth: bool, thumbs: _Thumbs) -> str:
    """One query's card: its thumbnail, the ranked images with rank, similarity and a green/red verdict."""
    per_query = query_metrics(ranked, relevant, k=metric_k) if relevant else None
    attrs = {"query": query,
             "weighted": _fmt(per_query["weighted_score"], 1) if per_query else "",
             "ap": _fmt(per_query["map@10"], 4) if per_query else "",
             "hit1": str(int(per_query["hit@1"])) if per_query else "",
             "top1sim": _fmt(row_scores[0], 4) if row_scores else ""}
    state = "" if per_query is None else (" pass" if per_query["hit@1"] else " fail")
    data = " ".join(f'data-{key}="{html.escape(value, quote=True)}"' for key, value in attrs.items())
    parts = [f'<div class="q{state}" {data}>', f'<div class="qinfo"><b>{html.escape(query)}</b><br>']
    if per_query:
        parts.append(f'<span class="score">score {attrs["weighted"]} &middot; AP@10 {_fmt(per_query["map@10"])}'
                     f'</span><br>{len(relevant)} relevant')
    elif relevant is None and has_ground_truth:
        parts.append('<span class="score">no ground truth</span>')
    parts.append("</div>")
    parts.append(f'<div class="cell query"><span class="t {thumbs.css_class(query_dir / query)}" role="img" '
                 f'title="{html.escape(query, quote=True)}"></span>query</div>')
    for rank, name in enumerate(ranked, start=1):
        verdict = "" if relevant is None else (" ok" if name in relevant else " bad")
        similarity = f" &middot; {_fmt(row_scores[rank - 1])}" if row_scores and rank <= len(row_scores) else ""
        parts.append(f'<div class="cell ranked{verdict}" data-name="{html.escape(name, quote=True)}" '
                     f'data-rank="{rank}"><span class="t {thumbs.css_class(gallery_dir / name)}" role="img" '
                     f'title="{html.escape(name, quote=True)}"></span>#{rank}{similarity}<br>'
                     f'{html.escape(name)}</div>')
    parts.append("</div>")
    return "".join(parts)


def _header(metrics: dict | None, has_ground_truth: bool, has_scores: bool) -> tuple[str, list[str]]:
    """The metrics table (or the no-ground-truth note) and the sort buttons."""
    header_rows = ""
    if metrics:
        header_rows = ("<table class='metrics'><tr>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
                       + "</tr><tr>" + "".join(f"<td>{_fmt(v, 1 if m == 'weighted_score' else 4)}</td>"
                                               for m, v in metrics.items()) + "</tr></table>")
    elif not has_ground_truth:
        header_rows = "<p class='sub'>No ground truth: no metrics, no green/red borders.</p>"
    buttons = []
    if metrics is not None:
        buttons += ['<button onclick="sortBy(\'weighted\',false)">score: worst first</button>',
                    '<button onclick="sortBy(\'weighted\',true)">score: best first</button>',
                    '<button onclick="sortBy(\'ap\',false)">AP@10: worst first</button>']
    if has_scores:
        buttons.append('<button onclick="sortBy(\'top1sim\',true)">top-1 similarity</button>')
    buttons.append('<button onclick="sortBy(\'query\',false)">name</button>')
    if metrics is not None:
        buttons.append('<label><input type="checkbox" onchange="onlyFailures(this.checked)"> only queries wrong at '
                       'rank 1</label>')
    return header_rows, buttons


def build_html_report(
    rankings: Mapping[str, Sequence[str]],
    query_dir: str | os.PathLike,
    gallery_dir: str | os.PathLike,
    ground_truth: Mapping[str, Sequence[str]] | None = None,
    scores: Mapping[str, Sequence[float]] | None = None,
    queries: Sequence[str] | None = None,
    k: int | None = None,
    title: str = "retrieval run",
    info: Mapping[str, Any] | None = None,
    thumb_size: int = 96,
    quality: int = 70,
) -> str:
    """The page as a string. ``queries`` None covers every query of ``rankings``; ``k`` cuts each ranking.

    Per query: its thumbnail, then each ranked name with rank, similarity (when ``scores`` has it) and a green/red
    border when ``ground_truth`` knows the query; the query's weighted score and AP@10 (ground truth) let the page be
    sorted. Metrics over the shown queries (and ``info``, e.g. model and data) are at the top.
    """
    query_dir, gallery_dir = Path(query_dir), Path(gallery_dir)
    chosen = list(queries) if queries is not None else list(rankings)
    unknown = [q for q in chosen if q not in rankings]
    if unknown:
        raise ValueError(f"query(ies) not in the submission: {unknown[:5]}")
    cut = {q: (list(rankings[q])[:k] if k else list(rankings[q])) for q in chosen}
    metric_k = k or max((len(r) for r in cut.values()), default=10)
    metrics = None
    if ground_truth is not None:
        evaluation = evaluate_rankings({q: cut[q] for q in chosen}, {q: ground_truth[q] for q in chosen
                                                                     if q in ground_truth}, k=metric_k)
        metrics = evaluation.metrics if evaluation.n_queries else None
    thumbs = _Thumbs()
    cards = [_query_card(query, cut[query], query_dir, gallery_dir,
                         set(ground_truth[query]) if ground_truth is not None and query in ground_truth else None,
                         list(scores[query]) if scores is not None and query in scores else None,
                         metric_k, ground_truth is not None, thumbs) for query in chosen]
    header_rows, buttons = _header(metrics, ground_truth is not None, scores is not None)
    details = dict(info or {})
    details.update({"queries": len(chosen),
                    "gallery images shown": sum(1 for p in thumbs.classes if p.parent == gallery_dir)})
    sub = " &middot; ".join(f"{html.escape(str(key))}: {html.escape(str(value))}" for key, value in details.items())
    style = _STYLE.replace("{T}", str(thumb_size))
    run_data = json.dumps({"title": title, "metrics": metrics, "queries": chosen}).replace("</", "<\\/")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{style}\n{thumbs.css(thumb_size, quality)}</style>",
        "</head><body>", f"<h1>{html.escape(title)}</h1>", f'<div class="sub">{sub}</div>', header_rows,
        f'<div class="controls">sort: {" ".join(buttons)}<span class="count" id="count">{len(chosen)} shown</span>'
        "</div>",
        f'<div id="queries">{"".join(cards)}</div>',
        f"<script>{_SCRIPT}</script>",
        f'<script type="application/json" id="run-data">{run_data}'
        "</script>",
        "</body></html>",
    ])


def write_html_report(path: str | os.PathLike, *args, **kwargs) -> Path:
    """Write :func:`build_html_report` (same arguments) atomically to ``path``."""
    return write_text(path, build_html_report(*args, **kwargs))


def write_run_html(run, path: str | os.PathLike, **kwargs) -> Path:
    """The page of a :class:`helpers.pipeline.RetrievalRun` (every query, its similarities and ground truth)."""
    info = {"model": run.model_name, "data": str(run.dataset.root)}
    return write_html_report(path, run.rankings, run.dataset.query_dir, run.dataset.gallery_dir,
                             ground_truth=run.dataset.ground_truth, scores=run.scores,
                             title=kwargs.pop("title", run.run_name), info=info, **kwargs)
