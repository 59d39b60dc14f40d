"""The search page and its JSON API (FastAPI): ``create_app(index)`` then ``serve(app)``.

Routes: ``GET /`` the page (its script and style under ``/static/``, nothing from outside), ``GET /api/info``,
``POST /api/search`` (multipart field ``image``, or JSON ``{"text": ...}`` / ``{"id": ...}``; ``k`` in either),
``GET /thumb/{id}`` and ``GET /image/{id}`` for row ids only. Every error is a JSON ``{"error": ...}``: 4xx for bad
input, 500 at worst, never a bare one.
"""

import logging
import os
import tempfile
from importlib import resources
from typing import Any

from .service import DEFAULT_MAX_K, AppError, SearchService, parse_k, parse_row, search_service
from .thumbs import DEFAULT_CACHE_BYTES, DEFAULT_THUMB_SIZE, ThumbnailCache, full_image

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0
#: Room for a multipart request's boundaries and small fields beyond the file itself.
MULTIPART_SLACK = 64 * 1024
#: A JSON query (a text or an id) is small.
MAX_JSON_BYTES = 64 * 1024
#: The page may load nothing from elsewhere: its script, style and images come from the app (blob: is the preview
#: of the user's own query image).
PAGE_POLICY = "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; form-action 'none'"
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}


def static_text(name: str) -> str:
    """A file of the page shipped inside the package (``helpers/app/static``)."""
    return resources.files("helpers.app").joinpath("static", name).read_text(encoding="utf-8")


def limited_request(request, limit: int, too_large: str = "the request is too large"):
    """``request`` whose body is refused (AppError 413 with the message ``too_large``) as soon as more than
    ``limit`` bytes arrive, before any parser buffers it; a ``Content-Length`` over the limit is refused at once."""
    from starlette.requests import Request

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise AppError(413, too_large)
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise AppError(413, too_large)
        return message

    return Request(request.scope, receive)


def _too_large(max_bytes: int) -> str:
    return f"the image is over the upload limit of {max_bytes / 2**20:g} MB"


