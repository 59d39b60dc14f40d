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


def _images(drawn_split: Path, n: int = 3):
    from PIL import Image

    paths = sorted((drawn_split / "test" / "gallery").iterdir())[:n]
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


def test_clip_b32_embeds_real_images_text_and_pools(drawn_split):
    images = _images(drawn_split)
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


def test_clip_weight_file_round_trip(tmp_path, drawn_split):
    images = _images(drawn_split, 2)
    model = load_model("clip-vit-b32", weights="none", pool="gem")
    with torch.no_grad():
        model.network.gem.p.fill_(4.0)
    path = save_weights(model, tmp_path / "clip.pt")
    again = load_model("clip-vit-b32", weights=str(path), pool="gem")
    assert float(again.network.gem.p.detach()) == 4.0
    assert np.array_equal(embed_pil_images(model, images, "cpu"), embed_pil_images(again, images, "cpu"))
    # an open_clip checkpoint (keys without our wrapper prefix) loads as well
    raw = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.network.model.state_dict(), raw)
    plain = load_model("clip-vit-b32", weights=str(raw))  # default pool: encode_image
    batch = torch.stack([model.transform()(im) for im in images])
    with torch.inference_mode():
        assert torch.equal(plain(batch), model.network.encode_image(batch))


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


# ----------------------------------------------------------------------------------------------------------------
# Every registered name
# ----------------------------------------------------------------------------------------------------------------
FACE_MEAN, FACE_STD = (127.5 / 255,) * 3, (128 / 255,) * 3
HALF = (0.5, 0.5, 0.5)
#: name -> (embedding size, input size, mean, std): the published configuration of each family.
EXPECTED = {
    "efficientnet-lite0": (1280, 224, HALF, HALF),
    "efficientnet-b0": (1280, 224, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet-b3": (1536, 320, IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (512, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet34": (512, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": (2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet101": (2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "resnet152": (2048, 224, IMAGENET_MEAN, IMAGENET_STD),
    "googlenet": (1024, 224, IMAGENET_MEAN, IMAGENET_STD),
    "vit-b16": (768, 224, HALF, HALF),
    "dinov2-vits14": (384, 224, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2-vitb14": (768, 224, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2-vitl14": (1024, 224, IMAGENET_MEAN, IMAGENET_STD),
    "clip-vit-b32": (512, 224, CLIP_MEAN, CLIP_STD),
    "clip-vit-b16": (512, 224, CLIP_MEAN, CLIP_STD),
    "clip-vit-l14": (768, 224, CLIP_MEAN, CLIP_STD),
    "clip-vit-l14-336": (768, 336, CLIP_MEAN, CLIP_STD),
    "clip-vit-h14": (1024, 224, CLIP_MEAN, CLIP_STD),
    "facenet-vggface2": (512, 160, FACE_MEAN, FACE_STD),
}
#: Built in the fast tests; the medium ones (a few seconds each on 2 cores) are built in a slow test.
MEDIUM = {"resnet101", "resnet152", "dinov2-vitb14", "clip-vit-b16", "efficientnet-b3"}
SMALL = [name for name in EXPECTED if name not in BIG | MEDIUM]


def test_every_mission_name_is_registered_and_listed(capsys):
    from helpers.cli import main

    registered = {spec.name for spec in list_models()}
    assert set(EXPECTED) <= registered
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, (dim, size, _, _) in EXPECTED.items():
        row = [line.split() for line in lines if line.split() and line.split()[0] == name]
        assert row, f"{name} missing from `models`"
        assert row[0][2] == str(dim) and row[0][3] == str(size), row[0][:4]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_spec_has_family_preprocessing(name):
    dim, size, mean, std = EXPECTED[name]
    spec = get_spec(name)
    assert spec.embed_dim == dim
    assert spec.preprocessing.input_size == size
    assert spec.preprocessing.mean == pytest.approx(mean) and spec.preprocessing.std == pytest.approx(std)


def test_timm_specs_follow_timm_pretrained_configs():
    import timm

    for name in ("efficientnet-b0", "efficientnet-b3", "resnet18", "resnet50", "resnet152"):
        spec = get_spec(name)
        cfg = timm.models.get_pretrained_cfg(spec.extra["timm_name"])
        assert spec.preprocessing.input_size == (cfg.test_input_size or cfg.input_size)[-1]
        assert spec.preprocessing.crop_pct == (cfg.test_crop_pct or cfg.crop_pct)
        assert spec.preprocessing.interpolation == cfg.interpolation
        assert spec.preprocessing.mean == tuple(cfg.mean)


@pytest.mark.parametrize("name", SMALL)
def test_builds_offline_and_embeds_real_images(name, drawn_split):
    dim = EXPECTED[name][0]
    model = load_model(name, weights="none")
    assert model.embed_dim == dim and model.weights == "none"
    assert not model.training
    emb = embed_pil_images(model, _images(drawn_split, 2), device="cpu")
    assert emb.shape == (2, dim) and emb.dtype == np.float32
    assert np.all(np.isfinite(emb)) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert not np.allclose(emb[0], emb[1]), "two different photos gave the same embedding"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEDIUM))
def test_medium_models_build_offline_and_embed_real_images(name, drawn_split):
    test_builds_offline_and_embeds_real_images(name, drawn_split)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BIG))
