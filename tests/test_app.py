"""The search page (``python -m helpers app``): its JSON API on small real collections, and the page itself in a
real headless Chromium (skipped with a reason where no browser is installed)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import struct
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import SHARED_DATASETS

pytest.importorskip("fastapi")
pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")

pytestmark = pytest.mark.slow  # two small collections are embedded once for the module (about 30 s on 2 cores)

N_IMAGES = 30
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ----------------------------------------------------------------------------------------------------------------
# Small real collections, built once for the module
# ----------------------------------------------------------------------------------------------------------------
def _collect_images(folder: Path) -> Path:
    """30 real Imagenette photos (3 a class) copied into ``folder``; drawn shapes where the dataset is absent."""
    folder.mkdir(parents=True)
    source = SHARED_DATASETS / "imagenette-val"
    if source.is_dir():
        for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
            for file in sorted(class_dir.iterdir())[:3]:
                shutil.copy(file, folder / f"{class_dir.name}_{file.name}")
        if len(list(folder.iterdir())) >= N_IMAGES:
            return folder
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        image = Image.new("RGB", (160, 120), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, 120), rng.integers(0, 80)
            draw.ellipse([x, y, x + 40, y + 40], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / f"drawn_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return _collect_images(tmp_path_factory.mktemp("app") / "photos")


def _build(image_dir: Path, out: Path, model: str, weights: str = "pretrained") -> Path:
    from helpers.collection import EngineOptions, build_collection

    build_collection(out, images=[image_dir], model=model, weights=weights,
                     options=EngineOptions(device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def lite0_index(image_dir, tmp_path_factory) -> Path:
    return _build(image_dir, tmp_path_factory.mktemp("app") / "lite0-index", "efficientnet-lite0")


@pytest.fixture(scope="module")
def clip_index(image_dir, tmp_path_factory) -> Path:
    """A CLIP collection with random weights (no download): the text path works end to end."""
    return _build(image_dir, tmp_path_factory.mktemp("app") / "clip-index", "clip-vit-b32", weights="none")


@pytest.fixture(scope="module")
def lite0_app(lite0_index):
    from helpers.app import create_app

    return create_app(lite0_index, device="cpu", max_upload_mb=1)


@pytest.fixture(scope="module")
def clip_app(clip_index):
    from helpers.app import create_app

    return create_app(clip_index, device="cpu")


@pytest.fixture(scope="module")
def client(lite0_app):
    from fastapi.testclient import TestClient

    return TestClient(lite0_app, raise_server_exceptions=False)


def _upload(client, path: Path, k: int | str | None = None, name: str | None = None):
    data = {} if k is None else {"k": str(k)}
    with open(path, "rb") as handle:
        return client.post("/api/search", files={"image": (name or path.name, handle, "image/jpeg")}, data=data)


def _bomb_png() -> bytes:
    """A valid PNG whose header claims 30000 x 30000 pixels (900 megapixels) around a tiny compressed body."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", 30000, 30000)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


# ----------------------------------------------------------------------------------------------------------------
# JSON API
# ----------------------------------------------------------------------------------------------------------------
def test_info_describes_the_collection(client, clip_app):
    from fastapi.testclient import TestClient

    info = client.get("/api/info").json()
    assert info["images"] == N_IMAGES and info["model"] == "efficientnet-lite0" and info["text"] is False
    assert info["index"]["kind"] == "exact" and info["max_upload_mb"] == 1
    assert TestClient(clip_app).get("/api/info").json()["text"] is True


def test_upload_of_an_indexed_image_ranks_it_first(client, lite0_app):
    service = lite0_app.state.service
    for row in (0, 17):
        response = _upload(client, service.files[row], k=5)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 5
        assert results[0]["id"] == row and results[0]["name"] == service.index.names[row]
        assert results[0]["score"] > 0.99 and results[0]["thumb"] == f"/thumb/{row}"
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True) and results[1]["score"] < 0.99
        assert set(results[0]) >= {"id", "name", "score", "thumb"}
    assert response.json()["time_ms"] > 0


