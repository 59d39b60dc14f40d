"""Verb: index build|add|search (a persisted, resumable, sharded index of a large image collection)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from ..quantize import PRECISION_CHOICES
from .common import add_k, model_options, positive_int


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: the project's extraction path in this process; ray: Ray Data (an optional extra: "
                        "pip install 'cbir-toolkit[scale]') (default: %(default)s)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="an existing Ray cluster (e.g. auto, or ray://HEAD:10001); default: start a local Ray "
                        "for this command and shut it down at the end")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="Ray: embedding actors, one model each (default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="Ray: GPUs per embedding actor (default: %(default)s, CPU)")
    p.add_argument("--max-index-memory", default=None, metavar="SIZE",
                   help="memory the FAISS index may take, e.g. 4GB (1GB = 2^30 bytes): exact search below about "
                        "100k vectors, then HNSW, then OPQ + IVF-PQ (default: 4GB; `add`: the build's)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="inference precision, local engine on a CPU: int8 = ONNX Runtime static quantisation "
                        "calibrated on the images, auto = int8 only where it agrees with fp32 (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    from ..models import DEFAULT_MODEL

    parser = subparsers.add_parser(
        "index", help="build, extend and search a persisted, sharded index of a large image collection",
        description="A collection folder: float16 embedding shards (resumable), a FAISS index fitted to a memory "
                    "budget, a manifest. `index build` embeds, `index add` embeds new files, `index search` ranks.",
    )
    verbs = parser.add_subparsers(dest="index_verb", metavar="build|add|search")
    verbs.required = True

    p = verbs.add_parser("build", help="embed image folders into shards and index them (resumable)")
    p.add_argument("--images", action="append", default=[], metavar="DIR",
                   help="a folder of images, searched recursively (repeatable)")
    p.add_argument("--list", metavar="FILE", help="a file naming one image path a line (relative to its folder)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME", help="registered model (default: %(default)s)")
    p.add_argument("--weights", default="pretrained", metavar="pretrained|none|PATH", help="default: %(default)s")
    p.add_argument("--pool", default=None, metavar="MODE", help="pooling (default: the family's own)")
    p.add_argument("--pretrained", default=None, metavar="TAG", help="open_clip weight tag for clip-* models")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="the collection folder (created or resumed)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="images a shard (default: %(default)s)")
    _add_common_run(p)
    _add_engine(p)
    p.set_defaults(func=cmd_build)

    p = verbs.add_parser("add", help="embed the new files of a collection (or of more folders) and update the index")
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="a folder written by `index build`")
    p.add_argument("--images", action="append", default=[], metavar="DIR",
                   help="more folders (default: rescan the collection's own folders and lists)")
    p.add_argument("--list", metavar="FILE", help="more files, one path a line")
    _add_common_run(p)
    _add_engine(p)
    p.set_defaults(func=cmd_add)

    p = verbs.add_parser("search", help="rank the collection for query images or text")
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="a folder written by `index build`")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="a query image (repeatable)")
    p.add_argument("--query-dir", metavar="DIR", help="every image of a folder as a query")
    p.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text query (CLIP models)")
    add_k(p)
    p.add_argument("--out", metavar="FILE",
                   help="submission (dict format) with the similarities beside it in <name>.scores.json "
                        "(default: submissions/index-search_<index>.json)")
    _add_common_run(p)
    p.add_argument("--no-cache", action="store_true", help="do not cache the query embeddings")
    p.set_defaults(func=cmd_search)


def _add_common_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32, metavar="B", help="default: %(default)s")


def _options(args: argparse.Namespace):
    from ..collection import EngineOptions

    return EngineOptions(engine=args.engine, ray_address=args.ray_address, workers=args.workers,
                         gpus_per_worker=args.gpus_per_worker, batch_size=args.batch_size, device=args.device,
                         progress=not args.quiet, precision=args.precision)


@contextlib.contextmanager
def _interruptible():
    """While the command runs, SIGTERM ends it like Ctrl-C, so that a Ray it started is shut down."""
    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(result, verb: str) -> int:
    index = result.manifest["index"]
    counts = result.manifest["counts"]
    recall = index.get("recall_at_10")
    print(f"{verb}: {result.embedded} image(s) embedded into {len(result.new_shards)} new shard(s), "
          f"{len(result.skipped)} skipped, in {result.seconds:.1f} s; collection: {counts['embedded']} vectors, "
          f"{counts['skipped']} skipped file(s); index {index['kind']} {index.get('params', {})}, recall@10 "
          f"{'n/a' if recall is None else f'{recall:.4f}'}; {result.index_dir}")
    for file, reason in result.skipped[:20]:
        print(f"  skipped {file}: {reason}", file=sys.stderr)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ..collection import build_collection

    with _interruptible():
        result = build_collection(args.out, images=args.images, list_file=args.list, model=args.model,
                                  weights=args.weights, model_options=model_options(args),
                                  shard_size=args.shard_size, max_index_memory=args.max_index_memory or "4GB",
                                  options=_options(args))
    return _report(result, "index build")


def cmd_add(args: argparse.Namespace) -> int:
    from ..collection import add_to_collection

    with _interruptible():
        result = add_to_collection(args.index, images=args.images, list_file=args.list,
                                   max_index_memory=args.max_index_memory, options=_options(args))
    return _report(result, "index add")


def cmd_search(args: argparse.Namespace) -> int:
    from ..collection import Index
    from ..submission import save_submission
    from ..viz import scores_sidecar_path, write_scores

    index = Index.open(args.index)
    result = index.search(images=args.image, query_dir=args.query_dir, text=args.text, k=args.k,
                          batch_size=args.batch_size, device=args.device, use_cache=not args.no_cache)
    out = Path(args.out) if args.out else Path("submissions") / f"index-search_{Path(args.index).resolve().name}.json"
    save_submission(out, result.rankings)
    write_scores(scores_sidecar_path(out), result.scores)
    for query, names in list(result.rankings.items())[:5]:
        top = ", ".join(f"{n} ({s:.3f})" for n, s in zip(names[:3], result.scores[query][:3]))
        print(f"{query}: {top}")
    print(f"{len(result.rankings)} quer(ies) ranked against {len(index)} images ({index.plan.kind}); "
          f"submission {out}, similarities {scores_sidecar_path(out)}")
    return 0
