"""CLIP image encoders through open_clip (Radford et al. 2021; Cherti et al. 2023 for the LAION weights).

Names: ``clip-vit-b32``, ``clip-vit-b16``, ``clip-vit-l14``, ``clip-vit-l14-336``, ``clip-vit-h14`` and the
pass-through ``open_clip:<arch>/<tag>`` (e.g. ``open_clip:ViT-B-32/laion2b_s34b_b79k``; the tag may be left out
for random weights: ``open_clip:ViT-B-32``).

Options
- ``pretrained``: the open_clip weight tag (default ``openai``; ``clip-vit-h14`` has no OpenAI weights and defaults
  to ``laion2b_s32b_b79k``). The OpenAI weights were trained with QuickGELU: the activation is taken from the
  tag's own config (``quick_gelu`` in open_clip's pretrained table), so ``openai`` builds the QuickGELU network
  and e.g. ``laion2b_s32b_b82k`` the plain GELU one, with ``--weights none`` too (a weight file saved from one
  build loads back into the same architecture).
- ``pool``:
  ``proj`` (default) the model's own ``encode_image``: CLS token -> ``ln_post`` -> projection (e.g. 768-d for
  ViT-L/14), the embedding space shared with the text tower (zero-shot, text search);
  ``gem`` / ``mean`` / ``cls``: the PRE-PROJECTION tokens of the visual transformer (``ln_post`` applied to every
  token), i.e. the visual width (1024 for ViT-L/14, grid = input / 14: 16x16 at 224 px, 24x24 at 336 px), pooled
  by signed GeM (see :mod:`helpers.models.pooling`), the mean of the patch tokens, or the CLS token. This is the
  input of the fine-tuning head (GeM -> ``EmbeddingHead``) of the mission's fine-tuned CLIP variant.

Preprocessing: CLIP's mean and std (never ImageNet's), the model's input size, bicubic, resize the shortest side to
the input size then centre crop (crop_pct 1.0), as OpenAI's and open_clip's eval transforms do.

Text: the network exposes ``encode_text(token_ids) -> (B, D)`` and ``tokenize(list[str]) -> LongTensor`` (open_clip's
tokenizer; the BPE vocabulary of the OpenAI models ships inside the open_clip package, so it works offline).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .pooling import GeM, pool_tokens
from .registry import (CLIP_MEAN, CLIP_STD, ModelError, ModelSpec, Preprocessing, pretrained_download_error, register,
                       register_prefix)

CLIP_POOLS = ("proj", "default", "gem", "mean", "cls")

#: name -> (open_clip architecture, default tag, projection dim, input size, visual width, patch size)
CLIP_MODELS: dict[str, tuple[str, str, int, int, int, int]] = {
    "clip-vit-b32": ("ViT-B-32", "openai", 512, 224, 768, 32),
    "clip-vit-b16": ("ViT-B-16", "openai", 512, 224, 768, 16),
    "clip-vit-l14": ("ViT-L-14", "openai", 768, 224, 1024, 14),
    "clip-vit-l14-336": ("ViT-L-14-336", "openai", 768, 336, 1024, 14),
    "clip-vit-h14": ("ViT-H-14", "laion2b_s32b_b79k", 1024, 224, 1280, 14),
}


def clip_preprocessing(input_size: int, mean=CLIP_MEAN, std=CLIP_STD, interpolation: str = "bicubic",
                       resize_mode: str = "shortest") -> Preprocessing:
    """CLIP's eval transform: resize the shortest side, centre crop (crop_pct 1.0), CLIP mean/std."""
    return Preprocessing(input_size, tuple(mean), tuple(std), interpolation=interpolation, crop_pct=1.0,
                         resize_mode="squash" if resize_mode == "squash" else "shortest")


def _tag_config(arch: str, tag: str | None) -> dict[str, Any]:
    from open_clip.pretrained import get_pretrained_cfg

    return dict(get_pretrained_cfg(arch, tag) or {}) if tag else {}


