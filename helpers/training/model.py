"""The trained network: a registry backbone, its pooling (GeM where possible), and the embedding head.

``RetrievalNet.forward(images)`` returns the head's L2-normalised embedding (512-d by default): that, and never a
classifier's logits, is what retrieval uses. :func:`load_checkpoint_model` turns a run's ``best.pt`` back into an
:class:`helpers.models.EmbeddingModel` for ``retrieve --checkpoint``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models import EmbeddingModel, ModelError, get_spec, load_model
from ..models.pooling import GEM_P_MIN, EmbeddingHead, GeM, gem
from .recipes import TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "helpers-training-1"


class PooledBackbone(nn.Module):
    """The registry network with the requested pooling, mapping images (B, 3, H, W) to features (B, C).

    ``pool="gem"``: the family's own GeM option when it has one (CLIP's pre-projection patch tokens), else a
    learnable GeM over a timm-style ``forward_features`` map; anything else, or a network without a feature map,
    keeps the backbone's own pooling (``pool_type`` says which one is used).
    """

    def __init__(self, base: EmbeddingModel, pool: str) -> None:
        super().__init__()
        self.network = base.network
        self.model_name = base.spec.name
        self.gem: GeM | None = None
        spec = base.spec
        family_gem = "gem" in (spec.pools or ())
        if pool == "gem" and family_gem and base.options.get("pool") == "gem":
            self.pool_type = "gem"  # the family pools with GeM itself (CLIP: pre-projection patch tokens)
        elif pool == "gem" and not family_gem and hasattr(self.network, "forward_features"):
            self.gem = GeM()  # learnable p over the backbone's last feature map (or its patch tokens)
            self.pool_type = "gem"
        else:
            if pool == "gem":
                logger.info("%s has no feature map for GeM: its own pooling (%s) is used", spec.name, base.pooling)
            self.pool_type = str(base.pooling or "backbone")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.gem is not None:
            features = self.network.forward_features(images)
            if features.ndim == 4:
                return self.gem(features)
            if features.ndim == 3:  # signed tokens of a timm transformer: the sign-preserving GeM of the patch tokens
                prefix = int(getattr(self.network, "num_prefix_tokens", 1))
                return gem(features[:, prefix:].float(), self.gem.p.float().clamp(min=GEM_P_MIN), self.gem.eps,
                           dim=(1,), signed=True)
            return features
        return self.network(images)


class RetrievalNet(nn.Module):
    """Backbone -> pooling -> (optional L2) -> :class:`EmbeddingHead`; ``classifier`` only for the ``ce`` loss."""

    def __init__(self, backbone: PooledBackbone, in_dim: int, embed_dim: int = 512, dropout: float = 0.1,
                 normalize_features: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(in_dim, embed_dim, dropout)
        self.normalize_features = normalize_features
        self.in_dim, self.embed_dim = in_dim, embed_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images).float()
        return nn.functional.normalize(features, dim=-1) if self.normalize_features else features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _base_options(config: TrainConfig) -> dict[str, Any]:
    spec = get_spec(config.model)
    if config.pool == "gem" and "gem" in (spec.pools or ()):
        return {"pool": "gem"}
    return {}


def feature_preprocessing(base: EmbeddingModel, input_size: int | None):
    """The model's own preprocessing, at ``input_size`` when given (reduced-size fine-tuning)."""
    if not input_size:
        return base.preprocessing
    return dataclasses.replace(base.preprocessing, input_size=int(input_size))


def _feature_dim(backbone: PooledBackbone, input_size: int) -> int:
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    with torch.no_grad():
        out = backbone(torch.zeros(1, 3, input_size, input_size, device=device))
    backbone.train(was_training)
    return int(out.shape[-1])


def _fit_input_size(base: EmbeddingModel, input_size: int | None) -> None:
    """A CLIP tower at another ``--input-size``: its position embedding is resampled to the new grid (as open_clip
    and timm do); other fixed-size networks are refused with a message."""
    if not input_size or input_size == base.preprocessing.input_size:
        return
    set_size = getattr(base.network, "set_input_size", None)
    if callable(set_size):
        set_size(int(input_size))
        return
    if base.spec.family in ("vit", "hf") and getattr(base.network, "tokens", True):
        raise ModelError(f"{base.name} has a fixed position embedding for {base.preprocessing.input_size} px: "
                         "--input-size is not supported for it")


