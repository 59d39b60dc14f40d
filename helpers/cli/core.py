"""Verbs: models, demo, split, retrieve, evaluate."""

from __future__ import annotations

import argparse
import sys

from .common import add_data, add_k, add_model, model_options, positive_int


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
    p.set_defaults(func=cmd_split)

    p = subparsers.add_parser("retrieve", help="rank the gallery for every query; evaluate if ground truth exists")
    add_data(p)
    add_model(p, multiple=True)
    add_k(p)
    p.add_argument("--out", metavar="FILE", help="submission path (default: submissions/<run>.json)")
    p.add_argument("--format", choices=("dict", "list"), default="dict", help="submission format (default: dict)")
    p.add_argument("--metrics-out", metavar="FILE", help="metrics JSON path (default: results/<run>.json)")
    p.add_argument("--grid", metavar="FILE", help="also write a PNG grid of the first queries here")
    p.add_argument("--tta", choices=("none", "flip", "multiscale"), default="none", help="test-time augmentation")
    p.add_argument("--text-modifier", metavar="TEXT",
                   help="composed queries (CLIP models): add this text to every query image, e.g. \"in red\"")
    p.add_argument("--text-weight", type=float, default=0.5, metavar="W",
                   help="weight of --text-modifier in the normalised sum, 0 (image) to 1 (text) (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="CPU inference engine: onnx = ONNX Runtime, auto = ONNX Runtime for 200+ images on the CPU "
                        "when installed, else torch (default: %(default)s)")
    p.add_argument("--cache-dir", metavar="DIR", help="embedding cache folder (default: ~/.cache/image-retrieval)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: automatic)")
    p.add_argument("--run-name", help="name used for default output files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_postprocessing(p)
    p.add_argument("--checkpoint", metavar="RUN_DIR/best.pt",
                   help="embed with a model trained by `train` (its head's embedding); replaces --model/--weights")
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

    summary = split_dataset(args.source, args.out, args.train_per_class, args.query_per_class,
                            args.gallery_per_class, args.seed)
    totals = summary.totals
    print(f"{len(summary.classes)} classes -> {summary.out_dir}: {totals.get('training', 0)} training, "
          f"{totals.get('query', 0)} query, {totals.get('gallery', 0)} gallery images"
          + (f"; {summary.renamed} renamed to <class>_<name> (shared basenames)" if summary.renamed else ""))
    print(f"ground truth: {summary.out_dir / 'test' / 'ground_truth.json'}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from ..metrics import format_metrics_table
    from ..pipeline import run_retrieval, save_run

    run = run_retrieval(
        args.data, model=retrieve_models(args), weights=args.weights, k=args.k, batch_size=args.batch_size,
        device=args.device, use_cache=not args.no_cache, cache_dir=args.cache_dir, tta=args.tta,
        num_workers=args.workers, progress=not args.quiet, run_name=args.run_name, backend=args.backend,
        rerank=args.rerank, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value, qe=args.qe, qe_k=args.qe_k,
        qe_alpha=args.qe_alpha, dba=args.dba, index=args.index, fusion=args.fusion,
        fusion_weights=args.fusion_weights,
        model_options=model_options(args),
        text_modifier=args.text_modifier, text_weight=args.text_weight,
        checkpoint=args.checkpoint,
    )
    outputs = save_run(run, out=args.out, fmt=args.format, metrics_out=args.metrics_out, grid_out=args.grid)
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


def add_postprocessing(p: argparse.ArgumentParser) -> None:
    """Re-ranking, query expansion, DBA, index and ensemble options of ``retrieve`` (see helpers.rerank)."""
    g = p.add_argument_group("re-ranking, query expansion, index, ensembles")
    g.add_argument("--rerank", choices=("none", "kreciprocal"), default="none",
                   help="k-reciprocal re-ranking (Zhong et al. 2017) of the whole gallery (default: none)")
    g.add_argument("--k1", type=positive_int, default=20, help="re-ranking k1 (default: %(default)s)")
    g.add_argument("--k2", type=positive_int, default=6, help="re-ranking k2 (default: %(default)s)")
    g.add_argument("--lambda", dest="lambda_value", type=float, default=0.3, metavar="LAMBDA",
                   help="re-ranking weight of the original distance, 0 to 1 (default: %(default)s)")
    g.add_argument("--qe", choices=("none", "avg", "alpha"), default="none",
                   help="query expansion: average (Chum et al. 2007) or alpha-weighted (Radenovic et al. 2019)")
    g.add_argument("--qe-k", type=positive_int, default=5, metavar="N",
                   help="neighbours used by query expansion (default: %(default)s)")
    g.add_argument("--qe-alpha", type=float, default=3.0, metavar="ALPHA", help="alpha-QE exponent (default: 3)")
    g.add_argument("--dba", type=int, default=0, metavar="K",
                   help="database-side augmentation with K gallery neighbours (default: 0, off)")
    g.add_argument("--index", choices=("exact", "flat", "hnsw", "ivf", "auto"), default="exact",
                   help="search: exact, FAISS flat (exact), HNSW or IVF (approximate), auto by size (default: exact)")
    g.add_argument("--fusion", choices=("concat", "score"), default="concat",
                   help="with several --model: concatenated embeddings or summed similarities (default: concat)")
    g.add_argument("--fusion-weights", type=fusion_weight_list, default=None, metavar="W1,W2",
                   help="one weight per --model, e.g. 0.6,0.4 (default: equal)")


def fusion_weight_list(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.6,0.4, got {text!r}") from None
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"weights must be >= 0 and not all 0, got {text!r}")
    return weights


def retrieve_models(args: argparse.Namespace):
    """``--model`` given once or never: one name; several times: the list (an ensemble)."""
    from ..models import DEFAULT_MODEL

    models = args.model or [DEFAULT_MODEL]
    if args.fusion_weights is not None and len(args.fusion_weights) != len(models):
        raise ValueError(f"--fusion-weights has {len(args.fusion_weights)} values for {len(models)} --model; "
                         "give one weight per model")
    return models[0] if len(models) == 1 else models


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
