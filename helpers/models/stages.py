"""Explicit stages of every backbone family: its stem, its ordered blocks and its neck.

Fine-tuning needs to know the layout of a backbone: layer-wise learning-rate decay gives each block its own rate,
and ``--trainable blocks:N`` trains exactly the last N blocks, the neck and the head. Each family says it here:

- timm networks (EfficientNet, ResNet, DINOv2, ``timm:<name>``): the coarse groups of the model's own
  ``group_matcher(coarse=True)``: its ``stem`` entry is the stem, each numbered ``blocks`` group one block (ResNet:
  ``layer1..4``; EfficientNet-Lite0: the 7 ``blocks.i`` stages; ViT: ``blocks.i``), what timm sends to the last
  group (``99999``: final norm, ``conv_head``) or leaves unmatched the neck.
- CLIP (open_clip ViT): stem = patch embedding, class and position embeddings, ``ln_pre``; blocks =
  ``visual.transformer.resblocks``; neck = ``ln_post`` and the projection. The text tower is no stage (never trained
  for image embeddings).
- Hugging Face ViTs (``vit-b16``, ``hf:...``): stem = the embeddings, blocks = the encoder layers, neck = the final
  norm, pooler and image projection.
- GoogLeNet and FaceNet (Inception-ResNet-v1), by hand: the stem convolutions, the inception stages 3/4/5 (GoogLeNet)
  or the 35x35 / 17x17 / 8x8 stages with their reductions (FaceNet), the embedding layers as neck.

A pooling exponent (GeM's ``p``) is none of these: it trains with the head. A layout that is not known is an error
naming the model, never "train everything".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .registry import ModelError

#: timm's ordinal for what follows the blocks (``group_matcher`` entries such as ``('^norm', (99999,))``).
TIMM_NECK_ORDINAL = 99999


@dataclass
class Stages:
    """The backbone's parameters by stage: ``(name, parameter)`` pairs with names relative to the network."""

    stem: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    blocks: list[list[tuple[str, nn.Parameter]]] = field(default_factory=list)
    neck: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    #: parameters that train with the head (a pooling exponent)
    pooling: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    #: parameters the image embedding never uses (e.g. CLIP's text tower): never trained
    unused: list[tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def counts(self) -> dict[str, int]:
        """Tensor counts per stage (``{"stem": .., "blocks": n, "neck": ..}``)."""
        return {"stem": len(self.stem), "blocks": self.n_blocks, "neck": len(self.neck)}


#: A classifier maps a parameter name to "stem", ("block", sort key), "neck", "pooling", "unused" or None (unknown).
Classifier = Callable[[str], object]


def _collect(network: nn.Module, classify: Classifier, name: str) -> Stages:
    stages = Stages()
    blocks: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
    unknown = []
    for pname, param in network.named_parameters():
        where = "pooling" if pname == "gem.p" or pname.endswith(".gem.p") else classify(pname)
        if isinstance(where, tuple):
            blocks.setdefault(where[1], []).append((pname, param))
        elif where in ("stem", "neck", "pooling", "unused"):
            getattr(stages, str(where)).append((pname, param))
        else:
            unknown.append(pname)
    if unknown or not blocks:
        detail = f"parameter {unknown[0]!r} belongs to no stage" if unknown else "no blocks found"
        raise ModelError(f"unknown layer layout for model {name}: {detail}; --trainable blocks:N and layer-wise "
                         "learning rates need its stages (helpers/models/stages.py)")
    stages.blocks = [blocks[key] for key in sorted(blocks)]
    return stages


def _timm_classifier(model: nn.Module, prefix: str, name: str) -> Classifier:
    matcher = model.group_matcher(coarse=True) if hasattr(model, "group_matcher") else None
    if not isinstance(matcher, dict):
        raise ModelError(f"unknown layer layout for model {name}: its timm class has no coarse group_matcher dict")
    compiled = []
    for key, spec in matcher.items():
        entries = [(spec, None)] if isinstance(spec, str) else list(spec)
        compiled += [(key, re.compile(regex), suffix) for regex, suffix in entries]

    def classify(pname: str) -> object:
        if not pname.startswith(prefix):
            return "unused"
        local = pname[len(prefix):]
        for key, regex, suffix in compiled:
            match = regex.match(local)
            if not match:
                continue
            if key == "stem":
                return "stem"
            if suffix is not None and suffix[0] >= TIMM_NECK_ORDINAL:
                return "neck"
            numbers = tuple(int(g) for g in match.groups() if g is not None) + tuple(suffix or ())
            return ("block", numbers[:1] if numbers else (0,))
        return "neck"  # timm sends whatever its matcher leaves out to the last group

    return classify


def _clip_classifier(pname: str) -> object:
    if not pname.startswith("model.visual."):
        return "unused"
    local = pname[len("model.visual."):]
    match = re.match(r"transformer\.resblocks\.(\d+)\.", local)
    if match:
        return ("block", (int(match.group(1)),))
    if re.match(r"(ln_post|proj$|attn_pool|ln_head|head)", local):
        return "neck"
    if re.match(r"(conv1|class_embedding|positional_embedding|ln_pre|patch_dropout)", local):
        return "stem"
    return None


def _hf_classifier(network: nn.Module) -> Classifier:
    vision = "model.vision_model." if getattr(network, "projects", False) else "model."

    def classify(pname: str) -> object:
        if not pname.startswith(vision):
            return "neck" if pname.startswith("model.visual_projection") else "unused"
        local = pname[len(vision):]
        match = re.match(r"(?:encoder\.)?(layer|layers|stages)\.(\d+)\.", local)
        if match:
            return ("block", (int(match.group(2)),))
        if re.match(r"(embeddings|embedder|pre_layrnorm)", local):
            return "stem"
        if re.match(r"(layernorm|post_layernorm|pooler|norm)", local):
            return "neck"
        return None

    return classify


def _by_hand(stem: tuple[str, ...], blocks: tuple[tuple[str, ...], ...], neck: tuple[str, ...]) -> Classifier:
    def classify(pname: str) -> object:
        top = pname.split(".")[0] if not pname.startswith("model.") else pname.split(".")[1]
        if top in stem:
            return "stem"
        for i, members in enumerate(blocks):
            if top in members:
                return ("block", (i,))
        return "neck" if top in neck else None

    return classify


GOOGLENET_LAYOUT = (("conv1", "conv2", "conv3"),
                    (("inception3a", "inception3b"),
                     ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e"),
                     ("inception5a", "inception5b")),
                    ("fc",))
FACENET_LAYOUT = (("conv2d_1a", "conv2d_2a", "conv2d_2b", "conv2d_3b", "conv2d_4a", "conv2d_4b"),
                  (("repeat_1",), ("mixed_6a", "repeat_2"), ("mixed_7a", "repeat_3", "block8")),
                  ("last_linear", "last_bn"))


def backbone_stages(network: nn.Module, name: str = "") -> Stages:
    """The stages of a registry network (``EmbeddingModel.network``); :class:`ModelError` for an unknown layout."""
    from .clip_family import CLIPNetwork
    from .facenet_family import InceptionResnetV1
    from .hf_family import HFNetwork
    from .timm_family import TimmNetwork
    from .torchvision_family import GoogLeNetFeatures

    name = name or type(network).__name__
    if isinstance(network, CLIPNetwork):
        if not hasattr(network.model.visual, "transformer"):
            raise ModelError(f"unknown layer layout for model {name}: only CLIP ViT towers have known stages")
        return _collect(network, _clip_classifier, name)
    if isinstance(network, TimmNetwork):
        return _collect(network, _timm_classifier(network.model, "model.", name), name)
    if isinstance(network, HFNetwork):
        return _collect(network, _hf_classifier(network), name)
    if isinstance(network, GoogLeNetFeatures):
        return _collect(network, _by_hand(*GOOGLENET_LAYOUT), name)
    if isinstance(network, InceptionResnetV1):
        return _collect(network, _by_hand(*FACENET_LAYOUT), name)
    raise ModelError(f"unknown layer layout for model {name} ({type(network).__name__}): no stage description; "
                     "--trainable blocks:N and layer-wise learning rates need one (helpers/models/stages.py)")
