"""The dashboard's web application (Starlette): a page, a JSON API over the run stores, and a
Server-Sent Events stream that pushes each step as training commits it.

Security posture: every file served comes from a fixed table of this package's static assets
(no path from the request ever reaches the filesystem); run names are validated and must name a
directory directly under the runs directory; when a token is set, every request must carry it
(``Authorization: Bearer``, ``?token=`` or the cookie the page sets after the first visit);
the Host header is parsed strictly (a token-less dashboard answers only to loopback names); every
response carries a Content-Security-Policy that admits only this server's own scripts and styles.
Streams are bounded: at most ``max_streams`` open at once, at most ``REPLAY_STEPS`` steps
replayed to a new one and ``STREAM_BATCH`` per event, polled by their own small thread pool so
that the API stays responsive however many are open.

Over 450 lines because it is one piece: every route goes through the same security layer
(token, Host check, run-name checks, headers) over one app state, and splitting the routes from
that layer would make each half unsafe to read alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zetaguard.store import DB_NAME, RUN_NAME_PATTERN, RunReader, StoreError, list_runs

# name -> content type: the only files this server ever sends.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
COOKIE = "zetaguard_token"
INITIAL_STEPS = 20000  # what a page loads at first; older steps stay in the store
POLL_SECONDS = 0.5
MIN_TOKEN_LENGTH = 16
MAX_STREAMS = 32  # open streams at once; each polls the store, so more are answered 503
REPLAY_STEPS = INITIAL_STEPS  # a stream never replays more than a page loads at first
STREAM_BATCH = 250  # most rows of each kind one event carries (~80 kB); a stream behind catches up
STREAM_THREADS = 2  # threads polling stores for streams (the API's requests use others)
CURSOR_KEYS = ("steps", "incidents", "recommendations", "recoveries")
MAX_CURSOR = 2**63 - 1  # SQLite's largest row id
_DIGITS = re.compile(r"[0-9]{1,19}")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # a first URL with ?token= goes nowhere else
]


def _static(name: str) -> bytes:
    return (resources.files("zetaguard.dashboard") / "static" / name).read_bytes()


def _step_view(row: dict[str, Any]) -> dict[str, Any]:
    ch = row["channels"]
    return {
        "id": row["id"],
        "step": row["step"],
        "ts": row["ts"],
        "status": row["status"],
        "zeta": row["zeta"],
        "raw_jar": row["raw_jar"],
        "smoothed_jar": row["smoothed_jar"],
        "loss": row["loss"],
        "grad_norm": row["grad_norm"],
        "update_norm": ch.get("update_norm"),
        "param_norm": ch.get("param_norm"),
        "worst_group": row["worst_group"],
        "in_warmup": row["in_warmup"],
    }


def _json(obj: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse(obj, status_code=status_code)


def _error(message: str, status_code: int) -> JSONResponse:
    return _json({"error": message}, status_code)


class Dashboard:
    """The runs a dashboard serves: every run directory under ``runs_dir``, or one run when
    ``runs_dir`` is itself a run (it holds ``run.sqlite``)."""

    def __init__(self, runs_dir: str | Path) -> None:
        root = Path(runs_dir).resolve()
        self.single: str | None = None
        if (root / DB_NAME).is_file():
            self.single = root.name
            root = root.parent
        self.root = root

    def run_path(self, name: str) -> Path:
        if not RUN_NAME_PATTERN.match(name) or (self.single is not None and name != self.single):
            raise KeyError(name)
        path = self.root / name / DB_NAME
        if path.parent.resolve().parent != self.root or not path.is_file():
            raise KeyError(name)
        return path

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for info in list_runs(self.root):
            if self.single is not None and info.name != self.single:
                continue
            out.append(
                {
                    "name": info.name,
                    "steps": info.steps,
                    "last_step": info.last_step,
                    "last_status": info.last_status,
                    "last_ts": info.last_ts,
                    "created": info.created,
                    "incidents": info.incidents,
                }
            )
        return out

    def snapshot(self, name: str) -> dict[str, Any]:
        """Everything a page needs to draw a run at first."""
        with RunReader(self.run_path(name)) as reader, reader.consistent() as r:
            steps = r.tail(INITIAL_STEPS)
            latest = r.steps(since_id=steps[-2]["id"] if len(steps) > 1 else 0, groups=True)
            meta = r.meta()
            config = meta.get("config") or {}
            return {
                "name": name,
                "config": config,
                "thresholds": [
                    config.get("drift_threshold", 0.707),
                    config.get("snap_threshold", 1.414),
                ],
                "steps": [_step_view(s) for s in steps],
                "groups": latest[-1]["groups"] if latest else {},
                "alerts": r.alerts(),
                "incidents": r.incidents(),
                "recommendations": r.recommendations(),
                "recoveries": r.recoveries(),
                "cursor": _cursor(r, steps),
            }

    def changes(self, name: str, cursor: dict[str, int]) -> dict[str, Any] | None:
        """What was committed after ``cursor`` (None when nothing was)."""
        with RunReader(self.run_path(name)) as reader, reader.consistent() as r:
            last = r.tail(1)
            if last:  # a cursor further back than a page would load skips ahead
                cursor["steps"] = max(cursor["steps"], int(last[-1]["id"]) - REPLAY_STEPS)
            steps = r.steps(since_id=cursor["steps"], limit=STREAM_BATCH, groups=False)
            incidents = r.incidents(since_id=cursor["incidents"])[:STREAM_BATCH]
            recs = r.recommendations(since_id=cursor["recommendations"])[:STREAM_BATCH]
            recoveries = r.recoveries(since_id=cursor["recoveries"])[:STREAM_BATCH]
            if not (steps or incidents or recs or recoveries):
                return None
            groups: dict[str, Any] = {}
            if steps:
                groups = r.steps(since_id=steps[-1]["id"] - 1, limit=1, groups=True)[0]["groups"]
            out = {
                "steps": [_step_view(s) for s in steps],
                "groups": groups,
                "incidents": incidents,
                "recommendations": recs,
                "recoveries": recoveries,
                "more": max(map(len, (steps, incidents, recs, recoveries))) >= STREAM_BATCH,
            }
            for key, rows in (
                ("steps", steps),
                ("incidents", incidents),
                ("recommendations", recs),
                ("recoveries", recoveries),
            ):
                if rows:
                    cursor[key] = int(rows[-1]["id"])
            return out


def _cursor(r: RunReader, steps: list[dict[str, Any]]) -> dict[str, int]:
    def last(rows: list[dict[str, Any]]) -> int:
        return int(rows[-1]["id"]) if rows else 0

    return {
        "steps": last(steps),
        "incidents": last(r.incidents()),
        "recommendations": last(r.recommendations()),
        "recoveries": last(r.recoveries()),
    }


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode()


class BadParameter(ValueError):
    """A query parameter out of its range; answered 400 with the message."""


def _cursor_param(request: Request, key: str) -> int:
    raw = request.query_params.get(key, "0")
    if not _DIGITS.fullmatch(raw) or int(raw) > MAX_CURSOR:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadParameter(
            f"query parameter {key!r} must be an integer from 0 to {MAX_CURSOR} (a row id from "
            f"the run's snapshot 'cursor'), got {shown!r}"
        )
    return int(raw)


def check_token(token: str) -> str:
    """``token`` if it is long enough to guess at no useful rate; ValueError naming the fix."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"the dashboard token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH}, "
            "e.g. one made by: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    if any(not c.isprintable() or c.isspace() for c in token):
        raise ValueError("the dashboard token must not contain spaces or control characters")
    return token


