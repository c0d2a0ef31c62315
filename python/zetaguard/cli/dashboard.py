"""``zeta-dashboard``: serve the live dashboard over a directory of run stores."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import stat
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
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--token",
        default=None,
        help=f"access token (16+ characters) required on every request (default: ${TOKEN_ENV}); "
        "open the page as http://HOST:PORT/?token=TOKEN. Other users can read a command line "
        "(ps): prefer --token-file or the environment variable",
    )
    given.add_argument(
        "--token-file",
        default=None,
        help="read the access token from this file (its first line); the file must be readable "
        "by its owner only (chmod 600)",
    )
    p.add_argument("--poll", type=float, default=0.5, help="seconds between store polls")
    p.add_argument(
        "--max-streams",
        type=int,
        default=32,
        help="live streams (open pages) served at once; more are answered 503 (default 32)",
    )
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


def _read_token_file(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as e:
        fail(f"--token-file {str(path)!r}: {e.strerror or e}")
    if not stat.S_ISREG(st.st_mode):
        fail(f"--token-file {str(path)!r} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        fail(
            f"--token-file {str(path)!r} is readable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):03o}): run chmod 600 {str(path)!r}"
        )
    if st.st_size > 4096:
        fail(f"--token-file {str(path)!r} is {st.st_size} bytes; it must hold one token line")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --token-file {str(path)!r}: {e}")
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        fail(f"--token-file {str(path)!r} is empty; write the token on its first line")
    return token


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
    if args.token_file is not None:
        token: str | None = _read_token_file(Path(args.token_file))
    else:
        token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        from zetaguard.dashboard.app import check_token

        try:
            check_token(token)
        except ValueError as e:
            source = (
                "--token-file" if args.token_file else "--token" if args.token else f"${TOKEN_ENV}"
            )
            fail(f"{source}: {e}")
    if not _is_loopback(args.host) and not token:
        fail(
            f"--host {args.host} exposes the dashboard beyond this machine: set a token with "
            f"--token-file, ${TOKEN_ENV} or --token"
        )
    if not 0 <= args.port <= 65535:
        fail(f"--port must be 0..65535, got {args.port}")
    if not 0 < args.poll <= 60:  # also refuses nan
        fail(f"--poll must be a number of seconds in (0, 60], got {args.poll}")
    if args.max_streams < 1:
        fail(f"--max-streams must be a positive number of streams, got {args.max_streams}")
    runs = Path(args.runs)
    _check_runs(runs)
    try:
        import uvicorn

        from zetaguard.dashboard import create_app
    except ImportError as e:
        fail(f"the dashboard needs starlette and uvicorn ({e}): pip install 'zetaguard[dashboard]'")
    app = create_app(runs, token=token, poll=args.poll, max_streams=args.max_streams)
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
