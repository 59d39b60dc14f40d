"""The model registry: a name -> a network that maps a normalised image batch to one embedding per image.

Every family registers :class:`ModelSpec` entries. :func:`load_model` builds the network with the requested weights
(``pretrained``, ``none`` for random initialisation, or a local file) and wraps it in :class:`EmbeddingModel`,
which carries the family's own preprocessing (input size, resize, mean and std).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..export_identity import model_identity, verified_export_fingerprint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP's normalisation (Radford et al., 2021), used by every CLIP checkpoint.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

WEIGHT_CHOICES = ("pretrained", "none")


class ModelError(Exception):
    """An unknown model name, a bad option, or weights that cannot be loaded. The message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """How a family turns a PIL image into its input tensor."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize_mode: str = "shortest"  # "shortest": resize the short side then centre-crop; "squash": resize to a square

    def transform(self) -> Callable:
        """PIL RGB image -> normalised float tensor (3, H, W): the torchvision eval transform (``Resize``,
        ``CenterCrop``, ``ToTensor``, ``Normalize``) step for step, without importing torchvision (about a second
        of start-up) where it can; see :class:`EvalTransform`."""
        return EvalTransform(self)

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


_PIL_FILTERS = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values, as torchvision maps them


class EvalTransform:
    """Callable ``PIL image -> tensor`` equal to torchvision's ``Compose([Resize, CenterCrop, ToTensor,
    Normalize])`` for ``preprocessing``: the same PIL resize (torchvision's output size: the short side to
    ``round(input_size / crop_pct)``, the long side truncated), the same crop offsets and the same float32 tensor
    operations, so the output is identical (tested). Anything else (not an RGB PIL image, a crop larger than the
    resized image) goes through torchvision itself. Picklable for decoding worker processes.
    """

    def __init__(self, preprocessing: "Preprocessing") -> None:
        self.preprocessing = preprocessing
        self._mean = torch.tensor(preprocessing.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(preprocessing.std, dtype=torch.float32)[:, None, None]

    def __call__(self, image) -> torch.Tensor:
        p = self.preprocessing
        size = p.input_size
        if getattr(image, "mode", None) != "RGB" or p.interpolation not in _PIL_FILTERS:
            return self.torchvision()(image)
        width, height = image.size
        if p.resize_mode == "squash":
            target = (size, size)
        else:
            short = int(round(size / p.crop_pct))
            long = int(short * max(width, height) / min(width, height))
            target = (short, long) if width <= height else (long, short)
        if target != (width, height):
            image = image.resize(target, _PIL_FILTERS[p.interpolation])
        width, height = image.size
        if size > width or size > height:
            return self.torchvision()(image)  # padding: rare, left to torchvision
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        if (width, height) != (size, size):
            image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(size, size, 3)
        tensor = pixels.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
        return tensor.sub_(self._mean).div_(self._std)

    def torchvision(self) -> Callable:
        """The reference: torchvision's own transform for this preprocessing."""
        from torchvision import transforms as T

        p = self.preprocessing
        interpolation = T.InterpolationMode(p.interpolation)
        if p.resize_mode == "squash":
            steps = [T.Resize((p.input_size, p.input_size), interpolation=interpolation, antialias=True)]
        else:
            scale_size = int(round(p.input_size / p.crop_pct))
            steps = [T.Resize(scale_size, interpolation=interpolation, antialias=True), T.CenterCrop(p.input_size)]
        return T.Compose(steps + [T.ToTensor(), T.Normalize(p.mean, p.std)])


@dataclass
class ModelSpec:
    """One registered name.

    ``build(spec, weights, options) -> nn.Module`` returns a network whose ``forward`` maps a batch (B, 3, H, W)
    to features (B, embed_dim). ``weights`` is ``"pretrained"`` or ``"none"``; local files are loaded afterwards
    by :func:`load_model`.

    A network may refine the spec for the chosen options (:func:`load_model` honours these attributes):
    ``embed_dim`` (int; e.g. a pooling that changes the width), ``preprocessing`` (:class:`Preprocessing`; e.g. a
    pass-through model whose config is only known once loaded), ``adapt_state_dict(state) -> state`` (accept a
    published weight file whose keys lack the wrapper's prefix or carry a classifier), ``wrap_transform(base)``
    (a PIL-level step before the tensor transform, e.g. face cropping) and ``loads_own_weights`` with
    ``load_weights_path(path)`` (a folder such as a Hugging Face ``save_pretrained`` output).
    ``options`` names the keyword options the family accepts (anything else is refused with a clear message).
    """

    name: str
    family: str
    embed_dim: int
    preprocessing: Preprocessing
    build: Callable[["ModelSpec", str, dict[str, Any]], nn.Module]
    offline_weights: bool = False
    description: str = ""
    default_pool: str | None = None
    pools: tuple[str, ...] = ()
    channels_last: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ("pool",)


