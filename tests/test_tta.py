"""Test-time augmentation: flip averaging and the multi-scale power mean, against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from helpers.embedding import MULTISCALE_SCALES, extract_embeddings, forward_tta, multiscale_power
from helpers.models.pooling import GeM


class TinyNet(torch.nn.Module):
    """A fixed random convolution + pooling: position-dependent enough that flipping changes its output."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.gem = GeM(p=3.0) if pool == "gem" else None
        self.head = torch.nn.Linear(6, 4)  # signed outputs

    def forward(self, x):
        f = torch.relu(self.conv(x))
        f = self.gem(f) if self.gem is not None else f.mean(dim=(2, 3))
        return self.head(f)


def normalize(v):
    return torch.nn.functional.normalize(v, dim=-1)


def test_flip_is_the_mean_of_the_normalised_views():
    net, images = TinyNet("gap").eval(), torch.rand(2, 3, 16, 16)
    expected = (normalize(net(images)) + normalize(net(torch.flip(images, dims=[3])))) / 2
    torch.testing.assert_close(forward_tta(net, images, "flip"), expected)
    assert not torch.allclose(normalize(net(images)), normalize(expected), atol=1e-3)  # flipping does matter here


@pytest.mark.parametrize("pool,p", [("gap", 1.0), ("gem", 3.0)])
def test_multiscale_is_the_power_mean_over_three_scales(pool, p):
    net, images = TinyNet(pool).eval(), torch.rand(2, 3, 32, 32)
    assert multiscale_power(net) == p
    assert MULTISCALE_SCALES == pytest.approx((1.0, 2 ** -0.5, 0.5))
    views = []
    for s in (1.0, 2 ** -0.5, 0.5):
        size = round(32 * s)
        x = images if s == 1.0 else torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                                    align_corners=False, antialias=True)
        views.append(normalize(net(x)).detach().numpy().astype(np.float64))
    powered = np.mean([np.sign(v) * np.abs(v) ** p for v in views], axis=0)
    expected = np.sign(powered) * np.abs(powered) ** (1 / p)
    np.testing.assert_allclose(forward_tta(net, images, "multiscale").detach().numpy(), expected, atol=1e-5)


def test_flip_tta_makes_an_image_and_its_mirror_identical(lite0, shapes, tmp_path):
    # Drawn images (off-centre shapes: the mirror differs) and the real default model, through extract_embeddings.
    sources = [shapes / "square-warm" / "000.png", shapes / "circle-cool" / "001.png"]
    paths = []
    for i, src in enumerate(sources):
        image = Image.open(src).convert("RGB").resize((224, 224))
        image.save(tmp_path / f"{i}.png")
        ImageOps.mirror(image).save(tmp_path / f"{i}_mirror.png")
        paths += [tmp_path / f"{i}.png", tmp_path / f"{i}_mirror.png"]
    flip = extract_embeddings(lite0, paths, device="cpu", tta="flip", progress=False).embeddings
    plain = extract_embeddings(lite0, paths, device="cpu", tta="none", progress=False).embeddings
    np.testing.assert_allclose(flip[0], flip[1], atol=1e-5)
    np.testing.assert_allclose(flip[2], flip[3], atol=1e-5)
    assert np.abs(plain[0] - plain[1]).max() > 1e-3  # without TTA the mirror embeds differently
    np.testing.assert_allclose(np.linalg.norm(flip, axis=1), 1.0, atol=1e-5)