class CLIPNetwork(nn.Module):
    """An open_clip model seen as an image embedder; ``forward`` = ``encode_image`` or pooled visual tokens."""

    def __init__(self, model: nn.Module, arch: str, tag: str | None, pool: str, tokenizer: Any,
                 preprocessing: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.arch, self.tag = arch, tag
        self.pool = "proj" if pool == "default" else pool
        self._tokenizer = tokenizer
        self.preprocessing = preprocessing
        visual = model.visual
        self.visual_width = int(getattr(visual, "width", 0) or visual.conv1.out_channels) if hasattr(visual, "conv1") else 0
        if self.pool == "proj":
            self.embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
        else:
            if not (hasattr(visual, "_embeds") and hasattr(visual, "transformer") and hasattr(visual, "ln_post")):
                raise ModelError(f"--pool {pool} needs a ViT visual tower; {arch} only supports --pool proj")
            self.embed_dim = self.visual_width
        self.gem = GeM(tokens=True) if self.pool == "gem" else None

    # ---- images -------------------------------------------------------------------------------------------
    def set_input_size(self, size: int) -> None:
        """Run the ViT tower at ``size`` px: the position embedding is resampled to the new patch grid (bicubic, the
        class token kept; timm's ``resample_abs_pos_embed``, as open_clip's ``resize_pos_embed`` does)."""
        from timm.layers import resample_abs_pos_embed

        visual = self.model.visual
        patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else int(visual.patch_size)
        if not hasattr(visual, "positional_embedding") or size % patch:
            raise ModelError(f"{self.arch}: --input-size must be a multiple of the patch size {patch} px, not {size}")
        old = visual.grid_size
        grid = (size // patch, size // patch)
        if tuple(old) != grid:
            pos = visual.positional_embedding.detach().unsqueeze(0)
            new = resample_abs_pos_embed(pos, list(grid), list(old), num_prefix_tokens=1)[0]
            visual.positional_embedding = nn.Parameter(new.contiguous())
            visual.grid_size, visual.image_size = grid, (size, size)
        self.preprocessing = replace(self.preprocessing, input_size=int(size))

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-projection tokens (B, 1 + grid*grid, width): the transformer output after ``ln_post``."""
        visual = self.model.visual
        x = visual.transformer(visual._embeds(images))
        return visual.ln_post(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "proj":
            return self.model.encode_image(images)
        return pool_tokens(self.visual_tokens(images), self.pool, num_prefix_tokens=1, gem_module=self.gem)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's own image embedding (projection space, shared with :meth:`encode_text`)."""
        return self.model.encode_image(images)

    # ---- text ---------------------------------------------------------------------------------------------
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, D) in the same space as :meth:`encode_image`."""
        return self.model.encode_text(token_ids)

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids (B, context length) for :meth:`encode_text`."""
        if isinstance(texts, str):
            texts = [texts]
        return self._tokenizer(list(texts))

    # ---- weight files -------------------------------------------------------------------------------------
    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept open_clip checkpoints (keys ``visual.*``, ``transformer.*``...) as well as our own saves."""
        if not any(k.startswith("model.") for k in state):
            state = {f"model.{k}": v for k, v in state.items()}
        # a GeM exponent saved with --pool gem is not part of the network when another pooling is asked for
        adapted = {k: v for k, v in state.items() if k.startswith("model.") or self.gem is not None}
        own = self.state_dict()
        for key in own:  # a GeM exponent is ours, not open_clip's: keep the initial one
            if not key.startswith("model.") and key not in adapted:
                adapted[key] = own[key]
        return adapted


def build_clip(arch: str, tag: str | None, weights: str, pool: str, name: str) -> CLIPNetwork:
    """Create the open_clip model (random init with ``weights="none"``, no network access) and wrap it."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ModelError(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    if pool not in CLIP_POOLS:
        raise ModelError(f"CLIP models take --pool {'|'.join(CLIP_POOLS)}, not {pool!r}")
    cfg = _tag_config(arch, tag)
    if tag and not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ModelError(f"open_clip has no pretrained tag {tag!r} for {arch} (known tags: {tags})")
    if weights == "pretrained" and not tag:
        raise ModelError(f"{name}: pretrained weights need a tag, e.g. --pretrained openai (or open_clip:{arch}/<tag>)")
    quick_gelu = bool(cfg.get("quick_gelu", False))
    import logging

    if weights != "pretrained":  # open_clip logs a warning for every random build; random is what was asked for
        logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(
            arch, pretrained=tag if weights == "pretrained" else None, force_quick_gelu=quick_gelu,
            pretrained_text=False,  # never fetch a separate text tower for random weights
        )
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub/HTTP/OS errors of all kinds
        if weights != "pretrained":
            raise ModelError(f"cannot build open_clip {arch}: {exc}") from None
        source = cfg.get("hf_hub") or cfg.get("url") or "the open_clip hub"
        raise pretrained_download_error(
            name, f"open_clip tag {tag} ({source})", exc,
            "an open_clip checkpoint such as open_clip_model.safetensors or open_clip_pytorch_model.bin of that "
            "repository, with the same --pretrained tag so that the architecture matches",
        ) from None
    finally:
        logging.disable(logging.NOTSET)
    model.eval()
    image_size = model.visual.image_size
    size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    preprocessing = clip_preprocessing(size, cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD),
                                       cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))
    tokenizer = open_clip.get_tokenizer(arch)
    return CLIPNetwork(model, arch, tag, pool, tokenizer, preprocessing)


def _build_registered(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    tag = options.get("pretrained", spec.extra["tag"])
    return build_clip(spec.extra["arch"], tag, weights, options.get("pool", spec.default_pool), spec.name)


for _name, (_arch, _tag, _dim, _size, _width, _patch) in CLIP_MODELS.items():
    register(
        ModelSpec(
            name=_name,
            family="clip",
            embed_dim=_dim,
            preprocessing=clip_preprocessing(_size),
            build=_build_registered,
            description=(f"CLIP {_arch} via open_clip, --pretrained {_tag} by default; encode_image "
                         f"({_dim}-d), --pool gem|mean|cls: pre-projection tokens ({_width}-d, grid "
                         f"{_size // _patch}x{_size // _patch})"),
            default_pool="proj",
            pools=CLIP_POOLS,
            extra={"arch": _arch, "tag": _tag, "width": _width, "patch": _patch},
            options=("pool", "pretrained"),
        )
    )


def _open_clip_spec(rest: str) -> ModelSpec:
    """``open_clip:<arch>/<tag>`` (or ``open_clip:<arch>`` without pretrained weights)."""
    import open_clip

    arch, _, tag = rest.partition("/")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ModelError(f"open_clip has no architecture {arch!r}; e.g. open_clip:ViT-B-32/laion2b_s34b_b79k")
    vision = config.get("vision_cfg", {})
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    cfg = _tag_config(arch, tag or None)
    name = f"open_clip:{rest}"

    def build(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
        return build_clip(arch, options.get("pretrained", tag or None), weights,
                          options.get("pool", "proj"), spec.name)

    return ModelSpec(
        name=name,
        family="clip",
        embed_dim=int(config["embed_dim"]),
        preprocessing=clip_preprocessing(size, cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD),
                                         cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest")),
        build=build,
        description=f"open_clip {arch} ({tag or 'no pretrained tag'})",
        default_pool="proj",
        pools=CLIP_POOLS,
        extra={"arch": arch, "tag": tag or None},
        options=("pool", "pretrained"),
    )


register_prefix("open_clip", _open_clip_spec, "open_clip:<arch>/<tag>")
