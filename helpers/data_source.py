"""Bringing a competition's data in: a data source (``DATA_SOURCE`` in the notebooks) resolved to a local folder in
the competition layout, and a check of that layout in words a student understands.

A data source is one of:

- a folder: absolute, or relative to the working folder, else to the project root;
- a path on Google Drive (``/content/drive/...``): on Colab, Drive is mounted first when it is not yet;
- a ``.zip`` file, or an ``http(s)://`` URL of one (downloaded once): unpacked once into the data cache
  (:func:`helpers.settings.data_cache_dir`), safely (no absolute paths, no ``..``, no symbolic links, a size cap)
  and atomically (a folder is there only once complete); the competition folder is then found inside.

:func:`check_layout` says what a folder lacks; :func:`prepare_data` resolves and checks, and is what notebooks call.
Only the standard library is imported at module level.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import slug

logger = logging.getLogger(__name__)

#: Largest total uncompressed size a zip may declare: 50 GiB, far above a course competition (a few GB) and low
#: enough to stop a zip bomb before it fills a disk. ``max_unpacked_bytes`` overrides it per call.
DEFAULT_MAX_UNPACKED_BYTES = 50 * 2**30
#: Where Colab mounts Google Drive (``google.colab.drive.mount``); the user's files are under ``MyDrive/``.
DRIVE_MOUNT = "/content/drive"
#: Zip members never unpacked: macOS's resource-fork folder, and Finder's and Explorer's own files.
IGNORED_FOLDERS = frozenset({"__MACOSX"})
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db"})
#: Seconds a download waits for the server before it gives up.
DOWNLOAD_TIMEOUT_S = 60
#: The competition layout, as shown when something is missing.
EXPECTED_LAYOUT = (
    "DIR/training/<class>/*      labelled images, one folder per class (identity)\n"
    "DIR/test/query/*            the query images, directly in the folder\n"
    "DIR/test/gallery/*          the gallery images, directly in the folder\n"
    "DIR/test/ground_truth.json  optional: {query name: [relevant gallery names]}"
)
_LAYOUT_ONE_LINE = "expected DIR/training/<class>/*, DIR/test/query/*, DIR/test/gallery/*"
_CHUNK = 1 << 20


def _data_error(message: str) -> Exception:
    """A :class:`helpers.data.DataError` (imported here: :mod:`helpers.data` needs numpy and Pillow)."""
    from .data import DataError

    return DataError(message)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


# --------------------------------------------------------------------------------------------------------------
# Resolving a source
# --------------------------------------------------------------------------------------------------------------
def resolve_data_source(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
) -> Path:
    """The local competition folder of ``source``: a folder, a Google Drive path, a ``.zip`` path or URL.

    Zips are downloaded and unpacked once into ``cache_dir`` (default :func:`helpers.settings.data_cache_dir`); the
    competition folder is the unpacked folder when it has ``training/`` or ``test/``, else its one subfolder that
    does. A folder is returned as it is (or its one subfolder with ``training/`` or ``test/`` when it has neither).
    Raises :class:`helpers.data.DataError` saying what is wrong.
    """
    text = os.fspath(source).strip()
    if not text:
        raise _data_error("the data source is empty: give a folder, a .zip file or URL, or a Google Drive path")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return competition_root(unpack_once(download_once(text, cache), cache, max_unpacked_bytes))
    path = _locate(Path(text).expanduser())
    if path.is_dir():
        return competition_root(path.resolve(), strict=False)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise _data_error(f"the data source {path} is a file but not a zip archive: give a folder or a .zip")
        return competition_root(unpack_once(path.resolve(), cache, max_unpacked_bytes))
    from .settings import project_root

    where = "" if Path(text).expanduser().is_absolute() else f" (looked in {Path.cwd()} and {project_root()})"
    raise _data_error(f"data source not found: {text}{where}; give a folder, a .zip file or an http(s) URL of a zip")


def _default_cache() -> Path:
    from .settings import data_cache_dir

    return data_cache_dir()


def _locate(path: Path) -> Path:
    """``path`` itself when absolute or present here, else under the project root when present there."""
    if path.is_absolute():
        if path == Path(DRIVE_MOUNT) or Path(DRIVE_MOUNT) in path.parents:
            _mount_drive_for(path)
        return path
    if path.exists():
        return path
    from .settings import project_root

    in_project = project_root() / path
    return in_project if in_project.exists() else path


def _mount_drive_for(path: Path) -> None:
    """On Colab, mount Google Drive when ``path`` (under :data:`DRIVE_MOUNT`) is not there yet; off Colab a missing
    Drive path is a clear error."""
    if path.exists():
        return
    from .colab import in_colab

    if not in_colab():
        raise _data_error(f"{path} is a Google Drive path on Colab ({DRIVE_MOUNT}/...), which exists only in a Colab "
                          "notebook with Drive mounted; here give a local folder, a .zip file or an http(s) URL")
    if not os.path.ismount(DRIVE_MOUNT) and not (Path(DRIVE_MOUNT) / "MyDrive").is_dir():
        from google.colab import drive

        print(f"mounting Google Drive at {DRIVE_MOUNT} (Colab asks for permission)")
        drive.mount(DRIVE_MOUNT)
    if not path.exists():
        raise _data_error(f"{path} not found on Google Drive (mounted at {DRIVE_MOUNT}; your files are under "
                          f"{DRIVE_MOUNT}/MyDrive/)")


def _has_layout(folder: Path) -> bool:
    return (folder / "training").is_dir() or (folder / "test").is_dir()


def _entries(folder: Path) -> list[str]:
    """Visible entries of ``folder``, folders ending in ``/``, sorted; the ignored zip folders left out."""
    with os.scandir(folder) as entries:
        names = [e.name + ("/" if e.is_dir() else "") for e in entries
                 if not e.name.startswith(".") and e.name not in IGNORED_FOLDERS]
    return sorted(names)


def competition_root(folder: str | os.PathLike, strict: bool = True) -> Path:
    """``folder`` when it has ``training/`` or ``test/``, else its one subfolder that does (a zip usually holds one
    top folder). With ``strict``, a :class:`helpers.data.DataError` listing what is there when neither holds; else
    ``folder`` itself (:func:`check_layout` then says what is missing)."""
    folder = Path(folder)
    if _has_layout(folder):
        return folder
    names = _entries(folder)
    found = [folder / name.rstrip("/") for name in names if name.endswith("/") and _has_layout(folder / name)]
    if len(found) == 1:
        return found[0]
    if not strict:
        return folder
    if found:
        raise _data_error(f"{folder} holds several competition folders ({', '.join(p.name for p in found)}): give "
                          "the one to use as the data source")
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") or "nothing"
    raise _data_error(f"no competition folder in {folder}: neither it nor one of its subfolders has training/ or "
                      f"test/ (found: {shown}); {_LAYOUT_ONE_LINE}")


# --------------------------------------------------------------------------------------------------------------
# Downloading and unpacking, once
# --------------------------------------------------------------------------------------------------------------
class _Quiet:
    """Stands in for a tqdm bar where tqdm is not installed."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, description: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the requirements
        print(f"{description} ...")
        return _Quiet()
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024)