def test_names_are_relative_to_the_indexed_folder(lite0_app, image_dir):
    service = lite0_app.state.service
    assert sorted(service.index.names) == sorted(p.name for p in image_dir.iterdir())
    assert all(service.files[i] == image_dir.resolve() / name for i, name in enumerate(service.index.names))


def test_k_is_checked_and_clamped_to_the_collection(client, lite0_app):
    file = lite0_app.state.service.files[0]
    assert len(_upload(client, file).json()["results"]) == 12  # the page's default
    assert len(_upload(client, file, k=200).json()["results"]) == N_IMAGES
    for bad in (0, -3, 201, "ten", "1.5"):
        response = _upload(client, file, k=bad)
        assert response.status_code == 400 and "k must" in response.json()["error"], bad
    assert client.post("/api/search", json={"id": 0, "k": 1000}).status_code == 400


def test_bad_uploads_get_a_4xx_with_a_message(client, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n" * 10)
    response = _upload(client, text)
    assert response.status_code == 400 and "notes.txt" in response.json()["error"]
    assert "not a usable image" in response.json()["error"]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert _upload(client, empty).status_code == 400
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png())
    response = _upload(client, bomb)
    assert response.status_code == 400 and "decompression bomb" in response.json()["error"]
    assert client.post("/api/search", data={"k": "3"}).status_code == 400  # a form without the image
    assert client.post("/api/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


def test_uploads_over_the_limit_are_refused(client, tmp_path):
    big = tmp_path / "big.jpg"  # over the 1 MB limit by less than the multipart slack: refused while copied
    big.write_bytes(os.urandom(2**20 + 10_000))
    response = _upload(client, big)
    assert response.json() == {"error": "the image is over the upload limit of 1 MB"}
    assert response.status_code == 413
    huge = tmp_path / "huge.jpg"  # far over: refused from its Content-Length
    huge.write_bytes(os.urandom(3 * 2**20))
    response = _upload(client, huge)
    assert response.status_code == 413 and response.json()["error"] == "the image is over the upload limit of 1 MB"


def test_the_body_limit_refuses_while_reading():
    """The request is cut as soon as the limit is passed: the rest of the body is never read."""
    from starlette.requests import Request

    from helpers.app.service import AppError
    from helpers.app.web import limited_request

    chunk, sent = b"x" * 65536, []

    async def receive():
        sent.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(sent) < 1000}

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(AppError) as error:
        asyncio.run(limited_request(request, 10 * 65536).body())
    assert error.value.status == 413 and len(sent) == 11


def test_text_queries(client, clip_app):
    from fastapi.testclient import TestClient

    response = client.post("/api/search", json={"text": "a dog"})
    assert response.status_code == 400 and "no text encoder" in response.json()["error"]
    clip = TestClient(clip_app)
    response = clip.post("/api/search", json={"text": "a photo of a church", "k": 7})
    assert response.status_code == 200 and len(response.json()["results"]) == 7
    for empty in ("", "   ", None, 3):
        response = clip.post("/api/search", json={"text": empty})
        assert response.status_code == 400 and "text query is empty" in response.json()["error"]


def test_more_like_this_by_id(client, lite0_app):
    names = lite0_app.state.service.index.names
    results = client.post("/api/search", json={"id": 9, "k": 4}).json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4] and results[0]["id"] == 9 and results[0]["name"] == names[9]
    assert client.post("/api/search", json={"id": N_IMAGES}).status_code == 404
    for bad in ({"id": "../x"}, {"id": -1}, {"id": True}, {"id": 2.0}, {"id": "\u00b2"}, {"id": "9" * 5000},
                {"text": "a", "id": 1}, {}, [1]):
        response = client.post("/api/search", json=bad)
        assert response.status_code == 400 and response.json()["error"], bad
    assert client.post("/api/search", content=b"{oops", headers={"content-type": "application/json"}
                       ).status_code == 400


