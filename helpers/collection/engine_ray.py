"""The Ray engine: the same shards computed by Ray Data, on a local Ray that it starts (and shuts down) or on an
existing cluster. Images are decoded and preprocessed in parallel tasks; ``map_batches`` runs the model over an
actor pool, the model loaded once per actor (on ``gpus_per_worker`` GPUs each where given)."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .modelref import ModelRef
from .sources import Entry

logger = logging.getLogger(__name__)

MISSING_RAY = ("--engine ray needs Ray Data, an optional extra: pip install 'cbir-toolkit[scale]' "
               "(or pip install 'ray[data]')")


#: Tries at starting a local Ray.
START_ATTEMPTS = 3
#: CPUs a decoding task asks Ray for.
DECODE_CPUS = 0.5


class EngineError(ValueError):
    """An engine that cannot run here (e.g. Ray not installed)."""


def require_ray():
    """The ``ray`` module with Ray Data, or :class:`EngineError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise EngineError(MISSING_RAY) from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected: to ``address`` where given, else to a local Ray started here. What this call started or
    connected is shut down on the way out, an interrupt (Ctrl-C) included; a Ray already running is left as is."""
    ray = require_ray()
    owned = not ray.is_initialized()
    if owned:
        _start(ray, address, num_cpus)
    try:
        yield ray
    finally:
        if owned:
            ray.shutdown()


def _start(ray, address: str | None, num_cpus: int | None, attempts: int = START_ATTEMPTS) -> None:
    """``ray.init``; a local start is retried: Ray gives its processes a fixed 30 s to come up, which a busy
    machine can miss."""
    for attempt in range(1, attempts + 1):
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception when its processes start late
            ray.shutdown()
            if address or attempt == attempts:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise EngineError(f"cannot start or reach {where} ({exc})") from None
            logger.warning("a local Ray did not start in time (%s); trying again (%d/%d)", exc, attempt + 1,
                           attempts)


def _decode(files: Sequence[str], transform, input_size: int,
            draft_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed float32 pixels (B, 3, S, S) and reasons ("" for a file that loaded); JPEGs decoded at
    ``draft_size`` as the local engine does (none for a model with its own PIL-level step)."""
    from ..data import ImageLoadError, load_image

    pixels = np.zeros((len(files), 3, input_size, input_size), dtype=np.float32)
    reasons = []
    for i, file in enumerate(files):
        try:
            pixels[i] = transform(load_image(file, draft_size=draft_size)).numpy()
            reasons.append("")
        except ImageLoadError as exc:
            reasons.append(exc.reason)
        except Exception as exc:  # noqa: BLE001 - a transform failing on a 1x1 image, as the local engine
            reasons.append(f"cannot preprocess ({type(exc).__name__}: {exc})")
    return pixels, np.array(reasons, dtype=object)


def decode_batch(batch: dict[str, np.ndarray], preprocessing) -> dict[str, np.ndarray]:
    """Ray task: decode (at the draft size the local engine uses) and preprocess a batch of files."""
    from ..data import draft_size_for

    pixels, reasons = _decode(list(batch["file"]), preprocessing.transform(), preprocessing.input_size,
                              draft_size_for(preprocessing))
    return {"id": batch["id"], "file": batch["file"], "pixels": pixels, "reason": reasons}


class Embedder:
    """Ray actor: one model, loaded once; L2-normalised float32 embeddings of preprocessed batches (or of files,
    decoded here, for a model with its own PIL-level step such as face cropping)."""

    def __init__(self, model: ModelRef, device: str, decode_here: bool) -> None:
        import torch

        self.device = torch.device(device)
        self.model = model.load(self.device)
        self.model.eval()
        self.channels_last = bool(self.model.spec.channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.transform = self.model.transform() if decode_here else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.transform is not None:
            pixels, reasons = _decode(list(batch["file"]), self.transform, self.model.preprocessing.input_size)
        else:
            pixels, reasons = batch["pixels"], batch["reason"]
        ok = np.array([not r for r in reasons], dtype=bool)
        vectors = np.zeros((len(ok), self.model.embed_dim), dtype=np.float32)
        if ok.any():
            images = torch.from_numpy(np.ascontiguousarray(pixels[ok])).to(self.device)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            autocast = (torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda"
                        else contextlib.nullcontext())
            with torch.inference_mode(), autocast:
                emb = torch.nn.functional.normalize(self.model(images).float(), dim=-1)
            vectors[ok] = emb.cpu().numpy()
        return {"id": batch["id"], "vector": vectors, "reason": np.asarray(reasons, dtype=object)}


def _dataset(ray, model, ref: ModelRef, files: list[str], workers: int, gpus_per_worker: float, batch_size: int):
    """The Ray Data pipeline: files -> decode tasks -> embedding actors."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards finish in order: an interrupt loses the fewest
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"id": i, "file": f} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), math.ceil(len(items) / batch_size))))
    decode_here = callable(getattr(model.network, "wrap_transform", None))
    if not decode_here:
        # Fewer CPUs than the actors ask for keeps Ray from fusing decoding into the actors: it stays in tasks.
        ds = ds.map_batches(decode_batch, fn_kwargs={"preprocessing": model.preprocessing},
                            batch_size=batch_size, num_cpus=DECODE_CPUS)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    return ds.map_batches(Embedder, fn_constructor_kwargs={"model": ref, "device": device, "decode_here": decode_here},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                          num_gpus=gpus_per_worker or None, num_cpus=1)


def embed_ray(model, ref: ModelRef, chunks: Sequence[tuple[int, Sequence[Entry]]],
              on_shard: Callable[[int, Sequence[Entry], np.ndarray, list], None], advance: Callable[[int], None],
              workers: int = 1, gpus_per_worker: float = 0, batch_size: int = 32, address: str | None = None) -> None:
    """As :func:`helpers.collection.engine_local.embed_local`, through Ray Data (see the module docstring)."""
    files, owner = [], []
    for c, (_, entries) in enumerate(chunks):
        files.extend(str(e.file) for e in entries)
        owner.extend((c, i) for i in range(len(entries)))
    if not files:
        return
    pending: dict[int, tuple[np.ndarray, list, list[int]]] = {}
    with ray_session(address) as ray:
        ds = _dataset(ray, model, ref, files, workers, gpus_per_worker, batch_size)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for gid, vector, reason in zip(batch["id"], batch["vector"], batch["reason"]):
                c, i = owner[int(gid)]
                number, entries = chunks[c]
                if c not in pending:
                    pending[c] = (np.zeros((len(entries), len(vector)), np.float32), [None] * len(entries), [0])
                vectors, reasons, seen = pending[c]
                vectors[i], reasons[i] = vector, (str(reason) or None)
                seen[0] += 1
                if seen[0] == len(entries):
                    on_shard(number, entries, vectors, reasons)
                    del pending[c]
            advance(len(batch["id"]))