def test_big_models_build_offline(name):
    dim, size = EXPECTED[name][:2]
    model = load_model(name, weights="none")
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, dim)


@pytest.mark.parametrize("name,pool,dim", [("resnet18", "gem", 512), ("resnet18", "max", 512),
                                           ("dinov2-vits14", "gem", 384), ("dinov2-vits14", "mean", 384),
                                           ("efficientnet-lite0", "gem", 1280),
                                           pytest.param("facenet-vggface2", "gem", 512, marks=pytest.mark.slow),
                                           pytest.param("googlenet", "gem", 1024, marks=pytest.mark.slow)])
def test_pool_options(name, pool, dim):
    model = load_model(name, weights="none", pool=pool)
    size = model.preprocessing.input_size
    assert model.pooling == pool and model.embed_dim == dim
    x = torch.rand(2, 3, size, size)
    with torch.inference_mode():
        assert model(x).shape == (2, dim)


def test_pooling_matches_features(drawn_split):
    model = load_model("resnet18", weights="none")
    gem_model = load_model("resnet18", weights="none", pool="gem")
    gem_model.network.model.load_state_dict(model.network.model.state_dict())
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        fmap = model.network.forward_features(x)
        assert torch.allclose(model(x), fmap.mean(dim=(-2, -1)), atol=1e-5)
        assert torch.allclose(gem_model(x), gem(fmap, 3.0), atol=1e-5)
        # timm's own classifier pooling is the same global average
        assert torch.allclose(model(x), model.network.model.forward_head(fmap, pre_logits=True), atol=1e-5)
    dino = load_model("dinov2-vits14", weights="none")
    with torch.inference_mode():
        tokens = dino.network.forward_features(torch.rand(1, 3, 224, 224))
    assert tokens.shape == (1, 1 + 16 * 16, 384)  # CLS + a 16x16 grid of patch-14 tokens at 224 px


def test_bad_options_are_clear_errors():
    with pytest.raises(ModelError, match="pool"):
        load_model("resnet18", weights="none", pool="cls")
    with pytest.raises(ModelError, match="does not take"):
        load_model("resnet18", weights="none", pretrained="openai")
    with pytest.raises(ModelError, match="unknown model"):
        get_spec("resnet19")
    with pytest.raises(ModelError, match="not found"):
        load_model("resnet18", weights="/nonexistent/weights.pt")


# ----------------------------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options", [("resnet18", {"pool": "gem"}), ("dinov2-vits14", {}),
                                          pytest.param("googlenet", {}, marks=pytest.mark.slow),
                                          pytest.param("vit-b16", {}, marks=pytest.mark.slow)])
