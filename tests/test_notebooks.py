"""The notebooks as files: committed without outputs, Colab badge, parameters cell, short cells, paired twins.

Running them is nbval's job: ``python -m pytest`` collects ``notebooks/*.ipynb`` (see ``[tool.pytest.ini_options]``
in pyproject.toml: ``--nbval-lax --nbval-current-env``) and executes every cell in fast mode.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from helpers.colab import colab_links, colab_settings

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_CODE_LINES = 25
MAX_FUNCTION_LINES = 5
SYNC = "python -m helpers.colab --sync"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/notebooks/(?P<name>[\w.-]+)"
)


def code_lines(source: str) -> list[str]:
    """Lines that hold code: neither blank nor only a comment."""
    return [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def cells(path: Path, kind: str | None = None) -> list:
    notebook = nbformat.read(path, as_version=4)
    return [c for c in notebook.cells if kind is None or c.cell_type == kind]


def test_notebooks_exist_in_reading_order():
    names = [p.name for p in NOTEBOOKS]
    assert names, "no notebook under notebooks/"
    assert all(re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", name) for name in names), names
    numbers = [name[:2] for name in names]
    assert len(set(numbers)) == len(numbers), f"two notebooks share a number: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_title_and_colab_badge(path):
    first = cells(path)[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{path.name} must open with a title"
    assert BADGE in first.source, f"{path.name}: no 'Open in Colab' badge in the first cell"
    match = COLAB_LINK.search(first.source)
    assert match and match["name"] == path.name, f"{path.name}: the badge must link to this notebook"
    links = colab_links(path.name, *colab_settings(ROOT))
    assert links["badge"] in first.source, f"{path.name}: badge not at the setting's repository: run {SYNC}"
    clone = next(c.source for c in cells(path, "code") if "google.colab" in c.source)
    assert links["clone"] in clone and f'"--branch", "{links["branch"]}"' in clone, (
        f"{path.name}: the clone cell is not at the setting's repository and branch: run {SYNC}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_install_cell_is_guarded_and_keeps_torch(path):
    code = cells(path, "code")
    install = [c for c in code if "google.colab" in c.source]
    assert len(install) == 1, f"{path.name}: expected one Colab-only install cell"
    source = install[0].source
    assert re.search(r'^if "google\.colab" in sys\.modules:', source, re.M), "the install must run only in Colab"
    assert "colab_setup" in source, "install through helpers.notebook.colab_setup (it keeps Colab's torch)"
    assert not re.search(r"pip install[^\n]*\btorch", source), "never reinstall torch on Colab"
    assert code.index(install[0]) < next(i for i, c in enumerate(code) if "helpers" in c.source and c is not install[0])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell(path):
    tagged = [c for c in cells(path, "code") if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected exactly one code cell tagged 'parameters' (papermill)"
    tree = ast.parse(tagged[0].source)
    assert all(isinstance(node, (ast.Assign, ast.AnnAssign)) for node in tree.body), "parameters: assignments only"
    names = {t.id for node in tree.body for t in getattr(node, "targets", [getattr(node, "target", None)])}
    assert {"FAST", "DEVICE", "DATA_SOURCE"} <= names, (
        f"{path.name}: the parameters cell must set FAST, DEVICE and DATA_SOURCE")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_are_short_and_define_no_long_functions(path):
    for index, cell in enumerate(cells(path, "code")):
        lines = code_lines(cell.source)
        assert lines, f"{path.name} code cell {index} is empty"
        assert len(lines) <= MAX_CODE_LINES, f"{path.name} code cell {index}: {len(lines)} lines of code"
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, (
                    f"{path.name} code cell {index}: {node.name} is {length} lines; move logic into helpers/"
                )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_mode_device_outputs_and_final_checks(path):
    code = [c.source for c in cells(path, "code")]
    text = "\n".join(code)
    assert len(re.findall(r"\bnotebook_mode\(", text)) == 1, (
        f"{path.name}: resolve the mode and the device once, with helpers.notebook.notebook_mode (it prints why)")
    assert "choose_device(" not in text and "fast_mode(" not in text, f"{path.name}: use notebook_mode"
    assert "check_run_outputs(" in code[-1] and "assert" in code[-1], f"{path.name}: end with checks on its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paired_py_percent_twin_in_sync(path):
    jupytext = pytest.importorskip("jupytext")
    twin = NOTEBOOK_DIR / "py" / f"{path.stem}.py"
    assert twin.is_file(), f"{path.name} has no py:percent twin {twin}: run `jupytext --sync {path}`"
    from_py = jupytext.read(twin)
    from_ipynb = nbformat.read(path, as_version=4)
    pairs = list(zip(from_py.cells, from_ipynb.cells))
    assert len(from_py.cells) == len(from_ipynb.cells), f"{path.name} and {twin.name} differ: run jupytext --sync"
    for index, (a, b) in enumerate(pairs):
        assert (a.cell_type, a.source.strip()) == (b.cell_type, b.source.strip()), (
            f"{path.name} cell {index} differs from {twin.name}: run `jupytext --sync {path}`"
        )
        assert a.metadata.get("tags", []) == b.metadata.get("tags", []), f"{path.name} cell {index}: tags differ"