def test_thumbnails_and_full_images_by_row_id_only(client, lite0_app):
    service = lite0_app.state.service
    response = client.get("/thumb/4")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) <= 256
    assert client.get("/image/4").content == service.files[4].read_bytes()
    for url in (f"/thumb/{N_IMAGES}", "/thumb/-1", "/thumb/abc", "/thumb/../../etc/passwd",
                "/thumb/..%2F..%2Fetc%2Fpasswd", "/thumb/%2Fetc%2Fpasswd", "/image/99999", "/static/../web.py",
                "/thumb/%C2%B2", "/image/" + "9" * 5000, "/image/1e3"):
        response = client.get(url)
        assert 400 <= response.status_code < 500 and "error" in response.json(), url


def test_rows_find_their_files_across_several_folders(image_dir, tmp_path):
    """A collection of two folders (names prefixed by the folder): every row id serves its own file."""
    from fastapi.testclient import TestClient

    from helpers.app import create_app
    from helpers.collection import EngineOptions, build_collection

    folders = [tmp_path / "a" / "photos", tmp_path / "b" / "photos"]
    for i, folder in enumerate(folders):
        (folder / "sub").mkdir(parents=True)
        for file in sorted(image_dir.iterdir())[3 * i:3 * i + 3]:
            shutil.copy(file, folder / "sub" / file.name)
    build_collection(tmp_path / "index", images=folders, model="efficientnet-lite0",
                     options=EngineOptions(device="cpu", progress=False))
    app = create_app(tmp_path / "index", device="cpu")
    client, names = TestClient(app), app.state.service.index.names
    assert len(names) == 6 and len({name.split("/")[0] for name in names}) == 2
    for row, name in enumerate(names):
        folder = folders[0] if name.startswith("photos/") else folders[1]
        assert client.get(f"/image/{row}").content == (folder / name.split("/", 1)[1]).read_bytes()


def test_thumbnail_cache_is_bounded(lite0_app):
    from helpers.app.thumbs import ThumbnailCache

    files = lite0_app.state.service.files
    cache = ThumbnailCache(size=64, max_bytes=6000)
    first = cache.get(0, files[0])
    assert cache.get(0, files[0]) is first  # made once, then served from the cache
    for row in range(1, 8):
        cache.get(row, files[row])
    assert cache.bytes <= 6000 and 0 < len(cache) < 8
    assert 0 not in cache._items  # the least recently used went first


def test_an_internal_failure_is_a_json_500(lite0_index, monkeypatch):
    from fastapi.testclient import TestClient

    from helpers.app import create_app

    app = create_app(lite0_index, device="cpu")
    monkeypatch.setattr(app.state.service, "search_id", lambda *a: 1 / 0)
    response = TestClient(app, raise_server_exceptions=False).post("/api/search", json={"id": 1})
    assert response.status_code == 500 and response.json() == {"error": "internal error (ZeroDivisionError)"}


