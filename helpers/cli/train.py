"""Verb: train (fine-tune a registry model with a metric-learning recipe; see helpers.training)."""

from __future__ import annotations

import argparse

from .common import positive_int


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def register(subparsers) -> None:
    from ..training.recipes import RECIPES, TRAINABLE_HELP

    recipes = "; ".join(f"{name}: {desc}" for name, (_, desc) in RECIPES.items())
    p = subparsers.add_parser(
        "train", help="fine-tune a model on DIR/training/<class>/* and write a run folder (best.pt, last.pt, JSON)",
        description=f"Recipes - {recipes}. Every option left out takes the recipe's default.",
    )
    p.add_argument("--data", default="data", metavar="DIR",
                   help="DIR/training/<class>/<image> (or DIR/<class>/<image>) (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="NAME", help="registered model (default: efficientnet-lite0; "
                   "the clip-gem-circle recipe defaults to clip-vit-l14)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="default: clip-gem-circle for clip-* models, circle otherwise")
    p.add_argument("--weights", default=None, metavar="pretrained|none|PATH", help="backbone weights to start from")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder (default: runs/<data>_<model>_<recipe>_<trainable>)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--trainable", default=None, metavar=TRAINABLE_HELP.replace(" ", ""),
                   help="the head only (cached backbone features), the head + last N blocks, or everything "
                   "(default: head; all for clip-gem-circle and simclr)")
    p.add_argument("--pool", default=None, help="gem (default) or backbone (the model's own pooling)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="PX",
                   help="train and embed at this input size (reduced-size CPU fine-tuning)")
    p.add_argument("--embed-dim", type=positive_int, default=None, help="head output size (default: 512)")
    p.add_argument("--miner-start-epoch", type=positive_int, default=None, metavar="E",
                   help="first epoch (from 1) with the miner (default: 5)")
    p.add_argument("--classes-per-batch", type=positive_int, default=None, metavar="P", help="default: 32")
    p.add_argument("--images-per-class", type=positive_int, default=None, metavar="K", help="default: 4")
    p.add_argument("--batch-size", type=positive_int, default=None, help="random batches (simclr), feature extraction")
    p.add_argument("--grad-accum", type=positive_int, default=None, help="batches per optimiser step (default: 1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the top block; block i trains at "
                   "lr * layer-decay ** (blocks - 1 - i) (default: 1e-4; clip-gem-circle 4e-4)")
    p.add_argument("--head-lr", type=float, default=None,
                   help="the head, GeM's p and the loss's weights (default: 1e-3; clip-gem-circle 4e-4)")
    p.add_argument("--backbone-lr", type=float, default=None,
                   help="flat rate of the stem and the neck (default: 1e-5; clip-gem-circle 4e-5)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0.05")
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay (default: 0.65)")
    p.add_argument("--warmup-fraction", type=float, default=None, help="default: 0.15")
    p.add_argument("--grad-clip", type=float, default=None, help="default: 1.0 (0 disables)")
    p.add_argument("--patience", type=positive_int, default=None, help="early stopping on val map@10 (default: 5)")
    p.add_argument("--val-split", choices=("classes", "images"), default=None,
                   help="validation on held-out whole classes (default: a seeded 20%% of them, at least 2; open-set "
                   "retrieval) or on a share of every class's images (closed-set data)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="--val-split images: held-out share per class (default: 0.1)")
    p.add_argument("--plan", action="store_true",
                   help="build the model and optimiser, train nothing: print the parameter-group table and write "
                   "RUN_DIR/param_groups.json")
    p.add_argument("--head-flip", type=_bool, default=None, metavar="on|off",
                   help="--trainable head: also train on the mirror images' cached features (default: on)")
    p.add_argument("--amp", type=_bool, default=None, metavar="on|off", help="mixed precision on GPU (default: on)")
    p.add_argument("--grad-checkpointing", type=_bool, default=None, metavar="on|off", help="on GPU (default: on)")
    p.add_argument("--unlabeled", action="append", default=None, metavar="DIR",
                   help="simclr: unlabeled image folder, repeatable (default: DIR/test/query and DIR/test/gallery)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto|cpu|cuda|mps (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..metrics import format_metrics_table
    from ..training import make_config, train

    config = make_config(
        args.recipe, data=args.data, model=args.model, weights=args.weights, out=args.out, epochs=args.epochs,
        trainable=args.trainable, pool=args.pool, input_size=args.input_size, embed_dim=args.embed_dim,
        miner_start_epoch=args.miner_start_epoch, classes_per_batch=args.classes_per_batch,
        images_per_class=args.images_per_class, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, head_lr=args.head_lr, backbone_lr=args.backbone_lr, val_split=args.val_split, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        warmup_fraction=args.warmup_fraction, grad_clip=args.grad_clip, patience=args.patience,
        val_fraction=args.val_fraction, head_flip=args.head_flip, amp=args.amp, grad_checkpointing=args.grad_checkpointing,
        unlabeled=args.unlabeled, seed=args.seed, device=args.device, num_workers=args.workers,
        progress=False if args.quiet else None,
    )
    if args.plan:
        from ..training.loop import default_run_dir, plan
        from ..training.optim import format_group_table

        rows = plan(config)
        print(format_group_table(rows))
        print(f"{sum(r['tensors'] for r in rows)} trainable tensors, {sum(r['numel'] for r in rows):,} parameters; "
              f"written: {(config.out or default_run_dir(config))}/param_groups.json")
        return 0
    result = train(config, resume=args.resume)
    print(f"{result.epochs_run} epoch(s) in {result.seconds:.1f} s"
          + (" (stopped early)" if result.stopped_early else "") + f"; best epoch {result.best_epoch}")
    for note in result.notes:
        print(f"note: {note}")
    if result.best_metrics:
        print(format_metrics_table(result.best_metrics))
    print(f"run folder: {result.run_dir}")
    print(f"best:       {result.best_path}  (python -m helpers retrieve --checkpoint {result.best_path})")
    return 0
