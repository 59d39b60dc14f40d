"""What one retrieval run produced (:func:`helpers.pipeline.run_retrieval`), and its metrics JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import RetrievalConfig, run_name_of
from .data import RetrievalSet
from .embedding import EmbeddingResult
from .metrics import EvaluationResult, build_metrics_record


@dataclass
class RetrievalRun:
    """Everything one run produced; ``rankings`` is the submission in dict format, ``config`` the recorded config
    (every option, plus the facts ``search`` and ``postprocess``), ``settings`` the :class:`RetrievalConfig`."""

    dataset: RetrievalSet
    model_name: str
    k: int
    rankings: dict[str, list[str]]
    scores: dict[str, list[float]]
    query: EmbeddingResult
    gallery: EmbeddingResult
    evaluation: EvaluationResult | None
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    settings: RetrievalConfig | None = None
    device: str | None = None

    @property
    def metrics(self) -> dict[str, float] | None:
        return self.evaluation.metrics if self.evaluation else None

    @property
    def run_name(self) -> str:
        return run_name_of(self.dataset.root, self.settings if self.settings is not None else self.config)

    def metrics_record(self) -> dict[str, Any]:
        """The run's metrics JSON (see :func:`helpers.metrics.build_metrics_record`)."""
        info = self.model_info
        labels = self.dataset.labels or {}
        classes = set(labels.get("query", {}).values()) | set(labels.get("gallery", {}).values())
        return build_metrics_record(
            model_name=self.model_name,
            top_k=self.k,
            metrics=self.metrics,
            batch_size=self.config.get("batch_size"),
            is_finetuned=bool(info.get("is_finetuned", False)),
            num_classes=len(classes) or None,
            runtime_seconds=self.timings.get("total"),
            loss_function=info.get("loss_function"),
            num_epochs=info.get("num_epochs"),
            final_train_loss=info.get("final_train_loss"),
            pooling_type=info.get("pooling_type"),
            config=self.config,
            device=self.device or self.config.get("device"),
            extra={
                "run_name": self.run_name,
                "timings": self.timings,
                "n_queries": len(self.rankings),
                "n_gallery": len(self.gallery.paths),
                "skipped_files": [f"{p}: {r}" for p, r in self.query.skipped + self.gallery.skipped],
                "cache": {
                    "read": self.query.n_cached + self.gallery.n_cached,
                    "computed": self.query.n_computed + self.gallery.n_computed,
                },
            },
        )