def build_network(config: TrainConfig, weights: str | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[RetrievalNet, EmbeddingModel]:
    """Build the trainable network for ``config`` (and return the registry model it wraps)."""
    base = load_model(config.model, weights=weights or config.weights, device=device, **_base_options(config))
    _fit_input_size(base, config.input_size)
    backbone = PooledBackbone(base, config.pool)
    size = feature_preprocessing(base, config.input_size).input_size
    in_dim = _feature_dim(backbone, size)
    net = RetrievalNet(backbone, in_dim, config.embed_dim, config.dropout,
                       normalize_features=config.trainable == "head")
    return net.to(device), base


class FeatureExtractor(EmbeddingModel):
    """The frozen backbone with the run's pooling as an EmbeddingModel (for the cached features of ``--trainable head``)."""

    def __init__(self, base: EmbeddingModel, backbone: PooledBackbone, input_size: int | None, dim: int,
                 flip: bool = False) -> None:
        spec = dataclasses.replace(base.spec, embed_dim=dim)
        options = dict(base.options)
        options["training_pool"] = backbone.pool_type
        if flip:
            options["mirrored"] = True  # a separate cache entry
        super().__init__(spec, backbone, base.weights, options)
        self.preprocessing = feature_preprocessing(base, input_size)
        self.flip = flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(torch.flip(images, dims=[3]) if self.flip else images)


class TrainedEmbeddingModel(EmbeddingModel):
    """A trained :class:`RetrievalNet` behind the :class:`EmbeddingModel` interface; ``forward`` returns the head's
    embedding. ``training_info`` feeds the metrics JSON (``is_finetuned``, ``loss_function``...)."""

    def __init__(self, base: EmbeddingModel, net: RetrievalNet, checkpoint: str, config: TrainConfig,
                 training_info: dict[str, Any]) -> None:
        spec = dataclasses.replace(base.spec, embed_dim=net.embed_dim)
        options = dict(base.options)
        options["checkpoint_pool"] = net.backbone.pool_type
        super().__init__(spec, net, checkpoint, options)
        self.preprocessing = feature_preprocessing(base, config.input_size)
        self.training_info = dict(training_info)
        self.train_config = config

    @property
    def pooling(self) -> str | None:
        return self.network.backbone.pool_type


def training_info(config: TrainConfig, history: list[dict[str, Any]], epochs_run: int,
                  pooling_type: str) -> dict[str, Any]:
    """The ``is_finetuned`` / ``loss_function`` / ``num_epochs`` / ``final_train_loss`` / ``pooling_type`` record."""
    final_loss = next((h["train_loss"] for h in reversed(history) if h.get("train_loss") is not None), None)
    return {
        "is_finetuned": True,
        "loss_function": config.loss,
        "num_epochs": int(epochs_run),
        "final_train_loss": None if final_loss is None else float(final_loss),
        "pooling_type": pooling_type,
        "recipe": config.recipe,
        "trainable": config.trainable,
        "val_split": config.val_split,
    }


def load_checkpoint_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedEmbeddingModel:
    """Rebuild the trained model from a run's checkpoint (``best.pt`` or ``last.pt``), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path} (pass RUN_DIR/best.pt written by `python -m helpers train`)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a training checkpoint of this toolkit (expected {CHECKPOINT_FORMAT})")
    config = TrainConfig.from_dict(payload["config"])
    strict = not payload.get("head_only_state", False)
    # a checkpoint holding the whole network is rebuilt from random weights (no download, no original weight file)
    weights = payload.get("backbone_weights", config.weights) if not strict else "none"
    net, base = build_network(config, weights=weights, device="cpu")
    state = payload["model"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or (strict and missing) or any(not k.startswith("backbone.") for k in missing):
        raise ModelError(f"{path} does not fit {config.model}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    net.eval()
    model = TrainedEmbeddingModel(base, net, str(path), config, payload.get("training_info", {}))
    model.eval()
    return model.to(device)
