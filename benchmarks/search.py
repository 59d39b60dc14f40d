"""Search: exact top-10 vs the matrix-multiply bound, FAISS flat/HNSW/IVF on real embeddings, a 1M fp16 gallery.

Three parts, each measured in one run with its baseline:

1. exact top-k of Q x G x d synthetic unit vectors (default 10,000 x 100,000 x 512): ``helpers.search.cosine_topk``
   against one plain matrix multiply of the same size (the bound: selecting the top-k cannot be cheaper than
   computing the scores), the FLOP bound at this machine's measured float32 rate, and FAISS ``IndexFlatIP``;
2. HNSW and IVF (``helpers.index.build_index``) on the default model's embeddings of every image in
   ``../shared/datasets`` (computed once, then read from the embedding cache): build time, recall@10 against exact
   search, queries per second beside exact search's;
3. a 1,000,000 x 512 float16 gallery memory-mapped from disk: exact search in blocks (memory bounded by the block,
   the gallery never loaded whole nor converted whole), and an IVF index: build time, memory, queries per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import PeakMemory, class_folder_images, header, matmul_gflops, print_table, rss_mb, timed

DATASETS = ("imagenette-val", "imagenette-train-300", "cifar10-test", "cifar10-train-1000")


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return sum(len(set(a[:k]) & set(e)) for a, e in zip(approx, exact)) / exact.size


def exact_part(n_query: int, n_gallery: int, dim: int, k: int, faiss_flat: bool) -> None:
    import torch

    from helpers.search import cosine_topk

    query, gallery = unit_vectors(n_query, dim, 1), unit_vectors(n_gallery, dim, 2)
    rate = matmul_gflops()
    flops = 2.0 * n_query * n_gallery * dim
    q, g = torch.from_numpy(query), torch.from_numpy(gallery)

    def plain_one_call():
        return q @ g.T

    plain_s, _ = timed(plain_one_call, repeats=2)  # best of 2: shared machines are noisy
    chunk = 4096
    buffer = torch.empty(min(chunk, n_query), n_gallery)

    def plain_chunked():
        for s in range(0, n_query, chunk):
            torch.mm(q[s : s + chunk], g.T, out=buffer[: min(chunk, n_query - s)])

    chunked_s, _ = timed(plain_chunked, repeats=2)
    del buffer
    with PeakMemory() as mem:
        ours_s, (idx, _) = timed(lambda: cosine_topk(query, gallery, k=k), repeats=2)
    rows = [
        [f"one plain matrix multiply {n_query:,} x {dim} x {n_gallery:,} (scores only, one call)", plain_s, 1.0,
         n_query / plain_s, None],
        ["the same multiply in 4,096-query chunks into one buffer (scores only)", chunked_s, chunked_s / plain_s,
         n_query / chunked_s, None],
        [f"FLOP bound at the measured {rate:.0f} GFLOP/s", flops / rate / 1e9, flops / rate / 1e9 / plain_s,
         n_query / (flops / rate / 1e9), None],
        [f"project: cosine_topk exact top-{k} (peak +{mem.peak_mb:.0f} MiB)", ours_s, ours_s / plain_s,
         n_query / ours_s, 1.0],
    ]
    if faiss_flat:
        import faiss

        index = faiss.IndexFlatIP(dim)
        index.add(gallery)
        flat_s, (_, fidx) = timed(lambda: index.search(query, k))
        rows.append([f"FAISS IndexFlatIP search (exact) top-{k}", flat_s, flat_s / plain_s, n_query / flat_s,
                     recall_at(fidx, idx)])
    print_table(f"Exact search, Q={n_query:,} x G={n_gallery:,} x d={dim}, float32 (best of 2 runs; FAISS: 1)",
                ["path", "seconds", "x plain multiply", "queries/s", f"recall@{k} vs project"], rows)


def real_embeddings(limit: int | None, batch_size: int, cache_dir: str | None,
                    datasets: tuple[str, ...] = DATASETS) -> np.ndarray:
    """The default model's embeddings of every image of the shared datasets (embedding cache: computed once)."""
    from helpers.embedding import EmbeddingCache, extract_embeddings
    from helpers.models import DEFAULT_MODEL, load_model

    from .common import SHARED_DATASETS

    paths = []
    for name in datasets:
        root = SHARED_DATASETS / name
        if root.is_dir():
            paths += class_folder_images(root, None if limit is None else max(1, limit // len(datasets)))
    if not paths:
        raise SystemExit(f"no dataset under {SHARED_DATASETS}")
    model = load_model(DEFAULT_MODEL, device="cpu")
    result = extract_embeddings(model, paths, batch_size=batch_size, cache=EmbeddingCache(cache_dir),
                                progress=True, desc="shared datasets")
    print(f"\n{len(result.paths):,} real embeddings: {result.n_cached:,} from the cache, {result.n_computed:,} "
          f"computed in {result.seconds:.0f} s")
    return result.embeddings


def ann_part(embeddings: np.ndarray, n_query: int, k: int) -> None:
    from helpers.index import build_index
    from helpers.search import cosine_topk

    rng = np.random.default_rng(0)
    pick = np.zeros(len(embeddings), bool)
    pick[rng.choice(len(embeddings), size=min(n_query, len(embeddings) // 10), replace=False)] = True
    query, gallery = embeddings[pick], embeddings[~pick]
    exact_s, (exact, _) = timed(lambda: cosine_topk(query, gallery, k=k), repeats=3)
    rows = [["exact (cosine_topk)", None, 1.0, len(query) / exact_s, 1.0, gallery.nbytes / 2**20]]
    for kind in ("flat", "hnsw", "ivf"):
        before = rss_mb()
        options = {}
        if kind == "ivf":  # 4 sqrt(G) lists need 39 x that many vectors to train; else sqrt(G) lists
            from helpers.index import MIN_POINTS_PER_CENTROID, default_nlist

            if len(gallery) < MIN_POINTS_PER_CENTROID * default_nlist(len(gallery)):
                options["nlist"] = max(1, int(np.sqrt(len(gallery))))
        build_s, index = timed(lambda: build_index(gallery, kind=kind, **options))
        grown = rss_mb() - before
        search_s, (idx, _) = timed(lambda: index.search(query, k=k), repeats=3)
        params = ", ".join(f"{a}={b}" for a, b in index.params.items())
        label = kind if index.kind == kind else f"{kind} (fell back to {index.kind})"
        rows.append([f"{label} ({params})" if params else label, build_s, recall_at(idx, exact),
                     len(query) / search_s, (len(query) / search_s) / (len(query) / exact_s), max(grown, 0.0)])
    print_table(f"Approximate search on real embeddings: {len(query):,} held-out queries x {len(gallery):,} gallery, "
                f"d={embeddings.shape[1]}",
                ["index", "build s", f"recall@{k} vs exact", "queries/s", "x exact", "memory MiB"],
                [[r[0], r[1], r[2], r[3], r[4], r[5]] for r in rows])


def million_part(n_gallery: int, dim: int, n_query: int, k: int, workdir: Path, ivf: bool) -> None:
    from helpers.search import cosine_topk

    path = workdir / f"gallery-{n_gallery}x{dim}-f16.npy"
    t0 = time.perf_counter()
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_gallery, dim))
    step = 100_000
    for s in range(0, n_gallery, step):
        mm[s : s + step] = unit_vectors(min(step, n_gallery - s), dim, 100 + s // step).astype(np.float16)
    mm.flush()
    del mm
    write_s = time.perf_counter() - t0
    gallery = np.load(path, mmap_mode="r")
    query = unit_vectors(n_query, dim, 7)
    with PeakMemory() as mem:
        exact_s, (exact, _) = timed(lambda: cosine_topk(query, gallery, k=k))
    from helpers.search import DEFAULT_GALLERY_BLOCK

    rows = [[f"exact, float16 memmap ({path.stat().st_size / 2**30:.2f} GiB on disk, counted in RSS once its pages "
             f"are read), {DEFAULT_GALLERY_BLOCK:,}-row blocks",
             0.0, n_query / exact_s, 1.0, mem.peak_mb]]
    if ivf:
        import faiss

        nlist = max(1, int(round(np.sqrt(n_gallery))))  # sqrt(N) lists: a short build on 2 cores
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            train = np.asarray(gallery[np.sort(rng.choice(n_gallery, size=min(n_gallery, 40 * nlist), replace=False))],
                               dtype=np.float32)
            index.train(train)
            del train
            for s in range(0, n_gallery, step):  # added block by block: never a float32 copy of the whole memmap
                index.add(np.asarray(gallery[s : s + step], dtype=np.float32))
            build_s = time.perf_counter() - t0
        index.nprobe = 32
        search_s, (_, idx) = timed(lambda: index.search(query, k))
        rows.append([f"IVF-Flat nlist={nlist} nprobe=32 (trained on {min(n_gallery, 40 * nlist):,})", build_s, n_query / search_s,
                     recall_at(idx, exact), mem.peak_mb])
    print_table(f"{n_gallery:,} x {dim} synthetic gallery (written in {write_s:.0f} s), {n_query:,} queries",
                ["path", "build s", "queries/s", f"recall@{k} vs exact", "memory MiB (peak rise)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks search", description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--no-faiss-flat", action="store_true")
    parser.add_argument("--limit", type=int, default=None,
                        help="real images used for the HNSW/IVF part (default: every image of the shared datasets)")
    parser.add_argument("--ann-queries", type=int, default=1000)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="shared datasets embedded for the ANN part")
    parser.add_argument("--million", type=int, default=1_000_000, help="synthetic fp16 gallery size (0: skip)")
    parser.add_argument("--million-queries", type=int, default=1000)
    parser.add_argument("--no-ivf", action="store_true", help="skip the IVF index on the synthetic gallery")
    parser.add_argument("--parts", default="exact,ann,million", help="comma-separated subset of exact,ann,million")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: the project's)")
    parser.add_argument("--workdir", default=None, help="where the synthetic memmap goes (default: a temp folder)")
    args = parser.parse_args(argv)
    header("search", argv or [])
    parts = set(args.parts.split(","))
    if "exact" in parts:
        exact_part(args.queries, args.gallery, args.dim, args.k, not args.no_faiss_flat)
    if "ann" in parts:
        ann_part(real_embeddings(args.limit, 32, args.cache_dir, tuple(args.datasets.split(","))), args.ann_queries,
                 args.k)
    if "million" in parts and args.million > 0:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            million_part(args.million, args.dim, args.million_queries, args.k, Path(tmp), not args.no_ivf)
    return 0
