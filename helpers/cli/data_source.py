"""Verb: data-check (bring a competition's data in and say what it lacks)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data-check", help="bring a data source in (folder, Drive path, .zip path or URL) and check its layout",
        description="Resolves SOURCE as the notebooks' DATA_SOURCE does (a .zip path or http(s) URL is downloaded "
                    "and unpacked once into the data cache), prints what it holds and what is missing; exit code 0 "
                    "when it is ready, 2 when it is not.",
    )
    p.add_argument("source", metavar="SOURCE", help="a folder, a /content/drive/... path on Colab, a .zip file or an "
                                                    "http(s) URL of a zip")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where zips are downloaded and unpacked (default: $RETRIEVAL_DATA_CACHE, else "
                        "~/.cache/image-retrieval/datasets)")
    p.add_argument("--max-unpacked-gb", type=float, default=None, metavar="GB",
                   help="refuse a zip that unpacks to more (default: 50)")
    p.set_defaults(func=cmd_data_check)


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data_source import DEFAULT_MAX_UNPACKED_BYTES, prepare_data

    limit = DEFAULT_MAX_UNPACKED_BYTES
    if args.max_unpacked_gb is not None:
        if args.max_unpacked_gb <= 0:
            raise ValueError(f"--max-unpacked-gb must be positive, got {args.max_unpacked_gb}")
        limit = int(args.max_unpacked_gb * 2**30)
    root = prepare_data(args.source, args.cache_dir, max_unpacked_bytes=limit)
    print(f"use it: python -m helpers select --data {root}")
    return 0
