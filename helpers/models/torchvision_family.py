"""``googlenet``: GoogLeNet / Inception-v1 (Szegedy et al. 2015) with torchvision's ImageNet-1k weights.

Features: the 1024-channel map after ``inception5b`` (7x7 at 224 px) pooled by ``--pool gap`` (default, as the
classifier was trained) ``|gem|max``. torchvision's weights expect ``transform_input=True`` (the network converts
ImageNet-normalised input to its original scaling itself), so the network is built that way with every weight choice
and the preprocessing is torchvision's: resize 256, centre crop 224, bilinear, ImageNet mean and std.
Pretrained weights download through ``torch.hub`` (torchvision's own mechanism); offline, pass the file
``googlenet-1378be20.pth`` from https://download.pytorch.org/models/ with ``--weights PATH``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pooling import GeM, pool_map
from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelError, ModelSpec, Preprocessing, pretrained_download_error, register
from .timm_family import MAP_POOLS, prefixed_state_dict

_STAGES = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
           "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
           "inception5a", "inception5b")


class GoogLeNetFeatures(nn.Module):
    """torchvision GoogLeNet without its classifier; ``forward`` pools the last inception map."""

    def __init__(self, model: nn.Module, pool: str) -> None:
        super().__init__()
        if pool not in MAP_POOLS:
            raise ModelError(f"googlenet takes --pool {'|'.join(MAP_POOLS)}, not {pool!r}")
        model.fc = nn.Identity()
        model.aux1 = model.aux2 = None
        self.model = model
        self.pool = pool
        self.gem = GeM() if pool == "gem" else None
        self.embed_dim = 1024

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model._transform_input(images)
        for stage in _STAGES:
            x = getattr(self.model, stage)(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pool_map(self.forward_features(images), self.pool, self.gem)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept torchvision's published file (classifier and auxiliary heads included)."""
        return prefixed_state_dict(state, self.state_dict(), "model.", drop=("fc.", "aux1.", "aux2."))


def _build_googlenet(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    from torchvision.models import GoogLeNet_Weights, googlenet

    if weights == "pretrained":
        try:
            model = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1, aux_logits=False, transform_input=True)
        except Exception as exc:  # noqa: BLE001 - URLError, HTTPError, OSError...
            raise pretrained_download_error(spec.name, GoogLeNet_Weights.IMAGENET1K_V1.url, exc,
                                            "the .pth file of that address") from None
    else:
        model = googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=True)
    return GoogLeNetFeatures(model, options.get("pool", spec.default_pool))


register(
    ModelSpec(
        name="googlenet",
        family="googlenet",
        embed_dim=1024,
        preprocessing=Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, interpolation="bilinear", crop_pct=0.875),
        build=_build_googlenet,
        description="GoogLeNet (Inception-v1), torchvision ImageNet-1k weights; --pool gap (default)|gem|max",
        default_pool="gap",
        pools=MAP_POOLS,
        channels_last=True,
    )
)
