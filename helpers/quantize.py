"""int8 inference on the CPU: ONNX Runtime static quantisation calibrated on the user's own images.

The float32 ONNX export of :mod:`helpers.onnx_backend` is quantised once per (model, weights, input size): QDQ
format, int8 weights per output channel, uint8 activations with ranges from min/max calibration on up to
:data:`CALIBRATION_IMAGES` images of the first set embedded (the gallery, in a retrieval run). The result sits beside
the export (``<export>.int8.onnx``) with a sidecar (``<export>.int8.json``) recording how well int8 agrees with
float32 on :data:`AGREEMENT_IMAGES` held-out calibration images: the mean and minimum cosine of their embeddings, and
how much of each image's 10 nearest neighbours among the others int8 keeps (:func:`neighbour_agreement`). Later runs
and every worker reuse both; a sidecar of another :data:`CRITERION` is measured again.

``precision="auto"`` uses int8 only where the neighbour overlap reaches :data:`NEIGHBOUR_THRESHOLD` (what retrieval
needs: the same images ranked near each other), and logs which precision it chose and why. The mean cosine stays
recorded but is not the criterion: for EfficientNet-Lite0 with the uint8 activations that make int8 faster it stays
at 0.92-0.95 whatever the calibration method, while the rankings barely move on Imagenette (README, "Extraction
options"); symmetric int8 activations reach 0.99 but ran slower than float32 on the measured CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .fileio import read_json, write_json

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("fp32", "int8", "auto")
#: What the sidecar's agreement figures mean; a sidecar without this value is calibrated and measured again.
CRITERION = "top10-neighbour-overlap/v2"
#: Neighbours compared per held-out image (the top 10 that map@10 and the submissions score).
NEIGHBOURS = 10
#: Mean share of each held-out image's float32 top-10 neighbours that int8 keeps, needed for ``auto`` to pick int8.
#: Set from measurements of EfficientNet-Lite0 on 2,000-image splits, each calibrated on its own gallery (README,
#: "Extraction options"): Imagenette kept 0.79 and int8 stayed within 0.01 of float32 (hit@1 -0.010, map@10
#: +0.002); CIFAR-10 kept 0.62 and int8 moved hit@1 by +0.025, so it must be refused there. Two datasets only: the
#: margin is thin, and a dataset near the threshold is judged on 128 images.
NEIGHBOUR_THRESHOLD = 0.75
#: Images used for calibration and agreement ("a few hundred", as ONNX Runtime's quantisation guide suggests).
CALIBRATION_IMAGES = 384
#: Of those, images held out of calibration to measure the agreement (when at least twice as many are available).
AGREEMENT_IMAGES = 128
#: Fewer images than this and ``auto`` does not calibrate (keeps float32; "a few hundred" are needed for ranges that
#: hold); ``int8`` calibrates on what there is.
MIN_AUTO_CALIBRATION = 200


def int8_path(fp32_path: Path) -> Path:
    """Where the quantised model of an export lives: beside it, ``<name>.int8.onnx``."""
    return fp32_path.with_name(fp32_path.stem + ".int8.onnx")


def int8_report_path(fp32_path: Path) -> Path:
    return fp32_path.with_name(fp32_path.stem + ".int8.json")


def read_int8_report(fp32_path: Path) -> dict | None:
    """The calibration sidecar when the quantised model and its report both exist, else ``None``."""
    report = int8_report_path(fp32_path)
    if not (report.exists() and int8_path(fp32_path).exists()):
        return None
    try:
        data = read_json(report)
    except Exception:  # noqa: BLE001 - a broken sidecar means: calibrate again
        return None
    if not isinstance(data, dict) or data.get("criterion") != CRITERION:
        return None  # an older sidecar: its agreement was judged otherwise
    return data


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([session.run(None, {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def neighbour_agreement(reference: np.ndarray, quantised: np.ndarray, k: int = NEIGHBOURS) -> tuple[float, float]:
    """How much of the float32 neighbourhoods int8 keeps: for each row, its ``k`` nearest other rows by cosine under
    both; returns (mean share of the float32 top ``k`` found in the int8 top ``k``, share of rows whose nearest
    neighbour is the same). ``k`` shrinks to ``n - 1`` for small samples."""
    n = len(reference)
    k = min(k, n - 1)
    if k < 1:
        return 1.0, 1.0
    tops = []
    for emb in (reference, quantised):
        unit = emb.astype(np.float64) / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-30)
        scores = unit @ unit.T
        np.fill_diagonal(scores, -np.inf)
        tops.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(*tops)])
    return float(overlap), float(np.mean(tops[0][:, 0] == tops[1][:, 0]))


def quantize_export(fp32_path: Path, out_path: Path, calibration: np.ndarray, batch: int = 16) -> None:
    """Static int8 quantisation of an ONNX export (QDQ, per-channel int8 weights, uint8 activations, min/max
    calibration on ``calibration`` (N, 3, H, W)); constant folding and batch-norm fusion run first."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": calibration[i:i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self):
            return next(self.batches, None)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        optimised = Path(tmp) / "optimised.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(optimised)
        options.log_severity_level = 3
        ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
        staged = Path(tmp) / "int8.onnx"
        ort.set_default_logger_severity(3)  # the calibration sessions' per-initializer warnings are noise
        with _quiet_root_logger():  # the quantiser's advice to pre-process goes to the root logger
            quantize_static(str(optimised), str(staged), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        os.replace(staged, out_path)


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    saved = root.level
    root.setLevel(max(saved, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(saved)


def calibrate(fp32_path: Path, sample: np.ndarray, threads: int = 1) -> dict:
    """Quantise ``fp32_path`` on ``sample`` and measure int8/float32 agreement; writes the model and its sidecar."""
    n = len(sample)
    held_out = AGREEMENT_IMAGES if n >= 2 * AGREEMENT_IMAGES else 0
    calibration = sample[: n - held_out] if held_out else sample
    check = sample[n - held_out:] if held_out else sample
    quantize_export(fp32_path, int8_path(fp32_path), calibration)
    reference = _run(_session(fp32_path, threads), check)
    quantised = _run(_session(int8_path(fp32_path), threads), check)
    cosine = _cosine(reference, quantised)
    overlap, top1 = neighbour_agreement(reference, quantised)
    report = {
        "criterion": CRITERION,
        "calibration_images": len(calibration),
        "agreement_images": len(check),
        "agreement_held_out": bool(held_out),
        "neighbour_overlap": overlap,
        "top1_agreement": top1,
        "threshold": NEIGHBOUR_THRESHOLD,
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "scheme": "QDQ, per-channel int8 weights, uint8 activations, min/max calibration",
    }
    write_json(int8_report_path(fp32_path), report)
    logger.info("quantised %s to int8 on %d images: on %d %s images int8 keeps %.3f of the float32 top-%d "
                "neighbours (mean cosine %.4f)", fp32_path.name, len(calibration), len(check),
                "held-out" if held_out else "calibration", overlap, NEIGHBOURS, report["mean_cosine"])
    return report


def choose_precision(
    requested: str,
    fp32_path: Path | None,
    sample_fn: Callable[[], np.ndarray],
    n_images: int,
    threads: int = 1,
) -> tuple[str, str]:
    """The precision to run (``fp32`` or ``int8``) and why.

    ``fp32_path`` is the verified float32 export (``None`` when ONNX Runtime does not serve the model: then only
    float32 exists). ``sample_fn`` decodes and preprocesses the calibration images, called only when no
    calibration is on disk. ``int8`` calibrates whatever the agreement (and says how it agrees); ``auto`` needs the
    top-10 neighbour overlap to reach :data:`NEIGHBOUR_THRESHOLD`.
    """
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, not {requested!r}")
    if requested == "fp32":
        return "fp32", "requested"
    if fp32_path is None:
        return "fp32", "int8 runs through ONNX Runtime on the CPU, which does not serve this model or device"
    report = read_int8_report(fp32_path)
    if report is None:
        if requested == "auto" and n_images < MIN_AUTO_CALIBRATION:
            return "fp32", f"no int8 calibration yet and only {n_images} images to calibrate on " \
                           f"(auto needs {MIN_AUTO_CALIBRATION})"
        report = calibrate(fp32_path, sample_fn(), threads)
    overlap = float(report["neighbour_overlap"])
    agreement = f"int8 keeps {overlap:.3f} of the float32 top-{NEIGHBOURS} neighbours of " \
                f"{report['agreement_images']} held-out images (mean cosine {report['mean_cosine']:.4f})"
    if requested == "int8":
        return "int8", f"requested; {agreement}"
    if overlap >= NEIGHBOUR_THRESHOLD:
        return "int8", f"{agreement}; >= {NEIGHBOUR_THRESHOLD}"
    return "fp32", f"{agreement}; < {NEIGHBOUR_THRESHOLD}"
