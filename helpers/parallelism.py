"""How extraction shares the machine: decoding processes, inference threads and, on a GPU, the batch size.

Decoding (in DataLoader worker processes) overlaps with inference (in the main process) through DataLoader's
bounded prefetch queue (``prefetch_factor`` batches per worker). The counts come from the cores this process may
use and never oversubscribe them: inference threads + decoding workers <= cores. ``$RETRIEVAL_THREADS`` and
``$RETRIEVAL_DECODE_WORKERS`` (or the ``threads`` / ``num_workers`` arguments) override them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from .settings import DECODE_WORKERS_ENV, THREADS_ENV, env_int

logger = logging.getLogger(__name__)

#: Share of the cores given to JPEG decoding and preprocessing on the CPU: decoding and preprocessing a 224 px
#: Imagenette JPEG took 2.0-2.2 ms of CPU time against 9.2-10.2 ms for EfficientNet-Lite0's float32 forward pass in
#: ONNX Runtime on one core (a 0.16-0.20 share). With ``round(cores * DECODE_SHARE)`` workers, a 2-core machine
#: decodes in the main process between batches (both cores infer: 2.1 + 9.7 / 2 ms per image beats the 9.7 ms of
#: one inference thread beside one decoding worker) and 4 cores or more get at least one overlapping worker.
DECODE_SHARE = 0.2
#: Batches each decoding worker keeps ready: the bounded queue between decoding and inference.
PREFETCH_BATCHES = 2
#: Most decoding workers on a GPU box (beyond that the GPU, not decoding, is the limit for these models).
MAX_GPU_WORKERS = 8


@dataclass(frozen=True)
class ThreadPlan:
    """Inference threads (ONNX Runtime or torch intra-op) and decoding worker processes for one extraction."""

    inference_threads: int
    decode_workers: int
    cores: int

    def describe(self) -> str:
        return f"{self.inference_threads} inference thread(s) + {self.decode_workers} decoding worker(s) on {self.cores} core(s)"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset`` restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def plan_threads(
    n_images: int,
    batch_size: int,
    device_type: str = "cpu",
    cores: int | None = None,
    num_workers: int | None = None,
    threads: int | None = None,
) -> ThreadPlan:
    """Choose inference threads and decoding workers for ``n_images`` images.

    CPU: fewer than two batches decode in the main process (starting workers costs more than it saves) with every
    core inferring; otherwise ``round(cores * DECODE_SHARE)`` workers (at least one from 4 cores up) and the
    remaining cores for inference. GPU: one host thread drives the device and up to :data:`MAX_GPU_WORKERS` workers decode. Explicit
    ``num_workers`` / ``threads`` (or their environment variables) win; the other count fills the remaining cores.
    """
    cores = cores or available_cores()
    num_workers = num_workers if num_workers is not None else env_int(DECODE_WORKERS_ENV)
    threads = threads if threads is not None else (env_int(THREADS_ENV) or None)
    if device_type != "cpu":
        workers = num_workers if num_workers is not None else (
            0 if n_images < 2 * batch_size else min(MAX_GPU_WORKERS, max(0, cores - 1)))
        return ThreadPlan(threads or 1, workers, cores)
    if num_workers is None:
        if n_images < 2 * batch_size or cores < 2:
            num_workers = 0
        elif threads is not None:
            num_workers = max(0, cores - threads)
        else:
            num_workers = max(1 if cores >= 4 else 0, round(cores * DECODE_SHARE))
    if threads is None:
        threads = max(1, cores - num_workers)
    return ThreadPlan(threads, num_workers, cores)


def batch_for_memory(free_bytes: int, per_image_bytes: float, fraction: float = 0.5, low: int = 8,
                     high: int = 1024) -> int:
    """The largest power of two whose activations fit in ``fraction`` of ``free_bytes``, within [low, high]."""
    if per_image_bytes <= 0:
        return high
    fit = int(free_bytes * fraction / per_image_bytes)
    batch = low
    while batch * 2 <= min(fit, high):
        batch *= 2
    return batch


def cuda_batch_size(model, input_size: int, device, probe: int = 8) -> int:
    """A batch size sized to the GPU's free memory: one probe forward pass (fp16 autocast, as extraction runs)
    measures the memory per image, then :func:`batch_for_memory` keeps half the free memory in reserve."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.zeros(probe, 3, input_size, input_size, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        model(x)
    per_image = (torch.cuda.max_memory_allocated(device) - base) / probe
    free, _total = torch.cuda.mem_get_info(device)
    batch = batch_for_memory(free, per_image)
    logger.info("GPU batch size %d (%.1f MiB per image, %.0f MiB free)", batch, per_image / 2**20, free / 2**20)
    return batch
