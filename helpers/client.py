"""Submitting to the evaluation server (the course server or a local ``python -m helpers serve``).

The protocol: ``POST URL`` with ``Content-Type: application/json`` and the body
``{"groupname": NAME, "images": {query: [gallery, ...]}}``; the server answers ``{"accuracy": score, ...}``.

:func:`submit` reads a submission file of either format, validates it (nothing is sent while problems remain,
unless ``force``), sends it, retries connection errors, timeouts and 5xx answers with exponential backoff (never a
4xx), and appends every attempt to a JSON-lines log (``submissions/submit_log.jsonl`` by default, relative to the
working directory). ``submit.py`` at the repository root and the notebooks call it; :func:`main` is the command line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import decimal
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .submission import Rankings, SubmissionError, load_submission, validate_submission

DEFAULT_URL = "http://tatooine.disi.unitn.it:3001/retrieval/"
URL_ENV = "RETRIEVAL_SERVER_URL"
DEFAULT_LOG = Path("submissions") / "submit_log.jsonl"
#: Longest answer text kept in the log and printed (characters).
ANSWER_LIMIT = 500
#: Most bytes read from an answer; a larger answer is cut (the course server answers a few dozen bytes).
MAX_ANSWER_BYTES = 1 << 20

#: Exit codes of :func:`main`.
EXIT_OK, EXIT_FAILED, EXIT_NOT_SENT = 0, 1, 2


class SubmitError(Exception):
    """A submission that cannot be sent (unreadable file, invalid content, bad URL)."""


@dataclass
class Attempt:
    """One request and what came back."""

    number: int
    outcome: str  # ok | http-error | bad-answer | timeout | connection-error
    status: int | None = None
    answer: str = ""
    error: str | None = None
    seconds: float = 0.0


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
    """``url`` if given, else ``$RETRIEVAL_SERVER_URL``, else the course server."""
    chosen = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if not chosen.startswith(("http://", "https://")):
        raise SubmitError(f"server URL must start with http:// or https://, got {chosen!r}")
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
    and gallery name must exist in ``data``'s ``test/query`` and ``test/gallery`` folders."""
    if data is None:
        return validate_submission(rankings, k=k)
    from .data import load_retrieval_set

    dataset = load_retrieval_set(data)
    return validate_submission(rankings, k=k, query_names=dataset.query_names, gallery_names=dataset.gallery_names)


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
def append_log(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (folders created) and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(record), ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


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
# Sending
# --------------------------------------------------------------------------------------------------------------
def _read_answer(response, deadline: float) -> bytes:
    """The answer body, read in pieces so that a server trickling bytes cannot hold us past ``deadline``."""
    import requests

    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=8192):
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
        if time.monotonic() > deadline:
            raise requests.Timeout("the answer took longer than the timeout to arrive")
    return b"".join(chunks)


def _parse_answer(raw: bytes) -> tuple[Any, Any]:
    """(value, value with floats kept as their exact text) of a JSON answer; raises ValueError if not JSON."""
    text = raw.decode("utf-8")
    return json.loads(text), json.loads(text, parse_float=decimal.Decimal)


