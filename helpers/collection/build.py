"""Building and extending a collection folder: embed the files not yet in a finished shard (local or Ray
engine), write them as new shards, then index every shard. A build that is killed and started again recomputes
only the shards that were in flight."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data import DataError
from .indexing import refresh_index
from .modelref import ModelRef, check_same_model
from .shards import (FORMAT_VERSION, PRECISION, clean_unfinished, finished_shards, indexed_keys, read_manifest,
                     read_shard_table, write_manifest, write_shard)
from .sources import Entry, collect_entries, merge_roots, source_folders

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000
DEFAULT_MAX_INDEX_MEMORY = "4GB"


@dataclass
class EngineOptions:
    """How to embed: ``engine`` (``local`` or ``ray``) and its settings."""

    engine: str = "local"
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    batch_size: int = 32
    device: str = "auto"
    backend: str = "auto"
    num_workers: int | None = None
    progress: bool = True
    precision: str = "fp32"  # inference precision (the local engine on a CPU may use int8; see helpers.quantize)

    def check(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {self.engine!r}")
        if self.workers < 1 or self.batch_size < 1 or self.gpus_per_worker < 0:
            raise ValueError("--workers and --batch-size must be at least 1, --gpus-per-worker at least 0")
        from ..quantize import PRECISION_CHOICES

        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"--precision must be fp32, int8 or auto, not {self.precision!r}")
        if self.engine == "ray":
            if self.precision != "fp32":
                raise ValueError("--precision int8/auto needs --engine local: the Ray engine's actors run the torch "
                                 "model in float32")
            from .engine_ray import require_ray

            require_ray()


def _check_same_precision(index_dir: Path, manifest: dict[str, Any], options: EngineOptions) -> None:
    """One collection, one inference precision: int8 and float32 vectors are not mixed in its shards."""
    recorded = manifest.get("inference_precision", "fp32")
    if recorded != options.precision:
        raise ValueError(f"{index_dir} was embedded with --precision {recorded}; give the same --precision (not "
                         f"{options.precision}) to resume or extend it, or another --out")


@dataclass
class BuildResult:
    """What a build or an addition did."""

    index_dir: Path
    manifest: dict[str, Any]
    new_shards: list[int] = field(default_factory=list)
    embedded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


class _Progress:
    """One bar for either engine: images done, images per second and time left (tqdm), shards done."""

    def __init__(self, total: int, shards: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="img", desc="indexing", disable=not enabled)
        self.shards, self.done = shards, 0
        self.bar.set_postfix_str(f"shards 0/{shards}")

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def shard_done(self) -> None:
        self.done += 1
        self.bar.set_postfix_str(f"shards {self.done}/{self.shards}")

    def close(self) -> None:
        self.bar.close()


def _plan(index_dir: Path, entries: Sequence[Entry], shard_size: int) -> list[tuple[int, list[Entry]]]:
    """The files of no finished shard, in order, cut into new shards numbered after the last finished one."""
    done = indexed_keys(index_dir)
    todo = [e for e in entries if e.key not in done]
    first = max(finished_shards(index_dir), default=-1) + 1
    return [(first + i, todo[start:start + shard_size]) for i, start in enumerate(range(0, len(todo), shard_size))]


def _counts(index_dir: Path) -> tuple[dict[str, int], list[dict[str, int]]]:
    totals = {"files": 0, "embedded": 0, "skipped": 0}
    shards = []
    for number in finished_shards(index_dir):
        table = read_shard_table(index_dir, number)
        skipped = sum(r is not None for r in table["reason"])
        shards.append({"number": number, "files": len(table["path"]), "embedded": len(table["path"]) - skipped,
                       "skipped": skipped})
        for key in totals:
            totals[key] += shards[-1][key]
    return totals, shards


def _embed(index_dir: Path, model, ref: ModelRef, chunks, options: EngineOptions, result: BuildResult) -> None:
    total = sum(len(entries) for _, entries in chunks)
    progress = _Progress(total, len(chunks), options.progress)

    def on_shard(number: int, entries: Sequence[Entry], vectors: np.ndarray, reasons: list) -> None:
        write_shard(index_dir, number, entries, vectors, reasons)
        result.new_shards.append(number)
        result.embedded += sum(r is None for r in reasons)
        result.skipped.extend((str(e.file), r) for e, r in zip(entries, reasons) if r is not None)
        progress.shard_done()

    try:
        if options.engine == "ray":
            from .engine_ray import embed_ray

            embed_ray(model, ref, chunks, on_shard, progress.advance, workers=options.workers,
                      gpus_per_worker=options.gpus_per_worker, batch_size=options.batch_size,
                      address=options.ray_address)
        else:
            from .engine_local import embed_local

            def on_precision(chosen: str) -> None:  # kept for later shards, resumed builds and the queries
                result.manifest["inference_precision_used"] = chosen
                write_manifest(index_dir, result.manifest)

            used = result.manifest.get("inference_precision_used", options.precision)
            embed_local(model, chunks, on_shard, progress.advance, batch_size=options.batch_size,
                        device=options.device, backend=options.backend, num_workers=options.num_workers,
                        precision=used, on_precision=on_precision)
    finally:
        progress.close()


def _update(index_dir: Path, manifest: dict[str, Any], ref: ModelRef, images: Sequence, lists: Sequence,
            shard_size: int, max_index_memory: str | int, options: EngineOptions) -> BuildResult:
    """Embed what is new under ``images`` / ``lists`` into new shards, then refresh the index."""
    start = time.perf_counter()
    device = "cpu" if options.engine == "ray" else options.device
    model = ref.load(device)
    if "weights_fingerprint" in manifest.get("model", {}):
        check_same_model(manifest["model"], model)
    manifest["model"] = ref.to_manifest(model)
    manifest["roots"] = merge_roots(manifest.get("roots", []), source_folders(images, lists))
    sources = manifest.setdefault("sources", {"folders": [], "lists": []})
    sources["folders"] = merge_roots(sources["folders"], [Path(f) for f in images])
    sources["lists"] = merge_roots(sources["lists"], [Path(f) for f in lists])
    entries = collect_entries(manifest["roots"], images, lists)
    if not entries and not finished_shards(index_dir):
        raise DataError(f"no image found in {', '.join(map(str, [*images, *lists]))}")
    clean_unfinished(index_dir)
    chunks = _plan(index_dir, entries, shard_size)
    manifest.update(shard_size=shard_size, engine=options.engine)
    write_manifest(index_dir, manifest)  # before any shard: a resumed build knows the model
    result = BuildResult(index_dir, manifest)
    logger.info("%d file(s) to embed in %d new shard(s) (%d already indexed)", sum(len(c) for _, c in chunks),
                len(chunks), len(entries) - sum(len(c) for _, c in chunks))
    _embed(index_dir, model, ref, chunks, options, result)
    totals, shards = _counts(index_dir)
    manifest.update(counts=totals, shards=shards)
    manifest["index"] = refresh_index(index_dir, manifest, max_index_memory)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_manifest(index_dir, manifest)
    result.seconds = time.perf_counter() - start
    return result


def build_collection(out: str | os.PathLike, images: Sequence[str | os.PathLike] = (),
                     list_file: str | os.PathLike | None = None, model: str = "efficientnet-lite0",
                     weights: str = "pretrained", model_options: dict[str, Any] | None = None,
                     shard_size: int = DEFAULT_SHARD_SIZE, max_index_memory: str | int = DEFAULT_MAX_INDEX_MEMORY,
                     options: EngineOptions | None = None) -> BuildResult:
    """Embed every image under ``images`` (recursively) and in ``list_file`` into float16 shards under ``out``,
    index them with the FAISS index that fits ``max_index_memory`` and write ``out/manifest.json``.

    Run again on the same ``out`` (after an interruption), it embeds only the files of no finished shard. An
    ``out`` that already holds another model's embeddings is refused.
    """
    options = options or EngineOptions()
    options.check()
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if not images and list_file is None:
        raise ValueError("give at least one --images DIR or a --list FILE")
    index_dir = Path(out)
    ref = ModelRef(model, weights, dict(model_options or {}))
    manifest = read_manifest(index_dir) or {}
    if manifest:
        old = ModelRef.from_manifest(manifest["model"])
        if (old.name, old.weights, old.options) != (ref.name, ref.weights, ref.options):
            raise ValueError(f"{index_dir} already holds embeddings of {old.name} (weights {old.weights}, options "
                             f"{old.options}); use `index add` to extend it, or another --out")
        _check_same_precision(index_dir, manifest, options)
    else:
        manifest = {"format": FORMAT_VERSION, "precision": PRECISION, "inference_precision": options.precision,
                    "normalised": "L2",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lists = [list_file] if list_file is not None else []
    return _update(index_dir, manifest, ref, images, lists, shard_size, max_index_memory, options)


def add_to_collection(index_dir: str | os.PathLike, images: Sequence[str | os.PathLike] = (),
                      list_file: str | os.PathLike | None = None, max_index_memory: str | int | None = None,
                      options: EngineOptions | None = None) -> BuildResult:
    """Embed the new files of ``images`` / ``list_file`` (default: every folder and list already indexed, rescanned)
    with the collection's own model into new shards, and update the index."""
    options = options or EngineOptions()
    options.check()
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if not manifest or "model" not in manifest:
        raise FileNotFoundError(f"no collection at {index_dir} (no manifest.json): build one with `index build`")
    _check_same_precision(index_dir, manifest, options)
    ref = ModelRef.from_manifest(manifest["model"])
    memory = max_index_memory or manifest.get("index", {}).get("max_index_memory") or DEFAULT_MAX_INDEX_MEMORY
    shard_size = int(manifest.get("shard_size", DEFAULT_SHARD_SIZE))
    lists = [list_file] if list_file is not None else []
    if not images and not lists:
        sources = manifest.get("sources", {})
        images, lists = sources.get("folders", []), sources.get("lists", [])
    return _update(index_dir, manifest, ref, images, lists, shard_size, memory, options)
