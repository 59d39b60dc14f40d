"""DINOv2 (Oquab et al. 2023, self-supervised ViTs with patch 14): ``dinov2-vits14``, ``dinov2-vitb14``,
``dinov2-vitl14``.

Built with timm (``vit_small_patch14_dinov2.lvd142m`` etc.), not torch hub: torch hub fetches the model code from
GitHub at run time, even for random weights, while timm holds the architecture locally and downloads only the
weights (from the Hugging Face hub, ``timm/<name>``), which makes ``--weights none`` fully offline and lets the
same wrapper, weight-file loading and pooling serve the CNNs too. transformers would work as well but adds a second
weight layout for the same network.

Input size: 224 px with patch 14 (a 16x16 grid), the resolution of DINOv2's linear and k-NN evaluations, with its
eval transform (resize 256 bicubic, centre crop 224, ImageNet mean/std). The checkpoints carry position
embeddings for 518 px (37x37); the network is built with ``dynamic_img_size=True`` so they stay as published (a
weight file loads unchanged) and are interpolated to the input grid at run time.

Pooling: ``cls`` (default; the final-norm CLS token, DINOv2's global descriptor), ``mean`` (patch tokens),
``gem`` (signed GeM of the patch tokens), ``max``. Offline, pass the ``model.safetensors`` of
``https://huggingface.co/timm/<timm name>`` with ``--weights PATH``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocessing, register
from .timm_family import TOKEN_POOLS, TimmNetwork, create_timm

#: name -> (timm name, embedding width)
DINOV2_MODELS = {
    "dinov2-vits14": ("vit_small_patch14_dinov2.lvd142m", 384),
    "dinov2-vitb14": ("vit_base_patch14_dinov2.lvd142m", 768),
    "dinov2-vitl14": ("vit_large_patch14_dinov2.lvd142m", 1024),
}
DINOV2_INPUT = 224
DINOV2_PREPROCESSING = Preprocessing(DINOV2_INPUT, IMAGENET_MEAN, IMAGENET_STD, interpolation="bicubic", crop_pct=0.875)


def _build(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    model = create_timm(spec.extra["timm_name"], weights, spec.name, dynamic_img_size=True)
    return TimmNetwork(model, options.get("pool", spec.default_pool))


for _name, (_timm_name, _dim) in DINOV2_MODELS.items():
    register(
        ModelSpec(
            name=_name,
            family="dinov2",
            embed_dim=_dim,
            preprocessing=DINOV2_PREPROCESSING,
            build=_build,
            description=f"DINOv2 ViT-{_name[-3].upper()}/14 (timm {_timm_name}) at 224 px, "
                        "--pool cls (default)|mean|gem|max",
            default_pool="cls",
            pools=TOKEN_POOLS,
            extra={"timm_name": _timm_name, "patch": 14},
        )
    )
