"""helpers.data_source: a data source (folder, Drive path, .zip path or URL) brought in once, safely, atomically;
the layout checked in words; the data-check verb."""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
import types
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
from PIL import Image

from helpers import data_source as ds
from helpers import settings
from helpers.cli import main
from helpers.data import DataError


def _png(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def make_competition(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl"), ground_truth: bool = False) -> Path:
    """A tiny competition folder: 2 training images per class, 1 query, 2 gallery images."""
    for number, name in enumerate(classes):
        for i in range(2):
            _png(root / "training" / name / f"{name}{i}.png", 40 * number + i)
    _png(root / "test" / "query" / "q1.png", 1)
    _png(root / "test" / "gallery" / "g1.png", 2)
    _png(root / "test" / "gallery" / "g2.png", 3)
    if ground_truth:
        (root / "test" / "ground_truth.json").write_text('{"q1.png": ["g1.png"]}', encoding="utf-8")
    return root


def make_zip(zip_path: Path, folder: Path | None, prefix: str = "", extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        if folder is not None:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, prefix + path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return zip_path


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


@pytest.fixture
def comp(tmp_path: Path) -> Path:
    return make_competition(tmp_path / "comp")


# --------------------------------------------------------------------------------------------------------------
# Folders and the cache setting
# --------------------------------------------------------------------------------------------------------------
def test_a_folder_is_found_absolute_then_in_the_working_folder_then_in_the_project(comp, tmp_path, monkeypatch):
    assert ds.resolve_data_source(comp) == comp.resolve()
    monkeypatch.chdir(tmp_path)
    assert ds.resolve_data_source("comp") == comp.resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(settings, "project_root", lambda start=None: tmp_path)
    assert ds.resolve_data_source("comp") == comp.resolve()
    with pytest.raises(DataError, match=r"data source not found: nowhere \(looked in .*elsewhere"):
        ds.resolve_data_source("nowhere")


def test_a_folder_holding_one_competition_folder_gives_that_folder(comp, tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    shutil.move(comp, outer / "comp")
    assert ds.resolve_data_source(outer) == (outer / "comp").resolve()


def test_the_data_cache_comes_from_the_environment_else_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_DATA_CACHE", str(tmp_path / "d"))
    assert settings.data_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("RETRIEVAL_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.data_cache_dir() == tmp_path / "xdg" / "image-retrieval" / "datasets"


# --------------------------------------------------------------------------------------------------------------
# Zips
# --------------------------------------------------------------------------------------------------------------
def test_a_zip_with_a_top_folder_and_macos_files_is_unpacked_to_its_competition_folder(comp, tmp_path):
    archive = make_zip(tmp_path / "Competition 2024.zip", comp, "comp/",
                       {"__MACOSX/comp/test/query/._q1.png": b"fork", "comp/.DS_Store": b"finder",
                        "comp/test/.DS_Store": b"finder"})
    cache = tmp_path / "cache"
    root = ds.resolve_data_source(archive, cache)
    unpacked = root.parent
    assert root.name == "comp" and unpacked.parent == cache and unpacked.name.startswith("Competition-2024-")
    assert visible(unpacked) == ["comp"]  # no __MACOSX
    assert not list(unpacked.rglob(".DS_Store"))
    report = ds.check_layout(root)
    assert report.ok and (report.training_classes, report.training_images, report.queries,
                          report.gallery_images) == (3, 6, 1, 2)


def test_a_zip_without_a_top_folder_is_its_own_competition_folder(comp, tmp_path):
    root = ds.resolve_data_source(make_zip(tmp_path / "flat.zip", comp), tmp_path / "cache")
    assert root.parent == tmp_path / "cache" and visible(root) == ["test", "training"]


def test_a_zip_is_unpacked_only_once(comp, tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "comp.zip", comp, "comp/")
    first = ds.resolve_data_source(archive, tmp_path / "cache")
    stamp = (first / "test" / "query" / "q1.png").stat().st_mtime_ns

    def no_second_unpack(*args):
        raise AssertionError("unpacked a second time")

    monkeypatch.setattr(ds, "_extract_member", no_second_unpack)
    assert ds.resolve_data_source(archive, tmp_path / "cache") == first
    assert (first / "test" / "query" / "q1.png").stat().st_mtime_ns == stamp
    assert len(visible(tmp_path / "cache")) == 1


def test_a_zip_without_a_competition_folder_says_what_it_holds(tmp_path):
    archive = make_zip(tmp_path / "photos.zip", None, extra={"cats/a.png": b"x", "notes.txt": b"x"})
    with pytest.raises(DataError, match=r"no competition folder .*found: cats/, notes\.txt.*expected DIR/training"):
        ds.resolve_data_source(archive, tmp_path / "cache")


@pytest.mark.parametrize("member, why", [
    ("../evil.png", "climbs out"),
    ("comp/test/../../../evil.png", "climbs out"),
    ("/etc/evil.png", "absolute path"),
    ("C:/Windows/evil.png", "absolute path"),
    ("comp\\..\\..\\evil.png", "climbs out"),
])
def test_members_that_leave_the_folder_are_refused_by_name(comp, tmp_path, member, why):
    archive = make_zip(tmp_path / "bad.zip", comp, "comp/", {member: b"x"})
    with pytest.raises(DataError, match=why) as caught:
        ds.resolve_data_source(archive, tmp_path / "cache")
    assert repr(member) in str(caught.value)
    assert visible(tmp_path / "cache") == [] and not (tmp_path / "evil.png").exists()


def test_a_symbolic_link_member_is_refused_by_name(comp, tmp_path):
    archive = make_zip(tmp_path / "link.zip", comp, "comp/")
    link = zipfile.ZipInfo("comp/training/cat/link.png")
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(archive, "a") as handle:
        handle.writestr(link, "/etc/passwd")
    with pytest.raises(DataError, match=r"'comp/training/cat/link.png' is a symbolic link; refused"):
        ds.resolve_data_source(archive, tmp_path / "cache")
    assert visible(tmp_path / "cache") == []


def test_a_zip_over_the_size_cap_or_the_free_space_is_refused(comp, tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "big.zip", comp, "comp/", {"comp/padding.bin": bytes(100_000)})
    with pytest.raises(DataError, match=r"unpacks to 9\d\.\d KiB, over the limit of 50\.0 KiB"):
        ds.resolve_data_source(archive, tmp_path / "cache", max_unpacked_bytes=50 * 1024)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ds.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DataError, match=r"only 1000 B are free .*RETRIEVAL_DATA_CACHE"):
        ds.resolve_data_source(archive, tmp_path / "cache")
    assert visible(tmp_path / "cache") == []


def _interrupt_after_first_member(monkeypatch) -> None:
    real = ds._extract_member
    calls = []

    def extract(archive, info, dest):
        if calls:
            raise KeyboardInterrupt
        calls.append(info.filename)
        real(archive, info, dest)

    monkeypatch.setattr(ds, "_extract_member", extract)


def test_an_interrupted_unpack_leaves_nothing_that_is_reused(comp, tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "comp.zip", comp, "comp/")
    cache = tmp_path / "cache"
    with monkeypatch.context() as patch:
        _interrupt_after_first_member(patch)
        with pytest.raises(KeyboardInterrupt):
            ds.resolve_data_source(archive, cache)
    assert list(cache.iterdir()) == []  # the partial folder was removed
    root = ds.resolve_data_source(archive, cache)
    assert ds.check_layout(root).ok and root.parent.name.startswith("comp-")


def test_a_killed_unpack_leaves_only_a_hidden_partial_folder_removed_next_time(comp, tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "comp.zip", comp, "comp/")
    cache = tmp_path / "cache"
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with monkeypatch.context() as patch:  # a kill: no clean-up runs, the process is gone afterwards
        _interrupt_after_first_member(patch)
        patch.setattr(ds.shutil, "rmtree", lambda *args, **kwargs: None)
        patch.setattr(ds.os, "getpid", lambda: process.pid)
        with pytest.raises(KeyboardInterrupt):
            ds.resolve_data_source(archive, cache)
    leftovers = list(cache.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and ".partial-" in leftovers[0].name
    assert visible(cache) == []  # nothing that looks like an unpacked zip
    root = ds.resolve_data_source(archive, cache)
    assert [p.name for p in cache.iterdir()] == [root.parent.name]
    report = ds.check_layout(root)
    assert report.ok and report.training_images == 6 and report.gallery_images == 2


# --------------------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def web(tmp_path):
    """A local HTTP server over ``tmp_path/www`` in a thread; yields (folder, base URL, requested paths)."""
    folder = tmp_path / "www"
    folder.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


def test_a_zip_url_is_downloaded_once_into_the_data_cache(comp, tmp_path, monkeypatch, web):
    folder, base, requested = web
    make_zip(folder / "comp.zip", comp, "comp/")
    monkeypatch.setenv("RETRIEVAL_DATA_CACHE", str(tmp_path / "cache"))
    root = ds.resolve_data_source(f"{base}/comp.zip")
    assert requested == ["/comp.zip"] and ds.check_layout(root).ok
    assert (tmp_path / "cache") in root.parents
    downloads = list((tmp_path / "cache" / "downloads").iterdir())
    assert len(downloads) == 1 and downloads[0].suffix == ".zip"
    assert ds.resolve_data_source(f"{base}/comp.zip") == root
    assert requested == ["/comp.zip"]


def test_a_failed_download_names_the_url_and_leaves_no_file(tmp_path, web):
    folder, base, _ = web
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"download of {base}/missing\.zip failed: HTTP 404"):
        ds.resolve_data_source(f"{base}/missing.zip", cache)
    (folder / "page.zip").write_text("<html>a sharing page</html>", encoding="utf-8")
    with pytest.raises(DataError, match=r"page\.zip is not a zip archive"):
        ds.resolve_data_source(f"{base}/page.zip", cache)
    assert list((cache / "downloads").iterdir()) == []
    with pytest.raises(DataError, match=r"unsupported data source URL ftp://x/y\.zip"):
        ds.resolve_data_source("ftp://x/y.zip", cache)


# --------------------------------------------------------------------------------------------------------------
# Google Drive
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(Path(ds.DRIVE_MOUNT).exists(), reason="Google Drive is mounted here")
def test_a_drive_path_off_colab_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("helpers.colab.in_colab", lambda: False)
    with pytest.raises(DataError, match=r"/content/drive/MyDrive/comp\.zip is a Google Drive path on Colab"):
        ds.resolve_data_source("/content/drive/MyDrive/comp.zip", tmp_path / "cache")


@pytest.mark.skipif(Path(ds.DRIVE_MOUNT).exists(), reason="Google Drive is mounted here")
def test_on_colab_drive_is_mounted_before_the_path_is_read(tmp_path, monkeypatch):
    mounted = []
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mounted.append
    colab = types.ModuleType("google.colab")
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setattr("helpers.colab.in_colab", lambda: True)
    with pytest.raises(DataError, match=r"comp not found on Google Drive \(mounted at /content/drive"):
        ds.resolve_data_source("/content/drive/MyDrive/comp", tmp_path / "cache")
    assert mounted == ["/content/drive"]


# --------------------------------------------------------------------------------------------------------------
# The layout check
# --------------------------------------------------------------------------------------------------------------
def test_a_complete_folder_without_ground_truth_is_ready_with_a_note(comp):
    report = ds.check_layout(comp)
    assert report.ok and not report.has_ground_truth
    assert any("class-disjoint validation split of training/" in note for note in report.notes)
    assert "ready" in report.summary() and "expected layout" not in str(report)


@pytest.mark.parametrize("damage, expected", [
    (lambda r: shutil.rmtree(r / "training"), "no training/ folder"),
    (lambda r: (shutil.rmtree(r / "training"), _png(r / "training" / "x.png")),
     "training/ holds 1 images but no class folders"),
    (lambda r: (shutil.rmtree(r / "training"), (r / "training").mkdir()), "training/ is empty"),
    (lambda r: (shutil.rmtree(r / "training" / "dog"), shutil.rmtree(r / "training" / "owl")),
     "training/ has 1 class(es) with 2 or more images; the validation split needs at least 2"),
    (lambda r: shutil.rmtree(r / "test" / "query"), "no test/query/ folder"),
    (lambda r: [p.unlink() for p in (r / "test" / "gallery").iterdir()], "test/gallery/ holds no image"),
    (lambda r: (shutil.move(r / "test" / "query" / "q1.png", r / "q1.png"), _png(r / "test" / "query" / "a" / "q.png")),
     "test/query/ holds no image: it holds 1 subfolder(s)"),
    (lambda r: shutil.rmtree(r / "test"), "no test/ folder"),
    (lambda r: (r / "test" / "ground_truth.json").write_text("[1]"), "test/ground_truth.json cannot be used"),
])
def test_each_missing_piece_is_named(comp, damage, expected):
    damage(comp)
    report = ds.check_layout(comp)
    assert not report.ok
    assert any(expected in problem for problem in report.problems), report.problems
    assert "expected layout:" in report.summary() and "DIR/test/gallery/*" in report.summary()
    assert "\n" not in report.error() and expected in report.error()


def test_class_folders_instead_of_the_layout_get_the_split_command(tmp_path):
    for name in ("cat", "dog"):
        _png(tmp_path / "photos" / name / "1.png")
    report = ds.check_layout(tmp_path / "photos")
    assert not report.ok and any("python -m helpers split --source" in note for note in report.notes)


def test_classes_with_one_image_are_a_note_and_ground_truth_lifts_the_two_class_need(tmp_path):
    root = make_competition(tmp_path / "one", classes=("cat",), ground_truth=True)
    _png(root / "training" / "solo" / "only.png")
    report = ds.check_layout(root)
    assert report.ok and report.has_ground_truth and report.training_classes == 2
    assert any("only one image (solo)" in note for note in report.notes)
    assert any("not needed here: test/ has ground truth" in note for note in report.notes)
    (root / "test" / "ground_truth.json").unlink()
    assert not ds.check_layout(root).ok


def test_prepare_data_prints_the_report_and_raises_with_every_problem(comp, capsys):
    assert ds.prepare_data(comp) == comp.resolve()
    assert "ready" in capsys.readouterr().out
    shutil.rmtree(comp / "training")
    shutil.rmtree(comp / "test" / "query")
    with pytest.raises(DataError, match=r"no training/ folder.*; no test/query/ folder"):
        ds.prepare_data(comp)
    assert "not ready: 2 problem(s)" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# The data-check verb
# --------------------------------------------------------------------------------------------------------------
def test_data_check_exits_0_when_ready_and_2_with_one_error_line(comp, tmp_path, capsys):
    archive = make_zip(tmp_path / "comp.zip", comp, "comp/")
    assert main(["data-check", str(archive), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "3 classes, 6 images" in out and "use it: python -m helpers select --data" in out
    shutil.rmtree(comp / "test" / "gallery")
    assert main(["data-check", str(comp)]) == 2
    captured = capsys.readouterr()
    assert "missing: no test/gallery/ folder" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "test/gallery/" in captured.err
    assert main(["data-check", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.startswith("error: data source not found")
    assert main(["data-check", str(comp), "--max-unpacked-gb", "0"]) == 2


def test_the_test_folder_itself_is_accepted_as_retrieve_accepts_it(tmp_path):
    folder = make_competition(tmp_path / "comp", ground_truth=True)
    report = ds.check_layout(folder / "test")  # query/ and gallery/ directly inside, as `retrieve --data DIR/test`
    assert report.ok, report.problems
    assert (report.queries, report.gallery_images, report.has_ground_truth) == (1, 2, True)
