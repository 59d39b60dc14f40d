"""What a collection indexes: image files under one or more folders (``--images DIR``, searched recursively) and
the files named in a list (``--list FILE``), each identified by its folder (a *root*) and its path relative to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..data import DataError, is_hidden, is_image_file


@dataclass(frozen=True)
class Entry:
    """One file of the collection: ``root`` indexes the collection's folders, ``path`` is relative to it (POSIX)."""

    root: int
    path: str
    file: Path

    @property
    def key(self) -> tuple[int, str]:
        return self.root, self.path


def walk_images(folder: Path) -> list[Path]:
    """Every image file under ``folder`` (recursively, hidden files and folders left out), sorted by path."""
    found: list[Path] = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(current)
        found.extend(base / name for name in sorted(files) if is_image_file(base / name))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def relative_name(file: Path, root: Path) -> str:
    """``file`` relative to ``root`` as a POSIX path; the absolute path where it lies outside ``root``."""
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.as_posix()


def read_list(list_file: Path) -> list[Path]:
    """The image paths named in ``list_file``, one a line (blank lines and ``#`` comments ignored); relative
    lines are relative to the list file's folder."""
    if not list_file.is_file():
        raise DataError(f"image list not found: {list_file}")
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line).expanduser()
            paths.append(path if path.is_absolute() else (list_file.parent / path).resolve())
    return paths


def merge_roots(known: Sequence[str], folders: Iterable[Path]) -> list[str]:
    """``known`` root folders (absolute) followed by those of ``folders`` not already there."""
    roots = list(known)
    for folder in folders:
        text = str(folder.resolve())
        if text not in roots:
            roots.append(text)
    return roots


def collect_entries(roots: Sequence[str], images: Sequence[str | os.PathLike] = (),
                    lists: Sequence[str | os.PathLike] = ()) -> list[Entry]:
    """The collection's files: every image under each of ``images`` and each file named in ``lists``.

    ``roots`` is the collection's list of root folders (absolute), which every folder used here must be part of
    (see :func:`merge_roots`). A file named twice is listed once. Raises :class:`DataError` for a missing folder.
    """
    index = {root: i for i, root in enumerate(roots)}
    entries: dict[tuple[int, str], Entry] = {}
    for folder in images:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"image folder not found: {folder}")
        root = folder.resolve()
        for file in walk_images(root):
            entry = Entry(index[str(root)], relative_name(file, root), file)
            entries.setdefault(entry.key, entry)
    for list_file in lists:
        list_path = Path(list_file).resolve()
        root = list_path.parent
        for file in read_list(list_path):
            if is_hidden(file):
                continue
            entry = Entry(index[str(root)], relative_name(file, root), file)
            entries.setdefault(entry.key, entry)
    return sorted(entries.values(), key=lambda e: e.key)


def source_folders(images: Sequence[str | os.PathLike] = (), lists: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The root folders that ``images`` and ``lists`` bring (a list file's own folder for a list)."""
    return [Path(folder) for folder in images] + [Path(f).resolve().parent for f in lists]