_REGISTRY: dict[str, ModelSpec] = {}
#: Prefixes for pass-through names such as ``timm:convnext_tiny``: prefix -> factory(rest of the name) -> spec.
_PREFIX_FACTORIES: dict[str, Callable[[str], ModelSpec]] = {}
_PREFIX_USAGE: dict[str, str] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (a later registration of the same name replaces the earlier one)."""
    _REGISTRY[spec.name] = spec
    return spec


def register_prefix(prefix: str, factory: Callable[[str], ModelSpec], usage: str = "") -> None:
    """Resolve names ``"<prefix>:<rest>"`` through ``factory(rest)``; ``usage`` shows the form, e.g.
    ``"timm:<model name>[.<tag>]"``."""
    _PREFIX_FACTORIES[prefix] = factory
    _PREFIX_USAGE[prefix] = usage or f"{prefix}:<name>"


def list_prefixes() -> dict[str, str]:
    """Pass-through prefixes and their usage, e.g. ``{"timm": "timm:<model name>[.<tag>]"}``."""
    return dict(sorted(_PREFIX_USAGE.items()))


def list_models() -> list[ModelSpec]:
    """Every registered spec, sorted by family then name."""
    return sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))


def get_spec(name: str) -> ModelSpec:
    """The spec for ``name``; pass-through names (``timm:...``) are resolved on demand."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _PREFIX_FACTORIES:
        if not rest:
            raise ModelError(f"model name {name!r} needs something after '{prefix}:'")
        return _PREFIX_FACTORIES[prefix](rest)
    import difflib

    names = [s.name for s in list_models()]
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.6)
    close = close or [n for n in names if name and n.startswith(name.lower())][:3]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    prefixes = ", ".join(f"{p}:<name>" for p in sorted(_PREFIX_FACTORIES))
    raise ModelError(f"unknown model {name!r}; {hint}Registered: {', '.join(names)}. Pass-through: {prefixes} "
                     "(`python -m helpers models` lists them)")


