"""The dashboard's web application (Starlette): a page, a JSON API over the run stores, and a
Server-Sent Events stream that pushes each step as training commits it.

Security posture: every file served comes from a fixed table of this package's static assets
(no path from the request ever reaches the filesystem); run names are validated and must name a
directory directly under the runs directory; when a token is set, every request must carry it
(``Authorization: Bearer``, ``?token=`` or the cookie the page sets after the first visit).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

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
            steps = r.steps(since_id=cursor["steps"], groups=False)
            incidents = r.incidents(since_id=cursor["incidents"])
            recs = r.recommendations(since_id=cursor["recommendations"])
            recoveries = r.recoveries(since_id=cursor["recoveries"])
            if not (steps or incidents or recs or recoveries):
                return None
            groups: dict[str, Any] = {}
            if steps:
                groups = r.steps(since_id=steps[-1]["id"] - 1, groups=True)[0]["groups"]
            out = {
                "steps": [_step_view(s) for s in steps],
                "groups": groups,
                "incidents": incidents,
                "recommendations": recs,
                "recoveries": recoveries,
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


def create_app(
    runs_dir: str | Path, token: str | None = None, poll: float = POLL_SECONDS
) -> Starlette:
    """The dashboard application over ``runs_dir``. With ``token``, every request must carry
    it; the page passes it on as an HttpOnly cookie after a first visit with ``?token=``."""
    if poll <= 0 or not math.isfinite(poll):
        raise ValueError(f"poll must be a positive number of seconds, got {poll}")
    board = Dashboard(runs_dir)

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

    async def stream(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            board.run_path(name)
            cursor = {
                key: max(0, int(request.query_params.get(key, "0")))
                for key in ("steps", "incidents", "recommendations", "recoveries")
            }
        except KeyError:
            return _error(f"no run named {name!r}", 404)
        except ValueError:
            return _error("cursor values must be integers", 400)

        async def events() -> AsyncIterator[bytes]:
            yield b"retry: 2000\n\n"
            idle = 0.0
            while not await request.is_disconnected():
                try:
                    change = await asyncio.to_thread(board.changes, name, cursor)
                except (StoreError, KeyError) as e:
                    yield _sse("failure", {"error": str(e)})
                    return
                if change is not None:
                    yield _sse("update", change)
                    idle = 0.0
                else:
                    idle += poll
                    if idle >= 15:  # a comment line keeps proxies from closing the stream
                        yield b": keep-alive\n\n"
                        idle = 0.0
                await asyncio.sleep(poll)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # Without a token the dashboard is reachable from this machine only, and only under a
    # loopback name: a page elsewhere cannot rebind its own domain to 127.0.0.1 and read runs.
    middleware = (
        [Middleware(_TokenGate, token=token)] if token is not None else [Middleware(_LoopbackHostGate)]
    )
    return Starlette(
        routes=[
            Route("/", index),
            Route("/static/{name}", static),
            Route("/api/runs", runs),
            Route("/api/runs/{name}", run),
            Route("/api/runs/{name}/stream", stream),
        ],
        middleware=middleware,
    )


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


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def host_name(header: str) -> str:
    """The host part of a Host header, without its port (IPv6 literals keep their brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _LoopbackHostGate:
    """ASGI middleware: refuses HTTP requests whose Host header is not a loopback name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_name(Request(scope).headers.get("host", ""))
            if host not in LOOPBACK_HOSTS:
                response = Response(
                    f"403: this token-less dashboard answers only to loopback names, not "
                    f"{host!r}; open http://127.0.0.1:<port>/ or start it with --token\n",
                    status_code=403,
                    media_type="text/plain; charset=utf-8",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _forbidden() -> Response:
    return Response(
        "403: this dashboard needs its token: open it as /?token=<token> or send "
        "'Authorization: Bearer <token>'\n",
        status_code=403,
        media_type="text/plain; charset=utf-8",
    )