def test_weight_file_round_trip(name, options, tmp_path, drawn_split):
    images = _images(drawn_split, 2)
    model = load_model(name, weights="none", **options)
    with torch.no_grad():  # make the saved state differ from any fresh random initialisation
        for param in model.network.parameters():
            param.add_(0.01)
    path = save_weights(model, tmp_path / f"{name}.pt")
    again = load_model(name, weights=str(path), **options)
    assert np.array_equal(embed_pil_images(model, images, "cpu"), embed_pil_images(again, images, "cpu"))
    for key, value in model.network.state_dict().items():
        assert torch.equal(value, again.network.state_dict()[key]), key


def test_published_layouts_load(tmp_path, drawn_split):
    """Files as the libraries publish them: timm (classifier included), torchvision (aux heads), FaceNet (logits)."""
    images = _images(drawn_split, 2)
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False).eval()  # with its 1000-class fc, as on the hub
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    model = load_model("resnet18", weights=str(tmp_path / "model.safetensors"))
    with torch.inference_mode():
        x = torch.rand(1, 3, 224, 224)
        assert torch.allclose(model(x), reference.forward_head(reference.forward_features(x), pre_logits=True))

    from torchvision.models import googlenet

    tv = googlenet(weights=None, aux_logits=True, transform_input=True, init_weights=True)
    torch.save(tv.state_dict(), tmp_path / "googlenet.pth")
    assert load_model("googlenet", weights=str(tmp_path / "googlenet.pth")).embed_dim == 1024

    face = load_model("facenet-vggface2", weights="none")
    state = dict(face.network.state_dict())
    state["logits.weight"], state["logits.bias"] = torch.zeros(8631, 512), torch.zeros(8631)
    torch.save(state, tmp_path / "20180402-114759-vggface2.pt")
    again = load_model("facenet-vggface2", weights=str(tmp_path / "20180402-114759-vggface2.pt"))
    assert np.array_equal(embed_pil_images(face, images, "cpu"), embed_pil_images(again, images, "cpu"))