class EmbeddingModel(nn.Module):
    """A network plus its preprocessing; ``forward`` returns raw (not yet normalised) embeddings (B, D).

    The network may be *deferred* (``network=None`` with a ``build`` callable): :func:`load_model` does so on the
    CPU when a verified ONNX export is known for the model's identity (:mod:`helpers.export_identity`), so that a run
    served by ONNX Runtime never builds it. Anything that needs the network (``network``, ``forward``,
    ``parameters()``, ``state_dict()``, ``to()``...) builds it first; ``eval()`` / ``train()`` only record the mode.
    """

    def __init__(self, spec: ModelSpec, network: nn.Module | None, weights: str,
                 options: dict[str, Any] | None = None, build: Callable[[], nn.Module] | None = None,
                 identity: str | None = None, fingerprint: str | None = None):
        super().__init__()
        if network is None and build is None:
            raise ValueError("an EmbeddingModel needs a network or a way to build it")
        self.spec = spec
        if network is not None:
            self.network = network
        self.weights = weights
        self.options = dict(options or {})
        self.preprocessing = spec.preprocessing
        self._build = build if network is None else None
        #: The identity the export fingerprint is remembered under (models loaded by name), and that fingerprint.
        self.identity = identity
        self._fingerprint = fingerprint
        self._signature = None

    @property
    def deferred(self) -> bool:
        """True while the network has not been built."""
        return self.__dict__.get("_build") is not None

    def __getattr__(self, name: str):
        if name == "network" and self.__dict__.get("_build") is not None:
            return self.materialize()
        return super().__getattr__(name)

    def materialize(self) -> nn.Module:
        """Build a deferred network (in the recorded train/eval mode); the network either way."""
        build = self.__dict__.get("_build")
        if build is None:
            return self._modules["network"]
        with torch.inference_mode(False):  # first used inside inference mode: the weights stay ordinary tensors
            network = build()
        self._build = None
        self.network = network
        network.train(self.training)
        self._signature = self._state_signature()
        return network

    def train(self, mode: bool = True) -> "EmbeddingModel":
        if self.deferred:
            self.training = mode
            return self
        return super().train(mode)

    def _state_signature(self) -> tuple:
        """Which tensors the module holds and their in-place version counters: changes when weights are trained,
        loaded, replaced or moved."""
        tensors = list(self._modules["network"].named_parameters()) + list(self._modules["network"].named_buffers())
        return tuple((name, t.data_ptr(), None if t.is_inference() else t._version) for name, t in tensors)

    def remember_identity(self, identity: str | None) -> None:
        """Mark the weights as now loaded for ``identity`` (see :meth:`pristine`)."""
        self.identity = identity
        self._signature = self._state_signature() if identity is not None and not self.deferred else None

    def pristine(self) -> bool:
        """True while the weights are those :func:`load_model` loaded for :attr:`identity` (never changed since)."""
        if self.identity is None:
            return False
        return self.deferred or self._signature == self._state_signature()

    def remembered_fingerprint(self) -> str | None:
        """The export fingerprint known for this model's unchanged weights without hashing them, else ``None``."""
        return self._fingerprint if self._fingerprint is not None and self.pristine() else None

    def pil_step(self) -> Callable | None:
        """The network's PIL-level step before the tensor transform (``wrap_transform``), if any; a deferred network
        has none (only such models are deferred)."""
        return None if self.deferred else getattr(self.network, "wrap_transform", None)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embed_dim(self) -> int:
        return int(self.spec.embed_dim)

    @property
    def pooling(self) -> str | None:
        return self.options.get("pool", self.spec.default_pool)

    def transform(self) -> Callable:
        base = self.preprocessing.transform()
        wrap = self.pil_step()
        return wrap(base) if callable(wrap) else base

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def weights_fingerprint(self, values_per_tensor: int = 16) -> str:
        """A cheap hash of the network's current parameters (a few values of every tensor)."""
        digest = hashlib.sha256()
        for name, tensor in self.network.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[:values_per_tensor].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def cache_key(self) -> str:
        """Identifies the model, its weights and its preprocessing: changing any of them invalidates the cache."""
        weights = self.weights
        if weights not in WEIGHT_CHOICES:
            path = Path(weights)
            stat = path.stat()
            weights = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}:{stat.st_ctime_ns}"
        elif weights == "none":
            weights = f"none:{self.weights_fingerprint()}"  # every random initialisation is a different model
        payload = json.dumps(
            {
                "name": self.spec.name,
                "weights": weights,
                "options": {k: str(v) for k, v in sorted(self.options.items())},
                "preprocessing": self.preprocessing.key(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _building_first(method: Callable) -> Callable:
    def wrapper(self, *args, **kwargs):
        self.materialize()
        return method(self, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


# Everything that walks the module's tensors or submodules builds a deferred network first.
for _method in ("parameters", "named_parameters", "buffers", "named_buffers", "children", "named_children", "modules",
                "named_modules", "state_dict", "load_state_dict", "_apply", "apply", "requires_grad_", "zero_grad"):
    setattr(EmbeddingModel, _method, _building_first(getattr(nn.Module, _method)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else Apple's MPS, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or a torch file with ``weights_only=True`` (never arbitrary pickles)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelError(f"cannot load weights from {path}: {exc}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return state


def pretrained_download_error(name: str, source: str, exc: BaseException, hint: str = "") -> ModelError:
    """The error for published weights that could not be fetched (no network, a firewall, an unknown tag...)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(
        f"cannot fetch the pretrained weights of {name} from {source} ({type(exc).__name__}: {reason[:300]}). "
        f"Without network access, download them elsewhere and pass the local file with --weights PATH"
        + (f" ({hint})" if hint else "")
        + ", or use --weights none for random weights."
    )


def save_weights(model: EmbeddingModel, path: str | os.PathLike) -> Path:
    """Save the network's state dict so that ``load_model(name, weights=path)`` reproduces it exactly."""
    from ..fileio import atomic_write

    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    return atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def load_model(
    name: str,
    weights: str = "pretrained",
    device: str | torch.device = "cpu",
    **options: Any,
) -> EmbeddingModel:
    """Build a registered model in eval mode on ``device``.

    ``weights``: ``"pretrained"`` (the family's published weights; offline families ship them, others download
    through their library), ``"none"`` (random initialisation, for tests) or a path to a local weight file or
    folder (loaded with ``weights_only=True``). ``options`` are family-specific (``pool``, ``pretrained`` tag...).

    On the CPU, when a verified ONNX export is remembered for this model's identity (name, options, preprocessing,
    weights as the embedding cache key names them, library versions; :mod:`helpers.export_identity`), the network
    is deferred: ONNX Runtime serves the export and the network is built only if something needs it.
    """
    spec = get_spec(name)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise ModelError(f"model {spec.name} does not take the option(s) {', '.join(unknown)} (it accepts: {accepted})")
    pool = options.get("pool")
    if pool is not None and spec.pools and pool not in spec.pools:
        raise ModelError(f"model {name} supports --pool {'|'.join(spec.pools)}, not {pool!r}")
    is_file = weights not in WEIGHT_CHOICES
    if is_file and not Path(weights).exists():
        raise ModelError(f"--weights must be pretrained, none or an existing file/folder; {weights!r} not found")
    target = resolve_device(device)
    identity = model_identity(spec.name, weights, options, spec.preprocessing.key())
    if target.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        fingerprint = verified_export_fingerprint(identity, spec.name, spec.preprocessing.input_size)
        if fingerprint is not None:  # ONNX Runtime will serve the export: build the network only if asked to
            build = functools.partial(_plain_network, spec, weights, options)
            return EmbeddingModel(spec, None, weights, options, build=build, identity=identity,
                                  fingerprint=fingerprint).eval()
    network = _build_network(spec, weights, options)
    refined = _refinements(spec, network)
    if refined:
        spec = replace(spec, **refined)
    model = EmbeddingModel(spec, network, weights, options)
    model.eval()
    model.to(target)
    if spec.channels_last and target.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if not refined and not callable(getattr(network, "wrap_transform", None)):
        model.remember_identity(identity)  # weights as loaded: their export fingerprint may be remembered
    return model


def _build_network(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    """The family's network with ``weights``: ``pretrained``, ``none`` or a local file or folder."""
    name = spec.name
    is_file = weights not in WEIGHT_CHOICES
    network = spec.build(spec, "none" if is_file else weights, options)
    if is_file and getattr(network, "loads_own_weights", False):
        network.load_weights_path(weights)
    elif is_file:
        if Path(weights).is_dir():
            raise ModelError(f"--weights {weights} is a folder; {name} needs a weight file (.pt, .pth, .bin, .safetensors)")
        state = load_state_dict_file(weights)
        adapt = getattr(network, "adapt_state_dict", None)
        if callable(adapt):
            state = adapt(state)
        missing, unexpected = network.load_state_dict(state, strict=False)
        if missing:
            raise ModelError(f"{weights} does not fit {name}: {len(missing)} missing keys, e.g. {missing[:3]}")
        if unexpected:
            raise ModelError(f"{weights} does not fit {name}: {len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
    return network


def _refinements(spec: ModelSpec, network: nn.Module) -> dict[str, Any]:
    """What the built network changes in its spec (width, preprocessing)."""
    refined: dict[str, Any] = {}
    if isinstance(getattr(network, "embed_dim", None), int) and network.embed_dim != spec.embed_dim:
        refined["embed_dim"] = int(network.embed_dim)
    if isinstance(getattr(network, "preprocessing", None), Preprocessing) and network.preprocessing != spec.preprocessing:
        refined["preprocessing"] = network.preprocessing
    return refined


def _plain_network(spec: ModelSpec, weights: str, options: dict[str, Any]) -> nn.Module:
    """A deferred model's network: only models whose network left the spec as it was are deferred."""
    network = _build_network(spec, weights, options)
    if _refinements(spec, network) or callable(getattr(network, "wrap_transform", None)):
        raise ModelError(f"{spec.name} no longer builds as when its ONNX export was remembered: remove "
                         f"fingerprints.json from the ONNX folder and run again")
    return network
