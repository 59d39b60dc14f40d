"""Verb: select (the best configuration on a class-disjoint validation split, run on the test, optionally sent)."""

from __future__ import annotations

import argparse
import sys

from ..quantize import PRECISION_CHOICES
from .common import add_data, add_k


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, got {value}")
    return value


def _minutes(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def register(subparsers) -> None:
    from ..select import GRIDS

    p = subparsers.add_parser(
        "select", help="find the best configuration on held-out training classes, run it on the test, submit",
        description="Hold out whole classes of DIR/training as a validation split that looks like the test, score "
                    "candidate configurations on it (models, pooling, TTA, DBA, query expansion, re-ranking, "
                    "fusions, optionally a fine-tuned model) within a time budget, write a leaderboard, and run "
                    "the winner on DIR/test (no ground truth needed).")
    add_data(p, help_text="competition folder with training/<class>/* and test/query, test/gallery "
                          "(default: %(default)s)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="a model to consider, repeatable (default: efficientnet-lite0, dinov2-vits14, clip-vit-b32 "
                        "on a CPU; clip-vit-l14, dinov2-vitl14, clip-vit-b16, efficientnet-lite0 on a GPU)")
    p.add_argument("--grid", choices=GRIDS, default="quick",
                   help="how many candidates: quick (6 for one model), default, full (default: %(default)s)")
    p.add_argument("--holdout-classes", type=_share, default=0.2, metavar="F",
                   help="share of the training classes held out for validation, at least 2 (default: %(default)s)")
    p.add_argument("--train", default=None, metavar="RECIPE",
                   help="also fine-tune the best model's head with this recipe (e.g. circle) on the other classes")
    p.add_argument("--train-epochs", type=int, default=None, metavar="N",
                   help="epochs of --train (default: the recipe's, with early stopping)")
    p.add_argument("--budget-minutes", type=_minutes, default=30.0, metavar="M",
                   help="stop searching after M minutes with the best so far (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out classes (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/select-<dataset>)")
    add_k(p)
    p.add_argument("--weights", default="pretrained", metavar="pretrained|none|PATH",
                   help="weights of every model (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B", help="default: %(default)s")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="inference precision of every candidate and the test run (default: %(default)s: on a CPU "
                        "int8 is about 1.3x faster but can cost 0.01-0.02 hit@1)")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--submit", action="store_true", help="send the submission (needs --group)")
    p.add_argument("--group", default=None, metavar="NAME", help="your group name, for --submit")
    p.add_argument("--url", default=None, help="server URL for --submit (default: as submit.py)")
    p.add_argument("--token", default=None, metavar="TOKEN", help="the group's token, for --submit")
    p.set_defaults(func=cmd_select)


def _print_outcome(outcome) -> None:
    from ..metrics import format_metrics_table

    held = ", ".join(outcome.split.held_out)
    print(f"validation: {outcome.validation_dir} ({'reused' if outcome.reused_validation else 'built'}; held-out "
          f"classes: {held}; {len(outcome.split.query)} queries, {len(outcome.split.gallery)} gallery images)")
    if outcome.skipped_models:
        print(f"{len(outcome.skipped_models)} model(s) skipped (weights not available, see above): "
              + ", ".join(name for name, _ in outcome.skipped_models))
    scored = sum(1 for r in outcome.results if r.metrics)
    print(f"{scored} candidate(s) scored, {len(outcome.results) - scored} failed, {outcome.left_out} left out by "
          f"the time budget; {outcome.seconds:.0f} s")
    print(f"leaderboard: {outcome.leaderboard['md']}")
    print(f"winner: {outcome.winner.candidate.name} (validation weighted score "
          f"{outcome.winner.metrics['weighted_score']:.1f}, hit@1 {outcome.winner.metrics['hit@1']:.3f})")
    print(f"winner config: {outcome.winner_config} (python -m helpers retrieve --config {outcome.winner_config})")
    if outcome.test_metrics:
        print("on the test's ground truth:\n" + format_metrics_table(outcome.test_metrics))
    print(f"submission: {outcome.submission}")
    if outcome.grid:
        print(f"grid: {outcome.grid}")


def cmd_select(args: argparse.Namespace) -> int:
    from ..select import SelectOptions, select, send_command

    if args.submit and not args.group:
        raise ValueError("--submit needs --group NAME (the name your team registered)")
    options = SelectOptions(data=args.data, models=args.model, grid=args.grid, holdout_classes=args.holdout_classes,
                            train=args.train, train_epochs=args.train_epochs,
                            budget_minutes=args.budget_minutes, seed=args.seed, out=args.out,
                            k=args.k, weights=args.weights, device=args.device, batch_size=args.batch_size,
                            progress=args.progress, precision=args.precision)
    outcome = select(options)
    _print_outcome(outcome)
    if outcome.problems:
        for problem in outcome.problems[:20]:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"error: the submission has {len(outcome.problems)} problem(s); nothing sent", file=sys.stderr)
        return 1
    print(f"submission valid for {args.data}/test (checked as submit.py --dry-run --data does)")
    if not args.submit:
        print(f"send it with: {send_command(outcome.submission, args.data, args.url)}")
        return 0
    from ..client import SubmitError, submit

    try:
        result = submit(outcome.submission, args.group, url=args.url, token=args.token, k=args.k, data=args.data)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.message)
    return result.exit_code
