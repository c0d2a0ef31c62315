"""``zeta-dashboard``: serve the live dashboard over a directory of run stores."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from zetaguard.cli import fail
from zetaguard.store import DB_NAME, DEFAULT_RUN_DIR, RunReader, StoreError

TOKEN_ENV = "ZETAGUARD_DASHBOARD_TOKEN"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zeta-dashboard",
        description="Live dashboard of zetaguard run stores: stability metrics as training "
        "writes them, historical charts, alert history, recommendations.",
    )
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks one)")
    p.add_argument(
        "--runs",
        default=DEFAULT_RUN_DIR,
        help=f"directory of runs, as given to ZetaGuard(run_dir=...), or one run's directory "
        f"(default ./{DEFAULT_RUN_DIR})",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1); any non-loopback address requires a token",
    )
    p.add_argument(
        "--token",
        default=None,
        help=f"access token required on every request (default: ${TOKEN_ENV}); open the page "
        "as http://HOST:PORT/?token=TOKEN",
    )
    p.add_argument("--poll", type=float, default=0.5, help="seconds between store polls")
    return p


def _check_runs(runs: Path) -> None:
    if not runs.exists():
        fail(
            f"run directory {str(runs)!r} does not exist: pass --runs with the directory given "
            "to ZetaGuard(run_dir=...)"
        )
    if not runs.is_dir():
        fail(f"--runs {str(runs)!r} is a file; pass the directory that holds the runs")
    single = runs / DB_NAME
    if single.is_file():
        try:
            RunReader(single).close()
        except StoreError as e:
            fail(str(e))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fail(
            f"cannot listen on {host}:{port}: {e.strerror or e}; is another dashboard running? "
            "Choose another --port (or 0 for any free one)"
        )
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not _is_loopback(args.host) and not token:
        fail(
            f"--host {args.host} exposes the dashboard beyond this machine: set a token with "
            f"--token or ${TOKEN_ENV}"
        )
    if not 0 <= args.port <= 65535:
        fail(f"--port must be 0..65535, got {args.port}")
    runs = Path(args.runs)
    _check_runs(runs)
    try:
        import uvicorn

        from zetaguard.dashboard import create_app
    except ImportError as e:
        fail(f"the dashboard needs starlette and uvicorn ({e}): pip install 'zetaguard[dashboard]'")
    app = create_app(runs, token=token, poll=args.poll)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    query = "/?token=<token>" if token else "/"
    print(f"zeta-dashboard: serving {runs.resolve()} on http://{shown}:{port}{query}", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
