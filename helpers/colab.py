"""Google Colab set-up: clone-and-install without replacing Colab's own torch, and only what notebooks need.

Only the standard library is imported: each notebook's Colab-only cell runs :func:`colab_setup` before the
requirements are installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

#: Packages Colab already ships (and that must not be replaced by a pip resolve): never installed on Colab.
COLAB_KEEP = ("torch", "torchvision", "torchaudio")


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def _requirement_name(line: str) -> str:
    name = line.split(";", 1)[0]
    for sep in ("[", "=", "<", ">", "!", "~", " "):
        name = name.split(sep, 1)[0]
    return name.strip().lower().replace("_", "-")


def colab_requirements(root: str | os.PathLike = ".", extras: Sequence[str] = ("notebooks",),
                       keep: Sequence[str] = COLAB_KEEP) -> list[str]:
    """The project's dependencies (``pyproject.toml``) and those of ``extras`` (the notebooks' own), minus ``keep``
    (torch, torchvision: Colab's builds stay): what a notebook needs on Colab, and nothing for tests or servers."""
    import tomllib

    project = tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    return [line for line in dict.fromkeys(lines) if _requirement_name(line) not in keep]


def colab_setup(root: str | os.PathLike = ".", dry_run: bool = False) -> list[list[str]]:
    """Install what the notebooks need (the dependencies and the ``notebooks`` extra) without touching torch, then
    the project itself without its dependencies.

    Returns the pip commands (run unless ``dry_run``). Called by each notebook's Colab-only cell after the clone.
    """
    root = Path(root).resolve()
    filtered = Path(tempfile.gettempdir()) / "requirements-colab.txt"
    filtered.write_text("\n".join(colab_requirements(root)) + "\n", encoding="utf-8")
    commands = [
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(filtered)],
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(root)],
    ]
    if not dry_run:
        for command in commands:
            subprocess.run(command, check=True)
    return commands
