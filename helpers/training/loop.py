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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..data import DataError, check_image, list_class_folder, list_images, report_skipped, validation_split
from ..fileio import atomic_write, slug, write_json
from ..metrics import evaluate_rankings
from ..models import resolve_device
from ..settings import output_dir
from .losses import Criterion, PKSampler
from .model import CHECKPOINT_FORMAT, FeatureExtractor, RetrievalNet, build_network, feature_preprocessing, training_info
from ..models.pooling import GeM
from .optim import backbone_stages_of, group_table, make_optimizer, make_scheduler, param_groups
from .recipes import TrainConfig, make_config, parse_trainable, validate_config

logger = logging.getLogger(__name__)

MONITOR = "map@10"
RUNS_DIR = output_dir("runs")


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


class LabelledBatches:
    """Collates :class:`helpers.embedding.ImageFileDataset` items into ``(images, labels)`` batches (a pair of view
    batches for SimCLR); an image that fails to load is left out of its batch and named in the log."""

    def __init__(self, labels: list[int], paths: list[Path]) -> None:
        self.labels, self.paths = labels, paths

    def __call__(self, batch):
        ok = [(index, images) for index, images, reason in batch if reason is None]
        for index, _, reason in batch:
            if reason is not None:
                logger.warning("left out of a training batch: %s (%s)", self.paths[index], reason)
        if not ok:
            raise DataError("no image of a training batch could be read")
        first = ok[0][1]
        if isinstance(first, tuple):
            images = tuple(torch.stack(views) for views in zip(*(x for _, x in ok)))
        else:
            images = torch.stack([x for _, x in ok])
        return images, torch.tensor([self.labels[index] for index, _ in ok])


def image_dataset(paths: list[Path], labels: list[int], transform: Callable, views: int = 1):
    """The training images through the package's one image dataset; its ``collate_fn`` pairs them with labels."""
    from ..embedding import ImageFileDataset

    dataset = ImageFileDataset(paths, transform, views=views)
    dataset.collate_fn = LabelledBatches(labels, paths)
    return dataset


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
    dataset = image_dataset(paths, [0] * len(paths), transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate_fn)
    out = []
    net.eval()
    with torch.inference_mode(), _autocast(device, amp):
        for images, _ in loader:
            out.append(net(_to_device(images, device, channels_last)).float().cpu())
    embeddings = torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
    if len(embeddings) != len(paths):  # rows are matched to images by position: a dropped image would shift them
        raise DataError(f"{len(paths) - len(embeddings)} of {len(paths)} validation images could not be decoded or "
                        "preprocessed; remove them (or fix them) and train again")
    return embeddings


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
    return RUNS_DIR / slug(f"{data_name}_{config.model}_{config.recipe}_{config.trainable}")


# --------------------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------------------
def set_trainable(net: RetrievalNet, trainable: str) -> None:
    """``head``: only the head; ``blocks:N``: the head, exactly the last N blocks of the backbone's stages
    (:mod:`helpers.models.stages`), its neck and GeM's p; ``all``: the stem, every block and the neck too. Tensors the
    image embedding never uses (CLIP's text tower) stay frozen in every mode."""
    kind, n = parse_trainable(trainable)
    for p in net.backbone.parameters():
        p.requires_grad = False
    if kind != "head":
        stages = backbone_stages_of(net)
        if kind == "blocks" and n > stages.n_blocks:
            raise ValueError(f"--trainable blocks:{n}: {net.backbone.model_name} has {stages.n_blocks} blocks")
        chosen = stages.blocks[-n:] if kind == "blocks" else [stages.stem] + stages.blocks
        for _, p in [item for block in chosen for item in block] + stages.neck + stages.pooling:
            p.requires_grad = True
        if net.backbone.gem is not None:
            net.backbone.gem.p.requires_grad = True
    for p in net.head.parameters():
        p.requires_grad = True


def freeze_unused(net: RetrievalNet, input_size: int, device: torch.device) -> list[str]:
    """Freeze backbone parameters that the image embedding never uses (e.g. CLIP's projection under GeM pooling),
    found by one forward/backward pass on a dummy batch; returns their names."""
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
# The run's data: unreadable images left out, the validation split
# --------------------------------------------------------------------------------------------------------------
_CHECKED: dict[tuple[str, int, int], str | None] = {}


