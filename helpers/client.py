"""Submitting to the evaluation server (the course server or a local ``python -m helpers serve``).

The protocol: ``POST URL`` with ``Content-Type: application/json`` and the body
``{"groupname": NAME, "images": {query: [gallery, ...]}}``; the server answers ``{"accuracy": score, ...}``.

:func:`submit` reads a submission file of either format, validates it (nothing is sent while problems remain,
unless ``force``), opens its JSON-lines log (``submissions/submit_log.jsonl`` by default, relative to the working
directory) before sending, sends it, and logs every try. ``timeout`` bounds each try's whole wall time (connecting,
sending, and the complete answer, however slowly the server trickles it). Connection errors, timeouts before the
body was delivered and 5xx answers are retried with exponential backoff; a timeout after the body was delivered is
retried only with ``retry_after_timeout`` (the server may have scored it already); a 4xx, a redirect (never
followed) or an answer without a finite numeric ``accuracy`` ends at once. ``submit.py`` at the repository root and
the notebooks call it; :func:`main` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import decimal
import hashlib
import http.client
import json
import math
import os
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from .submission import Rankings, SubmissionError, load_submission, validate_submission
from .settings import output_dir

DEFAULT_URL = "http://tatooine.disi.unitn.it:3001/retrieval/"
URL_ENV = "RETRIEVAL_SERVER_URL"
DEFAULT_LOG = output_dir("submissions") / "submit_log.jsonl"
#: Longest answer text kept in the log and printed (characters).
ANSWER_LIMIT = 500
#: Most bytes read from an answer; a larger answer is cut (the course server answers a few dozen bytes).
MAX_ANSWER_BYTES = 1 << 20

#: Most extra tries accepted (``--retries``).
MAX_RETRIES = 20

#: Exit codes of :func:`main`.
EXIT_OK, EXIT_FAILED, EXIT_NOT_SENT = 0, 1, 2


class SubmitError(Exception):
    """A submission that cannot be sent (unreadable file, invalid content, bad URL)."""


@dataclass
class Attempt:
    """One request and what came back."""

    number: int
    outcome: str  # ok | http-error | redirect | bad-answer | timeout | connection-error | request-error
    status: int | None = None
    answer: str = ""
    error: str | None = None
    seconds: float = 0.0
    body_sent: bool = False  # the whole body was handed to the connection before the try ended


@dataclass
class SubmitResult:
    """What :func:`submit` did. ``ok`` is true when the server accepted the submission and sent an accuracy."""

    ok: bool
    sent: bool
    url: str
    group: str
    accuracy: Any = None
    accuracy_text: str | None = None
    answer: Any = None
    status: int | None = None
    attempts: list[Attempt] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    message: str = ""
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        """0 accepted (or a dry run of a valid submission), 1 sent but not accepted, 2 nothing sent."""
        if self.dry_run:
            return EXIT_OK if not self.problems else EXIT_NOT_SENT
        if self.ok:
            return EXIT_OK
        return EXIT_FAILED if self.sent else EXIT_NOT_SENT


# --------------------------------------------------------------------------------------------------------------
# Building and checking the payload
# --------------------------------------------------------------------------------------------------------------
def resolve_url(url: str | None = None) -> str:
    """``url`` if given, else ``$RETRIEVAL_SERVER_URL``, else the course server; checked to be a usable http(s) URL."""
    chosen = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if not chosen.startswith(("http://", "https://")):
        raise SubmitError(f"server URL must start with http:// or https://, got {chosen!r}")
    try:
        parts = urllib.parse.urlsplit(chosen)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in range)
    except ValueError as exc:
        raise SubmitError(f"server URL {chosen!r} is not valid: {exc}") from None
    if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in chosen):
        raise SubmitError(f"server URL {chosen!r} is not valid: no host, or a space or control character in it")
    return chosen


def build_payload(rankings: Mapping[str, Sequence[str]], group: str) -> dict[str, Any]:
    """The exact body the server expects: ``{"groupname": group, "images": {query: [names]}}``."""
    if not isinstance(group, str) or not group.strip():
        raise SubmitError("the group name is empty: pass --group NAME (the name your team registered)")
    return {"groupname": group, "images": {str(q): [str(n) for n in names] for q, names in rankings.items()}}


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The body as JSON bytes, non-ASCII characters escaped (as ``json.dumps`` and ``requests`` write it by default)."""
    return json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def check_submission(rankings: Rankings, k: int = 10, data: str | os.PathLike | None = None) -> list[str]:
    """Problems with ``rankings`` (empty: valid): k distinct non-empty names per query; with ``data`` every query
    and gallery name must exist in ``data``'s ``test/query`` and ``test/gallery`` folders, and a gallery smaller
    than k asks for ``min(k, gallery size)`` names per query."""
    if data is None:
        return validate_submission(rankings, k=k)
    from .data import load_retrieval_set

    dataset = load_retrieval_set(data)
    return validate_submission(rankings, k=min(k, len(dataset.gallery_names)), query_names=dataset.query_names,
                               gallery_names=dataset.gallery_names)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shorten(text: str, limit: int = ANSWER_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def summarize_payload(payload: Mapping[str, Any], url: str, body: bytes) -> str:
    """A few readable lines describing what would be sent."""
    images = payload["images"]
    lengths = sorted({len(v) for v in images.values()})
    first = next(iter(images.items()), None)
    lines = [
        f"POST {url}",
        f"  groupname: {payload['groupname']!r}",
        f"  images:    {len(images)} queries, names per query: {', '.join(map(str, lengths)) or '-'}",
        f"  body:      {len(body)} bytes of JSON, Content-Type: application/json",
    ]
    if first:
        lines.append(f"  e.g.       {first[0]!r}: {first[1][:3]!r}{' ...' if len(first[1]) > 3 else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# The log
# --------------------------------------------------------------------------------------------------------------
def open_log(path: str | os.PathLike) -> TextIO:
    """Open ``path`` for appending (folders created) before anything is sent; :class:`SubmitError` if it cannot be."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")
    except OSError as exc:
        raise SubmitError(f"cannot open the log {path} ({exc.strerror or exc}); nothing sent: pass --log FILE "
                          "in a writable folder") from None


def write_log(handle: TextIO, record: Mapping[str, Any]) -> None:
    """Write one JSON line to the open log ``handle`` and flush it to disk."""
    handle.write(json.dumps(dict(record), ensure_ascii=False, default=str) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def append_log(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (folders created) and flush it to disk."""
    with open_log(path) as handle:
        write_log(handle, record)


def read_log(path: str | os.PathLike = DEFAULT_LOG) -> list[dict[str, Any]]:
    """Every record of a submit log (an absent log is empty)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------------------------
# One try
# --------------------------------------------------------------------------------------------------------------
class TryTimeout(Exception):
    """A try that did not complete within its timeout; ``body_sent`` says whether the whole body had gone out."""

    def __init__(self, message: str, body_sent: bool):
        super().__init__(message)
        self.body_sent = body_sent


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A not yet connected connection for ``url`` (through the environment's proxy, if any) and the request target."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if https:  # a CONNECT tunnel through the proxy, then TLS to the server
            conn = http.client.HTTPSConnection(via.hostname, via.port or 80, timeout=timeout)
            conn.set_tunnel(parts.hostname, port)
            return conn, target
        return http.client.HTTPConnection(via.hostname, via.port or 80, timeout=timeout), url
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    return cls(parts.hostname, port, timeout=timeout), target


def _read_answer(response: http.client.HTTPResponse) -> bytes:
    """The answer body, at most :data:`MAX_ANSWER_BYTES` (a larger answer is cut)."""
    chunks: list[bytes] = []
    size = 0
    while size < MAX_ANSWER_BYTES:
        chunk = response.read(min(8192, MAX_ANSWER_BYTES - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def post_once(url: str, body: bytes, timeout: float, headers: Mapping[str, str] | None = None
              ) -> tuple[int, bytes, str | None]:
    """One POST, redirects not followed; returns (status, answer bytes, ``Location`` header).

    ``timeout`` bounds the whole try: a watchdog shuts the socket down at the deadline, so a server that trickles
    its headers or its answer a byte at a time cannot hold the client longer. Raises :class:`TryTimeout` at the
    deadline, ``OSError``/``http.client.HTTPException`` on connection and protocol errors.
    """
    conn, target = _connection(url, timeout)
    fired = threading.Event()
    stage = {"body_sent": False}

    def abort() -> None:
        fired.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        if fired.is_set():
            raise TryTimeout(f"no connection within {timeout:g} s", False)
        conn.request("POST", target, body=body, headers={
            "Content-Type": "application/json", "Accept": "application/json", **(headers or {})})
        stage["body_sent"] = True
        response = conn.getresponse()
        answer = (response.status, _read_answer(response), response.getheader("Location"))
        watchdog.cancel()
        if fired.is_set():
            raise TryTimeout(f"no complete answer within {timeout:g} s", True)
        return answer
    except (OSError, http.client.HTTPException) as exc:
        if fired.is_set():
            what = "answer" if stage["body_sent"] else "delivery of the body"
            raise TryTimeout(f"no complete {what} within {timeout:g} s", stage["body_sent"]) from None
        if isinstance(exc, socket.timeout):
            raise TryTimeout(f"no progress within {timeout:g} s ({exc})", stage["body_sent"]) from None
        raise
    finally:
        watchdog.cancel()
        conn.close()


def _parse_answer(raw: bytes) -> tuple[Any, Any]:
    """(value, value with floats kept as their exact text) of a JSON answer; ValueError if not plain JSON
    (invalid, not UTF-8, nested too deeply, or holding NaN/Infinity)."""

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"the answer holds {name}, which is not a number")

    text = raw.decode("utf-8")
    try:
        return (json.loads(text, parse_constant=refuse_constant),
                json.loads(text, parse_float=decimal.Decimal, parse_constant=refuse_constant))
    except RecursionError:
        raise ValueError("the answer is JSON nested too deeply") from None


def _accuracy_problem(parsed: Any) -> str | None:
    """Why ``parsed`` is not an accepted answer (None: it holds a finite numeric ``accuracy``)."""
    if not isinstance(parsed, dict) or "accuracy" not in parsed:
        return "no accuracy in the answer"
    value = parsed["accuracy"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"the accuracy is {type(value).__name__ if value is not None else 'null'}, not a number"
    if not math.isfinite(value):
        return f"the accuracy is {value}, not a finite number"
    return None


def attempt_once(number: int, url: str, body: bytes, timeout: float,
                 headers: Mapping[str, str] | None = None) -> tuple[Attempt, Any, Any]:
    """One try, classified: (attempt, parsed answer, answer with exact floats); never raises for network trouble."""
    start = time.monotonic()
    attempt = Attempt(number=number, outcome="connection-error")
    parsed = exact = None
    try:
        attempt.status, raw, location = post_once(url, body, timeout, headers)
        attempt.body_sent = True
        attempt.answer = raw.decode("utf-8", errors="replace")
        try:
            parsed, exact = _parse_answer(raw)
        except ValueError as exc:
            attempt.error = f"the answer is not plain JSON: {exc}"
        if 300 <= attempt.status < 400:
            attempt.outcome = "redirect"
            attempt.error = f"redirected to {location or '(no Location)'}; not followed: pass --url with the new " \
                            "address if you trust it"
        elif attempt.status >= 400:
            attempt.outcome = "http-error"
        else:
            problem = attempt.error or _accuracy_problem(parsed)
            attempt.outcome, attempt.error = ("bad-answer", problem) if problem else ("ok", None)
    except TryTimeout as exc:
        attempt.outcome, attempt.error, attempt.body_sent = "timeout", str(exc), exc.body_sent
    except (ConnectionError, socket.gaierror, http.client.RemoteDisconnected, http.client.IncompleteRead) as exc:
        attempt.outcome, attempt.error = "connection-error", f"{type(exc).__name__}: {exc}"
    except (OSError, http.client.HTTPException, ValueError) as exc:  # a broken answer or request: retrying cannot help
        attempt.outcome, attempt.error = "request-error", f"{type(exc).__name__}: {exc}"
    attempt.seconds = time.monotonic() - start
    return attempt, parsed, exact


def is_retryable(attempt: Attempt, retry_after_timeout: bool = False) -> bool:
    """Connection errors and 5xx answers are retried; a timeout only if the body had not all gone out (or
    ``retry_after_timeout``: the server may then hold the submission twice); nothing else."""
    if attempt.outcome == "connection-error":
        return True
    if attempt.outcome == "timeout":
        return retry_after_timeout or not attempt.body_sent
    return attempt.outcome == "http-error" and (attempt.status or 0) >= 500


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Wait before try ``attempt + 1``: ``base * 2 ** (attempt - 1)``, at most ``cap`` seconds."""
    return min(cap, base * (2 ** (attempt - 1)))


# --------------------------------------------------------------------------------------------------------------
# Submitting: checks, then the tries
# --------------------------------------------------------------------------------------------------------------
def check_options(timeout: float, retries: int, backoff: float, max_backoff: float) -> None:
    """:class:`SubmitError` unless ``timeout`` is finite and positive, ``backoff``/``max_backoff`` finite and not
    negative, and ``retries`` an integer from 0 to :data:`MAX_RETRIES`."""
    for name, value, least in (("--timeout", timeout, "positive"), ("--backoff", backoff, "0 or more"),
                               ("max_backoff", max_backoff, "0 or more")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                value < 0 or (least == "positive" and value == 0):
            raise SubmitError(f"{name} must be a finite number, {least}, got {value!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise SubmitError(f"--retries must be an integer from 0 to {MAX_RETRIES}, got {retries!r}")


def auth_headers(token: str | None) -> dict[str, str]:
    """``Authorization: Bearer TOKEN`` for a server started with per-group tokens (none without a token)."""
    if token is None:
        return {}
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise SubmitError("the token must be printable ASCII without spaces (as written in the server's tokens file)")
    return {"Authorization": f"Bearer {token}"}


def _submission_file(submission: Any, group: str, saved_dir: str | os.PathLike) -> Path:
    """The path of ``submission``; rankings in memory (a notebook) are saved under ``saved_dir`` first, for the log."""
    if not isinstance(submission, (Mapping, list)):
        return Path(submission)
    from .submission import parse_submission, save_submission

    try:
        in_memory = parse_submission(submission)
    except SubmissionError as exc:
        raise SubmitError(str(exc)) from None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    safe_group = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(group))[:40] or "group"
    return save_submission(Path(saved_dir) / f"{stamp}_{safe_group}.json", in_memory)


def _validated(path: Path, group: str, k: int, data: Any, force: bool, say: Callable[[str], None]
               ) -> tuple[dict[str, Any], list[str]]:
    """(payload, problems) of the file ``path``; :class:`SubmitError` if unreadable, or invalid without ``force``."""
    try:
        rankings = load_submission(path)
    except SubmissionError as exc:
        raise SubmitError(str(exc)) from None
    payload = build_payload(rankings, group)
    problems = check_submission(payload["images"], k=k, data=data)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        if not force:
            raise SubmitError(f"{path}: {len(problems)} problem(s), nothing sent (fix them, or pass --force):\n"
                              f"{listing}{more}")
        say(f"warning: sending despite {len(problems)} problem(s) (--force):\n{listing}{more}")
    return payload, problems


@dataclass
class _Plan:
    """Everything the tries need."""

    url: str
    body: bytes
    timeout: float
    retries: int
    backoff: float
    max_backoff: float
    headers: dict[str, str]
    retry_after_timeout: bool
    record: dict[str, Any]


def _send(plan: _Plan, result: SubmitResult, log: TextIO | None, say: Callable[[str], None], sleep: Callable[[float], None]) -> None:
    """Every try of ``plan`` until one is accepted, not retryable, or the last; each logged to ``log`` (open or None)."""
    total = plan.retries + 1
    for number in range(1, total + 1):
        attempt, parsed, exact = attempt_once(number, plan.url, plan.body, plan.timeout, plan.headers)
        result.attempts.append(attempt)
        result.sent = True  # a try was made (exit code 1, not 2, if it fails)
        result.status = attempt.status
        result.answer = parsed if parsed is not None else (attempt.answer or None)
        if attempt.outcome == "ok":
            result.ok, result.accuracy = True, parsed["accuracy"]
            result.accuracy_text = str(exact["accuracy"])
        if log is not None:
            write_log(log, {
                "time": _now(), **plan.record, "attempt": number, "of": total, "outcome": attempt.outcome,
                "status": attempt.status, "accuracy": result.accuracy if attempt.outcome == "ok" else None,
                "answer": shorten(attempt.answer) if attempt.answer else None,
                "error": shorten(attempt.error) if attempt.error else None,
                "body_sent": attempt.body_sent, "seconds": round(attempt.seconds, 3),
            })
        if attempt.outcome == "ok" or not is_retryable(attempt, plan.retry_after_timeout) or number == total:
            if attempt.outcome == "timeout" and attempt.body_sent and number < total:
                say(f"try {number}/{total}: {_describe(attempt)}; not retried: the server may have received it "
                    "(check its leaderboard; --retry-after-timeout retries anyway)")
            return
        wait = backoff_delay(number, plan.backoff, plan.max_backoff)
        say(f"try {number}/{total}: {_describe(attempt)}; retrying in {wait:g} s")
        sleep(wait)


def submit(
    submission: str | os.PathLike | Mapping[str, Sequence[str]] | list,
    group: str,
    url: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    k: int = 10,
    data: str | os.PathLike | None = None,
    force: bool = False,
    dry_run: bool = False,
    log_path: str | os.PathLike | None = DEFAULT_LOG,
    echo: Callable[[str], None] | None = print,
    sleep: Callable[[float], None] = time.sleep,
    saved_dir: str | os.PathLike = output_dir("submissions") / "sent",
    token: str | None = None,
    retry_after_timeout: bool = False,
) -> SubmitResult:
    """Validate and send the submission file ``submission`` (dict or list format) for ``group``.

    ``submission`` may also be the rankings themselves (either format, in memory): they are first saved as a dict-format
    file under ``saved_dir`` (relative to the working directory), so that the log names a file and its hash.

    ``timeout`` bounds each try's whole wall time. ``retries`` (at most 20) extra tries follow a connection error, a
    5xx answer or a timeout before the body was delivered, waiting ``backoff``, ``2*backoff``, ... seconds (at most
    ``max_backoff``); a timeout after delivery is retried only with ``retry_after_timeout``. ``token`` is sent as
    ``Authorization: Bearer TOKEN`` (never logged). Every try is appended to ``log_path`` (None: no log), which is
    opened before anything is sent. Raises :class:`SubmitError` when nothing can be sent (bad option, unreadable
    file, empty group, bad URL, unwritable log, or problems found by validation without ``force``).
    """
    say = echo or (lambda _line: None)
    check_options(timeout, retries, backoff, max_backoff)
    target = resolve_url(url)
    headers = auth_headers(token)
    if not isinstance(group, str) or not group.strip():
        raise SubmitError("the group name is empty: pass --group NAME (the name your team registered)")
    path = _submission_file(submission, group, saved_dir)
    payload, problems = _validated(path, group, k, data, force, say)
    body = encode_payload(payload)
    result = SubmitResult(ok=False, sent=False, url=target, group=group, problems=problems)
    say(summarize_payload(payload, target, body))
    if dry_run:
        result.dry_run, result.message = True, "dry run: validated, nothing sent"
        say(result.message)
        return result
    record = {
        "url": target, "group": group, "submission": str(path), "submission_abs": str(path.resolve()),
        "sha256": file_sha256(path), "body_sha256": hashlib.sha256(body).hexdigest(),
        "n_queries": len(payload["images"]), "forced": bool(problems), "timeout": timeout,
    }
    plan = _Plan(target, body, timeout, retries, backoff, max_backoff, headers, retry_after_timeout, record)
    log = open_log(log_path) if log_path is not None else None
    try:
        _send(plan, result, log, say, sleep)
    finally:
        if log is not None:
            log.close()
    result.message = _final_message(result)
    return result


def _final_message(result: SubmitResult) -> str:
    last = result.attempts[-1]
    if result.ok:
        return f"accuracy: {result.accuracy_text}"
    if last.outcome in ("timeout", "connection-error") or (last.status or 0) >= 500:
        return f"failed after {len(result.attempts)} try(ies): {_describe(last)}"
    return f"not accepted: {_describe(last)}"


def _describe(attempt: Attempt) -> str:
    if attempt.outcome in ("timeout", "connection-error", "request-error"):
        return f"{attempt.outcome}: {shorten(attempt.error or '', 300)}"
    if attempt.outcome == "bad-answer":
        return f"HTTP {attempt.status}, unexpected answer ({attempt.error}): {shorten(attempt.answer) or '(empty)'}"
    if attempt.outcome == "redirect":
        return f"HTTP {attempt.status}, {attempt.error}"
    return f"HTTP {attempt.status}: {shorten(attempt.answer) or '(empty answer)'}"


# --------------------------------------------------------------------------------------------------------------
# Command line (submit.py)
# --------------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "submit.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Validate a submission file (dict or list format) and send it to the evaluation server. "
                    f"Every try is appended to {DEFAULT_LOG} (relative to the current folder).",
        epilog="exit codes: 0 accepted (accuracy printed), 1 sent but failed or refused, 2 nothing sent "
               "(invalid submission or arguments)",
    )
    parser.add_argument("submission", metavar="SUBMISSION", help="submission JSON, dict or list format")
    parser.add_argument("--group", required=True, metavar="NAME", help="your group name as registered")
    parser.add_argument("--url", default=None,
                        help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL}); redirects are not followed")
    parser.add_argument("--token", default=None, metavar="TOKEN",
                        help="the group's token, for a server started with --tokens (sent as Authorization: Bearer)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="most seconds one try may take in all: connecting, sending and the whole answer "
                             "(default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help=f"extra tries (at most {MAX_RETRIES}) after a connection error, a 5xx answer or a "
                             "timeout before the body was delivered (default: %(default)s)")
    parser.add_argument("--retry-after-timeout", action="store_true",
                        help="also retry a timeout after the body was delivered (the server may then count the "
                             "submission twice)")
    parser.add_argument("--backoff", type=float, default=1.0, metavar="S",
                        help="first wait between tries, doubled each time (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10,
                        help="names expected per query; with --data at most the gallery size (default: %(default)s)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="dataset folder: also check every query and gallery name exists in DIR/test/*")
    parser.add_argument("--force", action="store_true", help="send even if validation finds problems")
    parser.add_argument("--dry-run", action="store_true", help="validate and show the payload, send nothing")
    parser.add_argument("--log", default=str(DEFAULT_LOG), metavar="FILE",
                        help="JSON-lines log of every try, opened before sending (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "submit.py") -> int:
    """``python submit.py SUBMISSION --group NAME ...``; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    from .data import DataError

    try:
        result = submit(
            args.submission, args.group, url=args.url, timeout=args.timeout, retries=args.retries,
            backoff=args.backoff, k=args.k, data=args.data, force=args.force, dry_run=args.dry_run,
            log_path=args.log, token=args.token, retry_after_timeout=args.retry_after_timeout,
        )
    except (SubmitError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_SENT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.ok:
        print(result.message)
        if isinstance(result.answer, dict) and len(result.answer) > 1:
            print(f"answer: {shorten(json.dumps(result.answer, ensure_ascii=False))}")
    elif result.sent:
        print(f"error: {result.message}", file=sys.stderr)
    if result.sent:
        print(f"log: {args.log}")
    return result.exit_code
