"""Verbs: report (compare runs), show (look at a submission: PNG grids, HTML page, two runs side by side)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_data, positive_int

DEFAULT_REPORT_DIR = "visualizations/report"
DEFAULT_SHOW_DIR = "visualizations/show"
DEFAULT_SHOWN = 8


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
    p.add_argument("--results", default="results", metavar="DIR",
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


def _ground_truth(args: argparse.Namespace, dataset) -> dict | None:
    from ..data import load_ground_truth

    if args.ground_truth and args.ground_truth.lower() == "none":
        return None
    if args.ground_truth:
        return load_ground_truth(args.ground_truth)
    return dataset.ground_truth


def cmd_show(args: argparse.Namespace) -> int:
    from ..data import load_retrieval_set
    from ..report import compare_runs
    from ..submission import load_submission
    from ..viz import (load_scores, pick_queries, plot_run_comparison, save_figure, save_submission_grids,
                       scores_sidecar_path, similarities_from_model)

    rankings = load_submission(args.submission)
    if not rankings:
        raise ValueError(f"submission {args.submission} holds no query")
    dataset = load_retrieval_set(args.data)
    ground_truth = _ground_truth(args, dataset)
    labels = dataset.labels if ground_truth is dataset.ground_truth else None
    missing = [q for q in rankings if not (dataset.query_dir / q).exists()]
    if len(missing) == len(rankings):
        raise ValueError(f"no query of {args.submission} is in {dataset.query_dir}: is --data the dataset of this "
                         "submission?")
    if missing:
        print(f"note: {len(missing)} query(ies) of the submission are not in {dataset.query_dir} (grey tiles): "
              f"{missing[:3]}", file=sys.stderr)

    asked = getattr(args, "queries", DEFAULT_SHOWN)
    if args.query:
        unknown = [q for q in args.query if q not in rankings]
        if unknown:
            raise ValueError(f"--query {unknown[0]!r} is not in the submission (e.g. {next(iter(rankings))!r})")
        grid_queries = html_queries = list(args.query)
    else:
        grid_queries = pick_queries(list(rankings), asked, labels=labels, ground_truth=ground_truth)
        html_queries = pick_queries(list(rankings), getattr(args, "queries", None), labels=labels,
                                    ground_truth=ground_truth)

    stem = Path(args.submission).stem
    out = Path(args.out) if args.out else Path(DEFAULT_SHOW_DIR) / stem
    scores, scores_from = None, "rank only (no scores file; pass --model to recompute similarities)"
    sidecar = Path(args.scores) if args.scores else scores_sidecar_path(args.submission)
    if args.scores or (sidecar.exists() and not args.model):
        scores, scores_from = load_scores(sidecar), f"similarities from {sidecar}"
    elif args.model:
        needed = sorted(set(grid_queries) | (set(html_queries) if args.html else set()))
        scores = similarities_from_model(rankings, dataset.query_dir, dataset.gallery_dir, model=args.model,
                                         weights=args.weights, queries=needed, device=args.device,
                                         batch_size=args.batch_size, tta=args.tta, progress=True)
        scores_from = f"similarities recomputed with {args.model}"

    common = dict(ground_truth=ground_truth, scores=scores, labels=labels, k=args.k)
    pages = save_submission_grids(rankings, dataset.query_dir, dataset.gallery_dir, out, grid_queries,
                                  per_page=args.per_page, prefix=f"{stem}_grid", title=stem, **common)
    print(f"{len(grid_queries)} of {len(rankings)} queries in {len(pages)} PNG page(s); {scores_from}; "
          + ("green/red borders from the ground truth" if ground_truth is not None else "no ground truth"))
    for page in pages:
        print(f"grid: {page}")

    if args.html:
        from ..html_report import write_html_report

        info = {"submission": args.submission, "data": str(dataset.root)}
        page = write_html_report(out / f"{stem}.html", rankings, dataset.query_dir, dataset.gallery_dir,
                                 ground_truth=ground_truth, scores=scores, queries=html_queries, k=args.k,
                                 title=stem, info=info)
        print(f"html: {page} ({len(html_queries)} queries)")

    if args.compare:
        from ..fileio import write_text

        other = load_submission(args.compare)
        other_stem = Path(args.compare).stem
        other_sidecar = scores_sidecar_path(args.compare)
        other_scores = load_scores(other_sidecar) if other_sidecar.exists() else None
        comparison = compare_runs(rankings, other, ground_truth, name_a=stem, name_b=other_stem,
                                  k=args.k or 10)
        print(f"{stem} vs {other_stem} on {len(comparison.frame)} shared queries: {comparison.summary()}")
        csv = write_text(out / f"compare_{stem}__vs__{other_stem}.csv", comparison.frame.to_csv(index=False))
        print(f"comparison: {csv}")
        differ = comparison.differing()
        if args.query:
            differ = [q for q in args.query if q in other]
        elif getattr(args, "queries", DEFAULT_SHOWN) is not None:
            differ = differ[: getattr(args, "queries", DEFAULT_SHOWN)]
        if not differ:
            print("the two runs rank every shared query the same: no side-by-side grid")
        for number, start in enumerate(range(0, len(differ), args.per_page), start=1):
            chunk = differ[start : start + args.per_page]
            fig = plot_run_comparison(rankings, other, dataset.query_dir, dataset.gallery_dir, chunk,
                                      ground_truth=ground_truth, names=(stem, other_stem), scores_a=scores,
                                      scores_b=other_scores, k=args.k,
                                      title=f"{stem} (upper row) vs {other_stem} (lower row)")
            suffix = "" if len(differ) <= args.per_page else f"_{number:03d}"
            print(f"side by side: {save_figure(fig, out / f'compare_{stem}__vs__{other_stem}{suffix}.png')}")
    return 0
