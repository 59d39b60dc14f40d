"""Listing, robust loading of real-world images, retrieval sets and ``split``."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers.data import (
    DataError,
    ImageLoadError,
    class_folders,
    list_class_folder,
    list_images,
    load_image,
    load_retrieval_set,
    scan_folder,
    split_dataset,
)
from tests.conftest import shared_dataset


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A real photo (an Imagenette validation image)."""
    root = shared_dataset("imagenette-val")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    return Image.open(sorted(first_class.iterdir())[0]).convert("RGB")


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory, photo):
    """Valid images in every awkward mode beside every kind of broken file."""
    folder = tmp_path_factory.mktemp("messy")
    photo.save(folder / "plain photo é.JPG")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    photo.convert("LA").save(folder / "la.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.gif")
    photo.save(folder / "lossless.webp")
    photo.save(folder / "scan.tiff")
    photo.save(folder / "bitmap.bmp")
    # EXIF orientation 6: the stored pixels are landscape, the image is meant to be seen rotated (portrait).
    landscape = photo.resize((120, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    landscape.save(folder / "rotated.jpg", exif=exif)
    # Broken files
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image")
    full = (folder / "plain photo é.JPG").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 3])
    corrupt = bytearray(full)
    corrupt[200:2000] = b"\x00" * 1800
    (folder / "corrupt.jpg").write_bytes(bytes(corrupt))
    # Ignored entirely
    (folder / ".DS_Store").write_bytes(b"\x00\x01")
    (folder / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07")
    (folder / "readme.txt").write_text("not listed")
    return folder


def test_listing_ignores_hidden_and_matches_extensions_case_insensitively(tmp_path, shapes):
    drawn = Image.open(shapes / "square-warm" / "000.png")
    for name in ("plain photo é.JPG", "scan.tiff", "lossless.webp", "bitmap.bmp"):
        drawn.save(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "readme.txt").write_text("not listed")
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["bitmap.bmp", "lossless.webp", "plain photo é.JPG", "scan.tiff"]
    assert "plain photo é.JPG" in names and "scan.tiff" in names and "lossless.webp" in names
    assert not any(n.startswith(".") for n in names)
    assert "readme.txt" not in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", ["plain photo é.JPG", "cmyk.jpg", "grey16.png", "rgba.png", "la.png",
                                  "palette.gif", "lossless.webp", "scan.tiff", "bitmap.bmp"])
def test_every_valid_mode_loads_as_rgb(messy_folder, photo, name):
    image = load_image(messy_folder / name)
    assert image.mode == "RGB"
    assert image.size == photo.size


def test_sixteen_bit_is_scaled_not_clipped(messy_folder, photo):
    grey = np.asarray(load_image(messy_folder / "grey16.png"))[..., 0].astype(int)
    reference = np.asarray(photo.convert("L")).astype(int)
    assert np.abs(grey - reference).max() <= 1  # clipping would turn almost everything white (255)


def test_transparency_is_composited_on_white(messy_folder, photo):
    rgba = np.asarray(load_image(messy_folder / "rgba.png")).astype(float)
    original = np.asarray(photo).astype(float)
    expected = original * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(rgba - expected).mean() < 2.0


def test_exif_orientation_is_applied(messy_folder):
    assert load_image(messy_folder / "rotated.jpg").size == (60, 120)


@pytest.mark.parametrize(
    "name, reason",
    [("empty.jpg", "empty file"), ("notes.jpg", "not an image"), ("truncated.jpg", "truncated"),
     ("corrupt.jpg", "corrupt")],
)
def test_broken_files_raise_with_a_reason(messy_folder, name, reason):
    with pytest.raises(ImageLoadError) as info:
        load_image(messy_folder / name)
    assert reason in info.value.reason
    assert info.value.path.name == name


def test_pixel_limit_refuses_decompression_bombs(messy_folder):
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(messy_folder / "plain photo é.JPG", max_pixels=1000)


def test_retrieval_max_pixels_raises_the_limit_as_well_as_lowering_it(messy_folder, monkeypatch):
    from PIL import Image as PILImage

    photo_path = messy_folder / "plain photo é.JPG"
    width, height = PILImage.open(photo_path).size
    # Stand in for a photo above Pillow's own default limit: Pillow's limit below the photo, ours above it.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", width * height // 3)
    monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", str(width * height * 2))
    assert load_image(photo_path).size == (width, height)
    assert PILImage.MAX_IMAGE_PIXELS == width * height // 3  # Pillow's setting is restored afterwards
    monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", str(width * height - 1))
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(photo_path)
    monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", "lots")
    with pytest.raises(DataError, match="RETRIEVAL_MAX_PIXELS"):
        load_image(photo_path)


