"""Batched embedding extraction with robust loading, test-time augmentation and an on-disk cache.

Every embedding leaves this module L2-normalised float32. Unreadable files are reported and skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import ImageLoadError, load_image, report_skipped
from .fileio import atomic_write
from .models.registry import EmbeddingModel, resolve_device

logger = logging.getLogger("helpers")

TTA_CHOICES = ("none", "flip", "multiscale")
#: Multi-scale descriptor scales of Radenovic et al. (TPAMI 2019, "Fine-tuning CNN image retrieval with no human
#: annotation"): 1, 1/sqrt(2), 1/2.
MULTISCALE_SCALES = (1.0, 2 ** -0.5, 0.5)


def default_cache_dir() -> Path:
    """``$RETRIEVAL_CACHE_DIR``, else ``~/.cache/image-retrieval/embeddings``."""
    env = os.environ.get("RETRIEVAL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "image-retrieval" / "embeddings"


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------
def file_key(path: Path) -> str:
    """A file's identity for the cache: its absolute path, size and modification time."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


class EmbeddingCache:
    """Embeddings on disk, one shard per (model key, folder): ``root/<model key>/<folder hash>.npz``.

    Entries are keyed by :func:`file_key`, so a changed or replaced file is embedded again. Shards are rewritten
    atomically. ``dtype`` (float32 or float16) is the storage precision; :func:`extract_embeddings` passes freshly
    computed embeddings through the same precision so that cold and warm runs agree bit for bit.
    """

    def __init__(self, root: str | os.PathLike | None = None, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError("cache dtype must be float32 or float16")
        self.root = Path(root) if root is not None else default_cache_dir()
        self.dtype = np.dtype(dtype)

    def shard_path(self, model_key: str, folder: Path) -> Path:
        folder_hash = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
        return self.root / f"{model_key}-{self.dtype.name}" / f"{folder_hash}.npz"

    def load(self, model_key: str, folder: Path) -> dict[str, np.ndarray]:
        path = self.shard_path(model_key, folder)
        if not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as shard:
                keys, vectors = shard["keys"], shard["embeddings"]
        except Exception as exc:  # noqa: BLE001 - a broken shard is rebuilt, never fatal
            logger.warning("embedding cache %s unreadable (%s); it will be rebuilt", path, exc)
            return {}
        return dict(zip(keys.tolist(), vectors))

    def save(self, model_key: str, folder: Path, entries: dict[str, np.ndarray]) -> None:
        if not entries:
            return
        keys = sorted(entries)
        vectors = np.stack([entries[k] for k in keys]).astype(self.dtype)
        atomic_write(
            self.shard_path(model_key, folder),
            lambda f: np.savez(f, keys=np.array(keys), embeddings=vectors),
            mode="wb",
        )


# --------------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    """Loads images robustly; a failure yields its reason instead of raising."""

    def __init__(self, paths: Sequence[Path], transform: Callable, draft_size: int | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            image = load_image(self.paths[index], draft_size=self.draft_size)
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
    """Embeddings of the files that loaded, in input order, and what happened to the others."""

    embeddings: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]


def _auto_workers(n_images: int, batch_size: int) -> int:
    if n_images < 2 * batch_size:
        return 0
    return max(1, min(4, (os.cpu_count() or 1)))


def extract_embeddings(
    model: EmbeddingModel,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    cache: EmbeddingCache | None = None,
    tta: str = "none",
    draft_size: int | None = None,
    progress: bool = True,
    desc: str = "embedding",
    backend: str = "auto",
) -> EmbeddingResult:
    """Embed ``paths`` with ``model`` (batched, inference mode, autocast on CUDA), L2-normalised float32.

    With a ``cache``, files already embedded by the same model, weights, preprocessing and TTA are read back and
    only the rest are computed. Unreadable files are skipped and reported. ``backend``: ``torch``, ``onnx`` (ONNX
    Runtime on the CPU) or ``auto`` (ONNX Runtime on the CPU for 200+ images or an already exported model, else
    torch; see :mod:`helpers.onnx_backend`). Backends agree to about 1e-6 cosine and share the cache.
    """
    from tqdm.auto import tqdm

    if tta not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, not {tta!r}")
    start = time.perf_counter()
    paths = [Path(p) for p in paths]
    target = resolve_device(device)
    if next(model.parameters(), torch.empty(0)).device != target:
        model.to(target)
    model.eval()
    tta_key = "multiscale-pmean" if tta == "multiscale" else tta  # the power mean replaced the plain mean
    model_key = f"{model.cache_key()}-tta-{tta_key}-draft-{draft_size}"

    vectors: dict[int, np.ndarray] = {}
    by_folder: dict[Path, list[int]] = {}
    for i, p in enumerate(paths):
        by_folder.setdefault(p.parent, []).append(i)
    shards: dict[Path, dict[str, np.ndarray]] = {}
    keys: dict[int, str] = {}
    if cache is not None:
        for folder, indices in by_folder.items():
            shard = cache.load(model_key, folder)
            shards[folder] = shard
            for i in indices:
                try:
                    keys[i] = file_key(paths[i])
                except OSError:
                    continue
                if keys[i] in shard:
                    vectors[i] = l2_normalize(shard[keys[i]].astype(np.float32))
    n_cached = len(vectors)

    todo = [i for i in range(len(paths)) if i not in vectors]
    skipped: list[tuple[Path, str]] = []
    computed: dict[int, np.ndarray] = {}
    if todo:
        dataset = ImageFileDataset([paths[i] for i in todo], model.transform(), draft_size=draft_size)
        workers = _auto_workers(len(todo), batch_size) if num_workers is None else num_workers
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=target.type == "cuda",
            persistent_workers=False,
        )
        from .onnx_backend import resolve_backend

        runner = resolve_backend(model, backend, target, n_images=len(todo))
        autocast = torch.autocast("cuda", dtype=torch.float16) if target.type == "cuda" else _null_context()
        # channels-last also speeds up eager CNNs on the CPU (about 2x for EfficientNet-Lite0 here).
        channels_last = model.spec.channels_last and (target.type == "cuda" or runner is model)
        if channels_last and target.type != "cuda":
            model.to(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast, tqdm(total=len(todo), desc=desc, disable=not progress, unit="img") as bar:
            for local_indices, batch, failed in loader:
                for local, reason in failed:
                    skipped.append((paths[todo[local]], reason))
                if batch is not None:
                    batch = batch.to(target, non_blocking=True)
                    if channels_last:
                        batch = batch.contiguous(memory_format=torch.channels_last)
                    emb = torch.nn.functional.normalize(forward_tta(runner, batch, tta).float(), dim=-1)
                    emb = emb.cpu().numpy()
                    for row, local in enumerate(local_indices):
                        computed[todo[local]] = emb[row]
                bar.update(len(local_indices) + len(failed))
        storage = cache.dtype if cache is not None else np.dtype(np.float32)
        for i, vector in computed.items():
            stored = vector.astype(storage)
            vectors[i] = l2_normalize(stored.astype(np.float32))
            if cache is not None and i in keys:
                shards[paths[i].parent][keys[i]] = stored
        if cache is not None and computed:
            for folder in {paths[i].parent for i in computed}:
                cache.save(model_key, folder, shards[folder])

    order = sorted(vectors)
    dim = model.embed_dim
    embeddings = np.stack([vectors[i] for i in order]).astype(np.float32) if order else np.zeros((0, dim), np.float32)
    skipped.sort(key=lambda item: str(item[0]))
    report_skipped(skipped)
    return EmbeddingResult(
        embeddings=embeddings,
        paths=[paths[i] for i in order],
        skipped=skipped,
        n_cached=n_cached,
        n_computed=len(computed),
        seconds=time.perf_counter() - start,
    )


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


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
