"""Verbs: report (compare runs), show (look at a submission: PNG grids, HTML page, two runs side by side)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_data, positive_int

from ..show import DEFAULT_SHOW_DIR, DEFAULT_SHOWN
from ..settings import output_dir

DEFAULT_REPORT_DIR = str(output_dir("visualizations") / "report")


def _queries_arg(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        return positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="compare every run of a results folder: tables, grouped views, bar charts, failure analysis",
        description="Read every metrics JSON of a results folder (malformed or foreign JSON files are reported and "
                    "skipped) and write into --out: comparison.csv/.md (one row a run), by_model/pooling/"
                    "finetuning/options.csv, bar_weighted_score/hit1/map10.png, failures_<run>_*.csv (and a PNG of "
                    "the worst queries) where a run's submission and ground truth are found, compare_<a>__vs__<b>.csv "
                    "(and .png) for the best two runs on the same queries, and report.md with all of it.")
    p.add_argument("--results", default=str(output_dir("results")), metavar="DIR",
                   help="folder of metrics JSON files, searched recursively (default: %(default)s)")
    p.add_argument("--out", default=DEFAULT_REPORT_DIR, metavar="DIR",
                   help="output folder, files written directly into it (default: %(default)s)")
    p.add_argument("--worst", type=positive_int, default=10, metavar="N",
                   help="worst queries listed per run (default: %(default)s)")
    p.add_argument("--no-failures", action="store_true", help="skip the failure analysis and run comparison")
    p.add_argument("--no-images", action="store_true",
                   help="no image grids of the worst queries and of the two compared runs (tables and charts only)")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "show", help="look at a submission: query-vs-top-k PNG grids, an HTML page, two runs side by side",
        description="PNG grids of queries beside their top-k (rank and similarity under each image; green/red borders "
                    "where ground truth is known). Similarities: read from --scores, else recomputed with --model "
                    "when given, else read from the sidecar <submission>.scores.json that `retrieve` writes beside "
                    "its submission; otherwise only the rank is shown.")
    p.add_argument("--submission", required=True, metavar="FILE", help="submission in dict or list format")
    add_data(p, help_text="dataset folder with test/query and test/gallery (default: %(default)s)")
    p.add_argument("--ground-truth", metavar="FILE",
                   help="{query: [relevant names]} (default: DIR/test/ground_truth.json when present; 'none' to "
                        "ignore it)")
    p.add_argument("--queries", type=_queries_arg, default=argparse.SUPPRESS, metavar="N|all",
                   help=f"how many queries, spread over the classes, or all (default: {DEFAULT_SHOWN} for the PNG "
                        "grids; the HTML page covers all)")
    p.add_argument("--query", action="append", metavar="NAME", help="show this query (repeatable)")
    p.add_argument("--k", type=positive_int, default=None, help="ranked images shown per query (default: all)")
    p.add_argument("--per-page", type=positive_int, default=8, metavar="N",
                   help="queries per PNG page (default: %(default)s)")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default: {DEFAULT_SHOW_DIR}/<submission name>)")
    p.add_argument("--html", action="store_true", help="also write one self-contained HTML page <name>.html")
    p.add_argument("--compare", metavar="OTHER_SUBMISSION",
                   help="a second submission on the same queries: side-by-side grids of the queries where only one "
                        "of them is right at rank 1 (or where their top-1 differs, without ground truth) and a CSV")
    p.add_argument("--scores", metavar="FILE", help="{query: [similarities]} for the submission")
    p.add_argument("--model", metavar="NAME", help="recompute similarities with this registered model")
    p.add_argument("--weights", default="pretrained", metavar="pretrained|none|PATH",
                   help="weights of --model (default: %(default)s)")
    p.add_argument("--device", default="auto", help="device for --model (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="default: %(default)s")
    p.add_argument("--tta", choices=("none", "flip", "multiscale"), default="none",
                   help="test-time augmentation for --model (default: %(default)s)")
    p.set_defaults(func=cmd_show)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    outputs = write_report(args.results, args.out, n_worst=args.worst, failure=not args.no_failures,
                           images=not args.no_images)
    table = outputs.table
    print(f"{len(table)} run(s) from {args.results}; {len(outputs.skipped)} file(s) skipped")
    columns = [c for c in ("run", "model", "weighted_score", "hit@1", "map@10") if c in table.columns]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if outputs.analysed:
        print(f"failure analysis: {', '.join(outputs.analysed)}")
    for run, reason in outputs.not_analysed.items():
        print(f"note: {run}: no failure analysis, {reason}", file=sys.stderr)
    if outputs.comparison is not None:
        c = outputs.comparison
        print(f"{c.name_a} vs {c.name_b}: {c.summary()}")
    print(f"written to {outputs.out_dir}: {', '.join(p.name for p in outputs.files)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..show import ShowOptions, show_submission

    shown = getattr(args, "queries", DEFAULT_SHOWN)
    options = ShowOptions(
        submission=args.submission, data=args.data, ground_truth=args.ground_truth, queries=shown,
        html_queries=getattr(args, "queries", None), query=args.query, k=args.k, per_page=args.per_page,
        out=args.out, html=args.html, compare=args.compare, scores=args.scores, model=args.model,
        weights=args.weights, device=args.device, batch_size=args.batch_size, tta=args.tta)
    outputs = show_submission(options)
    for note in outputs.notes:
        print(f"note: {note}", file=sys.stderr)
    for line in outputs.lines:
        print(line)
    return 0
