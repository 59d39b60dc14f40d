"""What protects the local evaluation server (:mod:`helpers.server`): its resource limits, per-group rate limits
and tokens, the ``Host``/``Origin`` check, and a uvicorn protocol that drops connections whose request head does
not arrive in time.

What this protects against: one client or web page exhausting memory, disk or connections, a web page the user
visits posting to the server (foreign ``Origin``) or reaching it through DNS rebinding (foreign ``Host``), and, with
tokens, anyone who reaches the port submitting under another group's name. What it does not: eavesdropping (plain
HTTP, the token travels in clear text), a determined attacker on the network opening many connections from many
addresses, or a group that shares its token. FastAPI, Starlette and uvicorn are imported only when used.
"""

from __future__ import annotations

import collections
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


@dataclass(frozen=True)
class ServerLimits:
    """Resource limits of the local server (each can be set from ``python -m helpers serve``)."""

    #: Largest accepted body (bytes); the course client sends about 50 bytes per name.
    max_body_bytes: int = 10 * 1024 * 1024
    #: Most gallery names accepted for one query.
    max_names: int = 100
    #: Most queries accepted in one body; None: twice the ground truth's, and at least the ground truth's + 100.
    max_queries: int | None = None
    #: Seconds a request body may take to arrive, counted from the end of its head (then 408).
    read_timeout: float = 30.0
    #: Seconds a connection may take to send a complete request head (then it is closed).
    head_timeout: float = 5.0
    #: Seconds an idle keep-alive connection stays open (uvicorn's ``timeout_keep_alive``).
    keep_alive: int = 5
    #: Most open connections. A new one past it closes the oldest connection still waiting for its request head
    #: (a slow client cannot starve real ones); when every connection is busy with a request, it gets 503.
    max_connections: int = 64
    #: Most bodies parsed and scored at once (the others wait): bounds the memory of parsing.
    max_parallel: int = 2
    #: Most body bytes held by all requests being read at once (at least one full body); over it, 503.
    max_pending_bytes: int = 32 * 1024 * 1024
    #: Most submissions one group may make in any 60 s window (0: no limit); over it, 429 with Retry-After.
    rate_per_minute: int = 10

    def queries_allowed(self, n_truth: int) -> int:
        """The most queries one body may hold, for a ground truth of ``n_truth`` queries."""
        return self.max_queries if self.max_queries is not None else max(2 * n_truth, n_truth + 100)

    def check(self) -> None:
        """``ValueError`` naming the first limit that is not a positive finite number."""
        for name in ("max_body_bytes", "max_names", "read_timeout", "head_timeout", "keep_alive", "max_connections",
                     "max_parallel", "max_pending_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"server limit {name} must be a positive finite number, got {value!r}")
        if self.rate_per_minute < 0 or (self.max_queries is not None and self.max_queries < 1):
            raise ValueError("the rate limit must be 0 or more and max_queries at least 1")


class RateLimiter:
    """At most ``per_minute`` events per key in any sliding 60-second window (thread-safe; 0 disables it)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic, window: float = 60.0):
        self.per_minute = per_minute
        self.window = window
        self.clock = clock
        self._events: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def wait_needed(self, key: str) -> float:
        """0.0 and the event is counted, or the seconds to wait before ``key`` may try again (not counted)."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            for other in [k for k, q in self._events.items() if q and q[-1] <= now - self.window]:
                del self._events[other]  # forget keys with no recent event: the table stays small
            events = self._events.setdefault(key, collections.deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.per_minute:
                return max(0.001, events[0] + self.window - now)
            events.append(now)
            return 0.0


def load_tokens(path: str | os.PathLike) -> dict[str, str]:
    """``{group: token}`` from a JSON file; ``ValueError`` with the reason for anything else."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the tokens file {path}: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"the tokens file {path} must be a non-empty JSON object {{\"group\": \"token\", ...}}")
    for group, token in raw.items():
        if not isinstance(token, str) or len(token) < 8 or not token.isascii() or not token.isprintable() \
                or any(c.isspace() for c in token):
            raise ValueError(f"the token of group {group!r} in {path} must be printable ASCII without spaces, "
                             "at least 8 characters")
    return dict(raw)


def token_problem(tokens: Mapping[str, str] | None, group: str, authorization: str | None) -> tuple[int, str] | None:
    """(status, message) when ``group`` may not submit with the ``Authorization`` header given; None when it may."""
    if tokens is None:
        return None
    expected = tokens.get(group)
    if expected is None:
        return 403, f"group {group!r} is not registered on this server"
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return 401, "this server needs the group's token: send it with submit.py --token TOKEN"
    return None


# --------------------------------------------------------------------------------------------------------------
# Host and Origin
# --------------------------------------------------------------------------------------------------------------
def allowed_authorities(server: tuple[str, int | None] | None, extra_hosts: Iterable[str] = ()) -> set[str]:
    """The ``Host`` values (and ``Origin`` authorities) a request to ``server`` (host, port) may carry: the
    listening address, ``localhost`` and ``127.0.0.1`` (and ``extra_hosts``), with the port."""
    host, port = server if server else ("localhost", None)
    names = {host, "localhost", "127.0.0.1", "::1", *extra_hosts}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    allowed = {f"{n}:{port}".lower() for n in names} if port else set()
    if port in (80, None):
        allowed |= {n.lower() for n in names}
    return allowed


def foreign_request(scope: Mapping[str, Any], extra_hosts: Iterable[str] = ()) -> str | None:
    """Why a request is refused as foreign (a ``Host`` or ``Origin`` naming another site), or None.

    A request without ``Origin`` (every non-browser client, the course's included) is judged by its ``Host`` only.
    """
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    allowed = allowed_authorities(scope.get("server"), extra_hosts)
    host = headers.get("host")
    if host is not None and host.strip().lower() not in allowed:
        return f"Host {host[:100]!r} is not this server (start it with --allow-host NAME to accept that name)"
    origin = headers.get("origin")
    if origin is not None:
        scheme, _, authority = origin.strip().lower().partition("://")
        if scheme not in ("http", "https") or authority.rstrip("/") not in allowed:
            return f"requests from the web page {origin[:100]!r} are refused"
    return None


class GuardMiddleware:
    """ASGI middleware answering 403 ``{"error": ...}`` to a foreign ``Host`` or ``Origin`` (see
    :func:`foreign_request`)."""

    def __init__(self, app, extra_hosts: Iterable[str] = ()):
        self.app = app
        self.extra_hosts = tuple(extra_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            problem = foreign_request(scope, self.extra_hosts)
            if problem:
                from starlette.responses import JSONResponse

                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------------------------
# uvicorn
# --------------------------------------------------------------------------------------------------------------
_BUSY_BODY = b'{"error": "the server is busy: too many open requests; try again shortly"}'
#: The raw answer to a connection past the limit when every open one is busy with a request.
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 2\r\n"
               b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


def guarded_protocol(head_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with two guards uvicorn lacks: a connection that has not sent a complete request head
    ``head_timeout`` seconds after it opened (or after its previous answer) is closed, and at most
    ``max_connections`` stay open: a new one closes the connection that has waited longest for its head, or, when
    every connection is busy with a request, is answered 503 and closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedProtocol(H11Protocol):
        _head_timer = None
        _waiting_since = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()
            self._make_room()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._waiting_since = self.loop.time()
            self._head_timer = self.loop.call_later(head_timeout, self._head_deadline)

        def _head_deadline(self) -> None:
            if self._waiting_for_head():
                self.transport.close()

        def _make_room(self) -> None:
            open_ = [c for c in self.connections if not c.transport.is_closing()]
            if len(open_) <= max_connections:
                return
            waiting = [c for c in open_ if c is not self and isinstance(c, GuardedProtocol) and c._waiting_for_head()]
            if waiting:
                min(waiting, key=lambda c: c._waiting_since).transport.close()
            else:
                self.transport.write(BUSY_ANSWER)
                self.transport.close()

    return GuardedProtocol


def uvicorn_config(app: Any, limits: ServerLimits, **options: Any) -> Any:
    """A ``uvicorn.Config`` applying ``limits`` (connections, keep-alive, request-head deadline).

    uvicorn's own ``limit_concurrency`` stays one above ``max_connections``, as a backstop: the protocol keeps the
    open connections at ``max_connections``, closing slow ones first, where uvicorn would refuse everyone alike.
    """
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(limits.head_timeout, limits.max_connections),
                          limit_concurrency=limits.max_connections + 1, timeout_keep_alive=limits.keep_alive,
                          **options)