def download_once(url: str, cache: str | os.PathLike) -> Path:
    """The zip at ``url``, downloaded once into ``cache/downloads/`` (to ``<name>.part``, renamed when complete and
    a zip); a later call returns the file without downloading. A failed download is a
    :class:`helpers.data.DataError` naming the URL and the cause, and leaves no file behind."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise _data_error(f"unsupported data source URL {url}: only http:// and https:// URLs (or a local path)")
    name = Path(urllib.parse.unquote(parsed.path)).name or "data.zip"
    key = hashlib.sha1(url.encode("utf-8")).hexdigest()[:10]
    target = Path(cache) / "downloads" / f"{slug(Path(name).stem, 60)}-{key}.zip"
    if target.is_file():
        print(f"{url}: downloaded before, {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        _fetch(url, partial, name)
        if not zipfile.is_zipfile(partial):
            raise _data_error(f"the download from {url} is not a zip archive (a sharing page instead of the file? "
                              "use a direct download link)")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _fetch(url: str, out_path: Path, name: str) -> None:
    """Write the body of ``url`` to ``out_path``; a :class:`helpers.data.DataError` naming the URL on failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "image-retrieval-toolkit"})
    expected = received = 0
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(out_path, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0)
            bar = _progress(expected or None, f"downloading {name}")
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
    except urllib.error.HTTPError as exc:
        raise _data_error(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise _data_error(f"download of {url} failed: {getattr(exc, 'reason', None) or exc}") from None
    if expected and received != expected:
        raise _data_error(f"download of {url} is incomplete: {received} of {expected} bytes (try again)")


def unpack_once(
    zip_path: str | os.PathLike, cache: str | os.PathLike, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
) -> Path:
    """Unpack ``zip_path`` into ``cache/<zip stem>-<hash of its path, size and mtime>/`` unless done before; return
    that folder.

    Every member is checked first (:func:`_checked_members`); the files are written into a temporary sibling
    folder renamed into place when complete, so an interrupted unpack never leaves a folder that looks complete
    (its leftovers are removed by the next call once the process that wrote them is gone).
    """
    zip_path, cache = Path(zip_path), Path(cache)
    info = zip_path.stat()
    key = hashlib.sha1(f"{zip_path.resolve()}|{info.st_size}|{info.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache / f"{slug(zip_path.stem, 60)}-{key}"
    if target.is_dir():
        print(f"{zip_path.name}: unpacked before, {target}")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(cache, target.name)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _data_error(f"cannot open {zip_path} as a zip archive: {exc}") from None
    with archive:
        members = _checked_members(archive, zip_path, cache, max_unpacked_bytes)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=cache))
        try:
            _extract_all(archive, members, partial, zip_path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    try:
        os.rename(partial, target)
    except OSError:  # another process finished the same zip first
        shutil.rmtree(partial, ignore_errors=True)
        if not target.is_dir():
            raise
    print(f"{zip_path.name}: unpacked into {target}")
    return target


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: keep what might be in use
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_leftovers(cache: Path, name: str) -> None:
    """Remove the temporary folders of interrupted unpacks of ``name`` whose process is gone."""
    prefix = f".{name}.partial-"
    for leftover in cache.glob(prefix + "*"):
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
            logger.info("removed %s, left by an interrupted unpack", leftover)


def _member_parts(info: zipfile.ZipInfo) -> list[str]:
    return [part for part in info.filename.replace("\\", "/").split("/") if part]


def _checked_members(
    archive: zipfile.ZipFile, zip_path: Path, cache: Path, max_unpacked_bytes: int
) -> list[zipfile.ZipInfo]:
    """The members to unpack (``__MACOSX/``, ``.DS_Store`` left out). Refuses, naming the member, an absolute path,
    a ``..`` or a symbolic link; refuses a declared total over ``max_unpacked_bytes`` or the free disk space."""
    members, total = [], 0
    for info in archive.infolist():
        parts = _member_parts(info)
        if not parts or IGNORED_FOLDERS.intersection(parts) or parts[-1] in IGNORED_FILES:
            continue
        name = info.filename.replace("\\", "/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            raise _data_error(f"{zip_path}: member {info.filename!r} has an absolute path; refused")
        if ".." in parts:
            raise _data_error(f"{zip_path}: member {info.filename!r} climbs out of the folder with '..'; refused")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise _data_error(f"{zip_path}: member {info.filename!r} is a symbolic link; refused")
        members.append(info)
        total += info.file_size
    if total > max_unpacked_bytes:
        raise _data_error(f"{zip_path} unpacks to {_size(total)}, over the limit of {_size(max_unpacked_bytes)} "
                          "(max_unpacked_bytes raises it for a zip you trust)")
    free = shutil.disk_usage(cache).free
    if total > free:
        raise _data_error(f"{zip_path} unpacks to {_size(total)} but only {_size(free)} are free in {cache} (set "
                          "RETRIEVAL_DATA_CACHE to a folder on a larger disk)")
    return members


def _extract_all(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, zip_path: Path) -> None:
    bar = _progress(sum(m.file_size for m in members), f"unpacking {zip_path.name}")
    try:
        for info in members:
            try:
                _extract_member(archive, info, dest)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
                raise _data_error(f"{zip_path}: cannot unpack member {info.filename!r}: {exc}") from None
            bar.update(info.file_size)
    finally:
        bar.close()


def _extract_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    """Write one checked member under ``dest`` (its declared size and CRC are enforced by :mod:`zipfile`)."""
    target = dest.joinpath(*_member_parts(info))
    if info.filename.replace("\\", "/").endswith("/"):
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


# --------------------------------------------------------------------------------------------------------------
# Checking the layout
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LayoutReport:
    """What :func:`check_layout` found in a competition folder: counts, ``problems`` (the folder cannot be used as
    it is) and ``notes`` (worth knowing, not blocking). ``ok`` when there is no problem."""

    root: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    training_classes: int = 0
    training_images: int = 0
    queries: int = 0
    gallery_images: int = 0
    has_ground_truth: bool = False
    need_training: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A short report: the counts, each problem and note, and the expected layout when something is missing."""
        truth = "test/ground_truth.json (runs are scored on the test)" if self.has_ground_truth else "none"
        lines = [f"data: {self.root}",
                 f"  training/      {_count(self.training_classes, 'class')}, {_count(self.training_images, 'image')}",
                 f"  test/query/    {_count(self.queries, 'image')}",
                 f"  test/gallery/  {_count(self.gallery_images, 'image')}",
                 f"  ground truth   {truth}"]
        lines += [f"  missing: {problem}" for problem in self.problems]
        lines += [f"  note: {note}" for note in self.notes]
        if self.problems:
            lines += ["expected layout:", *("  " + line for line in EXPECTED_LAYOUT.splitlines())]
        lines.append("ready" if self.ok else f"not ready: {len(self.problems)} problem(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def error(self) -> str:
        """Every problem on one line (the message of the :class:`helpers.data.DataError` of :func:`prepare_data`)."""
        return f"{self.root} is not ready: {'; '.join(self.problems)} ({_LAYOUT_ONE_LINE})"


def check_layout(root: str | os.PathLike, need_training: bool = False) -> LayoutReport:
    """Check a competition folder and say, in words, what is missing: ``training/`` or its class folders, classes
    with one image, ``test/query/`` and ``test/gallery/`` or their images, the ground truth (a note: without it,
    scores come from a class-disjoint validation split of ``training/``, which needs 2 classes of 2 or more
    images). Without ``need_training`` (retrieval only), a folder whose test has ground truth needs no ``training/``."""
    report = LayoutReport(Path(root), need_training=need_training)
    if not report.root.is_dir():
        report.problems.append(f"the folder {report.root} does not exist")
        return report
    from .data import _find_test_dir

    test_dir = _find_test_dir(report.root)  # DIR/test, or DIR itself when it holds query/ and gallery/ (as retrieve)
    _check_ground_truth(test_dir, report)
    _check_training(report.root / "training", report)
    if test_dir.is_dir():
        for kind in ("query", "gallery"):
            _check_test_folder(test_dir / kind, kind, report)
    else:
        report.problems.append("no test/ folder: the query and gallery images go directly in test/query/ and "
                               "test/gallery/")
    if report.problems:
        from .data import _layout_hint

        report.notes.append(f"{report.root} holds: {_names(_entries(report.root), 12) or 'nothing'}")
        hint = _layout_hint(report.root).lstrip(". ")
        if hint and not test_dir.is_dir():
            report.notes.append(hint)
    return report


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_training(folder: Path, report: LayoutReport) -> None:
    from .data import scan_folder

    if not folder.is_dir():
        message = "no training/ folder: the labelled images go in training/<class>/<image>, one folder per class " \
                  "(identity)"
        if report.has_ground_truth and not report.need_training:
            report.notes.append(message + " (not needed here: test/ has ground truth; training and select need it)")
        else:
            report.problems.append(message)
        return
    listing = scan_folder(folder)
    if not listing.folders:
        what = f"holds {len(listing.images)} images but no class folders" if listing.images else "is empty"
        report.problems.append(f"training/ {what}: put each image in training/<class>/, the folder name is its class")
        return
    counts = {sub.name: len(scan_folder(sub).images) for sub in listing.folders}
    report.training_classes = sum(1 for n in counts.values() if n)
    report.training_images = sum(counts.values())
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        report.notes.append(f"{len(empty)} class folder(s) of training/ hold no image and are ignored: {_names(empty)}")
    single = [name for name, n in counts.items() if n == 1]
    if single:
        report.notes.append(f"{len(single)} training class(es) have only one image ({_names(single)}): they give "
                            "no pair of the same class to train on and cannot be held out for validation")
    usable = sum(1 for n in counts.values() if n >= 2)
    if usable < 2:
        message = (f"training/ has {usable} class(es) with 2 or more images; the validation split needs at least 2 "
                   "such classes")
        if report.has_ground_truth:
            report.notes.append(message + " (not needed here: test/ has ground truth)")
        else:
            report.problems.append(message)


def _check_test_folder(folder: Path, kind: str, report: LayoutReport) -> None:
    from .data import IMAGE_EXTENSIONS, scan_folder

    where = f"test/{kind}/"
    if not folder.is_dir():
        report.problems.append(f"no {where} folder: the {kind} images go directly in {where} "
                               f"(e.g. {where}{'q1' if kind == 'query' else 'g1'}.jpg)")
        return
    listing = scan_folder(folder)
    if kind == "query":
        report.queries = len(listing.images)
    else:
        report.gallery_images = len(listing.images)
    if not listing.images:
        inside = (f": it holds {len(listing.folders)} subfolder(s), but the images must sit directly in {where}"
                  if listing.folders else f" (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        report.problems.append(f"{where} holds no image{inside}")
    if listing.skipped:
        path, reason = listing.skipped[0]
        report.notes.append(f"{len(listing.skipped)} entries of {where} cannot be used (e.g. {path.name}: {reason})")


def _check_ground_truth(test_dir: Path, report: LayoutReport) -> None:
    from .data import DataError, load_ground_truth

    path = test_dir / "ground_truth.json"
    if not path.is_file():
        note = ("no test/ground_truth.json: scores will come from a class-disjoint validation split of training/ "
                "(only the server scores the test)")
        mapping = [p for p in (test_dir / "query_to_gallery_mapping.json", test_dir.parent /
                               "query_to_gallery_mapping.json") if p.is_file()]
        if mapping:
            note += f"; to score on the test instead, copy {mapping[0].name} to test/ground_truth.json"
        report.notes.append(note)
        return
    try:
        load_ground_truth(path)
    except DataError as exc:
        report.problems.append(f"test/ground_truth.json cannot be used: {exc}")
        return
    report.has_ground_truth = True


def prepare_data(
    source: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    need_training: bool = False,
) -> Path:
    """Resolve ``source`` (:func:`resolve_data_source`), check its layout (:func:`check_layout`), print the summary
    and return the competition folder; a :class:`helpers.data.DataError` with every problem when it is not ready."""
    root = resolve_data_source(source, cache_dir, max_unpacked_bytes=max_unpacked_bytes)
    report = check_layout(root, need_training=need_training)
    print(report.summary())
    if not report.ok:
        raise _data_error(report.error())
    return root