def find_unreadable(paths: list[Path]) -> list[tuple[Path, str]]:
    """``(path, reason)`` of every image that does not decode (checked once per file version and process)."""
    bad = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError as exc:
            bad.append((path, str(exc)))
            continue
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _CHECKED:
            _CHECKED[key] = check_image(path)
        if _CHECKED[key] is not None:
            bad.append((path, _CHECKED[key]))
    return bad


@dataclass
class TrainData:
    """The images of a run: training indices with labels 0..C-1 over ``classes`` (the training classes), and the
    validation queries and gallery (``images`` split: every validation image queries the others)."""

    paths: list[Path]
    class_names: list[str]
    classes: list[str]
    train_idx: list[int]
    labels: dict[int, int]
    val_query: list[int]
    val_gallery: list[int]
    held_out: list[str]
    skipped: list[tuple[Path, str]]


def prepare_data(config: TrainConfig) -> TrainData:
    """List the training folder, leave out unreadable images (named in the log), split off the validation set."""
    items = list_class_folder(training_folder(config.data))
    skipped = find_unreadable([p for p, _ in items])
    report_skipped(skipped, "training images")
    bad = {p for p, _ in skipped}
    items = [(p, c) for p, c in items if p not in bad]
    paths, names = [p for p, _ in items], [c for _, c in items]
    if config.val_split == "classes":
        split = validation_split(items, config.val_classes_fraction, seed=config.seed)
        index = {p: i for i, p in enumerate(paths)}
        held = set(split.held_out)
        train_idx = [i for i, c in enumerate(names) if c not in held]
        query, gallery = [index[p] for p in split.query], [index[p] for p in split.gallery]
        held_out = split.held_out
    else:
        number_of = {c: i for i, c in enumerate(sorted(set(names)))}
        numeric = [number_of[c] for c in names]
        train_idx, val_idx = split_validation(numeric, config.val_fraction, config.val_min_per_class, config.seed)
        query = gallery = val_idx
        held_out = []
    classes = sorted({names[i] for i in train_idx})
    label_of = {c: i for i, c in enumerate(classes)}
    labels = {i: label_of[names[i]] for i in train_idx}
    return TrainData(paths, names, classes, train_idx, labels, query, gallery, held_out, skipped)


def _val_metrics(data: TrainData, embeddings: np.ndarray, val_paths: list[int]) -> dict[str, float]:
    """Retrieval metrics of the validation embeddings (rows in the order of ``val_paths``)."""
    if data.val_query is data.val_gallery:
        return leave_one_out_metrics(embeddings, [data.class_names[i] for i in val_paths])
    from ..search import cosine_topk

    row = {i: r for r, i in enumerate(val_paths)}
    gallery = np.stack([embeddings[row[i]] for i in data.val_gallery])
    queries = np.stack([embeddings[row[i]] for i in data.val_query])
    top, _ = cosine_topk(queries, gallery, k=min(10, len(data.val_gallery)))
    rankings = {str(q): [str(data.val_gallery[j]) for j in r] for q, r in zip(data.val_query, top)}
    truth = {str(q): [str(g) for g in data.val_gallery if data.class_names[g] == data.class_names[q]]
             for q in data.val_query}
    return evaluate_rankings(rankings, truth, k=10).metrics


# --------------------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------------------
def _load_resume(config: TrainConfig, run_dir: Path) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's saved config and ``last.pt``; a foreign or truncated file is a one-line :class:`DataError`."""
    last_path = run_dir / "last.pt"
    if not last_path.exists():
        logger.warning("--resume: no %s yet, starting a new run", last_path)
        return config, None
    try:
        checkpoint = torch.load(last_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"cannot resume from {last_path}: not a readable checkpoint ({reason})") from None
    needed = ("config", "model", "optimizer", "scheduler", "history", "rng", "best", "epoch")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT or \
            any(k not in checkpoint for k in needed):
        raise DataError(f"cannot resume from {last_path}: it is not a last.pt written by `python -m helpers train`")
    saved = TrainConfig.from_dict(checkpoint["config"])
    volatile = {"progress", "device", "num_workers", "out"}
    changed = [k for k, v in config.to_dict().items() if k not in volatile and saved.to_dict().get(k) != v]
    if changed:
        logger.warning("--resume continues with the run's saved settings; ignored: %s", ", ".join(changed))
    saved.progress, saved.device, saved.num_workers, saved.out = (config.progress, config.device,
                                                                  config.num_workers, str(run_dir))
    return saved, checkpoint


