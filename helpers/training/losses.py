"""Losses, miners and the P-K sampler, wired from pytorch-metric-learning.

:class:`Criterion` is an ``nn.Module`` (ArcFace and the ``ce`` classifier carry weights that train with the head)
whose call ``criterion(embeddings, labels, epoch)`` applies the recipe's miner from ``miner_start_epoch`` on
(epochs count from 1) and returns the loss.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Sampler

from .recipes import TrainConfig

logger = logging.getLogger(__name__)


class CosineClassifierLoss(nn.Module):
    """Cross-entropy over cosine logits ``<e, w_c/|w_c|> / T`` with label smoothing (Zhai & Wu, BMVC 2019).

    The classifier only trains the embedding: retrieval never sees its logits.
    """

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05,
                 label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        e = nn.functional.normalize(embeddings.float(), dim=-1)
        w = nn.functional.normalize(self.weight.float(), dim=-1)
        return e @ w.t() / self.temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.logits(embeddings), labels, label_smoothing=self.label_smoothing)


def balanced_pairs(labels: torch.Tensor, generator: torch.Generator | None = None):
    """Siamese pairs from one batch: for every image with a same-class partner, one random positive and one random
    negative partner. Returns pytorch-metric-learning's pair tuple ``(a1, p, a2, n)``."""
    labels = labels.cpu()
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool)
    a1, p, a2, neg = [], [], [], []
    for i in range(n):
        pos_idx = torch.nonzero(same[i] & ~eye[i]).flatten()
        neg_idx = torch.nonzero(~same[i]).flatten()
        if len(pos_idx):
            a1.append(i)
            p.append(int(pos_idx[torch.randint(len(pos_idx), (1,), generator=generator)]))
        if len(neg_idx):
            a2.append(i)
            neg.append(int(neg_idx[torch.randint(len(neg_idx), (1,), generator=generator)]))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_tensor(a1), as_tensor(p), as_tensor(a2), as_tensor(neg)


class Criterion(nn.Module):
    """The recipe's loss (and miner) over L2-normalised embeddings."""

    def __init__(self, config: TrainConfig, num_classes: int, embedding_size: int) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.name = config.loss
        self.miner_name = config.miner
        self.miner_start_epoch = config.miner_start_epoch
        self.miner = None
        if config.loss == "circle":
            self.loss = losses.CircleLoss(m=config.circle_m, gamma=config.circle_gamma)
        elif config.loss == "contrastive":
            self.loss = losses.ContrastiveLoss(pos_margin=config.contrastive_pos_margin,
                                               neg_margin=config.contrastive_neg_margin)
        elif config.loss == "triplet":
            self.loss = losses.TripletMarginLoss(margin=config.triplet_margin)
        elif config.loss == "arcface":
            self.loss = losses.ArcFaceLoss(num_classes, embedding_size, margin=config.arcface_margin_deg,
                                           scale=config.arcface_scale)
        elif config.loss == "supcon":
            self.loss = losses.SupConLoss(temperature=config.supcon_temperature)
        elif config.loss == "ce":
            self.loss = CosineClassifierLoss(num_classes, embedding_size, config.ce_temperature,
                                             config.ce_label_smoothing)
        elif config.loss == "ntxent":
            self.loss = losses.NTXentLoss(temperature=config.ntxent_temperature)
        else:  # pragma: no cover - validated in recipes
            raise ValueError(f"unknown loss {config.loss!r}")
        if config.miner == "multisimilarity":
            self.miner = miners.MultiSimilarityMiner(epsilon=config.miner_epsilon)
        elif config.miner == "semihard":
            self.miner = miners.TripletMarginMiner(margin=config.triplet_margin, type_of_triplets="semihard")
        elif config.miner not in (None, "none", "pairs"):
            raise ValueError(f"unknown miner {config.miner!r} (multisimilarity, semihard, pairs or none)")

    def miner_active(self, epoch: int) -> bool:
        return self.miner_name not in (None, "none") and epoch >= self.miner_start_epoch

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, epoch: int = 1) -> torch.Tensor:
        embeddings = embeddings.float()
        if self.name == "ce":
            return self.loss(embeddings, labels)
        if self.miner_name == "pairs":
            pairs = tuple(t.to(embeddings.device) for t in balanced_pairs(labels))
            return self.loss(embeddings, labels, indices_tuple=pairs)
        indices = None
        if self.miner is not None and self.miner_active(epoch):
            indices = self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices_tuple=indices)


# --------------------------------------------------------------------------------------------------------------
# P-K batches
# --------------------------------------------------------------------------------------------------------------
def adapt_pk(labels: Sequence[int], classes_per_batch: int, images_per_class: int, keep_batch: bool = True
             ) -> tuple[int, int, list[str]]:
    """The P and K that the data allows, with a note for each adaptation (also logged).

    Fewer classes than P: P becomes the number of classes and, with ``keep_batch``, K grows so that the batch keeps
    about P*K images (at most the smallest class's size, so that no image repeats within a batch for it).
    Classes with fewer than K images: their images repeat within a batch (sampled with replacement).
    """
    counts = Counter(int(label) for label in labels)
    notes: list[str] = []
    p, k = classes_per_batch, images_per_class
    if len(counts) < 2:
        raise ValueError(f"metric learning needs at least 2 classes in the training folders, found {len(counts)}")
    if len(counts) < p:
        p = len(counts)
        if keep_batch:
            k = max(k, min(classes_per_batch * images_per_class // p, min(counts.values())))
        notes.append(f"only {p} classes (< P={classes_per_batch}): batches hold P={p} classes x K={k} images")
    small = sorted(c for c, n in counts.items() if n < k)
    if small:
        notes.append(f"{len(small)} class(es) have fewer than K={k} images: their images repeat within a batch")
    for note in notes:
        logger.warning("P-K sampler: %s", note)
    return p, k, notes


class PKSampler(Sampler[int]):
    """P classes x K images per batch via pytorch-metric-learning's ``MPerClassSampler``, adapted to the data.

    Yields indices; consecutive groups of ``batch_size = P*K`` form one batch (use it with ``drop_last=True``).
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int = 32, images_per_class: int = 4,
                 length: int | None = None, keep_batch: bool = True) -> None:
        from pytorch_metric_learning.samplers import MPerClassSampler

        self.p, self.k, self.notes = adapt_pk(labels, classes_per_batch, images_per_class, keep_batch)
        self.batch_size = self.p * self.k
        n = len(labels) if length is None else length
        n = max(self.batch_size, (n // self.batch_size) * self.batch_size)
        self.sampler = MPerClassSampler(list(int(x) for x in labels), m=self.k, batch_size=self.batch_size,
                                        length_before_new_iter=n)
        self._labels = sorted(self.sampler.labels)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        # MPerClassSampler shuffles its label list in place: start every epoch from the same order, so that an
        # epoch depends only on the random state (what makes --resume exact).
        self.sampler.labels = list(self._labels)
        return iter(self.sampler)
