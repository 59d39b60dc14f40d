"""Shared fixtures: the real image datasets next to the checkout, small splits of them, isolated output folders.

The test run never writes into the project's own output folders: notebooks run by nbval write under a temporary
``$RETRIEVAL_OUTPUT_DIR`` (set here, before any kernel starts), and at the end of the session a check fails the run
if any file appeared or changed in ``results/``, ``submissions/``, ``visualizations/``, ``runs/`` or ``data/``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("RETRIEVAL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))
#: The project's folders no test may write to.
GUARDED_FOLDERS = ("results", "submissions", "visualizations", "runs", "data")


def project_files(root: Path = ROOT, folders: tuple[str, ...] = GUARDED_FOLDERS) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root/<folder>`` for each of ``folders``."""
    found = {}
    for folder in folders:
        for path in (root / folder).rglob("*"):
            if path.is_file():
                stat = path.stat()
                found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def written_files(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Files of ``after`` that are new or changed since ``before``."""
    return sorted(name for name, stamp in after.items() if before.get(name) != stamp)


# Set at import, i.e. at collection, before nbval starts any notebook kernel (kernels inherit the environment).
os.environ["RETRIEVAL_OUTPUT_DIR"] = tempfile.mkdtemp(prefix="retrieval-test-outputs-")
_PROJECT_FILES_BEFORE = project_files()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test or notebook wrote into the project's own output or data folders."""
    written = written_files(_PROJECT_FILES_BEFORE, project_files())
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"the test run wrote {len(written)} file(s) into the project's output folders (tests must use "
                   f"tmp_path, notebooks $RETRIEVAL_OUTPUT_DIR): {', '.join(written[:10])}")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"ERROR: {message}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def shared_dataset(name: str) -> Path:
    """Path of ``../shared/datasets/<name>``; skips the test with a clear message where it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {path} is absent (tests that need ../shared/datasets are skipped)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes its embedding cache under a temporary folder, never in the user's home."""
    monkeypatch.setenv("RETRIEVAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "embedding-cache"))


@pytest.fixture(scope="session")
def imagenette_val() -> Path:
    return shared_dataset("imagenette-val")


@pytest.fixture(scope="session")
def cifar10_test() -> Path:
    return shared_dataset("cifar10-test")


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> Path:
    """A real competition-layout split of imagenette-val: 10 classes x (2 query, 4 gallery, 4 training)."""
    from helpers.data import split_dataset

    source = shared_dataset("imagenette-val")
    out = tmp_path_factory.mktemp("tiny_split")
    split_dataset(source, out, train_per_class=4, query_per_class=2, gallery_per_class=4, seed=0)
    return out


#: Drawn classes: five shapes, each in warm and in cool colours.
SHAPE_CLASSES = tuple(f"{shape}-{palette}" for shape in ("circle", "square", "triangle", "cross", "ring")
                      for palette in ("warm", "cool"))


def _draw_shape(draw, shape: str, cx: int, cy: int, r: int, colour: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(2, r // 3))


def draw_class_folders(root: Path, classes: tuple[str, ...] = SHAPE_CLASSES[:4], per_class: int = 12,
                       size: int = 96, seed: int = 0) -> Path:
    """``root/<class>/<NNN>.png``: per class one drawn shape (random size and position) in warm or cool colours on
    a noisy light background, the same file names in every class folder. For tests where real photos are not
    essential."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for name in classes:
        shape, palette = name.split("-")
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = Image.fromarray(rng.integers(170, 256, size=(size, size, 3), dtype=np.uint8))
            r = int(rng.integers(size // 5, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
            low, high = rng.integers(0, 90, size=2), int(rng.integers(160, 256))
            colour = (high, int(low[0]), int(low[1])) if palette == "warm" else (int(low[0]), int(low[1]), high)
            _draw_shape(ImageDraw.Draw(image), shape, cx, cy, r, colour)
            image.save(root / name / f"{index:03d}.png")
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    """Drawn class folders (:func:`draw_class_folders`): 4 classes x 12 images, basenames repeated across classes."""
    return draw_class_folders(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def drawn_split(tmp_path_factory) -> Path:
    """Ten drawn classes (:data:`SHAPE_CLASSES`) in the competition layout, the size of ``tiny_split``: 10 classes x
    (2 query, 4 gallery, 4 training); query and gallery names are ``<class>_<NNN>.png``."""
    from helpers.data import split_dataset

    source = draw_class_folders(tmp_path_factory.mktemp("drawn_classes"), SHAPE_CLASSES, per_class=10)
    out = tmp_path_factory.mktemp("drawn_split")
    split_dataset(source, out, train_per_class=4, query_per_class=2, gallery_per_class=4, seed=0)
    return out


@pytest.fixture(scope="session")
def shapes_split(tmp_path_factory, shapes) -> Path:
    """The drawn shapes in the competition layout: 4 classes x (2 query, 6 gallery, 4 training)."""
    from helpers.data import split_dataset

    out = tmp_path_factory.mktemp("shapes_split")
    split_dataset(shapes, out, train_per_class=4, query_per_class=2, gallery_per_class=6, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded digits demo dataset (always available: it ships inside scikit-learn)."""
    from helpers.demo import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo"), query_per_class=2, gallery_per_class=5,
                              train_per_class=5)


@pytest.fixture(scope="session")
def lite0():
    """The offline default model with its real ImageNet weights, on the CPU."""
    from helpers.models import load_model

    return load_model("efficientnet-lite0", weights="pretrained", device="cpu")