# --------------------------------------------------------------------------------------------------------------
# The network, its training set, the optimiser
# --------------------------------------------------------------------------------------------------------------
def build_trainable(config: TrainConfig, device: torch.device) -> tuple[RetrievalNet, Any, bool]:
    """The network with the requested parts trainable; returns (net, registry model, channels_last)."""
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
    # channels-last: about 1.8x faster forward + backward for EfficientNet-Lite0 on a CPU, and the layout
    # tensor cores want on a GPU
    channels_last = not head_mode and base.spec.channels_last
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net, base, channels_last


def _cached_features(config: TrainConfig, base, net: RetrievalNet, paths: list[Path], device: torch.device,
                     flip: bool = False) -> dict[Path, torch.Tensor]:
    """Backbone features of ``paths`` through the embedding cache. Every random state is restored afterwards, so
    that a cold and a warm cache give the same run."""
    from ..embedding import EmbeddingCache, extract_embeddings

    state = rng_state()
    try:
        result = extract_embeddings(FeatureExtractor(base, net.backbone, config.input_size, net.in_dim, flip=flip),
                                    paths, batch_size=min(config.batch_size, 64), device=device,
                                    cache=EmbeddingCache(), progress=config.progress,
                                    desc="mirrored features" if flip else "backbone features",
                                    num_workers=config.num_workers or None,
                                    precision="fp32")  # the head learns on the features retrieval will compute
    finally:
        set_rng_state(state)
    feats = torch.from_numpy(result.embeddings)
    return {Path(p): feats[i] for i, p in enumerate(result.paths)}


def make_train_set(config: TrainConfig, data: TrainData, net: RetrievalNet, base, device: torch.device):
    """(training dataset, its labels, cached validation features or None)."""
    preprocessing = feature_preprocessing(base, config.input_size)
    train_paths = [data.paths[i] for i in data.train_idx]
    train_labels = [data.labels[i] for i in data.train_idx]
    if config.trainable == "head":
        val_paths = [data.paths[i] for i in _val_indices(data)]
        feats = _cached_features(config, base, net, train_paths + val_paths, device)
        pairs = [(feats[p], y) for p, y in zip(train_paths, train_labels) if p in feats]
        if config.head_flip:  # the mirror images' features: a second, cached view of every training image
            mirrored = _cached_features(config, base, net, train_paths, device, flip=True)
            pairs += [(mirrored[p], y) for p, y in zip(train_paths, train_labels) if p in mirrored]
        labels = [y for _, y in pairs]
        val_feats = torch.stack([feats[p] for p in val_paths]) if val_paths else None
        return TensorDataset(torch.stack([f for f, _ in pairs]), torch.tensor(labels)), labels, val_feats
    if config.loss == "ntxent":
        unlabeled = _unlabeled_paths(config, train_paths)
        bad = {p for p, _ in find_unreadable(unlabeled)}
        unlabeled = [p for p in unlabeled if p not in bad]
        return (image_dataset(unlabeled, list(range(len(unlabeled))), train_transform(preprocessing, config), views=2),
                list(range(len(unlabeled))), None)
    return image_dataset(train_paths, train_labels, train_transform(preprocessing, config)), train_labels, None


def make_loader(config: TrainConfig, train_set, train_labels: list[int], notes: list[str]) -> tuple[DataLoader, int]:
    """P-K batches (or random batches for SimCLR); returns (loader, images per batch)."""
    head_mode = config.trainable == "head"
    collate = getattr(train_set, "collate_fn", None)  # image files: batches paired with their labels
    if config.sampler == "pk":
        sampler = PKSampler(train_labels, config.classes_per_batch, config.images_per_class,
                            keep_batch=config.pk_keep_batch)
        notes += sampler.notes
        loader = DataLoader(train_set, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                            num_workers=0 if head_mode else config.num_workers, collate_fn=collate)
        batch_size = sampler.batch_size
    else:
        batch_size = min(config.batch_size, len(train_set))
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=config.num_workers, collate_fn=collate)
    if len(loader) == 0:
        raise DataError(f"too few training images ({len(train_set)}) for one batch of {batch_size}")
    return loader, batch_size


def _val_indices(data: TrainData) -> list[int]:
    return sorted(set(data.val_query) | set(data.val_gallery))