def post_once(session, url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """One POST; returns (status, answer bytes). Raises ``requests`` connection errors and timeouts."""
    start = time.monotonic()
    response = session.post(
        url, data=body, headers={"Content-Type": "application/json", "Accept": "application/json"},
        timeout=(timeout, timeout), stream=True, allow_redirects=True,
    )
    try:
        return response.status_code, _read_answer(response, start + timeout)
    finally:
        response.close()


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Wait before try ``attempt + 1``: ``base * 2 ** (attempt - 1)``, at most ``cap`` seconds."""
    return min(cap, base * (2 ** (attempt - 1)))


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
    session=None,
    echo: Callable[[str], None] | None = print,
    sleep: Callable[[float], None] = time.sleep,
    saved_dir: str | os.PathLike = Path("submissions") / "sent",
) -> SubmitResult:
    """Validate and send the submission file ``submission`` (dict or list format) for ``group``.

    ``submission`` may also be the rankings themselves (either format, in memory): they are first saved as a dict-format
    file under ``saved_dir`` (relative to the working directory), so that the log names a file and its hash.

    ``retries`` extra tries follow a connection error, a timeout or a 5xx answer, waiting ``backoff``, ``2*backoff``,
    ... seconds (at most ``max_backoff``); a 4xx or an answer that is not the expected JSON ends at once. ``timeout``
    bounds each try (connecting, and the whole answer). Every try is appended to ``log_path`` (None: no log).
    Raises :class:`SubmitError` when nothing can be sent (unreadable file, empty group, bad URL, or problems found
    by validation without ``force``; the message lists them).
    """
    say = echo or (lambda _line: None)
    if retries < 0:
        raise SubmitError(f"--retries must be 0 or more, got {retries}")
    if timeout <= 0:
        raise SubmitError(f"--timeout must be positive, got {timeout}")
    target = resolve_url(url)
    if not isinstance(group, str) or not group.strip():
        raise SubmitError("the group name is empty: pass --group NAME (the name your team registered)")
    if isinstance(submission, (Mapping, list)):  # rankings in memory (a notebook): saved first, for the log
        from .submission import parse_submission, save_submission

        try:
            in_memory = parse_submission(submission)
        except SubmissionError as exc:
            raise SubmitError(str(exc)) from None
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        safe_group = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(group))[:40] or "group"
        submission = save_submission(Path(saved_dir) / f"{stamp}_{safe_group}.json", in_memory)
    path = Path(submission)
    try:
        rankings = load_submission(path)
    except SubmissionError as exc:
        raise SubmitError(str(exc)) from None
    payload = build_payload(rankings, group)
    body = encode_payload(payload)
    problems = check_submission(payload["images"], k=k, data=data)
    result = SubmitResult(ok=False, sent=False, url=target, group=group, problems=problems)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        if not force:
            raise SubmitError(f"{path}: {len(problems)} problem(s), nothing sent (fix them, or pass --force):\n"
                              f"{listing}{more}")
        say(f"warning: sending despite {len(problems)} problem(s) (--force):\n{listing}{more}")
    say(summarize_payload(payload, target, body))
    if dry_run:
        result.dry_run = True
        result.message = "dry run: validated, nothing sent"
        say(result.message)
        return result

    import requests

    base_record = {
        "url": target, "group": group, "submission": str(path), "submission_abs": str(path.resolve()),
        "sha256": file_sha256(path), "body_sha256": hashlib.sha256(body).hexdigest(),
        "n_queries": len(payload["images"]), "forced": bool(problems), "timeout": timeout,
    }
    own_session = session is None
    session = session or requests.Session()
    total = retries + 1
    try:
        for number in range(1, total + 1):
            start = time.monotonic()
            attempt = Attempt(number=number, outcome="connection-error")
            parsed = exact = None
            try:
                status, raw = post_once(session, target, body, timeout)
                attempt.status = status
                text = raw.decode("utf-8", errors="replace")
                attempt.answer = text
                try:
                    parsed, exact = _parse_answer(raw)
                except ValueError:
                    parsed = exact = None
                if status >= 500:
                    attempt.outcome = "http-error"
                elif status >= 400:
                    attempt.outcome = "http-error"
                elif isinstance(parsed, dict) and "accuracy" in parsed:
                    attempt.outcome = "ok"
                else:
                    attempt.outcome = "bad-answer"
            except requests.Timeout as exc:
                attempt.outcome, attempt.error = "timeout", f"no complete answer within {timeout} s ({exc})"
            except requests.ConnectionError as exc:
                attempt.outcome, attempt.error = "connection-error", str(exc)
            except requests.RequestException as exc:  # invalid URL and the like: retrying cannot help
                attempt.outcome, attempt.error = "request-error", str(exc)
            attempt.seconds = time.monotonic() - start
            result.attempts.append(attempt)
            result.sent = True
            result.status = attempt.status
            result.answer = parsed if parsed is not None else (attempt.answer or None)
            if attempt.outcome == "ok":
                result.ok = True
                result.accuracy = parsed["accuracy"]
                result.accuracy_text = str(exact["accuracy"])
            if log_path is not None:
                append_log(log_path, {
                    "time": _now(), **base_record, "attempt": number, "of": total, "outcome": attempt.outcome,
                    "status": attempt.status, "accuracy": result.accuracy if attempt.outcome == "ok" else None,
                    "answer": shorten(attempt.answer) if attempt.answer else None,
                    "error": shorten(attempt.error) if attempt.error else None,
                    "seconds": round(attempt.seconds, 3),
                })
            retryable = attempt.outcome in ("timeout", "connection-error") or (
                attempt.outcome == "http-error" and attempt.status is not None and attempt.status >= 500)
            described = _describe(attempt)
            if attempt.outcome == "ok" or not retryable or number == total:
                break
            wait = backoff_delay(number, backoff, max_backoff)
            say(f"try {number}/{total}: {described}; retrying in {wait:g} s")
            sleep(wait)
    finally:
        if own_session:
            session.close()
    last = result.attempts[-1]
    if result.ok:
        result.message = f"accuracy: {result.accuracy_text}"
    elif last.outcome in ("timeout", "connection-error") or (last.status or 0) >= 500:
        result.message = f"failed after {len(result.attempts)} try(ies): {_describe(last)}"
    else:
        result.message = f"not accepted: {_describe(last)}"
    return result


def _describe(attempt: Attempt) -> str:
    if attempt.outcome in ("timeout", "connection-error", "request-error"):
        return f"{attempt.outcome}: {shorten(attempt.error or '', 300)}"
    if attempt.outcome == "bad-answer":
        return f"HTTP {attempt.status}, unexpected answer (no accuracy): {shorten(attempt.answer) or '(empty)'}"
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
                        help=f"server URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds allowed per try, connecting and answering (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="extra tries after a connection error, timeout or 5xx answer (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=1.0, metavar="S",
                        help="first wait between tries, doubled each time (default: %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="names expected per query (default: %(default)s)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="dataset folder: also check every query and gallery name exists in DIR/test/*")
    parser.add_argument("--force", action="store_true", help="send even if validation finds problems")
    parser.add_argument("--dry-run", action="store_true", help="validate and show the payload, send nothing")
    parser.add_argument("--log", default=str(DEFAULT_LOG), metavar="FILE",
                        help="JSON-lines log of every try (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "submit.py") -> int:
    """``python submit.py SUBMISSION --group NAME ...``; returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    from .data import DataError

    try:
        result = submit(
            args.submission, args.group, url=args.url, timeout=args.timeout, retries=args.retries,
            backoff=args.backoff, k=args.k, data=args.data, force=args.force, dry_run=args.dry_run,
            log_path=args.log,
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
