"""Google Colab set-up: clone-and-install without replacing Colab's own torch, and only what notebooks need.

Only the standard library is imported: each notebook's Colab-only cell runs :func:`colab_setup` before the
requirements are installed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

#: Where the notebooks' Colab links are set: ``[tool.cbir-toolkit.colab]`` in ``pyproject.toml``.
SETTINGS_TABLE = ("tool", "cbir-toolkit", "colab")
_BADGE_LINK = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+?/notebooks/")
_CLONE_URL = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?\.git")
_CLONE_BRANCH = re.compile(r'("--branch", ")[^"]*(")')
_REPOSITORY = re.compile(r"^[\w.-]+/[\w.-]+$")

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


def _toml():
    """``tomllib`` (Python 3.11+), else pip's own copy of ``tomli`` (Python 3.10, where pip is always present)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib


def colab_requirements(root: str | os.PathLike = ".", extras: Sequence[str] = ("notebooks",),
                       keep: Sequence[str] = COLAB_KEEP) -> list[str]:
    """The project's dependencies (``pyproject.toml``) and those of ``extras`` (the notebooks' own), minus ``keep``
    (torch, torchvision: Colab's builds stay): what a notebook needs on Colab, and nothing for tests or servers."""
    project = _toml().loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))["project"]
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


def colab_settings(root: str | os.PathLike = ".") -> tuple[str, str]:
    """``(repository, branch)`` that the notebooks' Colab badges and clone cells use: the one setting,
    ``[tool.cbir-toolkit.colab]`` in ``pyproject.toml``."""
    table = _toml().loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))
    for key in SETTINGS_TABLE:
        table = table.get(key, {})
    repository, branch = table.get("repository"), table.get("branch", "main")
    if not (isinstance(repository, str) and _REPOSITORY.match(repository)):
        raise ValueError(f"pyproject.toml [tool.cbir-toolkit.colab] repository must be 'owner/name', not "
                         f"{repository!r}")
    return repository, str(branch)


def colab_links(name: str, repository: str, branch: str = "main") -> dict[str, str]:
    """The badge link of notebook ``name`` (``00_quickstart.ipynb``) and the clone URL, for ``repository``."""
    return {"badge": f"https://colab.research.google.com/github/{repository}/blob/{branch}/notebooks/{name}",
            "clone": f"https://github.com/{repository}.git", "branch": branch}


def sync_colab_links(root: str | os.PathLike = ".") -> list[Path]:
    """Point every notebook's badge and clone cell (``notebooks/*.ipynb`` and their ``notebooks/py/*.py`` twins) at
    the repository and branch of :func:`colab_settings`; returns the files that changed."""
    root = Path(root)
    repository, branch = colab_settings(root)
    links = colab_links("", repository, branch)
    changed = []
    for path in sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "notebooks" / "py").glob("*.py")):
        if path.suffix == ".ipynb":
            changed += [path] if _sync_notebook(path, links) else []
            continue
        text = path.read_text(encoding="utf-8")
        new = _relink(text, links)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def _relink(text: str, links: dict[str, str]) -> str:
    text = _BADGE_LINK.sub(links["badge"], text)
    text = _CLONE_URL.sub(links["clone"], text)
    return _CLONE_BRANCH.sub(lambda m: m.group(1) + links["branch"] + m.group(2), text)


def _sync_notebook(path: Path, links: dict[str, str]) -> bool:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    dirty = False
    for cell in notebook.cells:
        new = _relink(cell.source, links)
        dirty, cell.source = dirty or new != cell.source, new
    if dirty:
        nbformat.write(notebook, path)
    return dirty


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.colab --sync``: rewrite the notebooks' Colab links from ``pyproject.toml``."""
    parser = argparse.ArgumentParser(prog="python -m helpers.colab", description=main.__doc__)
    parser.add_argument("--sync", action="store_true", help="rewrite the badges and clone cells of notebooks/")
    parser.add_argument("--root", default=".", help="the project folder (default: the current one)")
    args = parser.parse_args(argv)
    if not args.sync:
        parser.print_help()
        return 0
    try:
        changed = sync_colab_links(args.root)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repository, branch = colab_settings(args.root)
    print(f"{len(changed)} file(s) now point at {repository} ({branch})")
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through main()
    raise SystemExit(main())