# --------------------------------------------------------------------------------------------------------------
# One epoch, validation, checkpoints
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Stepper:
    """What one optimiser step needs: gradient accumulation over ``grad_accum`` batches, clipping, AMP scaling, the
    scheduler step, GeM's p kept at 1 or more; records the head's and the top block's rates as used."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    grad_accum: int = 1
    grad_clip: float = 0.0
    gem_modules: list[nn.Module] = field(default_factory=list)
    used_lrs: dict[str, list[float]] = field(default_factory=dict)

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for key, lr in _watched_lrs(self.optimizer).items():
            self.used_lrs.setdefault(key, []).append(lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        for module in self.gem_modules:
            module.clamp_()


def _watched_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The head's rate and the top trainable block's rate (the highest ``block.<i>``) of the optimiser now."""
    lrs = {g.get("group", ""): float(g["lr"]) for g in optimizer.param_groups}
    blocks = sorted((int(k.split(".")[1]), v) for k, v in lrs.items() if k.startswith("block."))
    out = {"head": lrs["head"]} if "head" in lrs else {}
    if blocks:
        out["top_block"] = blocks[-1][1]
    return out


def run_epoch(embed: Callable[[torch.Tensor], torch.Tensor], criterion: Callable, loader, stepper: Stepper,
              epoch: int, loss_kind: str = "", to_device: Callable = lambda x: x, amp: Callable | None = None,
              callback: Callable[[int, int], None] | None = None, bar=None) -> float:
    """Train over ``loader`` once; returns the mean loss. ``loss/grad_accum`` is back-propagated per batch and the
    optimiser steps every ``grad_accum`` batches (and after the last one)."""
    import contextlib

    steps = len(loader)
    total, n = 0.0, 0
    stepper.optimizer.zero_grad(set_to_none=True)
    for step, (x, y) in enumerate(bar if bar is not None else loader):
        if loss_kind == "ntxent":
            x = torch.cat([x[0], x[1]])
            y = torch.arange(len(y)).repeat(2)
        x = to_device(x)
        y = y.to(x.device)
        with (amp() if amp is not None else contextlib.nullcontext()):
            emb = embed(x)
        loss = criterion(emb.float(), y, epoch)
        stepper.scaler.scale(loss / stepper.grad_accum).backward()
        if (step + 1) % stepper.grad_accum == 0 or step + 1 == steps:
            stepper.step()
        total += float(loss.detach())
        n += 1
        if bar is not None:
            bar.set_postfix({"loss": f"{total / n:.4f}"})
        if callback is not None:
            callback(epoch, step)
    return total / max(1, n)


def _checkpoint_common(config: TrainConfig, data: TrainData, net: RetrievalNet, history: list[dict[str, Any]],
                       epoch: int, metrics: dict[str, float] | None) -> dict[str, Any]:
    info = training_info(config, history, epoch, net.backbone.pool_type)
    # Only the published backbone can be rebuilt identically: a random or local-file backbone is saved whole.
    head_only_state = config.trainable == "head" and config.weights == "pretrained"
    return {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "head_only_state": head_only_state,
            "backbone_weights": config.weights, "epoch": epoch, "metrics": metrics, "training_info": info,
            "classes": data.classes, "held_out": data.held_out}


