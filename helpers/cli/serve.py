"""Verb: serve (the local evaluation server)."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from .common import positive_int


def register(subparsers) -> None:
    from ..server import DEFAULT_DB, DEFAULT_HOST, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_NAMES, DEFAULT_PORT

    p = subparsers.add_parser(
        "serve", help="run a local evaluation server (the course protocol, a leaderboard) on labeled data",
        description="POST /retrieval/ with {\"groupname\": NAME, \"images\": {query: [names]}} answers "
                    "{\"accuracy\": weighted score, ...}; GET / and GET /leaderboard show each group's best and "
                    "latest score. Every submission is stored in the SQLite file --db.",
    )
    p.add_argument("--ground-truth", required=True, metavar="FILE", help="{query: [relevant gallery names]}")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default: %(default)s, loopback only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    p.add_argument("--db", default=str(DEFAULT_DB), metavar="FILE",
                   help="SQLite file keeping every submission across restarts (default: %(default)s)")
    p.add_argument("--gallery", metavar="DIR", help="gallery folder: names not in it are reported (and are misses)")
    p.add_argument("--k", type=positive_int, default=10, help="ranks scored per query (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20, metavar="MB",
                   help="largest request body accepted (default: %(default)s)")
    p.add_argument("--max-names", type=positive_int, default=DEFAULT_MAX_NAMES, metavar="N",
                   help="most names accepted for one query (default: %(default)s)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..data import list_images, load_ground_truth
    from ..server import create_app, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    ground_truth = load_ground_truth(args.ground_truth)
    gallery = [p.name for p in list_images(args.gallery)] if args.gallery else None
    app = create_app(ground_truth, db=args.db, gallery_names=gallery, k=args.k,
                     max_body_bytes=int(args.max_body_mb * 2**20), max_names=args.max_names)
    store = app.state.store
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host}: the server is reachable from other machines", file=sys.stderr)
    print(f"{len(ground_truth)} ground-truth queries from {args.ground_truth}; {store.count()} stored "
          f"submission(s) in {store.path}")
    print(f"submit to http://{args.host}:{args.port}/retrieval/ ; leaderboard at http://{args.host}:{args.port}/")
    serve(app, host=args.host, port=args.port)
    return 0
