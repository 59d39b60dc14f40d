"""Verb: serve (the local evaluation server)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
from typing import Any

from .common import positive_int

LIMITS_EPILOG = (
    "limits (each refused request gets a 4xx or 503 with {\"error\": ...}): a body over --max-body-mb (413) or "
    "arriving over --read-timeout seconds (408); a request head not complete within --head-timeout seconds "
    "(connection closed); more than --max-names names per query (422) or --max-queries queries (413); past "
    "--max-connections open connections the one waiting longest for its request head is closed, or, if all are "
    "busy, the new one gets 503; more than --rate-limit submissions per group in any minute (429). "
    "Requests whose Host or Origin names another site are refused (403); requests without Origin (submit.py, "
    "the course client) are accepted. Only the score and the top-k names of known queries are stored. "
    "Not protected: plain HTTP (tokens travel in clear text), many connections from many machines."
)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def register(subparsers) -> None:
    from ..server import DEFAULT_DB, DEFAULT_HOST, DEFAULT_PORT
    from ..server_guard import ServerLimits

    p = subparsers.add_parser(
        "serve", help="run a local evaluation server (the course protocol, a leaderboard) on labeled data",
        description="POST /retrieval/ with {\"groupname\": NAME, \"images\": {query: [names]}} answers "
                    "{\"accuracy\": weighted score, ...}; GET / and GET /leaderboard show each group's best and "
                    "latest score. Every submission's score is stored in the SQLite file --db.",
        epilog=LIMITS_EPILOG,
    )
    p.add_argument("--ground-truth", required=True, metavar="FILE", help="{query: [relevant gallery names]}")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to bind (default: %(default)s, loopback only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")
    p.add_argument("--db", default=str(DEFAULT_DB), metavar="FILE",
                   help="SQLite file keeping every submission across restarts (default: %(default)s)")
    p.add_argument("--gallery", metavar="DIR", help="gallery folder: names not in it are reported (and are misses)")
    p.add_argument("--k", type=positive_int, default=10, help="ranks scored per query (default: %(default)s)")
    p.add_argument("--tokens", metavar="FILE",
                   help="JSON {group: token}: only these groups may submit, each with its token (submit.py --token)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another host name clients use to reach this server (repeatable; default: the listening "
                        "address, localhost and 127.0.0.1)")
    add_limits(p, ServerLimits())
    p.set_defaults(func=cmd_serve)


def add_limits(p: argparse.ArgumentParser, defaults: Any) -> None:
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20, metavar="MB",
                   help="largest request body accepted (default: %(default)s)")
    p.add_argument("--max-names", type=positive_int, default=defaults.max_names, metavar="N",
                   help="most names accepted for one query (default: %(default)s)")
    p.add_argument("--max-queries", type=positive_int, default=None, metavar="N",
                   help="most queries in one body (default: twice the ground truth's, at least its count + 100)")
    p.add_argument("--rate-limit", type=non_negative_int, default=defaults.rate_per_minute, metavar="N",
                   help="most submissions per group in any 60 s, 0: no limit (default: %(default)s)")
    p.add_argument("--max-connections", type=positive_int, default=defaults.max_connections, metavar="N",
                   help="most open connections; slow ones are closed first (default: %(default)s)")
    p.add_argument("--read-timeout", type=positive_seconds, default=defaults.read_timeout, metavar="S",
                   help="seconds a request body may take to arrive (default: %(default)s)")
    p.add_argument("--head-timeout", type=positive_seconds, default=defaults.head_timeout, metavar="S",
                   help="seconds a connection may take to send a request head (default: %(default)s)")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..data import list_images, load_ground_truth
    from ..server import create_app, serve
    from ..server_guard import ServerLimits, load_tokens

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise ValueError(f"--max-body-mb must be a positive finite number, got {args.max_body_mb}")
    limits = ServerLimits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_names=args.max_names, max_queries=args.max_queries,
        read_timeout=args.read_timeout, head_timeout=args.head_timeout, max_connections=args.max_connections,
        rate_per_minute=args.rate_limit,
    )
    tokens = load_tokens(args.tokens) if args.tokens else None
    ground_truth = load_ground_truth(args.ground_truth)
    gallery = [p.name for p in list_images(args.gallery)] if args.gallery else None
    app = create_app(ground_truth, db=args.db, gallery_names=gallery, k=args.k, limits=limits, tokens=tokens,
                     allowed_hosts=args.allow_host)
    store = app.state.store
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"warning: binding {args.host}: the server is reachable from other machines"
              + ("" if tokens else " and anyone reaching it can submit as any group (use --tokens)"), file=sys.stderr)
    print(f"{len(ground_truth)} ground-truth queries from {args.ground_truth}; {store.count()} stored "
          f"submission(s) in {store.path}" + (f"; {len(tokens)} group token(s)" if tokens else ""))
    print(f"submit to http://{args.host}:{args.port}/retrieval/ ; leaderboard at http://{args.host}:{args.port}/")
    serve(app, host=args.host, port=args.port)
    return 0
