"""Every notebook, in fast mode, on a competition folder whose ``test/`` has no ground truth (as the real one).

Each notebook runs in a fresh kernel (jupyter_client, as nbval runs them). The folder is the fast split (``helpers.notebook.fast_dataset``: the shared photos, else the embedded demo) with
``test/ground_truth.json`` and ``test/labels.json`` removed; a cell injected after the parameters cell points
``DATA_SOURCE`` at it, as papermill's ``-p DATA_SOURCE`` would. Each notebook must run to its end (its own final checks:
a valid submission for the test, metrics from the validation split of the training classes) and its metrics JSON
must say that it was scored on that split.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest

from helpers.notebook import fast_dataset

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def competition(tmp_path_factory) -> Path:
    """The fast split without any ground truth in ``test/``."""
    folder = fast_dataset(out=tmp_path_factory.mktemp("competition") / "data")
    for name in ("ground_truth.json", "labels.json"):
        (folder / "test" / name).unlink(missing_ok=True)
    assert not (folder / "test" / "ground_truth.json").exists()
    return folder


def execute(notebook: nbformat.NotebookNode, cwd: Path) -> None:
    """Run every code cell in a fresh kernel of this interpreter (jupyter_client, as nbval does); fail on the
    first cell that raises, with its traceback."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", cwd=str(cwd))
    try:
        for index, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
            reply = client.execute_interactive(cell.source, timeout=TIMEOUT_S, output_hook=lambda msg: None)
            content = reply["content"]
            assert content["status"] == "ok", (
                f"code cell {index} failed: {content.get('ename')}: {content.get('evalue')}\n"
                + re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content.get("traceback", [])))
            )
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def with_data_dir(path: Path, data: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(f"DATA_SOURCE = {str(data)!r}"))
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_ground_truth(path, competition, tmp_path, monkeypatch):
    outputs = tmp_path / "outputs"
    monkeypatch.setenv("RETRIEVAL_FAST", "1")
    monkeypatch.setenv("RETRIEVAL_OUTPUT_DIR", str(outputs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = with_data_dir(path, competition)
    execute(notebook, path.parent)
    records = [json.loads(p.read_text()) for p in (outputs / "results").glob("*.json")]
    scored = [r for r in records if (r.get("config") or {}).get("data") == str(competition)]
    assert scored, f"{path.name} wrote no metrics JSON for {competition}"
    for record in scored:
        assert Path(record["config"]["scored_on"]).is_dir(), record["config"]
        assert record["metrics"] and 0.0 <= record["metrics"]["hit@1"] <= 1.0, record["metrics"]
    assert list((outputs / "submissions").glob("*.json")), f"{path.name} wrote no submission"
