"""Hardening II item 5, against the dashboard as a real process over real HTTP: bounded streams
(replay, batch, number of clients), range-checked query parameters, security headers on every
response, token length and the token file, strict Host parsing."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from zetaguard import ZetaGuard

from tests.support.dashboard import dashboard

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from zetaguard.dashboard.app import REPLAY_STEPS, STREAM_BATCH

TOKEN = "a-long-enough-dashboard-token"
SMALL = 2 * STREAM_BATCH + STREAM_BATCH // 2


def _write_run(root: Path, name: str, steps: int) -> None:
    """A run of ``steps`` distinct steps: one real monitored step, then copies of its result
    with the step number advanced (a real guard takes seconds for twenty thousand)."""
    guard = ZetaGuard(run_dir=root, run_name=name, warmup_steps=2, auto_recover=False)
    w = {"w": np.ones(8, np.float32)}
    guard.monitor(w, loss=1.0)
    store, last = guard.run_store, guard.last_result
    assert store is not None
    assert last is not None
    for i in range(1, steps):
        store.record_step(dataclasses.replace(last, step=last.step + i))
    guard.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _write_run(root, "small", SMALL)
    _write_run(root, "big", REPLAY_STEPS + 1500)
    return root


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _request(
    port: int, path: str, host: str | None = "127.0.0.1", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte (so the Host header is exactly ``host``);
    (status, headers in lower case, body)."""
    lines = [f"GET {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("Connection: close")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        parsed[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), parsed, body


class _Stream:
    """An open SSE stream read line by line from a raw socket."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        self.file = self.sock.makefile("rb")
        self.status = int(self.file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self.file.readline().decode().strip()) != "":
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()

    def update(self) -> dict:
        """The next ``update`` event's data (chunked transfer framing lines are skipped)."""
        event = None
        while True:
            line = self.file.readline()
            assert line, "stream closed"
            text = line.decode().strip()
            if text.startswith("event:"):
                event = text.split(":", 1)[1].strip()
            elif text.startswith("data:") and event == "update":
                return json.loads(text.split(":", 1)[1])

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_stream_replays_in_batches_and_never_more_than_a_page_loads(runs: Path) -> None:
    with dashboard(runs) as url:
        s = _Stream(_port(url), "/api/runs/small/stream?steps=0")
        try:
            assert s.status == 200
            batches = [s.update()["steps"] for _ in range(3)]
        finally:
            s.close()
        assert [len(b) for b in batches] == [STREAM_BATCH, STREAM_BATCH, STREAM_BATCH // 2]
        assert [r["id"] for b in batches for r in b] == list(range(1, SMALL + 1))

        # From cursor 0 on a run longer than a page loads: only the last REPLAY_STEPS come.
        s = _Stream(_port(url), "/api/runs/big/stream?steps=0")
        try:
            got = []
            while len(got) < REPLAY_STEPS:
                batch = s.update()["steps"]
                assert len(batch) <= STREAM_BATCH
                got += batch
        finally:
            s.close()
        last = REPLAY_STEPS + 1500
        assert [r["id"] for r in got] == list(range(last - REPLAY_STEPS + 1, last + 1))


def test_streams_beyond_the_limit_get_503_and_slots_come_back(runs: Path) -> None:
    with dashboard(runs, "--max-streams", "3") as url:
        port = _port(url)
        open_ = [_Stream(port, f"/api/runs/small/stream?steps={SMALL}") for _ in range(3)]
        try:
            assert [s.status for s in open_] == [200, 200, 200]
            status, headers, body = _request(port, f"/api/runs/small/stream?steps={SMALL}")
            assert status == 503
            assert headers["retry-after"] == "5"
            assert "--max-streams" in json.loads(body)["error"]
            # The API keeps answering while every stream slot is taken.
            status, _, body = _request(port, "/api/runs")
            assert status == 200
            assert {r["name"] for r in json.loads(body)["runs"]} == {"small", "big"}
            open_.pop().close()
            deadline = time.monotonic() + 10  # the server notices the close at its next poll
            while True:
                s = _Stream(port, f"/api/runs/small/stream?steps={SMALL}")
                if s.status == 200 or time.monotonic() > deadline:
                    break
                s.close()
                time.sleep(0.2)
            open_.append(s)
            assert s.status == 200
        finally:
            for s in open_:
                s.close()


BAD_CURSORS = [
    "99999999999999999999999999",  # was an unhandled OverflowError in SQLite's binding
    str(2**63),
    "1" * 5000,  # past Python's int-from-string digit limit
    "-1",
    "+5",
    " 5",
    "5_000",
    "1e3",
    "0x10",
    "abc",
    "",
    "\u0661",  # ARABIC-INDIC DIGIT ONE: int() would take it
]


@pytest.mark.parametrize("key", ["steps", "incidents", "recommendations", "recoveries"])
def test_cursor_parameters_are_range_checked(runs: Path, key: str) -> None:
    from urllib.parse import quote

    with dashboard(runs) as url:
        port = _port(url)
        for raw in BAD_CURSORS:
            status, headers, body = _request(port, f"/api/runs/small/stream?{key}={quote(raw)}")
            assert status == 400, (key, raw, status, body[:200])
            assert headers["content-type"].startswith("application/json")
            error = json.loads(body)["error"]
            assert f"'{key}'" in error
            assert "0 to 9223372036854775807" in error
        # The largest row id is legal: a stream that has everything and waits for more.
        s = _Stream(port, f"/api/runs/small/stream?{key}={2**63 - 1}")
        assert s.status == 200
        s.close()
        assert _request(port, "/api/runs")[0] == 200  # still serving


def _check_security_headers(headers: dict[str, str], what: str) -> None:
    csp = headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp, what
    assert "script-src 'self'" in csp, what
    assert "frame-ancestors 'none'" in csp, what
    assert "unsafe-inline" not in csp, what
    assert "unsafe-eval" not in csp, what
    assert headers.get("x-content-type-options") == "nosniff", what
    assert headers.get("x-frame-options") == "DENY", what


def test_security_headers_on_every_response(runs: Path, tmp_path: Path) -> None:
    with dashboard(runs) as url:
        port = _port(url)
        for path, host, expected in [
            ("/", "127.0.0.1", 200),
            ("/static/app.js", "127.0.0.1", 200),
            ("/static/style.css", "127.0.0.1", 200),
            ("/api/runs", "127.0.0.1", 200),
            ("/api/runs/small", "127.0.0.1", 200),
            ("/api/runs/nope", "127.0.0.1", 404),
            ("/static/nope.js", "127.0.0.1", 404),
            ("/api/runs/small/stream?steps=x", "127.0.0.1", 400),
            ("/api/runs", "evil.example", 403),
            ("/api/runs", "localhost:1@evil.com", 400),
        ]:
            status, headers, _ = _request(port, path, host)
            assert status == expected, (path, host, status)
            _check_security_headers(headers, f"{path} Host {host}")
        s = _Stream(port, f"/api/runs/small/stream?steps={SMALL}")
        assert s.status == 200
        _check_security_headers(s.headers, "stream")
        s.close()
    env = {**os.environ, "ZETAGUARD_DASHBOARD_TOKEN": TOKEN}
    with dashboard(runs, env=env) as url:
        status, headers, _ = _request(_port(url), "/api/runs")
        assert status == 403  # the token gate's own refusal carries them too
        _check_security_headers(headers, "token refusal")


MALFORMED_HOSTS = [
    "localhost:1@evil.com",
    "localhost@evil.com",
    "user@localhost",
    "localhost:99999",
    "localhost:80:80",
    "localhost:",
    "localhost:abc",
    "localhost:+80",
    "127.0.0.1 evil.example",
    "[::1",
    "::1",
    "[not-v6]",
    "local_host",
    "localhost/evil",
    "",
]


def test_host_header_is_parsed_strictly(runs: Path) -> None:
    with dashboard(runs) as url:
        port = _port(url)
        for host in MALFORMED_HOSTS:
            status, _, body = _request(port, "/api/runs", host)
            assert status == 400, (host, status)
            assert b"malformed Host header" in body
            assert b"small" not in body
        status, _, body = _request(port, "/api/runs", host=None)  # no Host at all
        assert status == 400
        for host in (
            "127.0.0.1",
            f"127.0.0.1:{port}",
            f"LOCALHOST:{port}",
            "localhost.",
            f"[::1]:{port}",
            "[0:0:0:0:0:0:0:1]",
        ):
            status, _, body = _request(port, "/api/runs", host)
            assert status == 200, (host, status)
        for host in ("evil.example", f"127.0.0.1.evil.example:{port}", "[::2]"):
            status, _, body = _request(port, "/api/runs", host)
            assert status == 403, (host, status)
            assert b"small" not in body
    # With a token, any well-formed name is served (a reverse proxy's), a malformed one is not.
    env = {**os.environ, "ZETAGUARD_DASHBOARD_TOKEN": TOKEN}
    with dashboard(runs, env=env) as url:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert _request(_port(url), "/api/runs", "dash.example.org", auth)[0] == 200
        status, _, body = _request(_port(url), "/api/runs", "localhost:1@evil.com", auth)
        assert status == 400
        assert b"small" not in body


def _cli(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ZETAGUARD_DASHBOARD_TOKEN"}
    if env_token is not None:
        env["ZETAGUARD_DASHBOARD_TOKEN"] = env_token
    return subprocess.run(
        [sys.executable, "-m", "zetaguard.cli.dashboard", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_short_tokens_are_refused_from_every_source(runs: Path, tmp_path: Path) -> None:
    short = "fifteen-chars-x"
    assert len(short) == 15
    token_file = tmp_path / "short"
    token_file.write_text(short + "\n")
    token_file.chmod(0o600)
    for r, source in [
        (_cli("--runs", str(runs), "--token", short), "--token"),
        (_cli("--runs", str(runs), env_token=short), "$ZETAGUARD_DASHBOARD_TOKEN"),
        (_cli("--runs", str(runs), "--token-file", str(token_file)), "--token-file"),
    ]:
        assert r.returncode == 2, r.stderr
        assert source in r.stderr
        assert "15 characters; use at least 16" in r.stderr
        assert "secrets.token_urlsafe" in r.stderr
        assert "Traceback" not in r.stderr


def test_token_file_must_be_private_and_hold_a_token(runs: Path, tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    for mode in (0o644, 0o640, 0o604):
        f.chmod(mode)
        r = _cli("--runs", str(runs), "--token-file", str(f))
        assert r.returncode == 2
        assert f"readable by other users (mode {mode:03o})" in r.stderr
        assert f"chmod 600 '{f}'" in r.stderr
    f.chmod(0o600)
    f.write_text("\n")
    r = _cli("--runs", str(runs), "--token-file", str(f))
    assert r.returncode == 2
    assert "is empty" in r.stderr
    r = _cli("--runs", str(runs), "--token-file", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert "No such file" in r.stderr
    r = _cli("--runs", str(runs), "--token-file", str(tmp_path))
    assert r.returncode == 2
    assert "not a regular file" in r.stderr
    r = _cli("--runs", str(runs), "--token-file", str(f), "--token", TOKEN)
    assert r.returncode == 2
    assert "not allowed with" in r.stderr
    # A private file with a good token serves, and the token is not on the command line.
    f.write_text(TOKEN + "\n")
    with dashboard(runs, "--token-file", str(f), "--host", "0.0.0.0") as url:
        port = _port(url)
        assert _request(port, "/api/runs")[0] == 403
        assert _request(port, "/api/runs", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def test_cli_refuses_bad_limits(runs: Path) -> None:
    for args, message in [
        (("--max-streams", "0"), "--max-streams must be a positive"),
        (("--poll", "0"), "--poll must be"),
        (("--poll", "nan"), "--poll must be"),
        (("--poll", "1e308"), "--poll must be"),
    ]:
        r = _cli("--runs", str(runs), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr
