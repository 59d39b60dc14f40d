"""Batched embedding extraction with robust loading, test-time augmentation and an on-disk cache.

Every embedding leaves this module L2-normalised float32. Unreadable files are reported and skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import ImageLoadError, draft_size_for, load_image, max_pixels_limit, report_skipped
from .embedding_cache import EmbeddingCache, default_cache_dir, file_key  # noqa: F401 - re-exported
from .models.registry import EmbeddingModel, resolve_device
from .parallelism import PREFETCH_BATCHES, ThreadPlan, cuda_batch_size, plan_threads
from .quantize import CALIBRATION_IMAGES, PRECISION_CHOICES, choose_precision

logger = logging.getLogger(__name__)

TTA_CHOICES = ("none", "flip", "multiscale")
#: Multi-scale descriptor scales of Radenovic et al. (TPAMI 2019, "Fine-tuning CNN image retrieval with no human
#: annotation"): 1, 1/sqrt(2), 1/2.
MULTISCALE_SCALES = (1.0, 2 ** -0.5, 0.5)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    """Loads images robustly; a failure yields its reason instead of raising. The one image dataset of the package:
    extraction and training both read through it. Items are ``(index, tensor, None)`` or ``(index, None, reason)``;
    with ``views=2`` the tensor is a pair of independently transformed views (SimCLR).

    The decompression-bomb limit is read once here (in the calling process), so that a malformed
    ``$RETRIEVAL_MAX_PIXELS`` is one clear error rather than a reason given for every image.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable, draft_size: int | None = None,
                 max_pixels: int | None | str = "env", views: int = 1) -> None:
        self.paths = list(paths)
        self.views = views
        self.transform = transform
        self.draft_size = draft_size
        self.max_pixels = max_pixels_limit() if max_pixels == "env" else max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index], max_pixels=self.max_pixels, draft_size=self.draft_size)
            if self.views > 1:
                return index, tuple(self.transform(image) for _ in range(self.views)), None
            return index, self.transform(image), None
        except ImageLoadError as exc:
            return index, None, exc.reason
        except Exception as exc:  # noqa: BLE001 - e.g. a transform failing on a 1x1 image
            return index, None, f"cannot preprocess ({type(exc).__name__}: {exc})"


def _collate(batch):
    ok = [(i, t) for i, t, _ in batch if t is not None]
    failed = [(i, r) for i, _, r in batch if r is not None]
    indices = [i for i, _ in ok]
    tensor = torch.stack([t for _, t in ok]) if ok else None
    return indices, tensor, failed


def forward_tta(model: EmbeddingModel, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Embeddings of a preprocessed batch under test-time augmentation (before the final L2 normalisation).

    ``flip``: mean of the L2-normalised embeddings of the image and its horizontal mirror. ``multiscale``: the
    image at scales 1, 1/sqrt(2), 1/2, their L2-normalised embeddings combined by a power mean
    ``(mean_s v_s^p)^(1/p)`` as in Radenovic et al. (TPAMI 2019; the authors' ``extract_ms``), with ``p`` the
    model's GeM exponent and ``p = 1`` (the plain mean) for other poolings; the signed form
    ``sign(m)|m|^(1/p)``, ``m = mean(sign(v)|v|^p)``, keeps negative components. Queries and gallery get the same.
    """
    if tta == "none":
        return model(images)
    if tta == "flip":
        views = [images, torch.flip(images, dims=[3])]
    elif tta == "multiscale":
        size = images.shape[-1]
        views = [
            images if s == 1.0 else torch.nn.functional.interpolate(
                images, size=(max(8, round(images.shape[-2] * s)), max(8, round(size * s))),
                mode="bilinear", align_corners=False, antialias=True,
            )
            for s in MULTISCALE_SCALES
        ]
    else:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, not {tta!r}")
    p = multiscale_power(model) if tta == "multiscale" else 1.0
    total = None
    for view in views:
        emb = torch.nn.functional.normalize(model(view).float(), dim=-1)
        if p != 1.0:
            emb = emb.sign() * emb.abs().pow(p)
        total = emb if total is None else total + emb
    mean = total / len(views)
    return mean if p == 1.0 else mean.sign() * mean.abs().pow(1.0 / p)


def multiscale_power(model: torch.nn.Module) -> float:
    """The power of the multi-scale mean: the first GeM pooling's exponent p in ``model``, else 1 (Radenovic et
    al. use the network's GeM p, and the plain mean for other poolings)."""
    from .models.pooling import GeM

    for module in model.modules():
        if isinstance(module, GeM):
            p = module.p
            return float(p.detach()) if isinstance(p, torch.Tensor) else float(p)
    return 1.0


@dataclass
class EmbeddingResult:
    """Embeddings of the files that loaded, in input order, and what happened to the others.

    ``precision`` (``fp32`` or ``int8``) is what computed them and ``precision_reason`` why it was chosen;
    ``draft_size`` the JPEG draft decoding size; ``plan`` the threads and decoding workers used (``None`` when
    nothing was computed): all for the run's metrics JSON.
    """

    embeddings: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0
    precision: str = "fp32"
    precision_reason: str = ""
    draft_size: int | None = None
    plan: ThreadPlan | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def info(self) -> dict:
        """What the run's metrics JSON records about this extraction."""
        return {"precision": self.precision, "precision_reason": self.precision_reason, "draft_size": self.draft_size,
                "inference_threads": self.plan.inference_threads if self.plan else None,
                "decode_workers": self.plan.decode_workers if self.plan else None}


def resolve_draft_size(model: EmbeddingModel, draft_size: int | str | None = "auto") -> int | None:
    """``auto``: the smallest JPEG draft size the model's preprocessing needs (:func:`helpers.data.draft_size_for`),
    or none for models with their own PIL-level step (face cropping wants every pixel); otherwise as given."""
    if draft_size != "auto":
        return None if draft_size is None else int(draft_size)
    pil_step = model.pil_step() if hasattr(model, "pil_step") else getattr(getattr(model, "network", None),
                                                                          "wrap_transform", None)
    if callable(pil_step):
        return None
    return draft_size_for(model.preprocessing)


def _loader(paths: Sequence[Path], model: EmbeddingModel, draft: int | None, batch_size: int, workers: int,
            pin: bool = False) -> DataLoader:
    """Batches of decoded, preprocessed images; ``workers`` processes decode ahead through a bounded queue."""
    dataset = ImageFileDataset(paths, model.transform(), draft_size=draft)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate, pin_memory=pin,
                      persistent_workers=False, prefetch_factor=PREFETCH_BATCHES if workers else None)


def _calibration_sampler(model: EmbeddingModel, paths: Sequence[Path], draft: int | None,
                         workers: int) -> Callable[[], np.ndarray]:
    """A function returning up to :data:`CALIBRATION_IMAGES` preprocessed images spread evenly over ``paths``."""
    def sample() -> np.ndarray:
        n = min(CALIBRATION_IMAGES, len(paths))
        chosen = [paths[int(i * len(paths) / n)] for i in range(n)]
        batches = [batch.numpy() for _, batch, _ in _loader(chosen, model, draft, 32, workers) if batch is not None]
        if not batches:
            raise ValueError("no calibration image could be loaded")
        return np.concatenate(batches).astype(np.float32)

    return sample


def _model_device(model: EmbeddingModel) -> torch.device:
    """Where the model's weights are; a deferred network (see :class:`helpers.models.EmbeddingModel`) is built on
    the CPU, and asking its parameters would build it."""
    if getattr(model, "deferred", False):
        return torch.device("cpu")
    return next(model.parameters(), torch.empty(0)).device


def _choose_precision(model: EmbeddingModel, paths: Sequence[Path], target: torch.device, backend: str,
                      requested: str, draft: int | None, tta: str, plan: ThreadPlan) -> tuple[str, str]:
    """The precision to embed with and why (see :func:`helpers.quantize.choose_precision`)."""
    from .models.registry import ModelError
    from .onnx_backend import OnnxRunner, resolve_backend

    if requested == "fp32":
        return "fp32", "requested"
    if tta == "multiscale":
        if requested == "int8":
            raise ValueError("int8 is calibrated at the model's input size only: use precision fp32 with "
                             "multiscale TTA")
        return "fp32", "multiscale TTA runs at sizes int8 was not calibrated for"
    probe = resolve_backend(model, backend, target, n_images=len(paths), threads=plan.inference_threads,
                            precision="int8" if requested == "int8" else "fp32")
    fp32_path = None
    if isinstance(probe, OnnxRunner):
        size = model.preprocessing.input_size
        try:
            fp32_path = probe.ensure_export((size, size))
        except Exception as exc:  # noqa: BLE001 - no export means float32 through torch
            if requested == "int8":
                raise ModelError(f"int8 needs the model exported for ONNX Runtime, which failed: {exc}") from None
            logger.warning("ONNX export of %s failed (%s); float32 through torch", model.name, exc)
    sample = _calibration_sampler(model, paths, draft, plan.decode_workers)
    chosen, reason = choose_precision(requested, fp32_path, sample, len(paths), plan.inference_threads)
    logger.info("precision %s for %s (%s): %s", chosen, model.name, requested, reason)
    return chosen, reason


def _read_cache(cache: EmbeddingCache | None, model_key: str, paths: Sequence[Path],
                dim: int) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Cached vectors by input index, and the cache key of every file that could be stat'ed."""
    vectors: dict[int, np.ndarray] = {}
    keys: dict[int, str] = {}
    if cache is None:
        return vectors, keys
    by_folder: dict[Path, list[int]] = {}
    for i, p in enumerate(paths):
        by_folder.setdefault(p.parent, []).append(i)
    for folder, indices in by_folder.items():
        shard = cache.load(model_key, folder, dim=dim)
        for i in indices:
            try:
                keys[i] = file_key(paths[i])
            except OSError:
                continue
            if keys[i] in shard:
                vectors[i] = l2_normalize(shard[keys[i]].astype(np.float32))
    return vectors, keys


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """torch's intra-op threads at ``count`` for the block (``None``: unchanged)."""
    if count is None or count == torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _compute(runner, model: EmbeddingModel, paths: Sequence[Path], target: torch.device, batch_size: int,
             plan: ThreadPlan, tta: str, draft: int | None, progress: bool, desc: str):
    """Embed ``paths`` (L2-normalised float32 by local index) and list the files that failed with their reason."""
    from tqdm.auto import tqdm

    loader = _loader(paths, model, draft, batch_size, plan.decode_workers, pin=target.type == "cuda")
    cuda = target.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext()
    # channels-last also speeds up eager CNNs on the CPU (about 2x for EfficientNet-Lite0 here).
    channels_last = model.spec.channels_last and (cuda or runner is model)
    if channels_last and not cuda:
        model.to(memory_format=torch.channels_last)
    computed: dict[int, np.ndarray] = {}
    skipped: list[tuple[Path, str]] = []
    # torch runs the inference, or only the preprocessing when decoding stays in this process and ONNX Runtime
    # infers: then one torch thread, or its idle OpenMP threads spin against ONNX Runtime's (about 10x slower here).
    threads = None if cuda else (plan.inference_threads if runner is model else 1)
    with torch.inference_mode(), autocast, _torch_threads(threads), \
            tqdm(total=len(paths), desc=desc, disable=not progress, unit="img") as bar:
        for local_indices, batch, failed in loader:
            skipped.extend((paths[local], reason) for local, reason in failed)
            if batch is not None:
                batch = batch.to(target, non_blocking=True)
                if channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                emb = torch.nn.functional.normalize(forward_tta(runner, batch, tta).float(), dim=-1)
                computed.update(zip(local_indices, emb.cpu().numpy()))
            bar.update(len(local_indices) + len(failed))
    return computed, skipped


def extract_embeddings(
    model: EmbeddingModel,
    paths: Sequence[str | os.PathLike],
    batch_size: int | None = 32,
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    cache: EmbeddingCache | None = None,
    tta: str = "none",
    draft_size: int | str | None = "auto",
    progress: bool = True,
    desc: str = "embedding",
    backend: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
) -> EmbeddingResult:
    """Embed ``paths`` with ``model`` (batched, inference mode, autocast on CUDA), L2-normalised float32.

    With a ``cache``, files already embedded by the same model, weights, preprocessing, TTA, draft size and
    precision are read back and only the rest are computed. Unreadable files are skipped and reported.
    ``backend``: ``torch``, ``onnx`` (ONNX Runtime on the CPU) or ``auto`` (ONNX Runtime on the CPU for 200+ images
    or an already exported model, else torch; see :mod:`helpers.onnx_backend`); backends agree to about 1e-6 cosine.
    ``precision``: ``fp32``, ``int8`` or ``auto`` (int8 where it agrees with float32; see :mod:`helpers.quantize`).
    ``draft_size``: JPEG DCT-scaled decoding to this smallest side (``auto``: what the preprocessing needs).
    ``num_workers`` / ``threads``: decoding processes and inference threads (default: from the cores,
    :func:`helpers.parallelism.plan_threads`). ``batch_size=None`` sizes batches to the GPU's memory (32 on a CPU).
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, not {tta!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, not {precision!r}")
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    target = resolve_device(device)
    if _model_device(model) != target:
        model.to(target)
    model.eval()
    draft = resolve_draft_size(model, draft_size)
    if batch_size is None:
        size = model.preprocessing.input_size
        batch_size = cuda_batch_size(model, size, target) if target.type == "cuda" else 32
    plan = plan_threads(len(paths), batch_size, target.type, num_workers=num_workers, threads=threads)
    chosen, reason = _choose_precision(model, paths, target, backend, precision, draft, tta, plan)
    tta_key = "multiscale-pmean" if tta == "multiscale" else tta  # the power mean replaced the plain mean
    model_key = f"{model.cache_key()}-tta-{tta_key}-draft-{draft}-precision-{chosen}"
    vectors, keys = _read_cache(cache, model_key, paths, model.embed_dim)
    n_cached = len(vectors)
    todo = [i for i in range(len(paths)) if i not in vectors]
    skipped: list[tuple[Path, str]] = []
    computed: dict[int, np.ndarray] = {}
    used_plan = None
    if todo:
        from .onnx_backend import resolve_backend

        used_plan = plan_threads(len(todo), batch_size, target.type, num_workers=num_workers, threads=threads)
        runner = resolve_backend(model, backend, target, n_images=len(todo), threads=used_plan.inference_threads,
                                 precision=chosen)
        local, skipped = _compute(runner, model, [paths[i] for i in todo], target, batch_size, used_plan, tta, draft,
                                  progress, desc)
        computed = {todo[j]: vector for j, vector in local.items()}
        _store(cache, model_key, paths, keys, computed, vectors)
    order = sorted(vectors)
    dim = model.embed_dim
    embeddings = np.stack([vectors[i] for i in order]).astype(np.float32) if order else np.zeros((0, dim), np.float32)
    skipped.sort(key=lambda item: str(item[0]))
    report_skipped(skipped)
    return EmbeddingResult(embeddings=embeddings, paths=[paths[i] for i in order], skipped=skipped,
                           n_cached=n_cached, n_computed=len(computed), seconds=time.perf_counter() - start,
                           precision=chosen, precision_reason=reason, draft_size=draft, plan=used_plan)


def _store(cache: EmbeddingCache | None, model_key: str, paths: Sequence[Path], keys: dict[int, str],
           computed: dict[int, np.ndarray], vectors: dict[int, np.ndarray]) -> None:
    """Add ``computed`` to ``vectors`` through the cache's storage precision (so that cold and warm runs agree bit
    for bit) and save them to the cache, one merge per folder."""
    storage = cache.dtype if cache is not None else np.dtype(np.float32)
    new: dict[Path, dict[str, np.ndarray]] = {}
    for i, vector in computed.items():
        stored = vector.astype(storage)
        vectors[i] = l2_normalize(stored.astype(np.float32))
        if cache is not None and i in keys:
            new.setdefault(paths[i].parent, {})[keys[i]] = stored
    for folder, entries in new.items():
        cache.save(model_key, folder, entries)


def embed_pil_images(
    model: EmbeddingModel, images: Sequence, device: str | torch.device = "auto", tta: str = "none"
) -> np.ndarray:
    """Embed in-memory PIL images (RGB) in one batch; L2-normalised float32 (N, D)."""
    target = resolve_device(device)
    model.to(target).eval()
    transform = model.transform()
    batch = torch.stack([transform(image.convert("RGB")) for image in images]).to(target)
    with torch.inference_mode():
        emb = forward_tta(model, batch, tta).float()
    return l2_normalize(emb.cpu().numpy())
