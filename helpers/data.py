"""Datasets on disk: the competition layout, class folders, robust image loading, ``split`` and ground truth.

Competition layout::

    DIR/training/<class>/*      (for training only)
    DIR/test/query/*            (flat)
    DIR/test/gallery/*          (flat)
    DIR/test/ground_truth.json  (optional: {query name: [every relevant gallery name]})
    DIR/test/labels.json        (optional: {"query": {name: class}, "gallery": {name: class}})
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .fileio import read_json, write_json
from .settings import MAX_PIXELS_ENV

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
#: Pillow's own default limit (about 89.5 megapixels); larger files are refused as possible decompression bombs.
#: ``$RETRIEVAL_MAX_PIXELS`` sets the limit instead (higher or lower), read when images are loaded.
DEFAULT_MAX_PIXELS = 89_478_485
#: Pillow reads its limit from a module global: loads with another limit swap it under this lock.
_PILLOW_LIMIT_LOCK = threading.Lock()
DEFAULT_DATA_DIR = Path("data")

# Truncated files must fail loudly, never decode half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class DataError(Exception):
    """A dataset folder is missing, empty or malformed. The message says what and where."""


class ImageLoadError(Exception):
    """One image file cannot be used; ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------------------------
# Listing files
# --------------------------------------------------------------------------------------------------------------
def is_hidden(path: Path) -> bool:
    """Dot files and macOS resource forks (``.DS_Store``, ``._x.jpg``)."""
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path) and path.is_file()


def printable_name(path: str | os.PathLike) -> str:
    """``path`` as text that can always be printed and written to JSON: bytes of a file name that are not valid
    UTF-8 become ``\\xNN`` escapes (``caf\\xe9.jpg``)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def _is_valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of the file name, kept by Python as lone surrogates
        return False
    return True


@dataclass
class FolderListing:
    """What :func:`scan_folder` found in one folder."""

    images: list[Path] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _entry_kind(entry: os.DirEntry) -> tuple[str, str]:
    """``(kind, reason)``: kind ``file``, ``dir`` or ``other``; reason set for what cannot be used."""
    try:
        mode = entry.stat().st_mode  # follows symbolic links
    except OSError as exc:
        if entry.is_symlink():
            loop = exc.errno == errno.ELOOP
            return "other", "symbolic link loop" if loop else "broken symbolic link (its target is missing)"
        return "other", f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return "file", ""
    if stat.S_ISDIR(mode):
        return "dir", ""
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return "other", f"not a regular file (a {kind})"


def scan_folder(folder: str | os.PathLike) -> FolderListing:
    """The one listing of image folders: image files and class folders directly inside ``folder``, sorted by name.

    Hidden entries (``.DS_Store``, ``._x.jpg``, ``.git``) and files without an image extension are ignored. Entries
    that look like images or folders but cannot be used are listed in ``skipped`` with the reason: a name that is
    not valid UTF-8 (it could not be written to a submission), a folder named like an image, a symbolic link loop
    or a broken link, a FIFO, socket or device. Raises :class:`DataError` if ``folder`` is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {printable_name(folder)}")
    listing = FolderListing()
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = folder / entry.name
            if entry.name.startswith("."):
                continue
            kind, reason = _entry_kind(entry)
            imagelike = path.suffix.lower() in IMAGE_EXTENSIONS
            if not imagelike and kind != "dir":
                continue
            if not reason and not _is_valid_utf8(entry.name):
                reason = "name is not valid UTF-8 (rename it)"
            if not reason and kind == "dir" and imagelike:
                reason = "a folder named like an image"
            if reason:
                listing.skipped.append((path, reason))
            elif kind == "dir":
                listing.folders.append(path)
            elif kind == "file":
                listing.images.append(path)
    return listing


