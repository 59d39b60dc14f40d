"""AdamW with layer-wise learning-rate decay (LLRD), and the warm-up + cosine schedule.

LLRD (Clark et al. 2020; Bao et al. 2022 "BEiT"): the backbone is cut into layers from the input to the output:
the stem (everything before the block list), each block (transformer blocks, or a CNN's stages), then whatever
follows the blocks (final norm / projection / last conv). With L the index of the last layer, layer i trains at
``lr * decay ** (L - i)``; the head, the pooling's GeM exponent and the loss's own weights train at ``head_lr``.
Biases, norms and other 1-d parameters get no weight decay (the usual AdamW practice).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def find_blocks(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The backbone's block list: the ``ModuleList``/``Sequential`` of at least 3 children holding the most
    parameters (e.g. ``blocks`` of a timm CNN or ViT, ``transformer.resblocks`` of CLIP's visual tower)."""
    best: tuple[int, int, str, nn.Module] | None = None
    for name, child in module.named_modules():
        if not isinstance(child, (nn.ModuleList, nn.Sequential)) or len(child) < 3:
            continue
        n_params = sum(p.numel() for p in child.parameters())
        depth = name.count(".")
        key = (n_params, -depth)
        if best is None or key > best[:2]:
            best = (n_params, -depth, name, child)
    return None if best is None else (best[2], best[3])


def backbone_layers(backbone: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The backbone's parameters grouped into layers from input to output (see the module docstring)."""
    found = find_blocks(backbone)
    params = list(backbone.named_parameters())
    if found is None:
        return [params] if params else []
    prefix, blocks = found
    prefix = prefix + "." if prefix else ""
    n_blocks = len(blocks)
    stem, after = [], []
    per_block: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(n_blocks)]
    block_names = [name for name, _ in blocks.named_children()]
    seen_block = False
    for name, param in params:
        if name.startswith(prefix):
            first = name[len(prefix):].split(".", 1)[0]
            if first in block_names:
                per_block[block_names.index(first)].append((name, param))
                seen_block = True
                continue
        (after if seen_block else stem).append((name, param))
    layers = ([stem] if stem else []) + [b for b in per_block if b] + ([after] if after else [])
    return layers


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, criterion: nn.Module | None, lr: float, head_lr: float,
                 weight_decay: float = 0.05, layer_decay: float = 0.65) -> list[dict[str, Any]]:
    """AdamW parameter groups with LLRD over ``model.backbone`` and ``head_lr`` for the rest.

    Only parameters with ``requires_grad`` are included. Each group carries ``name`` (``layer_i`` or ``head``),
    ``lr`` and ``weight_decay``.
    """
    groups: list[dict[str, Any]] = []

    def add(name: str, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        decay = [p for n, p in named if p.requires_grad and not _no_decay(n, p)]
        no_decay = [p for n, p in named if p.requires_grad and _no_decay(n, p)]
        if decay:
            groups.append({"name": name, "params": decay, "lr": group_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": group_lr, "weight_decay": 0.0})

    backbone = getattr(model, "backbone", None)
    backbone_ids: set[int] = set()
    gem_params: list[tuple[str, nn.Parameter]] = []
    if backbone is not None:
        network = getattr(backbone, "network", backbone)
        layers = backbone_layers(network)
        last = len(layers) - 1
        for i, layer in enumerate(layers):
            gem_params += [(n, p) for n, p in layer if n.endswith("gem.p")]
            add(f"layer_{i}", [(n, p) for n, p in layer if not n.endswith("gem.p")], lr * layer_decay ** (last - i))
        backbone_ids = {id(p) for p in backbone.parameters()}
        network_ids = {id(p) for p in network.parameters()}
        gem_params += [(n, p) for n, p in backbone.named_parameters() if id(p) not in network_ids]
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in backbone_ids]
    if criterion is not None:
        rest += [(f"criterion.{n}", p) for n, p in criterion.named_parameters()]
    add("head", rest + gem_params, head_lr)
    return groups


def make_optimizer(model: nn.Module, criterion: nn.Module | None, lr: float, head_lr: float,
                   weight_decay: float = 0.05, layer_decay: float = 0.65) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over :func:`param_groups`."""
    groups = param_groups(model, criterion, lr, head_lr, weight_decay, layer_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=head_lr, weight_decay=weight_decay)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): linear warm-up from
    1/warmup to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.15
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over the first ``warmup_fraction`` of the optimiser steps, then cosine; call ``step()`` after
    every optimiser step."""
    warmup = int(math.ceil(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, total_steps, warmup)
    )
