"""Training recipes: one dataclass holding every knob of a run, and the named recipes that set its defaults.

Every value can be overridden (``TrainConfig(**overrides)`` or the ``train`` verb's options). The defaults and where
they come from:

| knob | default | source |
|---|---|---|
| pooling | GeM, p=3 learnable | Radenovic, Tolias, Chum, TPAMI 2019 |
| head | Linear(in->512, no bias) + BatchNorm1d + Dropout(0.1) + L2 | BNNeck: Luo et al., CVPR-W 2019 "Bag of tricks for person re-ID" |
| Circle loss | m=0.4, gamma=80 | Sun et al., CVPR 2020 "Circle Loss" (their retrieval setting) |
| MultiSimilarity miner | epsilon=0.1, from epoch 5 | Wang et al., CVPR 2019 "Multi-Similarity Loss" |
| P-K batches | P=32 classes x K=4 images | Hermans, Beyer, Leibe 2017 "In Defense of the Triplet Loss" |
| AdamW | weight decay 0.05 | Loshchilov & Hutter, ICLR 2019; 0.05 as in BEiT / DeiT fine-tuning |
| layer-wise LR decay | block i at lr * 0.65 ** (n_blocks - 1 - i); stem and neck at a flat backbone_lr | Bao et al., ICLR 2022 "BEiT" (ViT-B fine-tuning); Clark et al. 2020 "ELECTRA" |
| clip-gem-circle rates | top block 4e-4, decay 0.65, stem/neck 4e-5, head 4e-4, weight decay 0.05 | the mission recipe |
| CNN rates (other recipes) | top block 1e-4, decay 0.65, stem/neck 1e-5, head 1e-3 | AdamW fine-tuning practice; measured in the README's open-set table |
| validation | 20% of the classes (at least 2), whole classes held out | open-set retrieval: identities unseen in training |
| schedule | linear warm-up 15% of steps, then cosine | Goyal et al. 2017 (warm-up); Loshchilov & Hutter, ICLR 2017 "SGDR" (cosine) |
| gradient clipping | 1.0 (global norm) | Pascanu et al., ICML 2013 |
| contrastive (siamese) | positive margin 0, negative margin 1 | Hadsell, Chopra, LeCun, CVPR 2006 |
| triplet | margin 0.2, semi-hard mining | Schroff, Kalenichenko, Philbin, CVPR 2015 "FaceNet" |
| ArcFace | margin 0.5 rad (28.6 deg), scale 64 | Deng et al., CVPR 2019 "ArcFace" |
| SupCon | temperature 0.1 | Khosla et al., NeurIPS 2020 |
| ce | cosine classifier, temperature 0.05, label smoothing 0.1 | Zhai & Wu, BMVC 2019 "Classification is a Strong Baseline for Deep Metric Learning" |
| SimCLR (NT-Xent) | temperature 0.5, crop scale 0.08-1 | Chen et al., ICML 2020 "SimCLR" (CIFAR-10 setting) |
| augmentation | random resized crop 0.8-1, flip, colour jitter 0.4/0.4/0.4/0.1 (p=0.8), grayscale p=0.2, random erasing p=0.25 | SimCLR (jitter/grayscale), Zhong et al. AAAI 2020 (erasing) |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

LOSSES = ("circle", "contrastive", "triplet", "arcface", "supcon", "ce", "ntxent")
TRAINABLE_HELP = "head | blocks:N | all"


@dataclass
class TrainConfig:
    """Everything that defines one training run (JSON-compatible primitives only: it is stored in checkpoints)."""

    data: str = "data"
    model: str = "efficientnet-lite0"
    recipe: str = "circle"
    weights: str = "pretrained"
    out: str | None = None
    # what to train
    trainable: str = "head"
    pool: str = "gem"
    embed_dim: int = 512
    dropout: float = 0.1
    input_size: int | None = None
    #: ``--trainable head``: also train on the cached features of each training image's mirror image (the cached
    #: features see no random augmentation; the horizontal flip is the one that can be cached).
    head_flip: bool = True
    # loss and mining
    loss: str = "circle"
    circle_m: float = 0.4
    circle_gamma: float = 80.0
    miner: str | None = "multisimilarity"
    miner_epsilon: float = 0.1
    miner_start_epoch: int = 5
    contrastive_pos_margin: float = 0.0
    contrastive_neg_margin: float = 1.0
    triplet_margin: float = 0.2
    arcface_margin_deg: float = 28.6
    arcface_scale: float = 64.0
    supcon_temperature: float = 0.1
    ce_temperature: float = 0.05
    ce_label_smoothing: float = 0.1
    ntxent_temperature: float = 0.5
    # batches
    sampler: str = "pk"  # pk | random (simclr)
    classes_per_batch: int = 32
    images_per_class: int = 4
    pk_keep_batch: bool = True  # fewer classes than P: raise K to keep ~P*K images per batch
    batch_size: int = 128  # random batches (simclr) and feature extraction
    grad_accum: int = 1
    # optimisation
    epochs: int = 20
    lr: float = 1e-4  # the top block; block i at lr * layer_decay ** (n_blocks - 1 - i)
    head_lr: float = 1e-3  # the head, GeM's p and the loss's weights
    backbone_lr: float = 1e-5  # stem and neck (flat)
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    warmup_fraction: float = 0.15
    grad_clip: float = 1.0
    amp: bool = True
    grad_checkpointing: bool = True
    # augmentation
    crop_scale_min: float = 0.8
    color_jitter: float = 0.4
    grayscale_p: float = 0.2
    erasing_p: float = 0.25
    # validation: "classes" holds out whole classes (val_classes_fraction of them, at least 2), "images" a share of
    # every class's images (val_fraction, closed-set data)
    val_split: str = "classes"
    val_classes_fraction: float = 0.2
    val_fraction: float = 0.1
    val_min_per_class: int = 2
    patience: int = 5
    # unlabeled folders for simclr (default: DIR/test/query and DIR/test/gallery, else the training images)
    unlabeled: list[str] = field(default_factory=list)
    # run
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


#: Recipe name -> (overrides of the TrainConfig defaults, one-line description).
RECIPES: dict[str, tuple[dict[str, Any], str]] = {
    "clip-gem-circle": (
        dict(model="clip-vit-l14", pool="gem", loss="circle", miner="multisimilarity", trainable="all",
             lr=4e-4, head_lr=4e-4, backbone_lr=4e-5, layer_decay=0.65, weight_decay=0.05),
        "the mission recipe for CLIP: GeM over pre-projection patch tokens, BNNeck head, Circle loss, "
        "MultiSimilarity miner from epoch 5, P-K 32x4, AdamW + LLRD 0.65, warm-up 15% + cosine",
    ),
    "circle": (
        dict(pool="gem", loss="circle", miner="multisimilarity"),
        "the same recipe over any backbone (GeM where the backbone gives a feature map, else its own pooling)",
    ),
    "siamese": (
        dict(loss="contrastive", miner="pairs", miner_start_epoch=1),
        "balanced positive/negative pairs through one shared encoder, contrastive loss (Hadsell et al. 2006)",
    ),
    "triplet": (
        dict(loss="triplet", miner="semihard", miner_start_epoch=1),
        "triplet margin loss with semi-hard triplets from each P-K batch (FaceNet)",
    ),
    "arcface": (
        dict(loss="arcface", miner=None),
        "additive angular margin classifier loss on the embedding (ArcFace)",
    ),
    "supcon": (
        dict(loss="supcon", miner=None),
        "supervised contrastive loss over the P-K batch (Khosla et al. 2020)",
    ),
    "ce": (
        dict(loss="ce", miner=None),
        "cosine-softmax classifier on the embedding; retrieval uses the embedding, never the logits",
    ),
    "simclr": (
        dict(loss="ntxent", miner=None, sampler="random", trainable="all", crop_scale_min=0.08, color_jitter=0.8,
             batch_size=128),
        "self-supervised NT-Xent on two augmented views of unlabeled images (SimCLR)",
    ),
}


def default_recipe(model: str) -> str:
    """``clip-gem-circle`` for CLIP names, ``circle`` for everything else."""
    return "clip-gem-circle" if model.lower().startswith("clip") else "circle"


def make_config(recipe: str | None = None, **overrides: Any) -> TrainConfig:
    """The recipe's defaults with ``overrides`` applied (``None`` values are ignored: they mean "not given").

    The recipe's own model is used only when no model is given.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if recipe is None:
        recipe = default_recipe(overrides.get("model", TrainConfig.model))
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    values, _ = RECIPES[recipe]
    config = replace(TrainConfig(), recipe=recipe, **values)
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    config = replace(config, **overrides)
    validate_config(config)
    return config


