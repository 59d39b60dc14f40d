"""Shared fixtures: the real image datasets next to the checkout, small splits of them, isolated output folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/datasets/<name>``; skips the test with a clear message where it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (tests that need ../shared/datasets are skipped)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes its embedding cache under a temporary folder, never in the user's home."""
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "embedding-cache"))


@pytest.fixture(scope="session")
def imagenette_val() -> Path:
    return shared_dataset("imagenette-val")


@pytest.fixture(scope="session")
def cifar10_test() -> Path:
    return shared_dataset("cifar10-test")


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> Path:
    """A real competition-layout split of imagenette-val: 10 classes x (2 query, 4 gallery, 4 training)."""
    from helpers.data import split_dataset

    source = shared_dataset("imagenette-val")
    out = tmp_path_factory.mktemp("tiny_split")
    split_dataset(source, out, train_per_class=4, query_per_class=2, gallery_per_class=4, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded digits demo dataset (always available: it ships inside scikit-learn)."""
    from helpers.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo"), query_per_class=2, gallery_per_class=5,
                              train_per_class=5)


@pytest.fixture(scope="session")
def lite0():
    """The offline default model with its real ImageNet weights, on the CPU."""
    from helpers.models import load_model

    return load_model("efficientnet-lite0", weights="pretrained", device="cpu")