async def _save_upload(upload, max_bytes: int, folder: str) -> str:
    """Copy the uploaded file into ``folder`` in chunks, refusing it (413) past ``max_bytes``; returns its path."""
    path = os.path.join(folder, "upload")
    size = 0
    with open(path, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise AppError(413, _too_large(max_bytes))
            out.write(chunk)
    if size == 0:
        raise AppError(400, "the uploaded file is empty (0 bytes)")
    return path


async def _search_upload(service: SearchService, request, max_bytes: int) -> dict[str, Any]:
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    limited = limited_request(request, max_bytes + MULTIPART_SLACK, _too_large(max_bytes))
    form = await limited.form(max_files=1, max_fields=8)
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise AppError(400, "send the query image as a multipart form field named 'image'")
        k = parse_k(form.get("k"), service.max_k)
        label = f"'{(upload.filename or 'the upload')[:80]}'"
        with tempfile.TemporaryDirectory(prefix="cbir-upload-") as folder:
            path = await _save_upload(upload, max_bytes, folder)
            answer = await run_in_threadpool(service.search_image_file, path, k, label)
        return service.results_json(answer, {"kind": "image", "name": upload.filename or ""}, k)
    finally:
        await form.close()


async def _search_json(service: SearchService, request) -> dict[str, Any]:
    import json

    from starlette.concurrency import run_in_threadpool

    too_large = f"a JSON query is at most {MAX_JSON_BYTES} bytes"
    body = await limited_request(request, MAX_JSON_BYTES, too_large).body()
    try:
        query = json.loads(body or b"null")
    except ValueError:
        raise AppError(400, "the request body is not valid JSON") from None
    if not isinstance(query, dict) or ("text" in query) == ("id" in query):
        raise AppError(400, 'send JSON {"text": "...", "k": 10} or {"id": ROW, "k": 10}')
    k = parse_k(query.get("k"), service.max_k)
    if "text" in query:
        answer = await run_in_threadpool(service.search_text, query["text"], k)
        return service.results_json(answer, {"kind": "text", "text": query["text"]}, k)
    row = parse_row(query["id"], len(service))
    answer = await run_in_threadpool(service.search_id, row, k)
    return service.results_json(answer, {"kind": "id", "id": row, "name": service.index.names[row]}, k)


def _add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(AppError)
    async def app_error(_request, exc: AppError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError):
        return JSONResponse({"error": f"bad request: {exc.errors()[:1]}"}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        logger.exception("internal error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)


def _add_page_routes(app, service: SearchService, max_upload_mb: float) -> None:
    from fastapi.responses import HTMLResponse, Response

    page = static_text("index.html")
    if service.has_text:
        page = page.replace('id="text-form" hidden', 'id="text-form"')
    page = page.replace("__MAX_UPLOAD_MB__", f"{max_upload_mb:g}")

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/static/{name}")
    def static_file(name: str):
        if name not in STATIC_FILES:
            raise AppError(404, f"no static file {name[:40]!r}")
        return Response(static_text(name), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})


def _add_image_routes(app, service: SearchService, thumbs: ThumbnailCache) -> None:
    from fastapi.responses import FileResponse, Response

    from ..data import ImageLoadError

    cache_headers = {"Cache-Control": "public, max-age=3600"}

    @app.get("/thumb/{row}")
    def thumbnail(row: str):
        number = parse_row(row, len(service))
        path = service.file(number)
        try:
            return Response(thumbs.get(number, path), media_type="image/jpeg", headers=cache_headers)
        except ImageLoadError as exc:
            raise AppError(404, f"image {row} is no longer readable: {exc.reason}") from None

    @app.get("/image/{row}")
    def image(row: str):
        path = service.file(parse_row(row, len(service)))
        if not path.is_file():
            raise AppError(404, f"image {row} is no longer on disk")
        try:
            content, media = full_image(path)
        except ImageLoadError as exc:
            raise AppError(404, f"image {row} is no longer readable: {exc.reason}") from None
        if isinstance(content, bytes):
            return Response(content, media_type=media, headers=cache_headers)
        return FileResponse(content, media_type=media, headers=cache_headers)


def create_app(index, device: str = "auto", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_k: int = DEFAULT_MAX_K, thumb_size: int = DEFAULT_THUMB_SIZE,
               thumb_cache_bytes: int = DEFAULT_CACHE_BYTES, max_pixels: int | None = None):
    """The search page's FastAPI app for ``index`` (an :class:`helpers.collection.Index`, its folder, or a ready
    :class:`SearchService`). The model is loaded here, once. ``max_upload_mb`` bounds an uploaded image,
    ``max_pixels`` its decoded size (default: the project's decompression-bomb limit)."""
    # FastAPI reads the endpoints' annotations at run time: this module has no postponed annotations, so that
    # ``request: Request`` below resolves to the class imported here.
    from fastapi import FastAPI, Request

    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    service = index if isinstance(index, SearchService) else search_service(
        index, device=device, max_k=max_k, max_pixels=max_pixels)
    thumbs = ThumbnailCache(thumb_size, thumb_cache_bytes)
    max_bytes = int(max_upload_mb * 2**20)
    app = FastAPI(title="Image search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.thumbs = service, thumbs
    _add_error_handlers(app)
    _add_page_routes(app, service, max_upload_mb)
    _add_image_routes(app, service, thumbs)

    @app.get("/api/info")
    def info():
        return {**service.info(), "max_upload_mb": max_upload_mb}

    @app.post("/api/search")
    async def search(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return await _search_upload(service, request, max_bytes)
        if kind == "application/json":
            return await _search_json(service, request)
        raise AppError(415, "send a multipart form with the field 'image', or JSON {\"text\": ...} / {\"id\": ...}")

    return app
