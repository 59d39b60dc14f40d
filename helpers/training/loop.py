"""The training loop: data, P-K batches, the recipe's loss, AdamW + LLRD, warm-up + cosine, validation with the
evaluation module, early stopping, checkpoints that resume exactly.

A run folder holds ``config.json``, ``history.json`` (one row per epoch: train loss, learning rate, validation
metrics, seconds), ``last.pt`` (rewritten each epoch: model, criterion, optimizer, scheduler, AMP scaler and every
RNG state, so ``resume=True`` continues exactly where the last finished epoch left off) and ``best.pt`` (written the
moment validation ``map@10`` improves: a separate file, never a reference to the live weights). Checkpoints hold
only tensors and JSON-like primitives: they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..data import DataError, list_class_folder, list_images, load_image
from ..fileio import atomic_write, write_json
from ..metrics import evaluate_rankings
from ..models import resolve_device
from .losses import Criterion, PKSampler
from .model import CHECKPOINT_FORMAT, FeatureExtractor, RetrievalNet, build_network, feature_preprocessing, training_info
from .optim import backbone_layers, make_optimizer, make_scheduler
from .recipes import TrainConfig, make_config, parse_trainable, validate_config

logger = logging.getLogger("helpers")

MONITOR = "map@10"
RUNS_DIR = Path("runs")


@dataclass
class TrainResult:
    """What a run produced."""

    run_dir: Path
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]]
    best_epoch: int
    best_metrics: dict[str, float] | None
    epochs_run: int
    stopped_early: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------
def training_folder(data: str | Path) -> Path:
    """``DIR/training`` when it exists, else ``DIR`` itself (a plain ``<class>/<image>`` folder)."""
    root = Path(data)
    if not root.exists():
        raise DataError(f"training data not found: {root} (expected {root}/training/<class>/<image>)")
    return root / "training" if (root / "training").is_dir() else root


def split_validation(labels: list[int], fraction: float, min_per_class: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of (training, validation) images: per class, ``fraction`` of its images (at least
    ``min_per_class``, so that every validation query has a relevant image) are held out, when the class keeps at
    least 2 training images."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    train_idx, val_idx = [], []
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        idx = list(by_class[label])
        rng.shuffle(idx)
        n_val = 0
        if fraction > 0:
            n_val = max(min_per_class, int(round(fraction * len(idx))))
            if len(idx) - n_val < 2:
                n_val = 0
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return sorted(train_idx), sorted(val_idx)


def train_transform(preprocessing, config: TrainConfig):
    """Random resized crop (scale ``crop_scale_min``-1), flip, colour jitter (p=0.8), grayscale, the model's own
    normalisation, random erasing."""
    from torchvision import transforms as T

    steps = [
        T.RandomResizedCrop(preprocessing.input_size, scale=(config.crop_scale_min, 1.0),
                            interpolation=T.InterpolationMode(preprocessing.interpolation), antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if config.color_jitter > 0:
        j = config.color_jitter
        steps.append(T.RandomApply([T.ColorJitter(j, j, j, min(0.5, j / 4))], p=0.8))
    if config.grayscale_p > 0:
        steps.append(T.RandomGrayscale(p=config.grayscale_p))
    steps += [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    if config.erasing_p > 0:
        steps.append(T.RandomErasing(p=config.erasing_p))
    return T.Compose(steps)


class ImageDataset(Dataset):
    """(image tensor, label) pairs, or ((view 1, view 2), label) with ``views=2`` (SimCLR)."""

    def __init__(self, paths: list[Path], labels: list[int], transform: Callable, views: int = 1) -> None:
        self.paths, self.labels, self.transform, self.views = paths, labels, transform, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = load_image(self.paths[index])
        if self.views == 2:
            return (self.transform(image), self.transform(image)), self.labels[index]
        return self.transform(image), self.labels[index]


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def leave_one_out_metrics(embeddings: np.ndarray, labels: list[int], k: int = 10) -> dict[str, float]:
    """Every validation image queries all the others; scored by :func:`helpers.metrics.evaluate_rankings`."""
    from ..search import cosine_topk

    names = [str(i) for i in range(len(labels))]
    by_class: dict[int, list[str]] = {}
    for name, label in zip(names, labels):
        by_class.setdefault(label, []).append(name)
    indices, _ = cosine_topk(embeddings, embeddings, k=min(k + 1, len(names)))
    rankings, ground_truth = {}, {}
    for i, row in enumerate(indices):
        rankings[names[i]] = [names[j] for j in row if j != i][:k]
        ground_truth[names[i]] = [n for n in by_class[labels[i]] if n != names[i]]
    return evaluate_rankings(rankings, ground_truth, k=k).metrics


def _embed_images(net: RetrievalNet, paths: list[Path], transform, batch_size: int, device: torch.device,
                  amp: bool, channels_last: bool = False) -> np.ndarray:
    loader = DataLoader(ImageDataset(paths, [0] * len(paths), transform), batch_size=batch_size, shuffle=False)
    out = []
    net.eval()
    with torch.inference_mode(), _autocast(device, amp):
        for images, _ in loader:
            out.append(net(_to_device(images, device, channels_last)).float().cpu())
    return torch.cat(out).numpy()


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last and images.ndim == 4 else images


def _autocast(device: torch.device, amp: bool):
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", enabled=False)


# --------------------------------------------------------------------------------------------------------------
# RNG and checkpoints
# --------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every random state as tensors and primitives (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _save(path: Path, payload: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def _model_state(net: RetrievalNet, head_only: bool) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (``head_only`` leaves out the frozen, published backbone)."""
    return {
        k: v.detach().cpu().clone()
        for k, v in net.state_dict().items()
        if not (head_only and k.startswith("backbone.network."))
    }