def test_draft_size_for_follows_the_preprocessing():
    from helpers.data import draft_size_for
    from helpers.models.registry import Preprocessing

    assert draft_size_for(Preprocessing(224, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)) == 256
    assert draft_size_for(Preprocessing(224, (0.5,) * 3, (0.5,) * 3, resize_mode="squash")) == 224


def test_draft_mode_keeps_at_least_the_requested_size(messy_folder):
    big = load_image(messy_folder / "plain photo é.JPG")
    draft = load_image(messy_folder / "plain photo é.JPG", draft_size=64)
    assert min(draft.size) >= 64 and draft.size[0] <= big.size[0]


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_retrieval_set(tmp_path / "nope")
    (tmp_path / "test" / "query").mkdir(parents=True)
    with pytest.raises(DataError, match="gallery folder not found"):
        load_retrieval_set(tmp_path)
    (tmp_path / "test" / "gallery").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        load_retrieval_set(tmp_path)


def test_split_is_disjoint_deterministic_and_writes_ground_truth(tmp_path, shapes):
    # every class folder holds 000.png-011.png: basename collisions are certain
    a = split_dataset(shapes, tmp_path / "a", train_per_class=3, query_per_class=2, gallery_per_class=6, seed=7)
    split_dataset(shapes, tmp_path / "b", train_per_class=3, query_per_class=2, gallery_per_class=6, seed=7)
    assert a.totals == {"query": 8, "gallery": 24, "training": 12}
    assert a.renamed > 0
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert listing(tmp_path / "a") == listing(tmp_path / "b")

    data = load_retrieval_set(tmp_path / "a")
    query, gallery = set(data.query_names), set(data.gallery_names)
    assert len(query) == 8 and len(gallery) == 24 and not (query & gallery)
    labels = json.loads((tmp_path / "a" / "test" / "labels.json").read_text())
    for q, relevant in data.ground_truth.items():
        assert len(relevant) == 6
        assert all(labels["gallery"][g] == labels["query"][q] for g in relevant)
    # the same source file never lands in two parts: compare pixel content of query vs training
    training = list_class_folder(tmp_path / "a" / "training")
    assert len(training) == 12
    hashes = lambda paths: {hash(Image.open(p).tobytes()) for p in paths}  # noqa: E731
    assert not hashes(data.query_paths) & hashes([p for p, _ in training])


def test_split_different_seed_changes_the_selection(tmp_path, shapes):
    a = split_dataset(shapes, tmp_path / "a", train_per_class=0, query_per_class=1, gallery_per_class=1, seed=0)
    b = split_dataset(shapes, tmp_path / "b", train_per_class=0, query_per_class=1, gallery_per_class=1, seed=1)
    names = lambda s: sorted(p.name for p in (s.out_dir / "test" / "query").iterdir())  # noqa: E731
    assert names(a) != names(b)


def test_split_refuses_output_inside_source(tmp_path, demo_data):
    with pytest.raises(DataError):
        split_dataset(demo_data / "training", demo_data / "training" / "out")


def test_skips_are_logged_by_name(messy_folder, caplog):
    from helpers.data import report_skipped

    with caplog.at_level(logging.WARNING, logger="helpers"):
        report_skipped([(messy_folder / "empty.jpg", "empty file (0 bytes)")])
    assert "empty.jpg" in caplog.text and "1 images skipped" in caplog.text


# --------------------------------------------------------------------------------------------------------------
# Listing: what cannot be used is reported with its reason, never silently left out, never fatal
# --------------------------------------------------------------------------------------------------------------
UNDECODABLE = b"caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8


