"""Shared benchmark tools: the machine's matrix-multiply rate, FLOP-derived bounds, memory, timing and tables.

Every benchmark measures its baseline and the machine's bound in the same run as the project's path, because the
machines here are shared: only ratios measured side by side mean something.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

#: ``../shared/datasets`` next to the checkout (``$RETRIEVAL_SHARED_DATASETS`` overrides the folder).
SHARED_DATASETS = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS",
                                      Path(__file__).resolve().parents[1].parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """``<shared datasets>/<name>``; exits with a clear message when it is absent."""
    root = SHARED_DATASETS
    path = root / name
    if not path.is_dir():
        raise SystemExit(f"dataset {name} not found under {root}: pass --data DIR (a class-folder dataset)")
    return path


def class_folder_images(root: Path, limit: int | None = None) -> list[Path]:
    """Every image of a class-folder dataset, sorted; with ``limit``, an even spread over the whole set."""
    from helpers.data import list_class_folder

    paths = [p for p, _ in list_class_folder(root)]
    if limit is not None and limit < len(paths):
        step = len(paths) / limit
        paths = [paths[int(i * step)] for i in range(limit)]
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The machine
# ----------------------------------------------------------------------------------------------------------------
def machine_summary() -> str:
    """CPU count, torch threads and the load average (other users of a shared machine skew every figure)."""
    import platform

    import torch

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """The machine's dense matrix-multiply rate in GFLOP/s (best of ``repeats`` n x n x n products, 2n^3 FLOPs)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    a @ b  # warm-up: thread pool and caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def model_gflops(model: Any, input_size: int, batch: int = 1) -> float:
    """Forward-pass GFLOPs of one image, counted by ``torch.utils.flop_counter`` (2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, input_size, input_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / batch / 1e9


# ----------------------------------------------------------------------------------------------------------------
# Memory and time
# ----------------------------------------------------------------------------------------------------------------
def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: fall back to the peak
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PeakMemory:
    """Context manager sampling resident memory every ``interval`` s: ``.peak_mb`` is the rise above the start."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0.0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.start_mb = rss_mb()
        self._max = self.start_mb
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._max = max(self._max, rss_mb())
        self.peak_mb = self._max - self.start_mb
        return False


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls, in seconds, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to ``digits`` significant figures (thousands separated); None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if value != value:
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a Markdown table, ready for the README."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) if cells else len(str(c)) for i, c in enumerate(columns)]
    lines = [f"\n{title}\n",
             "| " + " | ".join(str(c).ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |"
              for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def header(name: str, argv: Sequence[str]) -> None:
    """The benchmark's command and the machine it ran on."""
    print(f"# python -m benchmarks {name} {' '.join(argv)}".rstrip())
    print(f"# {machine_summary()}", flush=True)
