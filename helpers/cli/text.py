"""Verbs: text-search (rank images for free-text queries) and zero-shot (classify images from class names)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..fileio import slug
from ..settings import output_dir
from .common import add_k, add_model


def _model_options(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in ("pool", "pretrained") if getattr(args, key, None) is not None}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the embedding cache (random weights never use it)")
    p.add_argument("--cache-dir", metavar="DIR", help="embedding cache folder (default: ~/.cache/image-retrieval)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: automatic)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    from ..text import DEFAULT_TEXT_MODEL

    p = subparsers.add_parser(
        "text-search", help="rank the gallery (or any image folder) for text queries with CLIP",
        description="Rank images for each --query by cosine similarity of L2-normalised CLIP text and image "
                    "embeddings. The image embeddings share the cache of `retrieve`.",
    )
    p.add_argument("--data", default="data", metavar="DIR",
                   help="competition layout (its test/gallery is searched), a flat image folder or class folders "
                        "(default: %(default)s)")
    p.add_argument("--query", action="append", required=True, metavar="TEXT",
                   help="a text query, e.g. \"a red dress with long sleeves\" (repeatable)")
    add_model(p)
    p.set_defaults(model=DEFAULT_TEXT_MODEL)
    add_k(p)
    p.add_argument("--out", metavar="FILE",
                   help="rankings in the submission's dict format keyed by query text "
                        "(default: submissions/text-search_<data>_<model>.json)")
    _add_run_options(p)
    p.set_defaults(func=cmd_text_search)

    p = subparsers.add_parser(
        "zero-shot", help="classify images from class names alone with CLIP (prompt-template ensembling)",
        description="Zero-shot classification: each class is the mean of its L2-normalised prompt embeddings "
                    "(CLIP's recipe); probabilities are a softmax of CLIP's scaled cosine similarities. Class "
                    "folders (DIR/<class>/<image>) are scored: top-1/top-5 accuracy and mean per-class recall.",
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a flat image folder, class folders DIR/<class>/<image> (labelled: metrics are written), "
                        "or a competition layout (query and gallery images)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--classes", metavar="A,B,C",
                       help="comma-separated class names (default for class folders: the folder names)")
    group.add_argument("--classes-file", metavar="FILE",
                       help="one class name per line (for names with commas or other punctuation)")
    p.add_argument("--templates", default="openai", metavar="openai|simple|FILE",
                   help="prompt templates: openai (CLIP's 18 CIFAR prompts), simple (\"a photo of a {}.\") or a file "
                        "with one template per line containing {} (default: %(default)s)")
    add_model(p)
    p.set_defaults(model=DEFAULT_TEXT_MODEL)
    p.add_argument("--out", metavar="DIR",
                   help="output folder for predictions.csv and metrics.json "
                        "(default: results/zero-shot/<data>_<model>_<templates>)")
    _add_run_options(p)
    p.set_defaults(func=cmd_zero_shot)


def cmd_text_search(args: argparse.Namespace) -> int:
    import re

    from ..submission import save_submission
    from ..text import text_search

    result = text_search(
        args.data, args.query, model=args.model, k=args.k, weights=args.weights, batch_size=args.batch_size,
        device=args.device, use_cache=False if args.no_cache else None, cache_dir=args.cache_dir,
        num_workers=args.workers, progress=not args.quiet, model_options=_model_options(args),
    )
    if args.out:
        out = Path(args.out)
    else:
        name = slug(f"text-search_{Path(args.data).resolve().name}_{result.model_name}")
        out = output_dir("submissions") / f"{name}.json"
    save_submission(out, result.rankings, fmt="dict")
    gallery = result.gallery
    print(f"{len(result.rankings)} text queries x {len(gallery.paths)} images with {result.model_name}; "
          f"embeddings: {gallery.n_cached} from cache, {gallery.n_computed} computed; "
          f"{len(gallery.skipped)} unreadable file(s) skipped; {result.timings['total']:.1f} s")
    for query, names in result.rankings.items():
        shown = ", ".join(f"{n} ({s:.3f})" for n, s in zip(names[:3], result.scores[query][:3]))
        print(f"  {query!r}: {shown}{' ...' if len(names) > 3 else ''}")
    print(f"rankings: {out}")
    return 0


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from ..metrics import format_metrics_table
    from ..text import default_zero_shot_dir, parse_class_list, read_class_file, run_zero_shot, save_zero_shot

    classes = None
    if args.classes is not None:
        classes = parse_class_list(args.classes)
    elif args.classes_file is not None:
        classes = read_class_file(args.classes_file)
    run = run_zero_shot(
        args.data, classes, templates=args.templates, model=args.model, weights=args.weights,
        batch_size=args.batch_size, device=args.device, use_cache=False if args.no_cache else None,
        cache_dir=args.cache_dir, num_workers=args.workers, progress=not args.quiet, model_options=_model_options(args),
    )
    out_dir = Path(args.out) if args.out else default_zero_shot_dir(args.data, run.model_name, args.templates)
    outputs = save_zero_shot(run, out_dir)
    result = run.result
    print(f"{len(run.names)} images, {len(result.classes)} classes, {len(result.templates)} template(s) with "
          f"{run.model_name} (logit scale {result.logit_scale:.1f}); {len(result.skipped)} unreadable file(s) skipped; "
          f"{run.timings['total']:.1f} s")
    if run.metrics is not None:
        print(format_metrics_table({k: v for k, v in run.metrics.items() if isinstance(v, float)}))
    else:
        print("no class folders: predictions only (no accuracy)")
    print(f"predictions: {outputs.predictions}")
    if outputs.metrics:
        print(f"metrics:     {outputs.metrics}")
    return 0