def _awkward_folder(folder, image_source):
    """``good.png`` beside every kind of entry that looks like an image but cannot be used."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(image_source, folder / "good.png")
    with open(os.path.join(os.fsencode(folder), UNDECODABLE), "wb") as handle:
        handle.write((folder / "good.png").read_bytes())
    (folder / "album.jpg").mkdir()
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink("missing.png", folder / "gone.png")
    os.mkfifo(folder / "pipe.png")
    (folder / ".hidden.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    return folder


@pytest.fixture
def drawn_image(shapes):
    return shapes / "circle-warm" / "000.png"


def test_scan_reports_undecodable_names_image_named_folders_links_and_fifos(tmp_path, drawn_image):
    folder = _awkward_folder(tmp_path / "mixed", drawn_image)
    listing = scan_folder(folder)
    assert [p.name for p in listing.images] == ["good.png"]
    reasons = {os.fsencode(p.name): reason for p, reason in listing.skipped}
    assert reasons == {
        UNDECODABLE: "name is not valid UTF-8 (rename it)",
        b"album.jpg": "a folder named like an image",
        b"loop.jpg": "symbolic link loop",
        b"gone.png": "broken symbolic link (its target is missing)",
        b"pipe.png": "not a regular file (a FIFO)",
    }


def test_list_images_logs_each_skipped_entry_with_a_printable_name(tmp_path, drawn_image, caplog):
    folder = _awkward_folder(tmp_path / "mixed", drawn_image)
    with caplog.at_level(logging.WARNING, logger="helpers"):
        assert [p.name for p in list_images(folder)] == ["good.png"]
    assert "caf\\xe9.jpg: name is not valid UTF-8" in caplog.text
    for name in ("album.jpg", "loop.jpg", "gone.png", "pipe.png"):
        assert f"{name}: " in caplog.text


def test_retrieval_set_skips_an_undecodable_name_and_its_names_serialise(tmp_path, shapes_split):
    data = tmp_path / "data"
    shutil.copytree(shapes_split, data)
    gallery = data / "test" / "gallery"
    with open(os.path.join(os.fsencode(gallery), UNDECODABLE), "wb") as handle:
        handle.write(next(gallery.iterdir()).read_bytes())
    dataset = load_retrieval_set(data)
    assert len(dataset.gallery_paths) == 24
    assert [os.fsencode(p.name) for p, _ in dataset.skipped] == [UNDECODABLE]
    json.dumps(dataset.gallery_names, ensure_ascii=False).encode("utf-8")  # what writing the submission needs


def test_retrieve_writes_its_submission_despite_an_undecodable_file_name(tmp_path, shapes_split, monkeypatch):
    from helpers.cli import main

    data = tmp_path / "data"
    shutil.copytree(shapes_split, data)
    for part in ("query", "gallery"):
        folder = data / "test" / part
        with open(os.path.join(os.fsencode(folder), UNDECODABLE), "wb") as handle:
            handle.write(next(folder.iterdir()).read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run.json"
    code = main(["retrieve", "--data", str(data), "--model", "efficientnet-lite0", "--k", "3", "--out", str(out),
                 "--metrics-out", str(tmp_path / "metrics.json"), "--no-cache", "--backend", "torch", "--quiet"])
    assert code == 0
    submission = json.loads(out.read_text(encoding="utf-8"))
    assert len(submission) == 8 and all(len(names) == 3 for names in submission.values())


def test_class_folders_are_listed_once_with_the_same_rules(tmp_path, drawn_image):
    root = tmp_path / "classes"
    for name in ("b", "a", ".git", "empty"):
        (root / name).mkdir(parents=True)
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    for name in ("a", "b"):
        shutil.copy(drawn_image, root / name / "x.png")
    (root / ".git" / "y.png").write_bytes(drawn_image.read_bytes())
    assert [p.name for p in class_folders(root)] == ["a", "b", "empty"]
    assert [(p.name, label) for p, label in list_class_folder(root)] == [("x.png", "a"), ("x.png", "b")]


def test_a_flat_folder_gets_the_expected_layout_and_split(tmp_path, drawn_image):
    flat = tmp_path / "photos"
    flat.mkdir()
    shutil.copy(drawn_image, flat / "one.png")
    with pytest.raises(DataError, match=r"flat folder of images.*photos/test/query/.*split --source CLASS_DIR"):
        load_retrieval_set(flat)
    with pytest.raises(DataError, match=r"flat folder of images without classes.*photos/cat/001.jpg"):
        list_class_folder(flat)


def test_class_folders_as_data_point_at_split(shapes):
    with pytest.raises(DataError, match=r"looks like class folders.*split --source .*shapes"):
        load_retrieval_set(shapes)


def test_data_without_layout_after_demo_points_at_data_demo(tmp_path, demo_data):
    (tmp_path / "data").mkdir()
    shutil.copytree(demo_data, tmp_path / "data" / "demo")
    with pytest.raises(DataError, match=r"try `python -m helpers retrieve --data .*data/demo`"):
        load_retrieval_set(tmp_path / "data")
