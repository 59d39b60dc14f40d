"""helpers.settings: output folders resolved one way, the cache folder, every RETRIEVAL_* variable documented; the
test run's guard on the project's own output folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import settings
from tests.conftest import project_files, written_files

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"\bRETRIEVAL_[A-Z_]+[A-Z]\b")


def _variables_used() -> dict[str, set[str]]:
    """``{variable: {files}}`` for every ``RETRIEVAL_*`` name in the code, tests, benchmarks and notebooks."""
    used: dict[str, set[str]] = {}
    files = [*ROOT.glob("helpers/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py"),
             *ROOT.glob("notebooks/py/*.py"), ROOT / "submit.py"]
    for path in files:
        for name in VARIABLE.findall(path.read_text(encoding="utf-8")):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return used


def test_output_folders_resolve_relative_to_the_working_directory_or_a_given_root(tmp_path):
    assert settings.output_dir("results") == Path("results")
    assert settings.output_path("submissions", "a.json") == Path("submissions") / "a.json"
    assert settings.output_dir("visualizations", tmp_path) == tmp_path / "visualizations"
    with pytest.raises(ValueError, match="unknown output folder 'result'"):
        settings.output_dir("result")


def test_cache_folder_from_the_environment_else_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path / "c"))
    assert settings.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RETRIEVAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_dir() == tmp_path / "xdg" / "image-retrieval" / "embeddings"


def test_the_test_run_writes_notebook_outputs_under_a_temporary_root():
    root = settings.notebook_output_root(fast=True)
    assert "retrieval-test-outputs-" in root.name and ROOT not in root.parents


def test_every_variable_in_use_is_in_the_settings_table_and_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(settings.ENVIRONMENT)
    for name, files in _variables_used().items():
        assert name in documented, f"{name} (used in {sorted(files)}) is missing from helpers.settings.ENVIRONMENT"
    for name in documented:
        assert f"`{name}`" in settings.__doc__, f"{name} is missing from the table in helpers/settings.py"
        assert f"| `{name}` |" in readme, f"{name} is missing from the README's table of environment variables"


def test_only_the_notebooks_read_the_fast_switch():
    readers = {f for f in _variables_used().get("RETRIEVAL_FAST", set()) if f.startswith("helpers/")}
    assert readers <= {"helpers/settings.py", "helpers/notebook.py"}, readers
    for path in ROOT.glob("helpers/**/*.py"):
        if path.name not in ("settings.py", "notebook.py"):
            assert "FAST_ENV" not in path.read_text(encoding="utf-8"), f"{path} reads the notebooks' fast switch"


def test_guard_sees_new_and_changed_files_in_the_project_folders(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.json").write_text("{}")
    before = project_files(tmp_path, ("results", "submissions"))
    assert written_files(before, project_files(tmp_path, ("results", "submissions"))) == []
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "fast_00.json").write_text("{}")
    (tmp_path / "results" / "kept.json").write_text('{"changed": 1}')
    after = project_files(tmp_path, ("results", "submissions"))
    assert written_files(before, after) == ["results/kept.json", "submissions/fast_00.json"]