# --------------------------------------------------------------------------------------------------------------
# train() and train --plan
# --------------------------------------------------------------------------------------------------------------
@dataclass
class _Session:
    """Everything a run builds before its first epoch."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    data: TrainData
    net: RetrievalNet
    base: Any
    channels_last: bool
    criterion: Criterion
    loader: DataLoader
    batch_size: int
    stepper: Stepper
    val_feats: torch.Tensor | None
    notes: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"score": -math.inf, "epoch": 0, "bad_epochs": 0,
                                                          "metrics": None})

    @property
    def use_amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"


def _optimizer_for(config: TrainConfig, net: RetrievalNet, criterion: nn.Module, optimizer_steps: int
                   ) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = make_optimizer(net, criterion, config.lr, config.head_lr, config.backbone_lr, config.weight_decay,
                               config.layer_decay)
    return optimizer, make_scheduler(optimizer, optimizer_steps, config.warmup_fraction)


def _setup(config: TrainConfig, run_dir: Path) -> _Session:
    device = resolve_device(config.device)
    seed_everything(config.seed)
    data = prepare_data(config)
    notes = [f"left out {len(data.skipped)} unreadable image(s): " + ", ".join(str(p) for p, _ in data.skipped)] \
        if data.skipped else []
    if not data.val_query:
        notes.append("no validation split (too few images or classes): best.pt is the last epoch")
        logger.warning(notes[-1])
    net, base, channels_last = build_trainable(config, device)
    criterion = Criterion(config, num_classes=len(data.classes), embedding_size=config.embed_dim).to(device)
    train_set, train_labels, val_feats = make_train_set(config, data, net, base, device)
    loader, batch_size = make_loader(config, train_set, train_labels, notes)
    optimizer_steps = math.ceil(len(loader) / config.grad_accum) * config.epochs
    optimizer, scheduler = _optimizer_for(config, net, criterion, optimizer_steps)
    gems = [m for m in net.modules() if isinstance(m, GeM)]
    stepper = Stepper(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda"),
                      config.grad_accum, config.grad_clip, gems)
    return _Session(config, run_dir, device, data, net, base, channels_last, criterion, loader, batch_size, stepper,
                    val_feats, notes)


def _restore(s: _Session, checkpoint: dict[str, Any]) -> int:
    """Load every state of ``last.pt``; returns the first epoch still to run."""
    s.net.load_state_dict(checkpoint["model"], strict=not checkpoint.get("head_only_state", False))
    s.criterion.load_state_dict(checkpoint["criterion"])
    s.stepper.optimizer.load_state_dict(checkpoint["optimizer"])
    s.stepper.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint.get("scaler"):
        s.stepper.scaler.load_state_dict(checkpoint["scaler"])
    s.history = list(checkpoint["history"])
    s.best = dict(checkpoint["best"])
    set_rng_state(checkpoint["rng"])
    logger.info("resuming %s after epoch %d", s.run_dir, checkpoint["epoch"])
    return int(checkpoint["epoch"]) + 1


def _validate(s: _Session) -> dict[str, float] | None:
    if not s.data.val_query:
        return None
    if s.config.trainable == "head":
        s.net.eval()
        with torch.inference_mode():
            val_emb = s.net.head(s.val_feats.to(s.device)).float().cpu().numpy()
    else:
        val_emb = _embed_images(s.net, [s.data.paths[i] for i in _val_indices(s.data)],
                                feature_preprocessing(s.base, s.config.input_size).transform(),
                                s.config.batch_size, s.device, s.use_amp, s.channels_last)
    return _val_metrics(s.data, val_emb, _val_indices(s.data))


def _epoch(s: _Session, epoch: int, callback: Callable[[int, int], None] | None) -> None:
    """Train one epoch, validate, write best.pt (on improvement), last.pt and history.json."""
    from tqdm.auto import tqdm

    config, net, start = s.config, s.net, time.perf_counter()
    _train_mode(net)
    s.criterion.train()
    s.stepper.used_lrs = {}
    head_mode = config.trainable == "head"
    bar = tqdm(s.loader, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
    loss = run_epoch(net.head if head_mode else net, s.criterion, s.loader, s.stepper, epoch, config.loss,
                     lambda x: _to_device(x, s.device, s.channels_last), lambda: _autocast(s.device, s.use_amp),
                     callback, bar)
    bar.close()
    metrics = _validate(s)
    used = {k: float(np.mean(v)) for k, v in s.stepper.used_lrs.items()}
    row = {"epoch": epoch, "train_loss": loss, "lr": used.get("head"), "lr_head": used.get("head"),
           "lr_top_block": used.get("top_block"), "miner": s.criterion.miner_active(epoch),
           "seconds": time.perf_counter() - start, **({f"val_{k}": v for k, v in metrics.items()} if metrics else {})}
    s.history.append(row)
    score = metrics[MONITOR] if metrics else epoch  # no validation: the latest epoch is the best
    common = _checkpoint_common(config, s.data, net, s.history, epoch, metrics)
    model_state = _model_state(net, common["head_only_state"])
    improved = score > s.best["score"]
    if improved:
        s.best.update(score=score, epoch=epoch, bad_epochs=0, metrics=metrics)
        _save(s.run_dir / "best.pt", {**common, "model": model_state, "criterion": s.criterion.state_dict()})
    else:
        s.best["bad_epochs"] += 1
    logger.info("epoch %d/%d: train loss %.4f%s%s", epoch, config.epochs, loss,
                f", val {MONITOR} {metrics[MONITOR]:.4f} hit@1 {metrics['hit@1']:.4f}" if metrics else "",
                " (best)" if improved else "")
    _save(s.run_dir / "last.pt", {
        **common, "model": model_state, "criterion": s.criterion.state_dict(),
        "optimizer": s.stepper.optimizer.state_dict(), "scheduler": s.stepper.scheduler.state_dict(),
        "scaler": s.stepper.scaler.state_dict(), "history": s.history, "rng": rng_state(), "best": dict(s.best)})
    _write_history(s)


def _write_history(s: _Session, **extra: Any) -> None:
    write_json(s.run_dir / "history.json", {"history": s.history, "best_epoch": s.best["epoch"],
                                            "best_metrics": s.best["metrics"], "monitor": MONITOR,
                                            "val_split": s.config.val_split, "held_out": s.data.held_out, **extra})


def train(config: TrainConfig | None = None, resume: bool = False,
          callback: Callable[[int, int], None] | None = None, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says (or ``make_config(**overrides)``) and write the run folder.

    ``resume=True`` continues from ``RUN_DIR/last.pt`` with its saved config and states (the epoch that was
    interrupted is run again from its start, so the result equals an uninterrupted run). ``callback(epoch, step)``
    is called after every batch (tests use it to interrupt a run).
    """
    if config is None:
        config = make_config(overrides.pop("recipe", None), **overrides)
    validate_config(config)
    start_time = time.perf_counter()
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    checkpoint = None
    if resume:
        config, checkpoint = _load_resume(config, run_dir)
    s = _setup(config, run_dir)
    start_epoch = _restore(s, checkpoint) if checkpoint is not None else 1
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = len(s.loader)
    write_json(run_dir / "config.json", {
        **config.to_dict(), "classes": s.data.classes, "held_out": s.data.held_out, "n_train": len(s.data.train_idx),
        "n_val": len(_val_indices(s.data)), "batch_size_effective": s.batch_size, "steps_per_epoch": steps,
        "optimizer_steps": math.ceil(steps / config.grad_accum) * config.epochs, "device": str(s.device),
        "skipped": [str(p) for p, _ in s.data.skipped], "notes": s.notes})
    stopped_early = False
    for epoch in range(start_epoch, config.epochs + 1):
        if s.best["bad_epochs"] >= config.patience:
            stopped_early = True
            break
        _epoch(s, epoch, callback)
    else:
        stopped_early = s.best["bad_epochs"] >= config.patience and len(s.history) < config.epochs
    _write_history(s, stopped_early=stopped_early, epochs_run=len(s.history))
    return TrainResult(run_dir, run_dir / "best.pt", run_dir / "last.pt", s.history, s.best["epoch"],
                       s.best["metrics"], len(s.history), stopped_early, time.perf_counter() - start_time, s.notes)