def report_unlisted(skipped: Sequence[tuple[Path, str]]) -> None:
    """Log each entry :func:`scan_folder` could not use, with its reason."""
    for path, reason in skipped:
        logger.warning("skipped %s: %s", printable_name(path), reason)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (:func:`scan_folder`; what cannot be used is logged
    with its reason). Raises :class:`DataError` if ``folder`` is missing."""
    listing = scan_folder(folder)
    report_unlisted(listing.skipped)
    return listing.images


def class_folders(root: str | os.PathLike) -> list[Path]:
    """The visible subfolders of ``root`` (the classes of a class-folder dataset), sorted by name; what cannot be
    used is logged. Raises :class:`DataError` if ``root`` is missing."""
    listing = scan_folder(root)
    report_unlisted(listing.skipped)
    return listing.folders


def list_class_folder(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """``(path, class name)`` for every image of ``root/<class>/*``, classes and files sorted by name.

    Empty class folders are skipped with a warning; a root without any image is a :class:`DataError` (a flat
    folder of images gets the expected layout and the ``split`` it needs).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"class folder dataset not found: {root}")
    items: list[tuple[Path, str]] = []
    for class_dir in class_folders(root):
        files = list_images(class_dir)
        if not files:
            logger.warning("class folder %s holds no image; skipped", class_dir)
        items.extend((f, class_dir.name) for f in files)
    if not items:
        hint = f"expected {root}/<class>/<image>, e.g. {root}/cat/001.jpg and {root}/dog/002.jpg"
        if scan_folder(root).images:
            hint = (f"{root} is a flat folder of images without classes; {hint}. To rank your own query and gallery "
                    f"images instead, put them in DIR/test/query/ and DIR/test/gallery/ and run "
                    f"`python -m helpers retrieve --data DIR`")
        raise DataError(f"no images found in class folders under {root} ({hint})")
    return items


# --------------------------------------------------------------------------------------------------------------
# Loading one image
# --------------------------------------------------------------------------------------------------------------
def max_pixels_limit() -> int:
    """The decompression-bomb limit in pixels: ``$RETRIEVAL_MAX_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`.

    Raises :class:`DataError` for a value that is not a positive whole number.
    """
    from .settings import env_int

    try:
        limit = env_int(MAX_PIXELS_ENV, minimum=1, unit="pixels")
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return DEFAULT_MAX_PIXELS if limit is None else limit


@contextlib.contextmanager
def _pillow_limit(max_pixels: int | None):
    """Pillow's own decompression-bomb check at ``max_pixels`` (``None``: off) for the duration of the block, so
    that a limit above Pillow's default raises it rather than being cut short by it."""
    if max_pixels == Image.MAX_IMAGE_PIXELS:
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def draft_size_for(preprocessing) -> int | None:
    """The smallest side a JPEG must keep for ``preprocessing`` (a :class:`helpers.models.Preprocessing`): the
    short-side resize target (``input_size / crop_pct``) for centre crops, the input size for squashed resizes.
    Decoding with :func:`load_image`'s ``draft_size`` at this size then resizing gives the model what a full
    decode would, up to the resampling of the last step."""
    size = int(preprocessing.input_size)
    if getattr(preprocessing, "resize_mode", "shortest") == "shortest":
        size = int(round(size / preprocessing.crop_pct))
    return size if size > 0 else None


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float grey images to 8 bits instead of clipping them to white."""
    array = np.asarray(image, dtype=np.float64)
    peak = float(array.max()) if array.size else 0.0
    if peak > 65535:
        array = array * (255.0 / peak)
    elif peak > 255:
        array = array / 257.0
    array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array, mode="L").convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB. Transparent pixels are composited over ``background``."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_bit_depth_to_rgb(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image(
    path: str | os.PathLike,
    max_pixels: int | None | str = "env",
    draft_size: int | None = None,
) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied.

    ``draft_size`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 (DCT scaling) while keeping both sides at
    least that large (much faster for big photos). Raises :class:`ImageLoadError` naming the reason for a
    zero-byte, non-image, corrupt or truncated file, or one over ``max_pixels`` (possible decompression bomb;
    ``"env"``: :func:`max_pixels_limit`, ``None``: no limit).
    """
    path = Path(path)
    if max_pixels == "env":
        max_pixels = max_pixels_limit()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _pillow_limit(max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageLoadError(
                        path, f"{width}x{height} pixels is over the limit of {max_pixels} (possible decompression bomb)"
                    )
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageLoadError(path, f"corrupt or truncated image ({reason})") from None


def check_image(path: str | os.PathLike, max_pixels: int | None | str = "env") -> str | None:
    """Return ``None`` if ``path`` loads, else the reason it does not."""
    try:
        load_image(path, max_pixels=max_pixels)
    except ImageLoadError as exc:
        return exc.reason
    return None


def report_skipped(skipped: Sequence[tuple[str | os.PathLike, str]], what: str = "images") -> None:
    """Log each skipped file with its reason, then how many were skipped."""
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    if skipped:
        logger.warning("%d %s skipped (unreadable); the run goes on without them", len(skipped), what)


# --------------------------------------------------------------------------------------------------------------
# Retrieval sets (test/query + test/gallery)
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalSet:
    """The query and gallery images of one dataset, with ground truth and labels where present."""

    root: Path
    query_dir: Path
    gallery_dir: Path
    query_paths: list[Path]
    gallery_paths: list[Path]
    ground_truth: dict[str, list[str]] | None = None
    labels: dict[str, dict[str, str]] | None = None
    training_dir: Path | None = None
    #: Query and gallery entries left out when listing, with the reason (:func:`scan_folder`).
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def query_names(self) -> list[str]:
        return [p.name for p in self.query_paths]

    @property
    def gallery_names(self) -> list[str]:
        return [p.name for p in self.gallery_paths]

    @property
    def ground_truth_path(self) -> Path:
        return self.query_dir.parent / "ground_truth.json"


def _find_test_dir(root: Path) -> Path:
    if (root / "test" / "query").exists() or (root / "test" / "gallery").exists():
        return root / "test"
    if (root / "query").exists() or (root / "gallery").exists():
        return root
    return root / "test"


def _layout_hint(root: Path) -> str:
    """The next step for a ``--data`` folder that is not in the retrieval layout ('' when there is none to give)."""
    demo = root / "demo"
    if (demo / "test" / "query").is_dir():
        return f". `python -m helpers demo` built {demo}: try `python -m helpers retrieve --data {demo}`"
    try:
        listing = scan_folder(root)
    except DataError:
        return ""
    if listing.images:
        return (f". {root} is a flat folder of images: put the queries in {root}/test/query/ and the gallery in "
                f"{root}/test/gallery/ (e.g. {root}/test/query/q1.jpg, {root}/test/gallery/g1.jpg); labeled images "
                "sorted into class folders (CLASS_DIR/cat/001.jpg) are split into that layout by "
                "`python -m helpers split --source CLASS_DIR --out data/mine`")
    classes = [f for f in listing.folders if f.name not in ("test", "training", "query", "gallery")]
    if classes and any(scan_folder(f).images for f in classes[:3]):
        return (f". {root} looks like class folders ({root}/<class>/<image>): "
                f"`python -m helpers split --source {root} --out data/mine` builds the retrieval layout from them")
    return ""


def load_retrieval_set(root: str | os.PathLike = DEFAULT_DATA_DIR) -> RetrievalSet:
    """Read ``root/test/query`` and ``root/test/gallery`` (``root`` may also be the ``test`` folder itself).

    Raises :class:`DataError` with a clear message when a folder is missing or holds no image.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data folder not found: {root}. Put your dataset there as {root}/test/query/* and {root}/test/gallery/*, "
            "or pass --data DIR (try `python -m helpers demo` for a ready-made example)"
        )
    test_dir = _find_test_dir(root)
    query_dir, gallery_dir = test_dir / "query", test_dir / "gallery"
    for kind, folder in (("query", query_dir), ("gallery", gallery_dir)):
        if not folder.is_dir():
            raise DataError(f"{kind} folder not found: {folder} (expected layout: DIR/test/query/*, "
                            f"DIR/test/gallery/*){_layout_hint(root)}")
    query_listing, gallery_listing = scan_folder(query_dir), scan_folder(gallery_dir)
    skipped = query_listing.skipped + gallery_listing.skipped
    report_unlisted(skipped)
    query_paths, gallery_paths = query_listing.images, gallery_listing.images
    for kind, folder, paths in (("query", query_dir, query_paths), ("gallery", gallery_dir, gallery_paths)):
        if not paths:
            raise DataError(
                f"{kind} folder {folder} holds no image (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
    gt_path = test_dir / "ground_truth.json"
    ground_truth = load_ground_truth(gt_path) if gt_path.exists() else None
    labels_path = test_dir / "labels.json"
    labels = read_json(labels_path) if labels_path.exists() else None
    training_dir = root / "training" if (root / "training").is_dir() else None
    return RetrievalSet(root, query_dir, gallery_dir, query_paths, gallery_paths, ground_truth, labels, training_dir,
                        skipped)


def load_ground_truth(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read ``{query name: [relevant gallery names]}``; a single name is accepted in place of a list.

    The course's mapping file (``query_to_gallery_mapping.json``) is accepted too: a list of
    ``{"filename": "test_folder/query_images/x.jpg", "gallery_images": ["test_folder/gallery_images/y.jpg", ...]}``,
    its paths reduced to the file names a submission uses (:func:`course_mapping_to_dict`).
    """
    path = Path(path)
    try:
        raw = read_json(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read ground truth {path}: {exc}") from None
    if isinstance(raw, list):
        raw = course_mapping_to_dict(raw, path)
    if not isinstance(raw, dict):
        raise DataError(f"ground truth {path} must be a JSON object {{query: [gallery names]}} or a list "
                        '[{"filename": query, "gallery_images": [gallery paths]}]')
    ground_truth: dict[str, list[str]] = {}
    for query, relevant in raw.items():
        if isinstance(relevant, str):
            relevant = [relevant]
        if not isinstance(relevant, list) or not all(isinstance(name, str) for name in relevant):
            raise DataError(f"ground truth {path}: entry {query!r} must be a list of gallery names")
        ground_truth[str(query)] = list(relevant)
    return ground_truth


def _file_name(text: str, seen: dict[str, str], what: str, where: str) -> str:
    """The file name of a path (``/`` or ``\\`` separated); a :class:`DataError` when another path of ``seen``
    already reduced to the same name (the submission could not tell them apart)."""
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise DataError(f"ground truth {where}: empty {what} path {text!r}")
    if seen.setdefault(name, text) != text:
        raise DataError(f"ground truth {where}: {what} paths {seen[name]!r} and {text!r} both reduce to the file "
                        f"name {name!r}, which a submission cannot tell apart; rename one of them")
    return name


def course_mapping_to_dict(entries: list, where: str | os.PathLike = "(list)") -> dict[str, list[str]]:
    """The course's list ``[{"filename": query path, "gallery_images": [gallery paths]}]`` as
    ``{query file name: [gallery file names]}``; a clear :class:`DataError` for a malformed entry, a query listed
    twice, or two different paths with the same file name."""
    queries: dict[str, str] = {}
    gallery: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    listed: set[str] = set()
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or not isinstance(
                entry.get("gallery_images"), list) or not all(isinstance(g, str) for g in entry["gallery_images"]):
            raise DataError(f"ground truth {where}: entry {number} must be {{\"filename\": query path, "
                            f"\"gallery_images\": [gallery paths]}}, got {str(entry)[:120]}")
        if entry["filename"] in listed:
            raise DataError(f"ground truth {where}: query {entry['filename']!r} is listed twice")
        listed.add(entry["filename"])
        query = _file_name(entry["filename"], queries, "query", str(where))
        out[query] = [_file_name(g, gallery, "gallery", str(where)) for g in entry["gallery_images"]]
    return out


# --------------------------------------------------------------------------------------------------------------
# split: class folders -> competition layout
# --------------------------------------------------------------------------------------------------------------
@dataclass
class SplitSummary:
    """What :func:`split_dataset` wrote."""

    out_dir: Path
    classes: list[str]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    renamed: int = 0

    @property
    def totals(self) -> dict[str, int]:
        total = Counter()
        for per_split in self.counts.values():
            total.update(per_split)
        return dict(total)


def _place(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` with its timestamps (a copy, never a link: editing the split must not touch
    the source dataset)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _unique_names(items: Iterable[tuple[Path, str]]) -> tuple[dict[Path, str], int]:
    """Flat names for files coming from several class folders; ``<class>_<name>`` where basenames collide."""
    items = list(items)
    counts = Counter(p.name for p, _ in items)
    names: dict[Path, str] = {}
    used: set[str] = set()
    renamed = 0
    for path, label in items:
        name = path.name if counts[path.name] == 1 else f"{label}_{path.name}"
        if name != path.name:
            renamed += 1
        base, suffix, n = Path(name).stem, Path(name).suffix, 1
        while name in used:
            name = f"{base}_{n}{suffix}"
            n += 1
        used.add(name)
        names[path] = name
    return names, renamed


def split_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    train_per_class: int | None = None,
    query_per_class: int = 5,
    gallery_per_class: int = 20,
    seed: int = 0,
) -> SplitSummary:
    """Turn a class-folder dataset into the competition layout with disjoint images per class.

    Per class (after a seeded shuffle): ``query_per_class`` queries, then ``gallery_per_class`` gallery images,
    then ``train_per_class`` training images (``None``: all the rest). Writes ``test/ground_truth.json``
    (each query -> every gallery name of its class) and ``test/labels.json``. Deterministic for a seed.
    """
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise DataError(f"--out {out} must not be inside --source {source}")
    by_class: dict[str, list[Path]] = {}
    for path, label in list_class_folder(source):
        by_class.setdefault(label, []).append(path)

    selection: dict[str, list[tuple[Path, str]]] = {"query": [], "gallery": [], "training": []}
    summary = SplitSummary(out, sorted(by_class))
    for class_index, label in enumerate(sorted(by_class)):
        files = list(by_class[label])
        rng = np.random.default_rng([seed, class_index])
        order = rng.permutation(len(files))
        files = [files[i] for i in order]
        n_query = min(query_per_class, len(files))
        n_gallery = min(gallery_per_class, len(files) - n_query)
        rest = len(files) - n_query - n_gallery
        n_train = rest if train_per_class is None else min(train_per_class, rest)
        if n_query < query_per_class or n_gallery < gallery_per_class:
            logger.warning("class %s has only %d images: %d query, %d gallery", label, len(files), n_query, n_gallery)
        chunks = {
            "query": files[:n_query],
            "gallery": files[n_query : n_query + n_gallery],
            "training": files[n_query + n_gallery : n_query + n_gallery + n_train],
        }
        for part, paths in chunks.items():
            selection[part].extend((p, label) for p in paths)
        summary.counts[label] = {part: len(paths) for part, paths in chunks.items()}

    for sub in ("training", "test/query", "test/gallery"):
        target = out / sub
        if target.exists():
            shutil.rmtree(target)
    test_names, renamed = _unique_names(selection["query"] + selection["gallery"])
    summary.renamed = renamed
    labels: dict[str, dict[str, str]] = {"query": {}, "gallery": {}}
    for part in ("query", "gallery"):
        for path, label in selection[part]:
            name = test_names[path]
            _place(path, out / "test" / part / name)
            labels[part][name] = label
    for path, label in selection["training"]:
        _place(path, out / "training" / label / path.name)

    gallery_by_class: dict[str, list[str]] = {}
    for name, label in labels["gallery"].items():
        gallery_by_class.setdefault(label, []).append(name)
    ground_truth = {
        name: sorted(gallery_by_class.get(label, [])) for name, label in sorted(labels["query"].items())
    }
    write_json(out / "test" / "ground_truth.json", ground_truth)
    write_json(out / "test" / "labels.json", labels)
    return summary


# --------------------------------------------------------------------------------------------------------------
# Held-out classes: validation of open-set training, and a competition-layout split of unseen classes
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ValidationSplit:
    """Whole classes held out of training, with a query/gallery split of their images.

    ``held_out`` and ``training`` are class names; ``query`` and ``gallery`` the held-out images (every held-out
    class has at least one of each); ``labels`` maps each held-out image to its class. ``to_dict()`` is the JSON
    record ``{"held_out": [...], "training": [...]}``.
    """

    held_out: list[str]
    training: list[str]
    query: list[Path] = field(default_factory=list)
    gallery: list[Path] = field(default_factory=list)
    labels: dict[Path, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, list[str]]:
        return {"held_out": list(self.held_out), "training": list(self.training)}

    def ground_truth(self, names: dict[Path, str] | None = None) -> dict[str, list[str]]:
        """Each query -> the gallery images of its class (by ``names[path]``, default the path as text)."""
        name = (lambda p: names[p]) if names else str  # noqa: E731
        by_class: dict[str, list[str]] = {}
        for path in self.gallery:
            by_class.setdefault(self.labels[path], []).append(name(path))
        return {name(q): sorted(by_class.get(self.labels[q], [])) for q in self.query}


def validation_split(
    items: Sequence[tuple[Path, str]],
    fraction: float = 0.2,
    min_classes: int = 2,
    seed: int = 0,
    query_fraction: float = 0.25,
    out: str | os.PathLike | None = None,
    min_training: int = 2,
) -> ValidationSplit:
    """Hold out a seeded share of whole classes (open-set validation: identities training never sees).

    ``items`` are ``(path, class)`` pairs (:func:`list_class_folder`). ``round(fraction * classes)`` classes, at
    least ``min_classes`` (2), are drawn from the classes with 2 or more images (a query needs a relevant gallery
    image), while at least ``min_training`` (2) classes stay for training; ``fraction=0`` holds out nothing. In each held-out class a
    seeded ``query_fraction`` of the images (at least 1, at most all but 1) are queries, the rest gallery.
    With ``out``, writes the competition layout of the held-out classes: ``out/test/query/*``,
    ``out/test/gallery/*``, ``out/test/ground_truth.json``, ``out/test/labels.json`` and ``out/split.json``
    (``{"held_out": [...], "training": [...]}``); the training images stay where they are.
    Deterministic for a seed.
    """
    by_class: dict[str, list[Path]] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(Path(path))
    classes = sorted(by_class)
    eligible = [c for c in classes if len(by_class[c]) >= 2]
    n_held = 0
    if fraction > 0:
        n_held = min(max(min_classes, int(round(fraction * len(classes)))), len(eligible),
                     len(classes) - min_training)
    if fraction > 0 and n_held < min_classes:
        raise DataError(f"cannot hold out {min_classes} whole classes for validation: {len(classes)} classes, "
                        f"{len(eligible)} with 2 or more images (use --val-split images for closed-set data)")
    rng = np.random.default_rng(seed)
    held = sorted(eligible[i] for i in rng.permutation(len(eligible))[:n_held])
    split = ValidationSplit(held, [c for c in classes if c not in held])
    for label in held:
        files = sorted(by_class[label])
        files = [files[i] for i in rng.permutation(len(files))]
        n_query = min(len(files) - 1, max(1, int(round(query_fraction * len(files)))))
        split.query += files[:n_query]
        split.gallery += files[n_query:]
        split.labels.update({p: label for p in files})
    if out is not None:
        _write_validation_split(split, Path(out))
    return split


def _write_validation_split(split: ValidationSplit, out: Path) -> None:
    names, _ = _unique_names([(p, split.labels[p]) for p in split.query + split.gallery])
    for part, paths in (("query", split.query), ("gallery", split.gallery)):
        target = out / "test" / part
        if target.exists():
            shutil.rmtree(target)
        for path in paths:
            _place(path, target / names[path])
    labels = {part: {names[p]: split.labels[p] for p in paths}
              for part, paths in (("query", split.query), ("gallery", split.gallery))}
    write_json(out / "test" / "ground_truth.json", split.ground_truth(names))
    write_json(out / "test" / "labels.json", labels)
    write_json(out / "split.json", split.to_dict())