def test_facenet_layout_matches_the_published_state_dict():
    """Parameter names and shapes of the published VGGFace2 file (spot checks) and the network's size."""
    state = load_model("facenet-vggface2", weights="none").network.state_dict()
    expected = {
        "conv2d_1a.conv.weight": (32, 3, 3, 3), "conv2d_4b.bn.running_var": (256,),
        "repeat_1.4.branch2.2.conv.weight": (32, 32, 3, 3), "repeat_1.0.conv2d.weight": (256, 96, 1, 1),
        "mixed_6a.branch0.conv.weight": (384, 256, 3, 3), "mixed_6a.branch1.2.conv.weight": (256, 192, 3, 3),
        "repeat_2.9.branch1.1.conv.weight": (128, 128, 1, 7), "repeat_2.9.branch1.2.conv.weight": (128, 128, 7, 1),
        "mixed_7a.branch0.1.conv.weight": (384, 256, 3, 3), "mixed_7a.branch2.2.bn.weight": (256,),
        "repeat_3.4.branch1.1.conv.weight": (192, 192, 1, 3), "block8.conv2d.weight": (1792, 384, 1, 1),
        "block8.conv2d.bias": (1792,), "last_linear.weight": (512, 1792), "last_bn.running_mean": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "last_linear.bias" not in state and not any(k.startswith("logits") for k in state)
    n_params = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n_params == 23_482_624  # Inception-ResNet-v1 without its classifier


# ----------------------------------------------------------------------------------------------------------------
# Faces
# ----------------------------------------------------------------------------------------------------------------
def test_face_detection_crop_and_fallback(imagenette_val):
    pytest.importorskip("cv2")
    from PIL import Image

    from helpers.models.facenet_family import FaceCropper

    # an angler holding a tench: one face in the upper middle of the photo
    person = Image.open(imagenette_val / "n01440764" / "ILSVRC2012_val_00017700.JPEG").convert("RGB")
    cropper = FaceCropper()
    x, y, w, h = cropper.detect(person)
    assert 90 <= x + w / 2 <= 135 and 30 <= y + h / 2 <= 80 and 40 <= w <= 100
    crop = cropper(person)
    assert crop is not None and crop.width < person.width and abs(crop.width - 1.4 * w) <= 2
    # a photo without a face: no crop, the model then embeds the whole image
    garbage_trucks = sorted((imagenette_val / "n03417042").iterdir())[:5]
    assert all(cropper(Image.open(p).convert("RGB")) is None for p in garbage_trucks)

    model = load_model("facenet-vggface2", weights="none")
    whole = load_model("facenet-vggface2", weights="none", face="none")
    whole.network.load_state_dict(model.network.state_dict())
    truck = Image.open(garbage_trucks[0]).convert("RGB")
    assert np.array_equal(embed_pil_images(model, [truck], "cpu"), embed_pil_images(whole, [truck], "cpu"))
    assert not np.allclose(embed_pil_images(model, [person], "cpu"), embed_pil_images(whole, [person], "cpu"))
    assert torch.equal(model.transform()(person), model.preprocessing.transform()(crop))


# ----------------------------------------------------------------------------------------------------------------
# Pass-through names
# ----------------------------------------------------------------------------------------------------------------
def test_timm_pass_through():
    model = load_model("timm:resnet18.a1_in1k", weights="none")
    assert model.embed_dim == 512 and model.preprocessing.input_size == 224 and model.preprocessing.crop_pct == 0.95
    vit = load_model("timm:vit_tiny_patch16_224", weights="none", pool="gem")
    assert vit.embed_dim == 192 and vit.preprocessing.mean == (0.5, 0.5, 0.5)
    with torch.inference_mode():
        assert vit(torch.rand(1, 3, 224, 224)).shape == (1, 192)
    mobile = load_model("timm:mobilenetv3_small_100", weights="none")  # its conv head widens 576 -> 1024
    with torch.inference_mode():
        assert mobile(torch.rand(1, 3, 224, 224)).shape == (1, mobile.embed_dim) and mobile.embed_dim == 1024
    with pytest.raises(ModelError, match="timm has no model"):
        get_spec("timm:not_a_model")


def test_hf_pass_through_from_a_local_folder(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = tmp_path / "tiny-vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1]
                      ).save_pretrained(folder)
    model = load_model(f"hf:{folder}", weights="pretrained")
    assert model.embed_dim == 32 and model.spec.embed_dim == 32
    assert model.preprocessing.input_size == 64 and model.preprocessing.mean == (0.1, 0.2, 0.3)
    assert model.preprocessing.resize_mode == "squash"
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        out = model(x)
        assert torch.allclose(out, model.network.model(pixel_values=x).last_hidden_state[:, 0])
    # the folder is also a --weights PATH for the same architecture
    again = load_model(f"hf:{folder}", weights=str(folder))
    with torch.inference_mode():
        assert torch.equal(again(x), out)
    # and a state-dict file saved from the wrapper
    with torch.no_grad():
        for param in model.network.parameters():
            param.mul_(1.5)
    saved = save_weights(model, tmp_path / "hf.pt")
    third = load_model(f"hf:{folder}", weights=str(saved))
    with torch.inference_mode():
        assert torch.equal(third(x), model(x)) and not torch.equal(third(x), out)
    assert load_model(f"hf:{folder}", weights="none", pool="mean").embed_dim == 32


@pytest.mark.parametrize("name", ["resnet18", "vit-b16", "facenet-vggface2",
                                  pytest.param("dinov2-vits14", marks=pytest.mark.slow),
                                  pytest.param("googlenet", marks=pytest.mark.slow),
                                  pytest.param("hf:google/vit-base-patch16-224-in21k", marks=pytest.mark.slow)])
def test_pretrained_offline_errors_name_the_fix(name, tmp_path):
    code = (
        "import sys\n"
        "from helpers.models import load_model, ModelError\n"
        "try:\n"
        f"    load_model({name!r})\n"
        "except ModelError as exc:\n"
        "    print('MODELERROR', exc)\n"
    )
    env = _offline_env()
    if name in ("googlenet", "facenet-vggface2"):  # plain URL downloads: point them at an unreachable proxy
        env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", TORCH_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert "MODELERROR" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "--weights PATH" in out.stdout and "cannot fetch" in out.stdout


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,extra", [("resnet18", ["--pool", "gem"]), ("facenet-vggface2", []),
                                        pytest.param("dinov2-vits14", ["--pool", "gem"], marks=pytest.mark.slow),
                                        pytest.param("clip-vit-b32", ["--pool", "gem"], marks=pytest.mark.slow),
                                        pytest.param("googlenet", [], marks=pytest.mark.slow),
                                        pytest.param("vit-b16", [], marks=pytest.mark.slow),
                                        pytest.param("efficientnet-b0", [], marks=pytest.mark.slow)])
