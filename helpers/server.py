"""A local evaluation server speaking the course server's protocol, to rehearse submissions on labeled data.

``POST /retrieval/`` with the body ``{"groupname": str, "images": {query: [gallery names]}}`` answers
``{"accuracy": weighted_score, ...}``: the 600/300/100 score of :mod:`helpers.metrics` (unrounded) and the other
metrics under their own keys. Like the course server it reads the body as JSON whatever the ``Content-Type`` says
(none included, and a JSON string holding the JSON, as posting ``json.dumps(...)`` output with ``json=`` gives).
Malformed input gets a 4xx with ``{"error": message}`` (names holding control characters, NUL, lone surrogates or
bidirectional overrides included), any other failure a JSON 500; unknown queries and gallery names are scored as
misses and reported. Every submission is stored in SQLite (its score and the top-k names of the known queries), so
a restart keeps the leaderboard: ``GET /leaderboard`` (JSON) and ``GET /`` (HTML) show each group's best and latest
score. Limits, rate limits, tokens and the ``Host``/``Origin`` check: :mod:`helpers.server_guard`.

FastAPI and uvicorn are imported only when a server is built.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import html
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .metrics import evaluate_rankings
from .server_guard import ServerLimits
from .settings import output_dir

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3001
DEFAULT_DB = output_dir("submissions") / "server.sqlite3"
#: Largest accepted body (bytes); the course client sends about 50 bytes per name.
DEFAULT_MAX_BODY_BYTES = ServerLimits.max_body_bytes
#: Most gallery names accepted for one query.
DEFAULT_MAX_NAMES = ServerLimits.max_names
#: Bidirectional-text controls (embeddings, overrides, isolates, marks): they make one name look like another.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Characters no name may hold: control characters (NUL included), lone surrogates, bidirectional controls.
_REFUSED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff" + "".join(sorted(BIDI_CONTROLS)) + "]")
#: Longest accepted group name (characters).
MAX_GROUP_LENGTH = 200
#: Longest accepted query or gallery name (characters; file systems allow 255 bytes).
MAX_NAME_LENGTH = 255
#: Problems listed in one answer at most.
MAX_PROBLEMS_SHOWN = 20


class PayloadError(Exception):
    """A request the server refuses; ``status`` is the HTTP code (4xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------------------
# Parsing and scoring (no web framework needed: tested on their own)
# --------------------------------------------------------------------------------------------------------------
def parse_body(body: bytes, max_names: int = DEFAULT_MAX_NAMES, max_queries: int | None = None
               ) -> tuple[str, dict[str, list[str]]]:
    """``(groupname, images)`` from a request body, or :class:`PayloadError` (400 not JSON, 422 wrong shape or a
    name that is not plain text, 413 more than ``max_queries`` queries)."""
    value = _decode_json(body)
    if not isinstance(value, dict):
        raise PayloadError(422, 'the JSON must be an object {"groupname": NAME, "images": {query: [names]}}, '
                                f"got {type(value).__name__}")
    missing = [key for key in ("groupname", "images") if key not in value]
    if missing:
        raise PayloadError(422, f"missing field(s) {missing}: expected {{\"groupname\": NAME, \"images\": {{...}}}}")
    group = _check_group(value["groupname"])
    images = value["images"]
    if not isinstance(images, dict):
        raise PayloadError(422, f"'images' must be an object {{query: [gallery names]}}, got {_kind(images)}")
    if max_queries is not None and len(images) > max_queries:
        raise PayloadError(413, f"'images' holds {len(images)} queries; at most {max_queries} are accepted")
    for query, names in images.items():
        _check_name(query, "a query name")
        if not isinstance(names, list):
            raise PayloadError(422, f"images[{_short(query)}] must be a list of gallery names, got {_kind(names)}")
        if len(names) > max_names:
            raise PayloadError(422, f"images[{_short(query)}] has {len(names)} names; at most {max_names} are "
                                    "accepted (10 are scored)")
        for name in names:
            if not isinstance(name, str):
                raise PayloadError(422, f"images[{_short(query)}] holds {_kind(name)}; names must be strings")
            _check_name(name, f"a name in images[{_short(query)}]")
    return group, images


def _decode_json(body: bytes) -> Any:
    """The JSON value of ``body`` (a JSON string that holds the JSON is unwrapped once); 400 if it is not JSON."""
    if not body.strip():
        raise PayloadError(400, 'empty body: send JSON {"groupname": NAME, "images": {query: [gallery names]}}')
    value: Any = body
    for _ in range(2):
        try:
            value = json.loads(value)
        except RecursionError:
            raise PayloadError(400, "the JSON is nested too deeply") from None
        except UnicodeDecodeError:
            raise PayloadError(400, "the body is not UTF-8 text") from None
        except ValueError as exc:
            raise PayloadError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(value, str):
            break
    return value


def _bad_character(text: str, strict: bool) -> str | None:
    """The first character of ``text`` that no name may hold (control characters, NUL, lone surrogates,
    bidirectional controls; with ``strict`` also every other invisible format or unassigned character), described."""
    if strict:
        invisible = (i for i, c in enumerate(text) if unicodedata.category(c)[0] == "C" or unicodedata.category(c)
                     in ("Zl", "Zp"))
        position = next(invisible, None)
    else:
        found = _REFUSED.search(text)  # a regular expression: fast on the many names of a large body
        position = found.start() if found else None
    if position is None:
        return None
    char = text[position]
    kind = {"Cc": "a control character", "Cs": "a lone surrogate"}.get(
        unicodedata.category(char), "a bidirectional control" if char in BIDI_CONTROLS else "an invisible character")
    return f"{kind} (U+{ord(char):04X}) at position {position}"


def _check_group(group: Any) -> str:
    """The group name, stripped and in Unicode NFC form (so that look-alike spellings are one group), or 422."""
    if not isinstance(group, str) or not group.strip():
        raise PayloadError(422, f"'groupname' must be a non-empty string, got {_kind(group)}")
    if len(group) > MAX_GROUP_LENGTH:
        raise PayloadError(422, f"'groupname' is longer than {MAX_GROUP_LENGTH} characters")
    bad = _bad_character(group, strict=True)
    if bad:
        raise PayloadError(422, f"'groupname' holds {bad}: use visible characters only")
    return unicodedata.normalize("NFC", group.strip())


def _check_name(name: str, what: str) -> None:
    if len(name) > MAX_NAME_LENGTH:
        raise PayloadError(422, f"{what} is {len(name)} characters long; file names have at most {MAX_NAME_LENGTH}")
    bad = _bad_character(name, strict=False)
    if bad:
        raise PayloadError(422, f"{what} holds {bad}; file names must be plain text")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def score_submission(
    images: Mapping[str, list[str]],
    ground_truth: Mapping[str, Iterable[str]],
    gallery_names: Iterable[str] | None = None,
    k: int = 10,
) -> dict[str, Any]:
    """The answer to one submission: ``accuracy`` (weighted score), every metric, and what was scored as a miss."""
    gallery = set(gallery_names) if gallery_names is not None else None
    result = evaluate_rankings(images, ground_truth, k=k, gallery_names=gallery)
    unknown_queries = sorted(set(images) - set(ground_truth))
    missing_queries = sorted(q for q in ground_truth if q not in images)
    answer: dict[str, Any] = {"accuracy": result.metrics["weighted_score"], **result.metrics}
    answer["n_queries"] = result.n_queries
    answer["n_submitted"] = len(images)
    answer["unknown_queries"] = len(unknown_queries)
    answer["missing_queries"] = len(missing_queries)
    if gallery is not None:
        answer["unknown_gallery_names"] = len({n for names in images.values() for n in names[:k] if n not in gallery})
    answer["problems"] = result.problems[:MAX_PROBLEMS_SHOWN] + (
        [f"... and {len(result.problems) - MAX_PROBLEMS_SHOWN} more"] if len(result.problems) > MAX_PROBLEMS_SHOWN
        else [])
    return answer


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------
class SubmissionStore:
    """Every scored submission in one SQLite file (one connection per call, safe across threads)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_DB):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS submissions ("
                " id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, groupname TEXT NOT NULL,"
                " accuracy REAL NOT NULL, metrics TEXT NOT NULL, n_queries INTEGER NOT NULL,"
                " body_sha256 TEXT NOT NULL, images TEXT NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS by_group ON submissions (groupname, id)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, group: str, answer: Mapping[str, Any], images: Mapping[str, list[str]], body: bytes) -> int:
        """Store one submission; returns its id."""
        metrics = {key: value for key, value in answer.items() if key != "problems"}
        row = (
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), group, float(answer["accuracy"]),
            json.dumps(metrics), int(answer.get("n_submitted", len(images))), hashlib.sha256(body).hexdigest(),
            json.dumps(images, ensure_ascii=False),
        )
        with self._lock, contextlib.closing(self._connect()) as db, db:
            cursor = db.execute(
                "INSERT INTO submissions (time, groupname, accuracy, metrics, n_queries, body_sha256, images)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            return int(cursor.lastrowid)

    def leaderboard(self) -> list[dict[str, Any]]:
        """One row per group, best score first: best and latest accuracy, submission count, last time."""
        query = (
            "SELECT groupname, COUNT(*), MAX(accuracy), MAX(id) FROM submissions GROUP BY groupname"
        )
        with contextlib.closing(self._connect()) as db:
            groups = db.execute(query).fetchall()
            rows = []
            for group, count, best, last_id in groups:
                latest, latest_time = db.execute(
                    "SELECT accuracy, time FROM submissions WHERE id = ?", (last_id,)).fetchone()
                rows.append({"groupname": group, "best": best, "latest": latest, "submissions": count,
                             "last_time": latest_time})
        rows.sort(key=lambda r: (-r["best"], r["groupname"]))
        return rows

    def count(self) -> int:
        with contextlib.closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0])


def leaderboard_html(rows: list[dict[str, Any]], title: str = "Retrieval leaderboard") -> str:
    """A small self-contained HTML page of the leaderboard (every value escaped)."""
    cells = "".join(
        f"<tr><td>{rank}</td><td>{html.escape(r['groupname'])}</td><td>{r['best']:.1f}</td>"
        f"<td>{r['latest']:.1f}</td><td>{r['submissions']}</td><td>{html.escape(str(r['last_time']))}</td></tr>"
        for rank, r in enumerate(rows, start=1)
    ) or '<tr><td colspan="6">no submission yet</td></tr>'
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}td:nth-child(2){text-align:left}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><table><tr><th>#</th><th>group</th><th>best</th>"
        f"<th>latest</th><th>submissions</th><th>last (UTC)</th></tr>{cells}</table>"
        "<p>POST /retrieval/ with {\"groupname\": NAME, \"images\": {query: [gallery names]}}; "
        "JSON at <a href=\"leaderboard\">/leaderboard</a>.</p></body></html>"
    )


# --------------------------------------------------------------------------------------------------------------
# The web application
# --------------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, headers: Mapping[str, str] | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class _BodyTooLarge(Exception):
    pass


class _ServerBusy(Exception):
    pass


class Scorer:
    """The ``POST /retrieval/`` endpoint: reads the body within the limits, checks the group's token and rate,
    scores, and stores the score with the top-k names of the known queries (never the whole body)."""

    def __init__(self, truth: Mapping[str, list[str]], gallery: list[str] | None, k: int, limits: ServerLimits,
                 store: SubmissionStore, tokens: Mapping[str, str] | None = None):
        import asyncio

        from .server_guard import RateLimiter

        self.truth, self.gallery, self.k, self.limits, self.store, self.tokens = truth, gallery, k, limits, store, tokens
        self.max_queries = limits.queries_allowed(len(truth))
        self.rate = RateLimiter(limits.rate_per_minute)
        self.parallel = asyncio.Semaphore(limits.max_parallel)
        self.pending = 0  # body bytes held by requests not yet answered (changed on the event loop only)
        self.pending_limit = max(limits.max_pending_bytes, limits.max_body_bytes)

    async def endpoint(self, request: Any) -> Any:
        """A plain Starlette route: the body is read as is, whatever its Content-Type."""
        import asyncio

        from starlette.concurrency import run_in_threadpool
        from starlette.requests import ClientDisconnect

        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return _error(413, f"the body is {int(length)} bytes; at most {limit} are accepted")
        held = [0]  # bytes of this body counted in self.pending until it is answered
        try:
            body = await asyncio.wait_for(self._read(request, held), self.limits.read_timeout)
            async with self.parallel:
                return await run_in_threadpool(self.handle, body, request.headers.get("authorization"))
        except _BodyTooLarge:
            return _error(413, f"the body is over {limit} bytes")
        except _ServerBusy:
            return _error(503, "the server is holding too many bodies at once; try again shortly",
                          {"Retry-After": "2", "Connection": "close"})
        except asyncio.TimeoutError:
            return _error(408, f"the body did not arrive within {self.limits.read_timeout:g} s",
                          {"Connection": "close"})
        except ClientDisconnect:
            return _error(400, "the client closed the connection before sending the whole body")
        finally:
            self.pending -= held[0]

    async def _read(self, request, held: list[int]) -> bytes:
        chunks: list[bytes] = []
        try:
            async for chunk in request.stream():
                held[0] += len(chunk)
                self.pending += len(chunk)
                if held[0] > self.limits.max_body_bytes:
                    raise _BodyTooLarge
                if self.pending > self.pending_limit:
                    raise _ServerBusy
                chunks.append(chunk)
        except BaseException:
            chunks.clear()  # the traceback keeps this frame alive until a garbage collection: free the body now
            raise
        return b"".join(chunks)

    def handle(self, body: bytes, authorization: str | None = None) -> Any:
        """The answer to one body: 200 with the score, a 4xx ``{"error": ...}``, or a JSON 500 (logged)."""
        from starlette.responses import JSONResponse

        from .server_guard import token_problem

        try:
            group, images = parse_body(body, max_names=self.limits.max_names, max_queries=self.max_queries)
            refused = token_problem(self.tokens, group, authorization)
            if refused:
                return _error(*refused)
            wait = self.rate.wait_needed(group)
            if wait:
                return _error(429, f"group {group!r} made {self.limits.rate_per_minute} submissions in the last "
                                   f"minute; try again in {wait:.0f} s", {"Retry-After": str(max(1, round(wait)))})
            answer = score_submission(images, self.truth, gallery_names=self.gallery, k=self.k)
            kept = {q: names[:self.k] for q, names in images.items() if q in self.truth}
            answer["submission_id"] = self.store.add(group, answer, kept, body)
            answer["groupname"] = group
            return JSONResponse(answer)
        except PayloadError as exc:
            return _error(exc.status, exc.message)
        except Exception:  # noqa: BLE001 (anything else is the server's fault: logged, and a JSON 500)
            log.exception("scoring a submission failed")
            return _error(500, "internal error while scoring (logged on the server)")


def create_app(
    ground_truth: Mapping[str, Iterable[str]] | str | os.PathLike,
    db: str | os.PathLike = DEFAULT_DB,
    gallery_names: Iterable[str] | None = None,
    k: int = 10,
    limits: ServerLimits | None = None,
    tokens: Mapping[str, str] | None = None,
    allowed_hosts: Iterable[str] = (),
) -> Any:
    """The FastAPI application scoring against ``ground_truth`` (a mapping or a ground-truth JSON file).

    ``limits``: see :class:`helpers.server_guard.ServerLimits`. ``tokens`` (``{group: token}``): only those groups
    may submit, each with its token. A request whose ``Host`` or ``Origin`` names another site than the listening
    address, ``localhost``, ``127.0.0.1`` or ``allowed_hosts`` is refused with 403.
    """
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse

    from .server_guard import GuardMiddleware

    limits = limits or ServerLimits()
    limits.check()
    if not isinstance(ground_truth, Mapping):
        from .data import load_ground_truth

        ground_truth = load_ground_truth(ground_truth)
    truth = {str(q): list(names) for q, names in ground_truth.items()}
    gallery = sorted(set(gallery_names)) if gallery_names is not None else None
    store = SubmissionStore(db)
    app = FastAPI(title="Local retrieval evaluation server", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.ground_truth, app.state.limits = store, truth, limits
    scorer = app.state.scorer = Scorer(truth, gallery, k, limits, store, tokens)
    app.add_route("/retrieval/", scorer.endpoint, methods=["POST"])
    app.add_route("/retrieval", scorer.endpoint, methods=["POST"])

    @app.get("/leaderboard")
    def leaderboard():
        return {"leaderboard": store.leaderboard(), "queries": len(truth)}

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(leaderboard_html(store.leaderboard()))

    async def server_error(_request, exc: Exception):
        log.error("unexpected error: %r", exc)
        return _error(500, "internal error (logged on the server)")

    app.add_exception_handler(Exception, server_error)
    app.add_middleware(GuardMiddleware, extra_hosts=tuple(allowed_hosts))
    return app


# --------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------
def serve(app: Any, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted (binds to loopback unless told otherwise), under the app's limits
    (connections, keep-alive, request-head deadline)."""
    import uvicorn

    from .server_guard import uvicorn_config

    limits = getattr(app.state, "limits", ServerLimits())
    uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, log_level=log_level)).run()


@dataclass
class RunningServer:
    url: str
    port: int
    server: Any
    thread: threading.Thread


@contextlib.contextmanager
def background_server(app: Any, host: str = DEFAULT_HOST, port: int = 0, startup_timeout: float = 20.0
                      ) -> Iterator[RunningServer]:
    """Run ``app`` with uvicorn in a thread (port 0: a free one) and stop it on exit; yields its URL.

    For notebooks and tests: ``with background_server(create_app(gt)) as s: submit(..., url=s.url + "/retrieval/")``.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    from .server_guard import uvicorn_config

    limits = getattr(app.state, "limits", ServerLimits())
    server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{bound_port} within {startup_timeout} s")
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://{host}:{bound_port}", bound_port, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout)
        sock.close()