def parse_trainable(text: str) -> tuple[str, int]:
    """``head`` -> ("head", 0); ``blocks:N`` -> ("blocks", N); ``all`` -> ("all", 0)."""
    if text in ("head", "all"):
        return text, 0
    kind, _, number = text.partition(":")
    if kind == "blocks" and number.isdigit() and int(number) >= 1:
        return "blocks", int(number)
    raise ValueError(f"--trainable must be {TRAINABLE_HELP}, not {text!r}")


def validate_config(config: TrainConfig) -> None:
    """Raise ValueError naming the option for impossible combinations."""
    parse_trainable(config.trainable)
    if config.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if config.loss == "ntxent" and config.trainable == "head":
        raise ValueError("the simclr recipe needs image augmentations, so it cannot train on cached features: "
                         "use --trainable all or blocks:N")
    if config.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    if config.miner_start_epoch < 1:
        raise ValueError("--miner-start-epoch counts from 1")
    if config.classes_per_batch < 2 or config.images_per_class < 2:
        raise ValueError("P-K batches need at least 2 classes (P) and 2 images per class (K)")
    if config.grad_accum < 1:
        raise ValueError("--grad-accum must be at least 1")
    if not 0 <= config.warmup_fraction < 1:
        raise ValueError("--warmup-fraction must be in [0, 1)")
    if not 0 < config.layer_decay <= 1:
        raise ValueError("--layer-decay must be in (0, 1]")
    if config.val_split not in ("classes", "images"):
        raise ValueError(f"--val-split must be classes or images, not {config.val_split!r}")
    if not 0 <= config.val_classes_fraction < 1:
        raise ValueError("the held-out share of classes must be in [0, 1)")
    if config.input_size is not None and config.input_size < 16:
        raise ValueError("--input-size must be at least 16 pixels")
