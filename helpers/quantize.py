"""int8 inference on the CPU: ONNX Runtime static quantisation calibrated on the user's own images.

The float32 ONNX export of :mod:`helpers.onnx_backend` is quantised once per (model, weights, input size): QDQ
format, int8 weights per output channel, uint8 activations with ranges from min/max calibration on up to
:data:`CALIBRATION_IMAGES` images of the first set embedded (the gallery, in a retrieval run). The result sits beside
the export (``<export>.int8.onnx``) with a sidecar (``<export>.int8.json``) recording how well int8 agrees with
float32 (mean and minimum cosine of the embeddings of held-out calibration images), so later runs and every worker
reuse both. ``precision="auto"`` uses int8 only where that mean cosine reaches :data:`AGREEMENT_THRESHOLD`, and logs
which precision it chose and why.
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
#: Mean cosine between int8 and float32 embeddings of held-out calibration images needed for ``auto`` to pick int8.
#: 0.99 keeps the rankings' top 10 essentially unchanged (hit@1 and map@10 move by well under 0.01 on Imagenette).
AGREEMENT_THRESHOLD = 0.99
#: Images used for calibration and agreement ("a few hundred", as ONNX Runtime's quantisation guide suggests).
CALIBRATION_IMAGES = 320
#: Of those, images held out of calibration to measure the agreement (when at least twice as many are available).
AGREEMENT_IMAGES = 64
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
    return data if isinstance(data, dict) and "mean_cosine" in data else None


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
    report = {
        "calibration_images": len(calibration),
        "agreement_images": len(check),
        "agreement_held_out": bool(held_out),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "threshold": AGREEMENT_THRESHOLD,
        "scheme": "QDQ, per-channel int8 weights, uint8 activations, min/max calibration",
    }
    write_json(int8_report_path(fp32_path), report)
    logger.info("quantised %s to int8 on %d images: mean cosine %.4f with float32 on %d %s images",
                fp32_path.name, len(calibration), report["mean_cosine"], len(check),
                "held-out" if held_out else "calibration")
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
    mean cosine to reach :data:`AGREEMENT_THRESHOLD`.
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
    agreement = f"int8 agrees with float32 at mean cosine {report['mean_cosine']:.4f} " \
                f"on {report['agreement_images']} images"
    if requested == "int8":
        return "int8", f"requested; {agreement}"
    if report["mean_cosine"] >= AGREEMENT_THRESHOLD:
        return "int8", f"{agreement} >= {AGREEMENT_THRESHOLD}"
    return "fp32", f"{agreement} < {AGREEMENT_THRESHOLD}"