def test_the_page_is_self_contained_with_stable_hooks(client, clip_app):
    from fastapi.testclient import TestClient

    response = client.get("/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page = response.text
    assert '<input type="file" id="query-file"' in page and 'id="results"' in page and 'id="query-text"' in page
    assert 'id="text-form" hidden' in page  # no text encoder: the text box is hidden
    assert 'id="text-form" hidden' not in TestClient(clip_app).get("/").text
    for text in (page, client.get("/static/app.js").text, client.get("/static/app.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    from helpers.cli import main

    assert main(["app", "--index", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: no finished index")
    assert main(["app", "--index", str(tmp_path), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# The page in a real headless Chromium
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium): the page's browser tests are skipped")
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _screenshot(page, tmp_path: Path, name: str) -> None:
    """Write the page's screenshot to ``tmp_path`` and to ``$APP_SCREENSHOT_DIR`` where it is set."""
    page.screenshot(path=str(tmp_path / name), full_page=True)
    assert (tmp_path / name).stat().st_size > 1000
    folder = os.environ.get("APP_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(folder) / name)


def _watch(page) -> list[str]:
    """Script errors, console errors (a blocked resource included) and failed responses of ``page``, as they come."""
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda message: message.type == "error" and not message.text.startswith(
        "Failed to load resource: the server responded with a status of 400") and problems.append(message.text))
    page.on("response", lambda response: response.status >= 400 and problems.append(
        f"{response.status} {urlsplit(response.url).path}"))
    return problems


def _wait_results(page, count: int, first_name: str | None = None) -> None:
    page.wait_for_function(
        "([n, name]) => { const imgs = document.querySelectorAll('#results img');"
        " return imgs.length === n && (name === null || imgs[0].alt === name)"
        " && [...imgs].every(i => i.complete && i.naturalWidth > 0); }",
        arg=[count, first_name], timeout=60_000)


#: Drops or pastes the full image of a row on the page, as a user dragging a file in or pressing Ctrl+V would.
HAND_OVER_JS = """async ([row, how]) => {
  const blob = await (await fetch(`/image/${row}`)).blob();
  const data = new DataTransfer();
  data.items.add(new File([blob], `handed-${row}.jpg`, {type: blob.type}));
  const init = {bubbles: true, cancelable: true};
  document.body.dispatchEvent(how === "drop" ? new DragEvent("drop", {...init, dataTransfer: data})
                                             : new ClipboardEvent("paste", {...init, clipboardData: data}));
}"""


def test_page_upload_click_and_error(browser, lite0_app, tmp_path):
    from helpers.server import background_server

    service = lite0_app.state.service
    with background_server(lite0_app) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = _watch(page)
        page.goto(server.url + "/")
        assert page.locator("#query-text").is_hidden()
        page.set_input_files("#query-file", str(service.files[5]))
        _wait_results(page, 12, service.index.names[5])
        assert "results in" in page.locator("#status").inner_text()
        _screenshot(page, tmp_path, "search-page-desktop.png")
        third = page.locator("#results img").nth(2)
        clicked = third.get_attribute("alt")
        third.click()  # more like this: the clicked image leads the new grid
        _wait_results(page, 12, clicked)
        page.keyboard.press("ArrowRight")  # the first result is selected, then the second
        page.keyboard.press("ArrowRight")
        page.keyboard.press("v")  # the full image of the selected result
        page.wait_for_function("document.getElementById('viewer').open")
        assert page.locator("#viewer-image").evaluate("i => i.src").endswith("/image/" + str(
            service.index.names.index(page.locator("#results img").nth(1).get_attribute("alt"))))
        page.keyboard.press("Escape")
        page.wait_for_function("document.activeElement.dataset.index === '1'")  # focus back on the card
        page.keyboard.press("ArrowRight")  # back on the second result: Enter searches by it
        second = page.locator("#results img").nth(2).get_attribute("alt")
        page.keyboard.press("Enter")
        _wait_results(page, 12, second)
        for row, how in ((11, "drop"), (23, "paste")):
            page.evaluate(HAND_OVER_JS, [row, how])
            _wait_results(page, 12, service.index.names[row])
        text = tmp_path / "notes.txt"
        text.write_text("plain text")
        page.set_input_files("#query-file", str(text))
        page.wait_for_selector("#error:not([hidden])")
        assert "not a usable image" in page.locator("#error").inner_text()
        page.close()
    assert problems == ["400 /api/search"]  # the text file, and nothing else


def test_page_text_query_and_phone_width(browser, clip_app, tmp_path):
    from helpers.server import background_server

    service = clip_app.state.service
    with background_server(clip_app) as server:
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=1)
        problems = _watch(page)
        page.goto(server.url + "/")
        page.fill("#k", "6")
        page.fill("#query-text", "a dog playing in the snow")
        page.press("#query-text", "Enter")
        _wait_results(page, 6)
        page.set_input_files("#query-file", str(service.files[2]))
        _wait_results(page, 6, service.index.names[2])
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        _screenshot(page, tmp_path, "search-page-phone.png")
        page.close()
    assert problems == []
