"""Packaging: a distribution name of its own, extras, and version floors that match the APIs the code calls."""

from __future__ import annotations

import inspect
from importlib import metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_the_distribution_is_not_named_like_the_import_package():
    assert PYPROJECT["name"] != "helpers"
    assert set(PYPROJECT["optional-dependencies"]) >= {"notebooks", "server", "scale", "test", "all"}
    all_extra = Requirement(PYPROJECT["optional-dependencies"]["all"][0])
    assert all_extra.name == PYPROJECT["name"]
    assert set(all_extra.extras) == {"notebooks", "server", "scale", "test"}


def test_requirements_install_the_package_with_every_extra():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    assert "-e .[all]" in lines


def _declared() -> list[Requirement]:
    requirements = [Requirement(text) for text in PYPROJECT["dependencies"]]
    for name, extra in PYPROJECT["optional-dependencies"].items():
        if name != "all":
            requirements += [Requirement(text) for text in extra]
    return requirements


@pytest.mark.parametrize("requirement", _declared(), ids=lambda r: r.name)
def test_installed_versions_satisfy_the_declared_floors(requirement):
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed")
    assert Version(installed) in requirement.specifier, f"{requirement.name} {installed} not in {requirement.specifier}"


def test_open_clip_floor_has_the_apis_the_clip_family_calls():
    open_clip = pytest.importorskip("open_clip")
    floor = next(r for r in _declared() if r.name == "open_clip_torch")
    assert Version("3.0") in floor.specifier and Version("2.31") not in floor.specifier
    assert "pretrained_text" in inspect.signature(open_clip.create_model).parameters
    from open_clip.transformer import VisionTransformer

    assert hasattr(VisionTransformer, "_embeds")


def test_timm_floor_has_the_apis_the_training_code_calls():
    timm = pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed  # noqa: F401

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert callable(getattr(model, "group_matcher", None))
    assert Version(timm.__version__) >= Version("1.0")
