"""The model a collection is embedded with, as the manifest records it, reloaded identically everywhere (the
build, each Ray actor, the searches)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Random weights (``--weights none``) are drawn under this seed, so that every process builds the same network.
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class ModelRef:
    """A registry name, its weights (``pretrained``, ``none`` or a file) and its family options."""

    name: str
    weights: str = "pretrained"
    options: dict[str, Any] = field(default_factory=dict)

    def load(self, device: str = "cpu"):
        """Build the model on ``device`` (random weights always drawn under :data:`RANDOM_WEIGHTS_SEED`)."""
        import torch

        from ..models import load_model, resolve_device

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            return load_model(self.name, weights=self.weights, device=resolve_device(device), **self.options)

    def to_manifest(self, model) -> dict[str, Any]:
        """What the manifest records of the loaded ``model``."""
        return {
            "name": self.name,
            "weights": self.weights,
            "options": {k: v for k, v in sorted(self.options.items())},
            "weights_fingerprint": model.weights_fingerprint(),
            "preprocessing": model.preprocessing.key(),
            "dim": model.embed_dim,
        }

    @classmethod
    def from_manifest(cls, record: dict[str, Any]) -> "ModelRef":
        return cls(record["name"], record.get("weights", "pretrained"), dict(record.get("options") or {}))


def check_same_model(record: dict[str, Any], model) -> None:
    """Raise ValueError when ``model`` is not the one the manifest ``record`` describes (other weights)."""
    fingerprint = model.weights_fingerprint()
    if record.get("weights_fingerprint") not in (None, fingerprint):
        raise ValueError(
            f"the model {record['name']} with weights {record.get('weights')} loads with other weights than the "
            f"collection was embedded with (fingerprint {fingerprint} != {record['weights_fingerprint']}); "
            "pass the same weight file"
        )
