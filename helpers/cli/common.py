"""Options shared by several verbs, so that each keeps one meaning everywhere."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..models import ModelSpec


def add_data(parser: argparse.ArgumentParser, default: str = "data", help_text: str | None = None) -> None:
    parser.add_argument(
        "--data", default=default, metavar="DIR",
        help=help_text or "dataset folder with test/query and test/gallery (default: %(default)s)",
    )


def add_model(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    """``--model``, ``--weights``, ``--device``, ``--batch-size`` and the model options."""
    from ..models import DEFAULT_MODEL

    if multiple:
        parser.add_argument("--model", action="append", metavar="NAME",
                            help=f"registered model name, repeatable (default: {DEFAULT_MODEL}; see `models`)")
    else:
        parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                            help="registered model name (default: %(default)s; see `python -m helpers models`)")
    parser.add_argument("--weights", default="pretrained", metavar="pretrained|none|PATH",
                        help="pretrained weights, none (random init) or a local weight file (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="default: %(default)s")
    parser.add_argument("--pool", default=None, metavar="MODE",
                        help="pooling: gap|gem|max for CNNs, cls|mean|gem for ViTs, proj|gem|mean|cls for CLIP "
                             "(default: the family's own; see `models`)")
    parser.add_argument("--pretrained", default=None, metavar="TAG",
                        help="open_clip weight tag for clip-* models (default: openai; e.g. laion2b_s32b_b82k)")
    parser.add_argument("--face", default=None, choices=("detect", "none"),
                        help="facenet-vggface2: crop the detected face (default) or embed the whole image")


def model_options(args: argparse.Namespace) -> dict:
    """The family options given on the command line (``--pool``, ``--pretrained``, ``--face``), unset ones left out."""
    return {key: getattr(args, key) for key in ("pool", "pretrained", "face") if getattr(args, key, None) is not None}


def add_k(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, default=10, help="names ranked per query (default: %(default)s)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def model_table(specs: Sequence["ModelSpec"], pass_through: Sequence[str] = (), width: int | None = None) -> list[str]:
    """The lines of ``models``: one line of columns per model, its description wrapped and indented below, every
    line at most ``width`` characters (default: the terminal's width, 80 when it is unknown)."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    rows = [("name", "family", "dim", "input", "offline")]
    rows += [(s.name, s.family, str(s.embed_dim), str(s.preprocessing.input_size),
              "yes" if s.offline_weights else "no") for s in specs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()[:width] for row in rows[:1]]
    for spec, row in zip(specs, rows[1:]):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()[:width])
        lines += textwrap.wrap(spec.description, width=width, initial_indent="    ", subsequent_indent="    ")
    if pass_through:
        lines += textwrap.wrap("pass-through (dimension and input size from the library): " + ", ".join(pass_through),
                               width=width, subsequent_indent="    ")
    return lines
