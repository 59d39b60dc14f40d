"""int8 agreement: the top-10 neighbour criterion, its sidecar version, and what ``auto`` chooses from it."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.fileio import read_json, write_json
from helpers.quantize import (CRITERION, NEIGHBOUR_THRESHOLD, choose_precision, int8_path, int8_report_path,
                              neighbour_agreement, read_int8_report)


def _naive_neighbours(emb: np.ndarray, k: int) -> list[list[int]]:
    """Each row's k most similar other rows by cosine, one pair at a time."""
    out = []
    for i, a in enumerate(emb):
        sims = []
        for j, b in enumerate(emb):
            if j != i:
                sims.append((-float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), j))
        out.append([j for _, j in sorted(sims)[:k]])
    return out


def test_neighbour_agreement_matches_a_naive_reference():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(40, 16))
    quantised = reference + rng.normal(scale=0.6, size=reference.shape)
    ours = neighbour_agreement(reference, quantised, k=10)
    a, b = _naive_neighbours(reference, 10), _naive_neighbours(quantised, 10)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b)])
    top1 = np.mean([x[0] == y[0] for x, y in zip(a, b)])
    assert ours == pytest.approx((overlap, top1))
    assert 0.1 < ours[0] < 0.95  # the noise really moved neighbours: the check can fail
    assert neighbour_agreement(reference, reference * 3.0) == (1.0, 1.0)  # cosine: scale does not matter
    assert neighbour_agreement(reference[:4], quantised[:4], k=10)[0] <= 1.0  # k shrinks to n - 1


def _export(tmp_path):
    export = tmp_path / "model-abc-224x224.onnx"
    export.write_bytes(b"float32 model")
    int8_path(export).write_bytes(b"int8 model")
    return export


def _report(overlap: float, **extra) -> dict:
    return {"criterion": CRITERION, "neighbour_overlap": overlap, "top1_agreement": 0.5, "mean_cosine": 0.93,
            "agreement_images": 128, **extra}


def test_auto_follows_the_recorded_neighbour_overlap(tmp_path):
    export = _export(tmp_path)

    def no_calibration():
        raise AssertionError("a recorded calibration must be reused, not redone")

    for overlap, expected in ((NEIGHBOUR_THRESHOLD + 0.01, "int8"), (NEIGHBOUR_THRESHOLD - 0.01, "fp32")):
        write_json(int8_report_path(export), _report(overlap))
        chosen, reason = choose_precision("auto", export, no_calibration, n_images=5000)
        assert chosen == expected and f"{overlap:.3f}" in reason and "mean cosine 0.9300" in reason
        assert choose_precision("int8", export, no_calibration, n_images=5)[0] == "int8"
        assert choose_precision("fp32", export, no_calibration, n_images=5000) == ("fp32", "requested")
    assert choose_precision("auto", None, no_calibration, n_images=5000)[0] == "fp32"  # torch only: no int8
    with pytest.raises(ValueError, match="precision"):
        choose_precision("half", export, no_calibration, n_images=5)


def test_an_older_sidecar_is_calibrated_again(tmp_path, monkeypatch):
    import helpers.quantize as quantize

    export = _export(tmp_path)
    write_json(int8_report_path(export), {"mean_cosine": 0.999, "agreement_images": 64})  # judged by cosine alone
    assert read_int8_report(export) is None
    calls = []

    def fake_calibrate(path, sample, threads=1):
        calls.append(len(sample))
        report = _report(NEIGHBOUR_THRESHOLD - 0.2)
        write_json(int8_report_path(path), report)
        return report

    monkeypatch.setattr(quantize, "calibrate", fake_calibrate)
    chosen, _ = choose_precision("auto", export, lambda: np.zeros((300, 3, 8, 8), np.float32), n_images=5000)
    assert calls == [300] and chosen == "fp32"  # the old 0.999 cosine no longer decides
    assert read_json(int8_report_path(export))["criterion"] == CRITERION
    assert choose_precision("auto", export, lambda: 1 / 0, n_images=5000)[0] == "fp32"  # now reused
    # too few images for auto to calibrate: float32, and the old sidecar is not trusted either
    write_json(int8_report_path(export), {"mean_cosine": 0.999, "agreement_images": 64})
    assert choose_precision("auto", export, lambda: 1 / 0, n_images=50)[0] == "fp32"


@pytest.mark.slow
def test_calibration_records_the_criterion_on_real_images(lite0, tiny_split, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from helpers.data import list_images
    from helpers.embedding import extract_embeddings

    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))
    paths = list_images(tiny_split / "test" / "gallery")[:24]
    result = extract_embeddings(lite0, paths, device="cpu", precision="int8", progress=False)
    (sidecar,) = (tmp_path / "onnx").glob("*.int8.json")
    report = read_json(sidecar)
    assert report["criterion"] == CRITERION and report["agreement_images"] == 24
    assert 0.0 < report["neighbour_overlap"] <= 1.0 and 0.5 < report["mean_cosine"] < 1.0
    assert f"{report['neighbour_overlap']:.3f}" in result.precision_reason
