"""Verbs: models, demo, split, retrieve, evaluate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_k, add_model, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the registered model names")
    p.add_argument("--family", help="only this family")
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("demo", help="build the embedded demo dataset and run retrieval on it, offline")
    p.add_argument("--out", default="data/demo", metavar="DIR", help="where the demo dataset goes (default: %(default)s)")
    add_model(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("split", help="turn a class-folder dataset into the competition layout")
    p.add_argument("--source", required=True, metavar="CLASS_DIR", help="dataset as CLASS_DIR/<class>/<image>")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (training/, test/query, test/gallery)")
    p.add_argument("--train-per-class", type=int, default=None, metavar="T", help="default: all remaining images")
    p.add_argument("--query-per-class", type=positive_int, default=5, metavar="Q", help="default: %(default)s")
    p.add_argument("--gallery-per-class", type=positive_int, default=20, metavar="G", help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--holdout-classes", type=float, default=None, metavar="F",
                   help="instead: hold out this share of whole classes (at least 2) of --source (DIR/training) as "
                        "OUT/validation/ with ground truth and classes.json; the other classes stay for training")
    p.set_defaults(func=cmd_split)

    p = subparsers.add_parser("retrieve", help="rank the gallery for every query; evaluate if ground truth exists")
    add_config_options(p)
    p.set_defaults(func=cmd_retrieve)

    p = subparsers.add_parser("evaluate", help="score a submission file against ground truth")
    p.add_argument("--submission", required=True, metavar="FILE", help="submission in dict or list format")
    p.add_argument("--ground-truth", required=True, metavar="FILE", help="{query: [relevant gallery names]}")
    add_k(p)
    p.add_argument("--metrics-out", metavar="FILE", help="also write a metrics JSON here")
    p.add_argument("--gallery", metavar="DIR", help="gallery folder: report names that are not in it")
    p.set_defaults(func=cmd_evaluate)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import list_models

    from ..models import list_prefixes
    from .common import model_table

    specs = [s for s in list_models() if not args.family or s.family == args.family]
    print("\n".join(model_table(specs, () if args.family else list(list_prefixes().values()))))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import next_steps, run_demo
    from ..metrics import format_metrics_table

    outputs = run_demo(args.out, model=args.model, weights=args.weights, device=args.device)
    print(f"demo dataset: {outputs.data}")
    if outputs.metrics_values:
        print(format_metrics_table(outputs.metrics_values))
    print(f"submission:   {outputs.submission}")
    print(f"metrics:      {outputs.metrics}")
    print(f"grid:         {outputs.grid}")
    print("\n".join(next_steps()))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from ..data import split_dataset

    if args.holdout_classes is not None:
        return _split_holdout(args)
    summary = split_dataset(args.source, args.out, args.train_per_class, args.query_per_class,
                            args.gallery_per_class, args.seed)
    totals = summary.totals
    print(f"{len(summary.classes)} classes -> {summary.out_dir}: {totals.get('training', 0)} training, "
          f"{totals.get('query', 0)} query, {totals.get('gallery', 0)} gallery images"
          + (f"; {summary.renamed} renamed to <class>_<name> (shared basenames)" if summary.renamed else ""))
    print(f"ground truth: {summary.out_dir / 'test' / 'ground_truth.json'}")
    return 0


def _split_holdout(args: argparse.Namespace) -> int:
    from ..select import build_validation

    if not 0 < args.holdout_classes < 1:
        raise ValueError(f"--holdout-classes must be a share between 0 and 1, got {args.holdout_classes}")
    target = Path(args.out) / "validation"
    split, reused = build_validation(args.source, target, args.holdout_classes, args.seed)
    print(f"{len(split.held_out)} held-out classes ({', '.join(split.held_out)}) -> {target}: {len(split.query)} "
          f"query, {len(split.gallery)} gallery images{' (already there)' if reused else ''}; "
          f"{len(split.training)} classes stay for training")
    print(f"ground truth: {target / 'test' / 'ground_truth.json'}; classes: {target / 'classes.json'}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from ..metrics import format_metrics_table
    from ..pipeline import run_retrieval, save_run

    config = retrieve_config(args)
    if config.index_dir:
        return _retrieve_with_index(config)
    run = run_retrieval(config=config)
    outputs = save_run(run)
    skipped = len(run.query.skipped) + len(run.gallery.skipped)
    print(f"{len(run.rankings)} queries x {len(run.gallery.paths)} gallery images with {run.model_name}; "
          f"embeddings: {run.query.n_cached + run.gallery.n_cached} from cache, "
          f"{run.query.n_computed + run.gallery.n_computed} computed; {skipped} unreadable file(s) skipped; "
          f"{run.timings['total']:.1f} s")
    if run.evaluation is not None:
        for problem in run.evaluation.problems:
            print(f"note: {problem}", file=sys.stderr)
        print(format_metrics_table(run.evaluation.metrics))
    print(f"submission: {outputs.submission}")
    if outputs.metrics:
        print(f"metrics:    {outputs.metrics}")
    if outputs.grid:
        print(f"grid:       {outputs.grid}")
    return 0


def _retrieve_with_index(config) -> int:
    """``retrieve --index-dir``: the queries against a prebuilt collection index (see ``index build``)."""
    from ..collection.retrieve import run_index_retrieval
    from ..metrics import format_metrics_table

    run, written = run_index_retrieval(config)
    print(f"{len(run.rankings)} queries against the index {config.index_dir} ({run.config['model']}, "
          f"{run.config['index']}); {len(run.skipped)} unreadable query file(s) skipped; {run.seconds:.1f} s")
    if run.evaluation is not None:
        for problem in run.evaluation.problems:
            print(f"note: {problem}", file=sys.stderr)
        print(format_metrics_table(run.evaluation.metrics))
    for kind, path in written.items():
        print(f"{kind + ':':<11} {path}")
    return 0


#: Fields of :class:`helpers.config.RetrievalConfig` shown in the post-processing group of ``retrieve --help``.
POSTPROCESS_FIELDS = ("fusion", "fusion_weights", "dba", "index", "qe", "qe_k", "qe_alpha", "rerank", "k1", "k2",
                      "lambda_value")


def _default_text(f) -> str:
    import dataclasses

    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None or "(default" in f.metadata["help"] or f.metadata["argparse"].get("action") in (
            "store_true", "store_false"):
        return ""
    return f" (default: {default})"


def add_config_options(p: argparse.ArgumentParser) -> None:
    """The ``retrieve`` options, one per field of :class:`helpers.config.RetrievalConfig` that has one (its
    ``cli`` metadata: option, help, choices, type), and ``--config``. Options not given stay out of the namespace
    (``argparse.SUPPRESS``), so that the config's defaults, or the ``--config`` file's values, apply."""
    import dataclasses

    from ..config import RetrievalConfig, cli_flag

    groups = {False: p, True: p.add_argument_group("re-ranking, query expansion, index, ensembles")}
    p.add_argument("--config", metavar="RUN.json", default=None,
                   help="repeat an earlier run: its metrics JSON (results/<run>.json); options given override it")
    for f in dataclasses.fields(RetrievalConfig):
        if not f.metadata.get("cli"):
            continue
        kwargs = dict(f.metadata["argparse"])
        help_text = f.metadata["help"] + _default_text(f)
        groups[f.name in POSTPROCESS_FIELDS].add_argument(cli_flag(f), dest=f.name, default=argparse.SUPPRESS,
                                                          help=help_text, **kwargs)


def retrieve_config(args: argparse.Namespace):
    """The :class:`helpers.config.RetrievalConfig` of a ``retrieve`` command line: the ``--config`` file's (or the
    defaults), with every option given on the command line applied on top, checked."""
    import dataclasses

    from ..config import RetrievalConfig

    base = RetrievalConfig.from_record(args.config) if getattr(args, "config", None) else RetrievalConfig()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RetrievalConfig) if hasattr(args, f.name)}
    return base.replace(**given)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..data import list_images, load_ground_truth
    from ..metrics import build_metrics_record, evaluate_rankings, format_metrics_table, write_metrics
    from ..submission import load_submission

    rankings = load_submission(args.submission)
    ground_truth = load_ground_truth(args.ground_truth)
    gallery = [p.name for p in list_images(args.gallery)] if args.gallery else None
    result = evaluate_rankings(rankings, ground_truth, k=args.k, gallery_names=gallery)
    for problem in result.problems:
        print(f"note: {problem}", file=sys.stderr)
    print(f"{result.n_queries} queries scored")
    print(format_metrics_table(result.metrics))
    if args.metrics_out:
        record = build_metrics_record(model_name="unknown", top_k=args.k, metrics=result.metrics,
                                      config={"submission": args.submission, "ground_truth": args.ground_truth})
        print(f"metrics: {write_metrics(args.metrics_out, record)}")
    return 0
