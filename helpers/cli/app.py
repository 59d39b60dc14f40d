"""Verb: app (a search page in the browser over a persisted collection)."""

from __future__ import annotations

import argparse
import ipaddress
import sys


def register(subparsers) -> None:
    from ..app.web import DEFAULT_MAX_UPLOAD_MB

    p = subparsers.add_parser(
        "app", help="a search page in the browser over an index built by `index build`",
        description="Serves a page that queries the collection by an image (file picker, drag and drop, paste), "
                    "by text (CLIP models) or by a click on a result, and a JSON API: POST /api/search, "
                    "GET /api/info, GET /thumb/ID, GET /image/ID.",
    )
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="a folder written by `index build`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, loopback only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help="largest query image accepted (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: %(default)s)")
    p.set_defaults(func=cmd_app)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_app(args: argparse.Namespace) -> int:
    from ..app import create_app
    from ..server import serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    app = create_app(args.index, device=args.device, max_upload_mb=args.max_upload_mb)
    if not _is_loopback(args.host):
        print(f"warning: binding {args.host}: the page is reachable from other machines", file=sys.stderr)
    service = app.state.service
    print(f"{len(service)} images indexed with {service.model.name}"
          f"{' (text queries on)' if service.has_text else ''}; open http://{args.host}:{args.port}/")
    serve(app, host=args.host, port=args.port)
    return 0
