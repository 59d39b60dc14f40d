"""Command line: ``python -m helpers VERB ...``. Argument parsing only; every verb calls library functions.

Each module listed in ``VERB_MODULES`` defines ``register(subparsers)`` and adds its verbs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

VERB_MODULES = [
    "helpers.cli.app",
    "helpers.cli.core",
    "helpers.cli.data_source",
    "helpers.cli.index",
    "helpers.cli.report",
    "helpers.cli.select",
    "helpers.cli.serve",
    "helpers.cli.text",
    "helpers.cli.train",
]

#: Exceptions that mean "bad input": printed as one clear line, exit code 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from ..data import DataError, ImageLoadError
    from ..models import ModelError
    from ..submission import SubmissionError

    return (DataError, ImageLoadError, ModelError, SubmissionError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m helpers",
        description="Content-based image retrieval: embed, search, re-rank, train, evaluate, submit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for module_name in VERB_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
