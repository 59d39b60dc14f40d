"""Model registry and families: ``load_model(name, weights=...)`` returns an :class:`EmbeddingModel`."""

from .registry import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EmbeddingModel,
    ModelError,
    ModelSpec,
    Preprocessing,
    get_spec,
    list_models,
    list_prefixes,
    load_model,
    load_state_dict_file,
    register,
    resolve_device,
    save_weights,
)
from . import families  # noqa: F401,E402  (every family registers its names; after the registry it fills)

DEFAULT_MODEL = "efficientnet-lite0"

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EmbeddingModel",
    "ModelError",
    "ModelSpec",
    "Preprocessing",
    "get_spec",
    "list_models",
    "list_prefixes",
    "load_model",
    "load_state_dict_file",
    "register",
    "resolve_device",
    "save_weights",
]
