"""Errors and outputs that show the next step: did-you-mean model names, the data layout, the demo's next commands,
``models`` within 80 columns."""

from __future__ import annotations

import shutil

import pytest

from helpers.cli import main
from helpers.demo import DemoOutputs, next_steps
from helpers.models import ModelError, get_spec


@pytest.mark.parametrize("typed, suggested", [("effnet-lite0", "efficientnet-lite0"), ("ResNet50", "resnet50"),
                                              ("resnet-50", "resnet50"), ("dinov2", "dinov2-vitb14")])
def test_unknown_model_gets_did_you_mean(typed, suggested):
    with pytest.raises(ModelError) as info:
        get_spec(typed)
    message = str(info.value)
    assert message.startswith(f"unknown model {typed!r}; did you mean ") and repr(suggested) in message
    assert "python -m helpers models" in message


def test_unknown_model_on_the_command_line_is_one_line_with_the_suggestion(demo_data, capsys):
    assert main(["retrieve", "--data", str(demo_data), "--model", "efficientnet-lite", "--weights", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'efficientnet-lite'; did you mean 'efficientnet-lite0'")
    assert "\n" not in err


def test_retrieve_without_data_after_demo_points_at_data_demo(tmp_path, demo_data, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    shutil.copytree(demo_data, tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    assert main(["retrieve"]) == 2
    assert "try `python -m helpers retrieve --data data/demo`" in capsys.readouterr().err


def test_a_flat_folder_suggests_the_layout_and_split(tmp_path, shapes, capsys):
    flat = tmp_path / "photos"
    flat.mkdir()
    for path in sorted((shapes / "circle-warm").iterdir())[:3]:
        shutil.copy(path, flat / path.name)
    assert main(["retrieve", "--data", str(flat)]) == 2
    err = capsys.readouterr().err
    assert "flat folder of images" in err and f"{flat}/test/query/" in err and "helpers split --source" in err
    assert main(["split", "--source", str(flat), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "flat folder of images without classes" in err and f"{flat}/cat/001.jpg" in err


def test_class_folders_given_as_data_suggest_split(shapes, capsys):
    assert main(["retrieve", "--data", str(shapes)]) == 2
    assert f"python -m helpers split --source {shapes} --out data/mine" in capsys.readouterr().err


def test_models_fits_an_80_column_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    names = {line.split()[0] for line in lines if line and not line.startswith(" ")}
    assert {"efficientnet-lite0", "clip-vit-l14-336", "facenet-vggface2", "dinov2-vitl14"} <= names
    assert any("timm:<model name>" in line for line in lines)  # the pass-through prefixes, wrapped too


def test_demo_ends_with_the_next_commands_for_ones_own_data(tmp_path, monkeypatch, capsys):
    import helpers.demo

    fake = DemoOutputs(tmp_path / "data" / "demo", tmp_path / "s.json", None, None, None)
    monkeypatch.setattr(helpers.demo, "run_demo", lambda *args, **kwargs: fake)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("\n".join(next_steps()))
    assert "python -m helpers split --source CLASS_DIR --out data/mine" in out
    assert "python -m helpers retrieve --data data/mine" in out
    assert all(len(line) <= 80 for line in next_steps())


def test_demo_next_steps_name_real_verbs_and_options():
    from helpers.cli import build_parser

    parser = build_parser()
    for line in next_steps():
        command = line.split("#")[0].split()
        if command[:3] == ["python", "-m", "helpers"]:
            parser.parse_args(command[3:])  # exits (SystemExit) on an unknown verb or option
