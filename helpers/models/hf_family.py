"""Hugging Face transformers image models: ``vit-b16`` and the pass-through ``hf:<repo id or local folder>``.

``vit-b16``: ViT-B/16 (Dosovitskiy et al. 2021) pretrained on ImageNet-21k, ``google/vit-base-patch16-224-in21k``,
the checkpoint of the paper. Its architecture is transformers' default ``ViTConfig``, so ``--weights none`` needs no
network. Embedding: the CLS token after the final layer norm (768-d); ``--pool mean|gem|max`` pool the patch tokens
instead. Preprocessing as its image processor: resize to 224x224 (no crop), bilinear, mean = std = 0.5.

``hf:<repo id>`` (e.g. ``hf:facebook/dinov2-small``, ``hf:microsoft/resnet-50``, ``hf:openai/clip-vit-base-patch32``)
loads ``AutoModel`` with the repository's own image processor settings (input size, resize, mean/std). A local
folder written by ``save_pretrained`` works too (``hf:/path/to/folder``), offline. Pooling ``default``: the image
features of vision-language models (``get_image_features``), else the CLS token of token models or the global average
of feature maps; ``cls|mean|gem|max`` (tokens) and ``gap|gem|max`` (maps) choose explicitly. Even random weights need
the repository's ``config.json``: offline, use a local folder.

``--weights PATH`` takes a ``save_pretrained`` folder or a state-dict file (``model.safetensors``/``pytorch_model.bin``
of the repository, or a file written by :func:`helpers.models.save_weights`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pooling import GeM, pool_map, pool_tokens
from .registry import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    ModelError,
    ModelSpec,
    Preprocessing,
    load_state_dict_file,
    pretrained_download_error,
    register,
    register_prefix,
)
from .timm_family import MAP_POOLS, TOKEN_POOLS

VIT_B16_REPO = "google/vit-base-patch16-224-in21k"
HF_POOLS = ("default",) + tuple(dict.fromkeys(TOKEN_POOLS + MAP_POOLS)) + ("proj",)
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes
_RESAMPLE[1] = "bicubic"  # PIL.Image.LANCZOS (1) -> the closest torchvision mode


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


class HFNetwork(nn.Module):
    """A transformers model seen as an image embedder."""

    loads_own_weights = True

    def __init__(self, model: nn.Module, pool: str, preprocessing: Preprocessing, repo: str) -> None:
        super().__init__()
        self.model = model
        self.repo = repo
        self.preprocessing = preprocessing
        self.projects = hasattr(model, "get_image_features")
        self.num_prefix_tokens = 1
        if pool == "default":
            pool = "proj" if self.projects else "auto"
        if pool == "proj" and not self.projects:
            raise ModelError(f"--pool proj needs a vision-language model; {repo} has no image projection")
        self.pool = pool
        self.gem: GeM | None = None
        self.embed_dim = 0
        self._probe()

    def _probe(self) -> None:
        """One forward pass on a blank image: the output width and whether the model yields tokens or a map."""
        size = self.preprocessing.input_size
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            hidden = None if self.pool == "proj" else self._hidden(torch.zeros(1, 3, size, size))
        self.tokens = hidden is not None and hidden.ndim == 3
        if self.pool == "auto":
            self.pool = "cls" if self.tokens else "gap"
        allowed = ("proj",) if self.pool == "proj" else (TOKEN_POOLS if self.tokens else MAP_POOLS)
        if self.pool not in allowed:
            kind = "tokens" if self.tokens else "a feature map"
            raise ModelError(f"{self.repo} yields {kind}: --pool takes {'|'.join(('default',) + allowed)}")
        if self.pool == "gem":
            self.gem = GeM(tokens=self.tokens)
        with torch.inference_mode():
            self.embed_dim = int(self.forward(torch.zeros(1, 3, size, size)).shape[-1])
        self.train(was_training)

    def _hidden(self, images: torch.Tensor) -> torch.Tensor:
        vision = getattr(self.model, "vision_model", None) if self.projects else self.model
        output = (vision or self.model)(pixel_values=images)
        return output.last_hidden_state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool == "proj":
            return _first_tensor(self.model.get_image_features(pixel_values=images))
        hidden = self._hidden(images)
        if hidden.ndim == 4:
            return pool_map(hidden, self.pool, self.gem)
        return pool_tokens(hidden, self.pool, self.num_prefix_tokens, self.gem)

    # ---- weights ------------------------------------------------------------------------------------------
    def adapt_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(k.startswith("model.") for k in state):
            return state
        own = {k[len("model."):] for k in self.state_dict() if k.startswith("model.")}
        base = getattr(self.model, "base_model_prefix", "")
        adapted = {}
        for key, value in state.items():
            if key not in own and base and key.startswith(base + ".") and key[len(base) + 1:] in own:
                key = key[len(base) + 1:]  # a ...ForImageClassification checkpoint
            if key in own:
                adapted["model." + key] = value
        for key, value in self.state_dict().items():
            if not key.startswith("model."):
                adapted.setdefault(key, value)
        return adapted

    def load_weights_path(self, path: str) -> None:
        """A ``save_pretrained`` folder, a published weight file of the repository, or a :func:`save_weights` file.

        Published files go through transformers' own loader (which maps legacy parameter names), from a temporary
        folder holding this model's config and a link to the file.
        """
        import os
        import tempfile

        source = Path(path)
        if source.is_file():
            state = load_state_dict_file(source)
            if any(k.startswith("model.") for k in state):  # written by save_weights
                missing, unexpected = self.load_state_dict(self.adapt_state_dict(state), strict=False)
                if missing or unexpected:
                    raise ModelError(f"{path} does not fit {self.repo}: missing {missing[:3]}, unexpected {unexpected[:3]}")
                return
            with tempfile.TemporaryDirectory() as tmp:
                self.model.config.save_pretrained(tmp)
                name = "model.safetensors" if source.suffix == ".safetensors" else "pytorch_model.bin"
                os.symlink(source.resolve(), Path(tmp) / name)
                self._load_folder(Path(tmp), str(path))
        elif source.is_dir():
            self._load_folder(source, str(path))
        else:
            raise ModelError(f"weights not found: {path}")

    def _load_folder(self, folder: Path, label: str) -> None:
        quiet = logging.getLogger("transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            loaded, info = type(self.model).from_pretrained(folder, output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - a broken folder or file
            raise ModelError(f"cannot load {label} into {self.repo}: {exc}") from None
        finally:
            quiet.setLevel(level)
        own = self.model.state_dict()
        # the pooler (dense + tanh) is never used for embeddings; classification checkpoints lack it
        missing = [k for k in info.get("missing_keys", []) if k in own and not k.startswith("pooler.")]
        if missing:
            raise ModelError(f"{label} does not fit {self.repo}: {len(missing)} missing keys, e.g. {missing[:3]}")
        missing, _ = self.model.load_state_dict(loaded.state_dict(), strict=False)
        if missing:
            raise ModelError(f"{label} does not fit {self.repo}: {len(missing)} missing keys, e.g. {missing[:3]}")


def hf_preprocessing(processor: Any, fallback: Preprocessing) -> Preprocessing:
    """Translate an image processor's settings (size, crop, resample, mean/std) into :class:`Preprocessing`."""
    if processor is None:
        return fallback
    size = getattr(processor, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
    crop = getattr(processor, "crop_size", None) or {}
    crop = dict(crop) if not isinstance(crop, int) else {"height": crop, "width": crop}
    do_crop = bool(getattr(processor, "do_center_crop", False)) and crop
    resample = getattr(processor, "resample", 3)
    interpolation = _RESAMPLE.get(int(getattr(resample, "value", resample) or 3), "bicubic")
    mean = tuple(getattr(processor, "image_mean", None) or fallback.mean)
    std = tuple(getattr(processor, "image_std", None) or fallback.std)
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        target = int(crop.get("height", short)) if do_crop else short
        return Preprocessing(target, mean, std, interpolation, crop_pct=min(1.0, target / short))
    height = int(size.get("height", fallback.input_size))
    if do_crop:
        target = int(crop.get("height", height))
        return Preprocessing(target, mean, std, interpolation, crop_pct=min(1.0, target / height))
    return Preprocessing(height, mean, std, interpolation, crop_pct=1.0, resize_mode="squash")


def _hub_call(name: str, what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, HTTP errors, offline-mode errors...
        raise pretrained_download_error(
            name, f"the Hugging Face hub ({what})", exc,
            "a folder with the repository's config.json, preprocessor_config.json and weights, given as hf:FOLDER, "
            "or the weight file itself",
        ) from None


def build_hf(repo: str, weights: str, pool: str, name: str) -> HFNetwork:
    """``AutoModel`` for ``repo`` (a hub id or a local folder), random or pretrained, wrapped."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        config = _hub_call(name, f"{repo} config", AutoConfig.from_pretrained, repo)
        try:
            processor = AutoImageProcessor.from_pretrained(repo)
        except Exception:  # noqa: BLE001 - a repository without an image processor: timm-like defaults
            processor = None
        if weights == "pretrained":
            model = _hub_call(name, repo, AutoModel.from_pretrained, repo)
        else:
            model = AutoModel.from_config(config)
    finally:
        quiet.setLevel(level)
    fallback = Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 0.875)
    return HFNetwork(model.eval(), pool, hf_preprocessing(processor, fallback), repo)


def _build_vit_b16(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    if weights == "pretrained":
        model = _hub_call(spec.name, VIT_B16_REPO, ViTModel.from_pretrained, VIT_B16_REPO, add_pooling_layer=False)
    else:
        model = ViTModel(ViTConfig(), add_pooling_layer=False)
    return HFNetwork(model.eval(), options.get("pool", spec.default_pool), spec.preprocessing, VIT_B16_REPO)


register(
    ModelSpec(
        name="vit-b16",
        family="vit",
        embed_dim=768,
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, "bilinear", crop_pct=1.0, resize_mode="squash"),
        build=_build_vit_b16,
        description=f"ViT-B/16 ImageNet-21k ({VIT_B16_REPO}, transformers), --pool cls (default)|mean|gem|max",
        default_pool="cls",
        pools=TOKEN_POOLS,
        extra={"repo": VIT_B16_REPO},
    )
)


def _hf_spec(rest: str) -> ModelSpec:
    """``hf:<repo id or folder>``: dimension and preprocessing are read from the repository when it is built."""
    return ModelSpec(
        name=f"hf:{rest}",
        family="hf",
        embed_dim=0,
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, "bicubic", 0.875),
        build=lambda spec, weights, options: build_hf(rest, weights, options.get("pool", "default"), spec.name),
        description=f"transformers AutoModel {rest}",
        default_pool="default",
        pools=HF_POOLS,
        extra={"repo": rest},
    )


register_prefix("hf", _hf_spec, "hf:<repo id or local folder>")
