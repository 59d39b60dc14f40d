"""ONNX Runtime inference for embedding models on the CPU, with an automatic fall-back to torch.

On a small CPU, ONNX Runtime runs the default EfficientNet-Lite0 several times faster than eager PyTorch (it fuses
batch norm and activations into the depthwise and pointwise convolutions). A model is exported once per input size
with ``torch.onnx.export`` into ``$RETRIEVAL_ONNX_DIR`` (default: ``<embedding cache>/onnx``), named by a
fingerprint of its weights, so a changed or fine-tuned network is exported again, never served stale. Each export is
checked against torch on a fixed input (cosine >= 1 - 1e-4 per row) before it is used; any failure (no
``onnxruntime`` or ``onnx`` package, an operator the exporter lacks, a mismatch) falls back to torch with a warning
under ``backend="auto"`` and raises :class:`~helpers.models.ModelError` under ``backend="onnx"``.

Backends agree to about 1e-6 in cosine, so the embedding cache does not distinguish them. ``precision="int8"``
serves the statically quantised model that :mod:`helpers.quantize` keeps beside the export (the embedding cache
keys include the precision).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .export_identity import export_path, is_verified, onnx_dir, remember_fingerprint
from .fileio import atomic_write, write_json
from .models.registry import EmbeddingModel, ModelError
from .quantize import int8_path

logger = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "torch", "onnx")
#: Below this many images to embed, ``auto`` keeps torch unless the model is already exported (an export costs
#: a few seconds once).
AUTO_MIN_IMAGES = 200
#: Minimum per-row cosine between ONNX Runtime's and torch's embeddings for an export to be used.
MIN_COSINE = 1 - 1e-4
#: Images per ONNX Runtime call: a batch is run in slices of this many. On the measured 2-core CPU (2 threads,
#: EfficientNet-Lite0 at 224 px) slices of 4 ran 1.09x (int8) and 1.29x (float32) the images/s of whole batches of
#: 32 (activations that stay in cache); the embeddings are bit for bit the same.
SESSION_BATCH = 4


#: One runner per live model, so that its sessions serve every extraction call (re-checked by fingerprint).
_RUNNERS: "weakref.WeakKeyDictionary[EmbeddingModel, OnnxRunner]" = weakref.WeakKeyDictionary()


def onnx_available() -> bool:
    """True when ONNX Runtime and the ``onnx`` package (needed by the exporter) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def model_fingerprint(model: EmbeddingModel) -> str:
    """SHA-256 of the model's name, options and every parameter and buffer: identifies what an export computes.

    A model whose network :func:`helpers.models.load_model` deferred carries the fingerprint remembered for its
    identity (:mod:`helpers.export_identity`); a built model loaded by name has its fingerprint remembered so."""
    remembered = getattr(model, "remembered_fingerprint", None)
    known = remembered() if callable(remembered) else None
    if known is not None:
        return known
    digest = hashlib.sha256()
    digest.update(json.dumps([model.name, {k: str(v) for k, v in sorted(model.options.items())}]).encode())
    digest.update(torch.__version__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    fingerprint = digest.hexdigest()[:24]
    pristine = getattr(model, "pristine", None)
    if callable(pristine) and pristine():  # weights as loaded for the model's identity: remember them
        remember_fingerprint(model.identity, fingerprint)
        model._fingerprint = fingerprint  # and keep it: no second hash of every weight for the next call
    return fingerprint


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / denom


class OnnxRunner:
    """Callable like the model (``images (B, 3, H, W) -> embeddings (B, D)``), served by ONNX Runtime.

    One session per input size, exported and verified on first use. ``strict=False`` (backend ``auto``) serves a
    size whose export fails through torch with a warning; ``strict=True`` raises :class:`ModelError`.
    ``threads``: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``). ``precision="int8"`` serves
    the quantised model beside the export, which must exist (see :func:`helpers.quantize.choose_precision`).
    """

    def __init__(self, model: EmbeddingModel, threads: int | None = None, strict: bool = False,
                 folder: str | os.PathLike | None = None, precision: str = "fp32") -> None:
        if precision not in ("fp32", "int8"):
            raise ValueError(f"an ONNX runner's precision is fp32 or int8, not {precision!r}")
        self.model = model
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.strict = strict
        self.folder = Path(folder) if folder is not None else onnx_dir()
        self.fingerprint = model_fingerprint(model)
        self._sessions: dict[tuple[int, int], object | None] = {}

    def __getattr__(self, name: str):
        # Everything else (spec, embed_dim, modules(), ...) is the wrapped model's: a runner stands in for it.
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def path_for(self, height: int, width: int) -> Path:
        return export_path(self.folder, self.model.name, self.fingerprint, height, width)

    def is_exported(self, height: int, width: int) -> bool:
        return is_verified(self.path_for(height, width))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if size not in self._sessions:
            self._sessions[size] = self._open(size)
        session = self._sessions[size]
        if session is None:  # torch computes after all: with the inference threads planned for ONNX Runtime
            saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return self.model(images)
            finally:
                torch.set_num_threads(saved)
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        parts = [session.run(None, {"images": array[i:i + SESSION_BATCH]})[0]
                 for i in range(0, len(array), SESSION_BATCH)]
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))

    # ------------------------------------------------------------------------------------------------------------
    def _open(self, size: tuple[int, int]):
        try:
            return self._session(size)
        except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure means: use torch
            if self.strict:
                raise ModelError(f"ONNX backend unavailable for {self.model.name} at {size[0]}x{size[1]}: {exc}. "
                                 "Use --backend torch") from None
            logger.warning("ONNX backend unavailable for %s at %dx%d (%s); using torch",
                           self.model.name, size[0], size[1], exc)
            return None

    def _new_session(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if os.environ.get("RETRIEVAL_ORT_SPIN", "0") != "1":
            # Idle worker threads sleep instead of spinning: image decoding processes share the same cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _session(self, size: tuple[int, int]):
        path = self.ensure_export(size)
        if self.precision == "int8":
            quantised = int8_path(path)
            if not quantised.exists():
                raise ModelError(f"no int8 model beside {path.name}: calibrate first (precision int8 or auto)")
            return self._new_session(quantised)
        return self._new_session(path)

    def ensure_export(self, size: tuple[int, int]) -> Path:
        """The verified float32 export for ``size`` (exported and checked against torch on first use)."""
        import onnxruntime  # noqa: F401 - fail early with ImportError when missing

        path = self.path_for(*size)
        sidecar = path.with_suffix(".json")
        if self.is_exported(*size):
            return path
        self._export(path, size)
        session = self._new_session(path)
        probe = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, *size, generator=probe)
        model = self.model
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            expected = model(x).float().numpy()
        model.train(was_training)
        got = session.run(None, {"images": x.numpy()})[0]
        cosine = float(_row_cosine(expected, got).min()) if got.shape == expected.shape else -1.0
        if cosine < MIN_COSINE:
            path.unlink(missing_ok=True)
            raise ModelError(f"exported model disagrees with torch (cosine {cosine:.6f} < {MIN_COSINE})")
        write_json(sidecar, {"model": model.name, "size": list(size), "verified": True, "min_cosine": cosine,
                             "torch": torch.__version__})
        return path

    def _export(self, path: Path, size: tuple[int, int]) -> None:
        model = self.model
        was_training = model.training
        model.eval()
        buffer = io.BytesIO()
        dummy = torch.zeros(1, 3, *size)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (dummy,), buffer, input_names=["images"], output_names=["embeddings"],
                    dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                    opset_version=17, dynamo=False,
                )
        finally:
            model.train(was_training)
        atomic_write(path, lambda f: f.write(buffer.getvalue()), mode="wb")
        logger.info("exported %s for ONNX Runtime to %s", model.name, path)