def default_run_dir(config: TrainConfig) -> Path:
    data_name = Path(config.data).resolve().name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{data_name}_{config.model}_{config.recipe}_{config.trainable}")
    return RUNS_DIR / slug.strip("-")


# --------------------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------------------
def set_trainable(net: RetrievalNet, trainable: str) -> None:
    """``head``: only the head; ``blocks:N``: the head, the last N backbone blocks and the layers after them
    (final norm, projection or last conv) and GeM's p; ``all``: everything."""
    kind, n = parse_trainable(trainable)
    for p in net.backbone.parameters():
        p.requires_grad = kind == "all"
    if kind == "blocks":
        layers = backbone_layers(net.backbone.network)
        # the last layer may be the post-block layer (norm / projection / conv head): count blocks before it
        for layer in layers[-(n + 1):]:
            for _, p in layer:
                p.requires_grad = True
        if net.backbone.gem is not None:
            net.backbone.gem.p.requires_grad = True
    if kind == "head" and net.backbone.gem is not None:
        net.backbone.gem.p.requires_grad = False
    for p in net.head.parameters():
        p.requires_grad = True


def freeze_unused(net: RetrievalNet, input_size: int, device: torch.device) -> list[str]:
    """Freeze backbone parameters that the image embedding never uses (e.g. CLIP's text tower), found by one
    forward/backward pass on a dummy batch; returns their names."""
    params = dict(net.backbone.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    was_training = net.training
    net.eval()  # eval mode: batch-norm statistics stay untouched, gradients still reach every used tensor
    net.backbone(torch.zeros(2, 3, input_size, input_size, device=device)).float().sum().backward()
    net.train(was_training)
    unused = [name for name, p in params.items() if p.grad is None]
    for name, p in params.items():
        p.grad = None
        p.requires_grad_(flags[name] and name not in unused)
    if unused:
        logger.info("%d backbone tensors are not used by the image embedding and stay frozen (e.g. %s)",
                    len(unused), unused[0])
    return unused


def _train_mode(net: RetrievalNet) -> None:
    """Train mode, except batch norms whose parameters are frozen keep their running statistics."""
    net.train()
    for m in net.backbone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


# --------------------------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------------------------
def train(config: TrainConfig | None = None, resume: bool = False,
          callback: Callable[[int, int], None] | None = None, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says (or ``make_config(**overrides)``) and write the run folder.

    ``resume=True`` continues from ``RUN_DIR/last.pt`` with its saved config and states (the epoch that was
    interrupted is run again from its start, so the result equals an uninterrupted run). ``callback(epoch, step)``
    is called after every batch (tests use it to interrupt a run).
    """
    from tqdm.auto import tqdm

    if config is None:
        config = make_config(overrides.pop("recipe", None), **overrides)
    validate_config(config)
    start_time = time.perf_counter()
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    checkpoint = None
    if resume:
        if last_path.exists():
            checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
            saved = TrainConfig.from_dict(checkpoint["config"])
            volatile = {"progress", "device", "num_workers", "out"}
            changed = [k for k, v in config.to_dict().items() if k not in volatile and saved.to_dict().get(k) != v]
            if changed:
                logger.warning("--resume continues with the run's saved settings; ignored: %s", ", ".join(changed))
            saved.progress, saved.device, saved.num_workers, saved.out = (config.progress, config.device,
                                                                          config.num_workers, str(run_dir))
            config = saved
        else:
            logger.warning("--resume: no %s yet, starting a new run", last_path)
    device = resolve_device(config.device)
    use_amp = config.amp and device.type == "cuda"
    seed_everything(config.seed)

    # ---- data
    items = list_class_folder(training_folder(config.data))
    classes = sorted({label for _, label in items})
    class_index = {c: i for i, c in enumerate(classes)}
    paths = [p for p, _ in items]
    labels = [class_index[label] for _, label in items]
    train_idx, val_idx = split_validation(labels, config.val_fraction, config.val_min_per_class, config.seed)
    notes: list[str] = []
    if not val_idx:
        notes.append("no validation split (too few images per class): best.pt is the last epoch")
        logger.warning(notes[-1])

    # ---- model, loss
    net, base = build_network(config, device=device)
    head_mode = config.trainable == "head"
    set_trainable(net, config.trainable)
    if not head_mode:
        with torch.random.fork_rng(devices=[]):  # the dummy pass (dropout) must not move the seeded RNG
            freeze_unused(net, feature_preprocessing(base, config.input_size).input_size, device)
    if device.type == "cuda" and config.grad_checkpointing and not head_mode:
        for m in net.backbone.modules():
            if hasattr(m, "set_grad_checkpointing") and m is not net.backbone:
                m.set_grad_checkpointing(True)
                break
    # channels-last: about 1.8x faster forward + backward for EfficientNet-Lite0 on this CPU, and the layout
    # tensor cores want on a GPU
    channels_last = not head_mode and base.spec.channels_last
    if channels_last:
        net.to(memory_format=torch.channels_last)
    criterion = Criterion(config, num_classes=len(classes), embedding_size=config.embed_dim).to(device)
    preprocessing = feature_preprocessing(base, config.input_size)
    eval_tf = preprocessing.transform()

    # ---- datasets
    if head_mode:
        from ..embedding import EmbeddingCache, extract_embeddings

        extractor = FeatureExtractor(base, net.backbone, config.input_size, net.in_dim)
        result = extract_embeddings(extractor, paths, batch_size=min(config.batch_size, 64), device=device,
                                    cache=EmbeddingCache(), progress=config.progress, desc="backbone features",
                                    num_workers=config.num_workers or None)
        row_of = {p: i for i, p in enumerate(result.paths)}
        feats = torch.from_numpy(result.embeddings)
        keep = lambda idx: [i for i in idx if paths[i] in row_of]  # noqa: E731  unreadable files are skipped
        train_idx, val_idx = keep(train_idx), keep(val_idx)
        train_feats = feats[[row_of[paths[i]] for i in train_idx]]
        train_targets = [labels[i] for i in train_idx]
        if config.head_flip:  # the mirror images' features: a second, cached view of every training image
            mirrored = extract_embeddings(
                FeatureExtractor(base, net.backbone, config.input_size, net.in_dim, flip=True),
                [paths[i] for i in train_idx], batch_size=min(config.batch_size, 64), device=device,
                cache=EmbeddingCache(), progress=config.progress, desc="mirrored features",
                num_workers=config.num_workers or None)
            mirror_row = {p: i for i, p in enumerate(mirrored.paths)}
            both = [i for i in train_idx if paths[i] in mirror_row]
            train_feats = torch.cat([train_feats, torch.from_numpy(mirrored.embeddings)[
                [mirror_row[paths[i]] for i in both]]])
            train_targets = train_targets + [labels[i] for i in both]
        train_set = TensorDataset(train_feats, torch.tensor(train_targets))
        val_feats = feats[[row_of[paths[i]] for i in val_idx]] if val_idx else None
    elif config.loss == "ntxent":
        unlabeled = _unlabeled_paths(config, [paths[i] for i in train_idx])
        train_set = ImageDataset(unlabeled, list(range(len(unlabeled))), train_transform(preprocessing, config),
                                 views=2)
    else:
        train_set = ImageDataset([paths[i] for i in train_idx], [labels[i] for i in train_idx],
                                 train_transform(preprocessing, config))
    train_labels = train_targets if head_mode else [labels[i] for i in train_idx]
    if config.sampler == "pk":
        sampler = PKSampler(train_labels, config.classes_per_batch, config.images_per_class,
                            keep_batch=config.pk_keep_batch)
        notes += sampler.notes
        loader = DataLoader(train_set, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                            num_workers=0 if head_mode else config.num_workers)
        batch_size = sampler.batch_size
    else:
        batch_size = min(config.batch_size, len(train_set))
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=config.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"too few training images ({len(train_set)}) for one batch of {batch_size}")
    optimizer_steps = math.ceil(steps_per_epoch / config.grad_accum) * config.epochs

    # ---- optimisation
    optimizer = make_optimizer(net, criterion, config.lr, config.head_lr, config.weight_decay, config.layer_decay)
    scheduler = make_scheduler(optimizer, optimizer_steps, config.warmup_fraction)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trainable_params = [p for g in optimizer.param_groups for p in g["params"]]

    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    best_metrics: dict[str, float] | None = None
    if checkpoint is not None:
        net.load_state_dict(checkpoint["model"], strict=not checkpoint.get("head_only_state", False))
        criterion.load_state_dict(checkpoint["criterion"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        history = list(checkpoint["history"])
        best = checkpoint["best"]
        best_score, best_epoch, bad_epochs = best["score"], best["epoch"], best["bad_epochs"]
        best_metrics = best.get("metrics")
        start_epoch = int(checkpoint["epoch"]) + 1
        set_rng_state(checkpoint["rng"])
        logger.info("resuming %s after epoch %d", run_dir, checkpoint["epoch"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", {**config.to_dict(), "classes": classes, "n_train": len(train_idx),
                                         "n_val": len(val_idx), "batch_size_effective": batch_size,
                                         "steps_per_epoch": steps_per_epoch, "optimizer_steps": optimizer_steps,
                                         "device": str(device), "notes": notes})

    def embed(x: torch.Tensor) -> torch.Tensor:
        return net.head(x) if head_mode else net(x)

    stopped_early = False
    last_val = best_metrics.get(MONITOR) if best_metrics else None
    for epoch in range(start_epoch, config.epochs + 1):
        if bad_epochs >= config.patience:
            stopped_early = True
            break
        epoch_start = time.perf_counter()
        _train_mode(net)
        criterion.train()
        total_loss, n_batches = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
        for step, (x, y) in enumerate(bar):
            if config.loss == "ntxent":
                x = torch.cat([x[0], x[1]])
                y = torch.arange(len(y)).repeat(2)
            x, y = _to_device(x, device, channels_last), y.to(device)
            with _autocast(device, use_amp):
                emb = embed(x)
            loss = criterion(emb.float(), y, epoch)
            scaler.scale(loss / config.grad_accum).backward()
            if (step + 1) % config.grad_accum == 0 or step + 1 == steps_per_epoch:
                scaler.unscale_(optimizer)
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable_params, config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            total_loss += float(loss.detach())
            n_batches += 1
            postfix = {"loss": f"{total_loss / n_batches:.4f}"}
            if last_val is not None:
                postfix[f"val {MONITOR}"] = f"{last_val:.4f}"
            bar.set_postfix(postfix)
            if callback is not None:
                callback(epoch, step)
        bar.close()

        # ---- validation
        metrics = None
        if val_idx:
            if head_mode:
                net.eval()
                with torch.inference_mode():
                    val_emb = net.head(val_feats.to(device)).float().cpu().numpy()
            else:
                val_emb = _embed_images(net, [paths[i] for i in val_idx], eval_tf, config.batch_size, device,
                                        use_amp, channels_last)
            metrics = leave_one_out_metrics(val_emb, [labels[i] for i in val_idx])
            last_val = metrics[MONITOR]
        row = {"epoch": epoch, "train_loss": total_loss / max(1, n_batches), "lr": scheduler.get_last_lr()[0],
               "miner": criterion.miner_active(epoch), "seconds": time.perf_counter() - epoch_start,
               **({f"val_{k}": v for k, v in metrics.items()} if metrics else {})}
        history.append(row)
        score = metrics[MONITOR] if metrics else epoch  # no validation: the latest epoch is the best
        info = training_info(config, history, epoch, net.backbone.pool_type)
        # Only the published backbone can be rebuilt identically: a random or local-file backbone is saved whole.
        head_only_state = head_mode and config.weights == "pretrained"
        common = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "head_only_state": head_only_state,
                  "backbone_weights": config.weights, "epoch": epoch, "metrics": metrics, "training_info": info,
                  "classes": classes}
        model_state = _model_state(net, head_only_state)
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs, best_metrics = score, epoch, 0, metrics
            _save(best_path, {**common, "model": model_state, "criterion": criterion.state_dict()})
        else:
            bad_epochs += 1
        logger.info("epoch %d/%d: train loss %.4f%s%s", epoch, config.epochs, row["train_loss"],
                    f", val {MONITOR} {metrics[MONITOR]:.4f} hit@1 {metrics['hit@1']:.4f}" if metrics else "",
                    " (best)" if improved else "")
        _save(last_path, {
            **common, "model": model_state, "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "history": history, "rng": rng_state(),
            "best": {"score": best_score, "epoch": best_epoch, "bad_epochs": bad_epochs, "metrics": best_metrics},
        })
        write_json(run_dir / "history.json", {"history": history, "best_epoch": best_epoch,
                                              "best_metrics": best_metrics, "monitor": MONITOR})
    else:
        stopped_early = bad_epochs >= config.patience and len(history) < config.epochs
    epochs_run = len(history)
    seconds = time.perf_counter() - start_time
    write_json(run_dir / "history.json", {"history": history, "best_epoch": best_epoch, "best_metrics": best_metrics,
                                          "monitor": MONITOR, "stopped_early": stopped_early,
                                          "epochs_run": epochs_run})
    return TrainResult(run_dir, best_path, last_path, history, best_epoch, best_metrics, epochs_run, stopped_early,
                       seconds, notes)


def _unlabeled_paths(config: TrainConfig, fallback: list[Path]) -> list[Path]:
    """The images SimCLR learns from: ``config.unlabeled`` folders, else DIR/test/query + DIR/test/gallery, else
    the training images (their labels unused)."""
    folders = [Path(f) for f in config.unlabeled]
    if not folders:
        root = Path(config.data)
        folders = [f for f in (root / "test" / "query", root / "test" / "gallery") if f.is_dir()]
    found = [p for folder in folders for p in list_images(folder)]
    return found or list(fallback)