def create_app(
    runs_dir: str | Path,
    token: str | None = None,
    poll: float = POLL_SECONDS,
    *,
    max_streams: int = MAX_STREAMS,
) -> Starlette:
    """The dashboard application over ``runs_dir``. With ``token`` (at least 16 characters),
    every request must carry it; the page passes it on as an HttpOnly cookie after a first
    visit with ``?token=``. At most ``max_streams`` live streams are open at once; more are
    answered 503."""
    if poll <= 0 or not math.isfinite(poll):
        raise ValueError(f"poll must be a positive number of seconds, got {poll}")
    if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
        raise ValueError(f"max_streams must be a positive integer, got {max_streams!r}")
    if token is not None:
        check_token(token)
    board = Dashboard(runs_dir)
    # Streams poll in their own threads: however many are open, the API's requests (which use
    # asyncio's default pool) never queue behind them.
    stream_pool = ThreadPoolExecutor(STREAM_THREADS, thread_name_prefix="zetaguard-stream")
    open_streams = 0

    async def index(request: Request) -> Response:
        response = Response(_static("index.html"), media_type=STATIC_FILES["index.html"])
        if token is not None and request.query_params.get("token") == token:
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES or name == "index.html":
            return _error("not found", 404)
        return Response(
            _static(name),
            media_type=STATIC_FILES[name],
            headers={"Cache-Control": "no-cache"},
        )

    async def runs(request: Request) -> Response:
        try:
            return _json({"runs": await asyncio.to_thread(board.runs)})
        except StoreError as e:
            return _error(str(e), 500)

    async def run(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            return _json(await asyncio.to_thread(board.snapshot, name))
        except KeyError:
            return _error(f"no run named {name!r}", 404)
        except StoreError as e:
            return _error(str(e), 500)

    def release() -> None:
        nonlocal open_streams
        open_streams -= 1

    async def stream(request: Request) -> Response:
        nonlocal open_streams
        name = request.path_params["name"]
        try:
            board.run_path(name)
            cursor = {key: _cursor_param(request, key) for key in CURSOR_KEYS}
        except KeyError:
            return _error(f"no run named {name!r}", 404)
        except BadParameter as e:
            return _error(str(e), 400)
        if open_streams >= max_streams:
            return JSONResponse(
                {
                    "error": f"{open_streams} live streams are open, the most this dashboard "
                    f"serves at once; close other dashboard pages, or start zeta-dashboard "
                    f"with a larger --max-streams"
                },
                status_code=503,
                headers={"Retry-After": "5"},
            )
        open_streams += 1
        loop = asyncio.get_running_loop()

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 2000\n\n"
            idle = 0.0
            while not await request.is_disconnected():
                try:
                    change = await loop.run_in_executor(stream_pool, board.changes, name, cursor)
                except (StoreError, KeyError) as e:
                    yield _sse("failure", {"error": str(e)})
                    return
                if change is not None:
                    more = change.pop("more")
                    yield _sse("update", change)
                    idle = 0.0
                    if more:  # behind: the next batch now (sending waits for the client)
                        continue
                else:
                    idle += poll
                    if idle >= 15:  # a comment line keeps proxies from closing the stream
                        yield b": keep-alive\n\n"
                        idle = 0.0
                await asyncio.sleep(poll)

        return _CountedStream(
            events(),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        stream_pool.shutdown(wait=False, cancel_futures=True)

    # Without a token the dashboard is reachable from this machine only, and only under a
    # loopback name: a page elsewhere cannot rebind its own domain to 127.0.0.1 and read runs.
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(_HostGate, loopback_only=token is None),
    ]
    if token is not None:
        middleware.append(Middleware(_TokenGate, token=token))
    return Starlette(
        routes=[
            Route("/", index),
            Route("/static/{name}", static),
            Route("/api/runs", runs),
            Route("/api/runs/{name}", run),
            Route("/api/runs/{name}/stream", stream),
        ],
        middleware=middleware,
        lifespan=lifespan,
    )


class _CountedStream(StreamingResponse):
    """A stream that gives its slot back however it ends (done, failed, client gone)."""

    def __init__(self, content: AsyncIterator[bytes], release: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _SecurityHeaders:
    """ASGI middleware: the CSP and anti-sniffing/framing headers on every response, the
    gates' refusals included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _TokenGate:
    """ASGI middleware: refuses every HTTP request that does not carry the token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            given = (
                request.query_params.get("token")
                or request.cookies.get(COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not hmac.compare_digest(given.encode(), self.expected):
                await _forbidden()(scope, receive, send)
                return
        await self.app(scope, receive, send)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(
    rf"(?:(?P<name>{_LABEL}(?:\.{_LABEL})*\.?)|\[(?P<v6>[0-9a-f:.]+)\])(?::(?P<port>[0-9]{{1,5}}))?"
)


def host_name(header: str) -> str | None:
    """The host of a Host header without its port: a DNS name or dotted IPv4 address (lower
    case), or an IPv6 literal in brackets (compressed form). None when the header is anything
    else: userinfo (``localhost:1@evil.com``), a non-numeric or out-of-range port, spaces,
    an empty or over-long name."""
    header = header.lower()
    m = _HOST.fullmatch(header)
    if m is None or len(header) > 260:
        return None
    if m["port"] is not None and int(m["port"]) > 65535:
        return None
    if m["v6"] is not None:
        try:
            return f"[{ipaddress.IPv6Address(m['v6']).compressed}]"
        except ValueError:
            return None
    name = m["name"].rstrip(".")
    return name if len(name) <= 253 else None


class _HostGate:
    """ASGI middleware: refuses (400) HTTP requests whose Host header is malformed and, with
    ``loopback_only``, (403) those whose host is not a loopback name."""

    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = Request(scope).headers.get("host", "")
            host = host_name(raw)
            refusal = None
            if host is None:
                shown = raw if len(raw) <= 80 else raw[:80] + "..."
                refusal = Response(
                    f"400: malformed Host header {shown!r}: expected a host name, an IPv4 "
                    "address or a bracketed IPv6 address, optionally with :<port>\n",
                    status_code=400,
                    media_type="text/plain; charset=utf-8",
                )
            elif self.loopback_only and host not in LOOPBACK_HOSTS:
                refusal = Response(
                    f"403: this token-less dashboard answers only to loopback names, not "
                    f"{host!r}; open http://127.0.0.1:<port>/ or start it with --token-file\n",
                    status_code=403,
                    media_type="text/plain; charset=utf-8",
                )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _forbidden() -> Response:
    return Response(
        "403: this dashboard needs its token: open it as /?token=<token> or send "
        "'Authorization: Bearer <token>'\n",
        status_code=403,
        media_type="text/plain; charset=utf-8",
    )
