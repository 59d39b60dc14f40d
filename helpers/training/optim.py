"""AdamW with layer-wise learning-rate decay (LLRD) over the backbone's explicit stages, and the warm-up + cosine
schedule.

LLRD as the recipe states it (Clark et al. 2020 "ELECTRA"; Bao et al. 2022 "BEiT"): with the backbone's ``n``
ordered blocks (:mod:`helpers.models.stages`), block ``i`` trains at ``lr * layer_decay ** (n - 1 - i)`` (the top
block at ``lr``); the stem (patch/position embeddings, first convolutions) and the neck (final norm, projection, last
conv) at one flat ``backbone_lr``; the head and the pooling's GeM exponent at ``head_lr``, and so do the loss's own
weights (group ``loss``). Biases, norms and other 1-d parameters get no weight decay (the usual AdamW practice).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def backbone_stages_of(model: nn.Module):
    """The :class:`helpers.models.stages.Stages` of ``model.backbone`` (a :class:`RetrievalNet`)."""
    from ..models.stages import backbone_stages

    backbone = model.backbone
    return backbone_stages(backbone.network, getattr(backbone, "model_name", ""))


def param_groups(model: nn.Module, criterion: nn.Module | None, lr: float, head_lr: float, backbone_lr: float,
                 weight_decay: float = 0.05, layer_decay: float = 0.65) -> list[dict[str, Any]]:
    """AdamW parameter groups ``stem``, ``block.<i>``, ``neck``, ``head`` and ``loss`` (see the module docstring).

    Only parameters with ``requires_grad`` are included, each exactly once. A group whose tensors split into decayed
    and not decayed ones becomes two optimiser groups with the same ``group`` name. Each carries ``group``, ``lr``
    and ``weight_decay``.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()

    def add(name: str, named: list[tuple[str, nn.Parameter]], group_lr: float) -> None:
        named = [(n, p) for n, p in named if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for _, p in named)
        for wd, members in ((weight_decay, [p for n, p in named if not _no_decay(n, p)]),
                            (0.0, [p for n, p in named if _no_decay(n, p)])):
            if members:
                groups.append({"group": name, "params": members, "lr": group_lr, "weight_decay": wd})

    stages = backbone_stages_of(model)
    add("stem", stages.stem, backbone_lr)
    n = stages.n_blocks
    for i, block in enumerate(stages.blocks):
        add(f"block.{i}", block, lr * layer_decay ** (n - 1 - i))
    add("neck", stages.neck, backbone_lr)
    head = [(f"backbone.network.{n}", p) for n, p in stages.pooling]
    head += [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.network.")]
    add("head", head, head_lr)
    if criterion is not None:
        add("loss", list(criterion.named_parameters()), head_lr)
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if stray:
        raise ValueError(f"trainable tensors outside every stage: {stray[:3]}")
    return groups


def group_table(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON row per optimiser group: ``{"group", "tensors", "numel", "lr", "weight_decay"}``."""
    return [{"group": g["group"], "tensors": len(g["params"]), "numel": int(sum(p.numel() for p in g["params"])),
             "lr": float(g["lr"]), "weight_decay": float(g["weight_decay"])} for g in groups]


def format_group_table(rows: list[dict[str, Any]]) -> str:
    """The parameter-group table as Markdown."""
    lines = ["| group | tensors | parameters | lr | weight decay |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['tensors']} | {r['numel']:,} | {r['lr']:.3g} | {r['weight_decay']:g} |"
              for r in rows]
    return "\n".join(lines)


def make_optimizer(model: nn.Module, criterion: nn.Module | None, lr: float, head_lr: float, backbone_lr: float,
                   weight_decay: float = 0.05, layer_decay: float = 0.65) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over :func:`param_groups`."""
    groups = param_groups(model, criterion, lr, head_lr, backbone_lr, weight_decay, layer_decay)
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
