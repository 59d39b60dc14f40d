"""Embedding cache: time to load N cached embeddings (default 100,000) against reading the raw array.

Writes one cache shard of N entries keyed like real files (``path|size|mtime``) through
``helpers.embedding.EmbeddingCache`` in float32 and float16, then times ``EmbeddingCache.load`` against the bound:
``np.load`` of the same embeddings as one plain ``.npy`` array (the bytes have to be read either way).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from .common import header, print_table, timed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks cache", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="cached embeddings (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=1280, help="default model's dimension (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    header("cache", argv or [])

    from helpers.embedding import EmbeddingCache

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = Path("/data/images/gallery")
    keys = [f"{folder}/img_{i:07d}.jpg|{100_000 + i}|{1_700_000_000_000_000_000 + i}" for i in range(args.n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.npy"
        np.save(raw, vectors)
        raw_s, _ = timed(lambda: np.load(raw), repeats=args.repeats)
        rows.append([f"bound: np.load of one float32 .npy ({raw.stat().st_size / 2**20:.0f} MiB)", raw_s, 1.0,
                     args.n / raw_s])
        for dtype in ("float32", "float16"):
            cache = EmbeddingCache(Path(tmp) / "cache", dtype=dtype)
            save_s, _ = timed(lambda: cache.save("bench", folder, dict(zip(keys, vectors))))
            shard = cache.shard_path("bench", folder)
            load_s, loaded = timed(lambda: cache.load("bench", folder), repeats=args.repeats)
            assert len(loaded) == args.n
            rows.append([f"EmbeddingCache.load, {dtype} ({shard.stat().st_size / 2**20:.0f} MiB; save {save_s:.2f} s)",
                         load_s, load_s / raw_s, args.n / load_s])
    print_table(f"Embedding cache: load {args.n:,} cached {args.dim}-d embeddings (best of {args.repeats})",
                ["path", "seconds", "x bound", "embeddings/s"], rows)
    return 0
