"""The benchmark suite's smallest configurations run and print their tables (no timed assertions)."""

from __future__ import annotations

import pytest

from benchmarks import __main__ as dispatcher
from benchmarks.common import fmt, print_table


def test_dispatcher_lists_every_benchmark(capsys):
    assert dispatcher.main([]) == 0
    out = capsys.readouterr().out
    for name in ("extraction", "search", "cache", "end-to-end", "scaling"):
        assert name in out


def test_table_formatting(capsys):
    text = print_table("T", ["a", "b"], [["x", 1234567], ["y", 0.012345], ["z", None]])
    assert "| x " in text and "1,234,567" in text and "0.0123" in text and text.rstrip().endswith("- |")
    assert fmt(float("nan")) == "-"


def test_extraction_smallest(shapes, capsys):
    from benchmarks import extraction

    assert extraction.main(["--data", str(shapes), "--limit", "12", "--naive-limit", "3",
                            "--batch-size", "4", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "naive loop" in out and "compute bound" in out and "images/s" in out
    rows = {line.split("|")[1].strip().split(" [")[0]: line.split("|") for line in out.splitlines()
            if line.startswith("| ")}
    for name in ("+ int8 alone", "+ draft decoding alone", "all together: int8 + draft + thread plan"):
        assert name in rows
    cosine = float(rows["+ draft decoding alone"][6])
    assert cosine > 0.9999  # 224 px photos: draft decoding changes nothing, the path embeds like the naive loop
    assert rows["+ int8 alone"][9].strip() == "int8" and 0 <= float(rows["+ int8 alone"][7]) <= 1
    assert "auto chose" in out


@pytest.mark.slow
def test_extraction_gpu_path_runs_on_the_cpu_with_a_tiny_limit(imagenette_val, capsys):
    from benchmarks import extraction

    assert extraction.main(["--data", str(imagenette_val), "--limit", "4", "--device", "cpu", "--gpu-table",
                            "--models", "efficientnet-lite0", "--batch-size", "2", "--gpu-batch", "2",
                            "--gpu-repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "inference only" in out and "efficientnet-lite0" in out


def test_search_smallest(capsys):
    from benchmarks import search

    assert search.main(["--parts", "exact,million", "--queries", "30", "--gallery", "3000", "--dim", "32",
                        "--million", "6000", "--million-queries", "10"]) == 0
    out = capsys.readouterr().out
    assert "one plain matrix multiply" in out and "cosine_topk" in out and "IndexFlatIP" in out
    assert "float16 memmap" in out and "IVF-Flat" in out
    flat_row = next(line for line in out.splitlines() if "IndexFlatIP" in line)
    assert flat_row.rstrip(" |").endswith("1")  # FAISS flat finds exactly the project's top-10


def test_search_ann_on_real_embeddings(imagenette_val, capsys):
    from benchmarks import search

    assert search.main(["--parts", "ann", "--limit", "40", "--ann-queries", "4"]) == 0
    out = capsys.readouterr().out
    assert "hnsw" in out and "recall@10 vs exact" in out


def test_cache_smallest(capsys):
    from benchmarks import cache

    assert cache.main(["--n", "500", "--dim", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "EmbeddingCache.load, float32" in out and "float16" in out and "np.load" in out


@pytest.mark.slow
def test_end_to_end_smallest(imagenette_val, capsys):
    from benchmarks import end_to_end

    assert end_to_end.main(["--query-per-class", "1", "--gallery-per-class", "2", "--skip-cache"]) == 0
    out = capsys.readouterr().out
    assert "naive script" in out and "retrieve --no-cache" in out
    assert "overlap between the naive script's and retrieve's rankings: 1.0000" in out


def test_scaling_smallest(imagenette_val, tmp_path, capsys):
    from benchmarks import scaling

    out_png = tmp_path / "scaling.png"
    assert scaling.main(["--sizes", "20", "--post-sizes", "200", "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "retrieve stages against N" in out and "k-reciprocal" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
