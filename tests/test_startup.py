"""Start-up: the eval transform without torchvision, and a verified export served without building the network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.data import list_images, load_image
from helpers.models import load_model
from helpers.models.registry import (CLIP_MEAN, CLIP_STD, INCEPTION_MEAN, INCEPTION_STD, EvalTransform,
                                     Preprocessing, save_weights)


@pytest.mark.parametrize("preprocessing", [
    Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD),
    Preprocessing(224, CLIP_MEAN, CLIP_STD, crop_pct=1.0),
    Preprocessing(288, CLIP_MEAN, CLIP_STD, interpolation="bilinear", crop_pct=0.95),
    Preprocessing(160, CLIP_MEAN, CLIP_STD, resize_mode="squash"),
])
def test_eval_transform_equals_torchvision_on_real_photos(preprocessing, tiny_split, cifar10_test):
    photos = list_images(tiny_split / "test" / "gallery")[:4] + list_images(cifar10_test / "cat")[:2]
    transform = EvalTransform(preprocessing)
    reference = transform.torchvision()
    for path in photos:
        image = load_image(path)
        for variant in (image, image.resize((image.width * 3 // 2, image.height)), image.resize((200, 90))):
            assert torch.equal(transform(variant), reference(variant)), (path, variant.size, variant.mode)


@pytest.fixture()
def onnx_folder(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("RETRIEVAL_ONNX_DIR", str(tmp_path / "onnx"))
    return tmp_path / "onnx"


def _embed(model, paths):
    from helpers.embedding import extract_embeddings

    return extract_embeddings(model, paths, device="cpu", backend="onnx", precision="fp32", num_workers=0,
                              progress=False)


@pytest.mark.slow
def test_a_verified_export_is_served_without_building_the_network(tiny_split, onnx_folder):
    from helpers.fileio import read_json, write_json
    from helpers.onnx_backend import model_fingerprint

    paths = list_images(tiny_split / "test" / "gallery")[:6]
    built = load_model("efficientnet-lite0", device="cpu")
    assert not built.deferred
    first = _embed(built, paths)  # exports, verifies, remembers the fingerprint
    deferred = load_model("efficientnet-lite0", device="cpu")
    assert deferred.deferred
    again = _embed(deferred, paths)
    assert deferred.deferred  # served by the export: never built
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    assert deferred.cache_key() == built.cache_key() and deferred.embed_dim == built.embed_dim
    # only a verified export is trusted: with its check undone, the network is built again
    (sidecar,) = [p for p in onnx_folder.glob("*.json") if p.name.endswith("224x224.json")]
    record = read_json(sidecar)
    write_json(sidecar, {**record, "verified": False})
    assert not load_model("efficientnet-lite0", device="cpu").deferred
    write_json(sidecar, record)
    # whatever needs the network builds it (here a forward pass in inference mode, as a naive script would), with
    # the same weights the export was verified against, as ordinary tensors
    x = torch.zeros(1, 3, 224, 224)
    with torch.inference_mode():
        out = deferred(x)
    assert torch.allclose(out, built(x), atol=1e-5) and deferred.pristine()
    state = deferred.state_dict()
    assert not any(t.is_inference() for t in state.values())
    assert not deferred.deferred and not deferred.training
    assert torch.equal(state["network.model.conv_head.weight"], built.state_dict()["network.model.conv_head.weight"])
    fingerprint = model_fingerprint(built)
    deferred._fingerprint = None  # hash the built weights for real
    assert model_fingerprint(deferred) == fingerprint


@pytest.mark.slow
def test_changed_weights_are_never_served_a_remembered_export(lite0, tiny_split, onnx_folder, tmp_path):
    from helpers.export_identity import FINGERPRINTS_FILE
    from helpers.fileio import read_json
    from helpers.onnx_backend import model_fingerprint

    paths = list_images(tiny_split / "test" / "gallery")[:4]
    weights = save_weights(lite0, tmp_path / "w.pt")
    model = load_model("efficientnet-lite0", weights=str(weights), device="cpu")
    _embed(model, paths)
    assert load_model("efficientnet-lite0", weights=str(weights), device="cpu").deferred
    # a model changed after loading (trained in place) is not remembered under the file's identity
    changed = load_model("efficientnet-lite0", weights=str(weights), device="cpu")
    with torch.no_grad():
        changed.network.model.conv_head.weight.mul_(0.5)
    assert not changed.pristine() and changed.remembered_fingerprint() is None
    changed_fingerprint = model_fingerprint(changed)
    assert changed_fingerprint not in read_json(onnx_folder / FINGERPRINTS_FILE).values()
    # a rewritten weight file is another identity: built, not deferred
    save_weights(changed, weights)
    reloaded = load_model("efficientnet-lite0", weights=str(weights), device="cpu")
    assert not reloaded.deferred and model_fingerprint(reloaded) == changed_fingerprint
    # random weights are never deferred
    assert not load_model("efficientnet-lite0", weights="none", device="cpu").deferred


def test_retrieve_with_an_export_imports_neither_timm_nor_torchvision(tiny_split, tmp_path):
    pytest.importorskip("onnxruntime")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, RETRIEVAL_ONNX_DIR=str(tmp_path / "onnx"), PYTHONPATH=str(root))
    code = ("import sys; from helpers.cli import main; "
            "rc = main(['retrieve', '--data', sys.argv[1], '--no-cache', '--quiet', '--backend', 'onnx', '--out', "
            "sys.argv[2], '--metrics-out', sys.argv[3]]); "
            "print(rc, 'timm' in sys.modules, 'torchvision' in sys.modules)")
    args = [str(tiny_split / "test"), str(tmp_path / "sub.json"), str(tmp_path / "m.json")]
    outputs = [subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=root)
               for _ in range(2)]
    assert [o.stdout.split()[-3:] for o in outputs] == [["0", "True", "True"], ["0", "False", "False"]], outputs