def resolve_backend(
    model: EmbeddingModel,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    n_images: int | None = None,
    threads: int | None = None,
    precision: str = "fp32",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs the forward pass: the model itself (torch) or an :class:`OnnxRunner`.

    ``auto`` picks ONNX Runtime on the CPU when it is installed and either the model is already exported or at
    least :data:`AUTO_MIN_IMAGES` images are to be embedded; otherwise torch. ``onnx`` insists (CPU only).
    ``precision="int8"`` needs ONNX Runtime: it forces it under ``auto`` and refuses ``torch`` or a GPU.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, not {backend!r}")
    device = torch.device(device)
    if precision == "int8" and (backend == "torch" or device.type != "cpu"):
        raise ModelError("int8 precision runs through ONNX Runtime on the CPU: use --backend auto|onnx and "
                         "--device cpu, or --precision fp32")
    if precision == "int8":
        backend = "onnx"
    if backend == "torch":
        return model
    if backend == "onnx":
        if device.type != "cpu":
            raise ModelError(f"the ONNX backend runs on the CPU; use --backend torch with --device {device}")
        if not onnx_available():
            raise ModelError("the ONNX backend needs the packages onnxruntime and onnx "
                             "(pip install onnxruntime onnx), or use --backend torch")
        return _runner(model, threads, strict=True, precision=precision)
    if device.type != "cpu" or not onnx_available():
        return model
    try:
        runner = _runner(model, threads, strict=False)
    except Exception as exc:  # noqa: BLE001 - e.g. a model whose state cannot be fingerprinted
        logger.warning("ONNX backend unavailable for %s (%s); using torch", model.name, exc)
        return model
    size = model.preprocessing.input_size
    if n_images is not None and n_images < AUTO_MIN_IMAGES and not runner.is_exported(size, size):
        return model
    return runner


def _runner(model: EmbeddingModel, threads: int | None, strict: bool, precision: str = "fp32") -> OnnxRunner:
    """The model's cached runner when its weights, threads, folder, strictness and precision are unchanged, else a
    new one."""
    cached = _RUNNERS.get(model)
    if (cached is not None and cached.strict == strict and cached.threads == (threads or torch.get_num_threads())
            and cached.precision == precision and cached.folder == onnx_dir()
            and cached.fingerprint == model_fingerprint(model)):
        return cached
    runner = OnnxRunner(model, threads=threads, strict=strict, precision=precision)
    _RUNNERS[model] = runner
    return runner
