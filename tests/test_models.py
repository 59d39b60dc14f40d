"""The model zoo: every registered name builds offline, embeds real images with its own preprocessing and dimension,
weight files round-trip exactly, pretrained downloads fail with a clear message offline, and pooling is correct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.embedding import embed_pil_images
from helpers.models import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ModelError, get_spec, list_models, load_model, save_weights
from helpers.models.pooling import GeM, gem, pool_map, pool_tokens

ROOT = Path(__file__).resolve().parents[1]

#: Names built with random weights in the fast tests (the big ViTs are checked by spec here, built only when slow).
BIG = {"clip-vit-l14", "clip-vit-l14-336", "clip-vit-h14", "dinov2-vitl14"}


def _images(tiny_split: Path, n: int = 3):
    from PIL import Image

    paths = sorted((tiny_split / "test" / "gallery").iterdir())[:n]
    return [Image.open(p).convert("RGB") for p in paths]


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


# ----------------------------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------------------------
def test_gem_is_average_at_p1_and_tends_to_max():
    torch.manual_seed(0)
    x = torch.rand(2, 8, 5, 5) + 0.01  # post-ReLU-like, positive
    assert torch.allclose(gem(x, p=1.0), x.mean(dim=(-2, -1)), atol=1e-6)
    assert torch.allclose(pool_map(x, "gap"), x.mean(dim=(-2, -1)))
    big = gem(x.double(), p=200.0)
    assert torch.allclose(big, x.double().amax(dim=(-2, -1)), rtol=0.03)
    # monotone in p (power-mean inequality), between mean and max
    p3 = gem(x, p=3.0)
    assert torch.all(p3 >= x.mean(dim=(-2, -1)) - 1e-6) and torch.all(p3 <= x.amax(dim=(-2, -1)) + 1e-6)
    # naive reference for p=3
    ref = (x ** 3).mean(dim=(-2, -1)) ** (1 / 3)
    assert torch.allclose(p3, ref, atol=1e-6)


def test_signed_gem_on_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(2, 1 + 16, 6)  # CLS + 16 signed patch tokens, like a ViT
    patches = tokens[:, 1:]
    # p=1: the mean of the patch tokens, signs kept
    assert torch.allclose(gem(patches, p=1.0, dim=(1,), signed=True), patches.mean(dim=1), atol=1e-5)
    # identical to the clamped GeM on non-negative inputs
    positive = patches.abs() + 0.01
    assert torch.allclose(gem(positive, 3.0, dim=(1,), signed=True), gem(positive, 3.0, dim=(1,)), atol=1e-5)
    # odd symmetry: negating the tokens negates the pooled vector (clamping would zero it instead)
    pooled = pool_tokens(tokens, "gem")
    assert torch.allclose(pool_tokens(-tokens, "gem"), -pooled, atol=1e-5)
    assert (pooled < 0).any(), "signed GeM must keep negative components"
    clamped = gem(patches, 3.0, dim=(1,))
    assert (clamped >= 0).all()
    # large p: the component with the largest magnitude dominates, with its sign
    big = gem(patches.double(), 100.0, dim=(1,), signed=True)
    idx = patches.abs().argmax(dim=1, keepdim=True)
    extreme = patches.double().gather(1, idx).squeeze(1)
    assert torch.allclose(big, extreme, rtol=0.1)
    # module form: learnable p, tokens
    module = GeM(tokens=True)
    assert module.signed and isinstance(module.p, torch.nn.Parameter) and float(module.p.detach()) == 3.0
    assert torch.allclose(module(patches), gem(patches, 3.0, dim=(1,), signed=True), atol=1e-6)
    assert torch.equal(pool_tokens(tokens, "cls"), tokens[:, 0])
    assert torch.allclose(pool_tokens(tokens, "mean"), patches.mean(dim=1))


def test_embedding_head_shapes_and_normalisation():
    from helpers.models.pooling import EmbeddingHead

    head = EmbeddingHead(1024, 512).eval()
    assert head.linear.bias is None and head.dropout.p == 0.1
    out = head(torch.randn(4, 1024))
    assert out.shape == (4, 512)
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------------
CLIP_NAMES = ["clip-vit-b32", "clip-vit-b16", "clip-vit-l14", "clip-vit-l14-336", "clip-vit-h14"]


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_clip_specs_use_clip_normalisation_and_open_clip_sizes(name):
    import open_clip

    spec = get_spec(name)
    assert spec.preprocessing.mean == CLIP_MEAN and spec.preprocessing.std == CLIP_STD
    assert spec.preprocessing.mean != IMAGENET_MEAN
    assert spec.preprocessing.crop_pct == 1.0 and spec.preprocessing.interpolation == "bicubic"
    assert spec.preprocessing.resize_mode == "shortest"
    config = open_clip.get_model_config(spec.extra["arch"])
    assert spec.preprocessing.input_size == config["vision_cfg"]["image_size"]
    assert spec.embed_dim == config["embed_dim"]
    assert spec.extra["width"] == config["vision_cfg"]["width"]
    assert spec.extra["tag"] in open_clip.list_pretrained_tags_by_model(spec.extra["arch"])


def test_clip_l14_gem_contract_by_spec():
    spec = get_spec("clip-vit-l14")
    assert spec.embed_dim == 768 and spec.extra["width"] == 1024
    assert spec.preprocessing.input_size // spec.extra["patch"] == 16
    assert get_spec("clip-vit-l14-336").preprocessing.input_size // 14 == 24


def test_clip_b32_embeds_real_images_text_and_pools(tiny_split):
    images = _images(tiny_split)
    model = load_model("clip-vit-b32", weights="none")
    assert model.embed_dim == 512 and model.pooling == "proj"
    assert model.preprocessing.mean == CLIP_MEAN
    emb = embed_pil_images(model, images, device="cpu")
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # the default pool is exactly encode_image
    batch = torch.stack([model.transform()(im) for im in images])
    with torch.inference_mode():
        assert torch.allclose(model(batch), model.network.model.encode_image(batch))
        tokens = model.network.visual_tokens(batch)
    assert tokens.shape == (3, 1 + 7 * 7, 768)
    # text tower: offline tokenizer, same space as the image embedding
    ids = model.network.tokenize(["a photo of a dog", "a church"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    with torch.inference_mode():
        assert model.network.encode_text(ids).shape == (2, 512)
    # pre-projection GeM: visual width, and it matches signed GeM of the patch tokens
    gem_model = load_model("clip-vit-b32", weights="none", pool="gem")
    gem_model.network.model.load_state_dict(model.network.model.state_dict())
    assert gem_model.embed_dim == 768 and gem_model.spec.embed_dim == 768
    with torch.inference_mode():
        pooled = gem_model(batch)
    assert pooled.shape == (3, 768)
    assert torch.allclose(pooled, gem(tokens[:, 1:], 3.0, dim=(1,), signed=True), atol=1e-4)
    cls_model = load_model("clip-vit-b32", weights="none", pool="cls")
    assert cls_model.embed_dim == 768


def test_clip_quickgelu_follows_the_pretrained_tag():
    from open_clip.transformer import QuickGELU

    def has_quick(model):
        return any(isinstance(m, QuickGELU) for m in model.network.modules())

    assert has_quick(load_model("clip-vit-b32", weights="none"))  # openai
    assert not has_quick(load_model("clip-vit-b32", weights="none", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ModelError, match="no pretrained tag"):
        load_model("clip-vit-b32", weights="none", pretrained="not-a-tag")
    with pytest.raises(ModelError, match="pool"):
        load_model("clip-vit-b32", weights="none", pool="gap")


def test_clip_weight_file_round_trip(tmp_path, tiny_split):
    images = _images(tiny_split, 2)
    model = load_model("clip-vit-b32", weights="none", pool="gem")
    with torch.no_grad():
        model.network.gem.p.fill_(4.0)
    path = save_weights(model, tmp_path / "clip.pt")
    again = load_model("clip-vit-b32", weights=str(path), pool="gem")
    assert float(again.network.gem.p) == 4.0
    assert np.array_equal(embed_pil_images(model, images, "cpu"), embed_pil_images(again, images, "cpu"))
    # an open_clip checkpoint (keys without our wrapper prefix) loads as well
    raw = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.network.model.state_dict(), raw)
    plain = load_model("clip-vit-b32", weights=str(raw))
    reference = load_model("clip-vit-b32", weights=str(path))
    assert np.array_equal(embed_pil_images(plain, images, "cpu"), embed_pil_images(reference, images, "cpu"))


def test_open_clip_pass_through():
    spec = get_spec("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert spec.embed_dim == 512 and spec.preprocessing.mean == CLIP_MEAN
    model = load_model("open_clip:ViT-B-32/laion2b_s34b_b79k", weights="none")
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 512)
    with pytest.raises(ModelError, match="no architecture"):
        get_spec("open_clip:ViT-X-99")


def test_pretrained_without_network_is_a_clear_error():
    code = (
        "from helpers.models import load_model, ModelError\n"
        "for name in ['clip-vit-b32']:\n"
        "    try:\n"
        "        load_model(name)\n"
        "    except ModelError as exc:\n"
        "        print('MODELERROR', name, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_offline_env(), capture_output=True, text=True,
                         timeout=240)
    lines = [line for line in out.stdout.splitlines() if line.startswith("MODELERROR")]
    assert len(lines) == 1, out.stdout + out.stderr
    for line in lines:
        assert "--weights PATH" in line and "cannot fetch the pretrained weights" in line


@pytest.mark.slow
@pytest.mark.parametrize("name,dim,gem_dim,grid", [("clip-vit-l14", 768, 1024, 16), ("clip-vit-l14-336", 768, 1024, 24)])
def test_clip_large_builds_with_contract_dims(name, dim, gem_dim, grid):
    model = load_model(name, weights="none", pool="gem")
    assert model.embed_dim == gem_dim
    size = model.preprocessing.input_size
    with torch.inference_mode():
        x = torch.zeros(1, 3, size, size)
        assert model(x).shape == (1, gem_dim)
        assert model.network.visual_tokens(x).shape == (1, 1 + grid * grid, gem_dim)
        assert model.network.encode_image(x).shape == (1, dim)