def test_cli_retrieve_with_random_weights_writes_a_valid_submission(name, extra, drawn_split, tmp_path):
    from helpers.cli import main
    from helpers.data import load_retrieval_set
    from helpers.submission import load_submission, validate_submission

    out = tmp_path / "submission.json"
    metrics = tmp_path / "metrics.json"
    rc = main(["retrieve", "--model", name, "--weights", "none", "--data", str(drawn_split), "--out", str(out),
               "--metrics-out", str(metrics), "--device", "cpu", "--quiet", "--workers", "0", "--k", "5", *extra])
    assert rc == 0
    dataset = load_retrieval_set(drawn_split)
    rankings = load_submission(out)
    assert validate_submission(rankings, k=5, query_names=[p.name for p in dataset.query_paths],
                               gallery_names=[p.name for p in dataset.gallery_paths]) == []
    record = json.loads(metrics.read_text())
    assert record["model_name"] == name


# --------------------------------------------------------------------------------------------------------------
# Stages (stem, ordered blocks, neck) per family
# --------------------------------------------------------------------------------------------------------------
#: one registered name per family -> (blocks, the prefix(es) of the last block, a neck parameter or None)
STAGE_CASES = {
    "clip": ("clip-vit-b32", 12, "model.visual.transformer.resblocks.11.", "model.visual.ln_post.weight"),
    "efficientnet": ("efficientnet-lite0", 7, "model.blocks.6.", "model.conv_head.weight"),
    "resnet": ("resnet18", 4, "model.layer4.", None),
    "googlenet": ("googlenet", 3, ("model.inception5a.", "model.inception5b."), None),
    "face": ("facenet-vggface2", 3, ("mixed_7a.", "repeat_3.", "block8."), "last_linear.weight"),
    "dinov2": ("dinov2-vits14", 12, "model.blocks.11.", "model.norm.weight"),
    "vit": ("vit-b16", 12, "model.layers.11.", "model.layernorm.weight"),
}


def test_every_registered_family_has_a_stage_case():
    assert {spec.family for spec in list_models()} == set(STAGE_CASES)


@pytest.mark.parametrize("family", sorted(STAGE_CASES))
def test_stage_counts_of_every_family(family):
    from helpers.models.stages import backbone_stages

    name, n_blocks, last_block, neck = STAGE_CASES[family]
    network = load_model(name, weights="none").network
    stages = backbone_stages(network, name)
    assert stages.n_blocks == n_blocks
    assert stages.blocks[-1][0][0].startswith(last_block)
    assert all(n.startswith(last_block) for n, _ in stages.blocks[-1])
    assert stages.stem and (neck is None and not stages.neck or neck in dict(stages.neck))
    every = [id(p) for part in (stages.stem, *stages.blocks, stages.neck, stages.pooling, stages.unused)
             for _, p in part]
    assert sorted(every) == sorted(id(p) for p in network.parameters())  # each tensor in exactly one stage


def test_an_unknown_layout_is_an_error_naming_the_model():
    from helpers.models.stages import backbone_stages

    with pytest.raises(ModelError, match="unknown layer layout for model mystery-net"):
        backbone_stages(torch.nn.Sequential(torch.nn.Linear(2, 2)), "mystery-net")