def plan(config: TrainConfig) -> list[dict[str, Any]]:
    """Build the network and its optimiser as :func:`train` would, train nothing; write ``RUN/param_groups.json``
    (one row per optimiser group: ``group``, ``tensors``, ``numel``, ``lr``, ``weight_decay``) and return it.

    Without a data folder, the loss's own weights (``ce``/``arcface``) are sized for 2 classes."""
    validate_config(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    try:
        n_classes = len(prepare_data(config).classes)
    except DataError:
        n_classes = 2
    net, _, _ = build_trainable(config, device)
    criterion = Criterion(config, num_classes=n_classes, embedding_size=config.embed_dim).to(device)
    groups = param_groups(net, criterion, config.lr, config.head_lr, config.backbone_lr, config.weight_decay,
                          config.layer_decay)
    rows = group_table(groups)
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    write_json(run_dir / "param_groups.json", rows)
    return rows


def _unlabeled_paths(config: TrainConfig, fallback: list[Path]) -> list[Path]:
    """The images SimCLR learns from: ``config.unlabeled`` folders, else DIR/test/query + DIR/test/gallery, else
    the training images (their labels unused)."""
    folders = [Path(f) for f in config.unlabeled]
    if not folders:
        root = Path(config.data)
        folders = [f for f in (root / "test" / "query", root / "test" / "gallery") if f.is_dir()]
    found = [p for folder in folders for p in list_images(folder)]
    return found or list(fallback)
