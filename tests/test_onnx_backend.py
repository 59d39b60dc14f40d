"""ONNX Runtime backend: agrees with torch on real images, reuses its export, falls back to torch when it must."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers.data import list_images
from helpers.embedding import extract_embeddings
from helpers.models import ModelError
from helpers.models.registry import INCEPTION_MEAN, INCEPTION_STD, EmbeddingModel, ModelSpec, Preprocessing
from helpers.onnx_backend import OnnxRunner, resolve_backend

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture()
def onnx_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))
    return tmp_path / "onnx"


def test_onnx_embeddings_match_torch_on_real_images(lite0, tiny_split, onnx_folder):
    paths = list_images(tiny_split / "test" / "gallery")[:6]
    ours = extract_embeddings(lite0, paths, backend="onnx", batch_size=3, num_workers=0, progress=False)
    ref = extract_embeddings(lite0, paths, backend="torch", batch_size=3, num_workers=0, progress=False)
    cosine = (ours.embeddings * ref.embeddings).sum(axis=1)
    assert cosine.min() > 1 - 1e-4
    exported = list(onnx_folder.glob("efficientnet-lite0-*-224x224.onnx"))
    assert len(exported) == 1 and exported[0].with_suffix(".json").exists()
    # An exported model serves "auto" even for a handful of images, through the same cached runner.
    runner = resolve_backend(lite0, "auto", "cpu", n_images=1)
    assert isinstance(runner, OnnxRunner) and runner.is_exported(224, 224)
    assert resolve_backend(lite0, "auto", "cpu", n_images=1) is runner


def test_auto_keeps_torch_for_few_images_without_an_export(lite0, onnx_folder):
    assert resolve_backend(lite0, "auto", "cpu", n_images=5) is lite0
    assert resolve_backend(lite0, "torch", "cpu", n_images=5000) is lite0
    assert not onnx_folder.exists()


class _Untraceable(torch.nn.Module):
    """A network whose forward leaves torch (through numpy): an export freezes it into a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        pooled = torch.from_numpy(x.detach().mean(dim=(2, 3)).numpy() ** 2)
        return pooled * self.scale


def _tiny_model() -> EmbeddingModel:
    spec = ModelSpec("untraceable", "test", 3, Preprocessing(16, INCEPTION_MEAN, INCEPTION_STD),
                     build=lambda *a: _Untraceable())
    return EmbeddingModel(spec, _Untraceable(), "none").eval()


def test_auto_falls_back_to_torch_when_the_export_is_wrong(onnx_folder, caplog):
    model = _tiny_model()
    x = torch.rand(4, 3, 16, 16)
    runner = resolve_backend(model, "auto", "cpu", n_images=1000)
    with caplog.at_level(logging.WARNING, logger="helpers"):
        got = runner(x)
    assert torch.allclose(got, model(x))
    assert "using torch" in caplog.text
    with pytest.raises(ModelError, match="--backend torch"):
        resolve_backend(model, "onnx", "cpu")(x)


def test_bad_backend_choices_are_clear(lite0):
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(lite0, "tensorrt", "cpu")
    with pytest.raises(ModelError, match="runs on the CPU"):
        resolve_backend(lite0, "onnx", torch.device("meta"))


def test_runner_rejects_nothing_of_the_model_interface(lite0, onnx_folder):
    runner = OnnxRunner(lite0)
    assert runner.embed_dim == lite0.embed_dim and runner.spec is lite0.spec
    assert np.isfinite(runner(torch.zeros(1, 3, 224, 224)).numpy()).all()


def test_onnx_backend_does_not_import_the_embedding_module():
    import subprocess
    import sys

    code = "import sys, helpers.onnx_backend; print('helpers.embedding' in sys.modules)"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "False"


def test_slices_of_a_batch_give_the_whole_batch_result(lite0, tiny_split, onnx_folder, monkeypatch):
    import helpers.onnx_backend as onnx_backend
    from helpers.embedding import ImageFileDataset

    dataset = ImageFileDataset(list_images(tiny_split / "test" / "gallery")[:10], lite0.transform())
    images = torch.stack([dataset[i][1] for i in range(len(dataset))])  # 10: not a multiple of the slice
    runner = OnnxRunner(lite0, threads=1, strict=True)
    calls = []
    session = runner._open((224, 224))
    original = session.run
    monkeypatch.setattr(session, "run", lambda *a, **k: calls.append(len(a[1]["images"])) or original(*a, **k),
                        raising=False)
    runner._sessions[(224, 224)] = session
    sliced = runner(images)
    assert calls == [4, 4, 2]
    monkeypatch.setattr(onnx_backend, "SESSION_BATCH", 64)
    whole = runner(images)
    assert calls[-1] == 10 and torch.equal(sliced, whole)
