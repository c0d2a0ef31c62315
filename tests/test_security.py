"""The security properties SECURITY.md promises, each checked against the real thing: the
dashboard's bind address, token and path handling over HTTP; checkpoints and state files that
never execute code from the file unless a flag says so; webhooks that go only where configured."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard.state import StateFileError


class Payload:
    """Unpickling this creates `marker`: proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# ---- code execution from files ---------------------------------------------------------------------


def test_state_file_with_a_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.zg"
    with open(bad, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, meta=np.array([Payload(marker)], dtype=object))
    with pytest.raises(StateFileError, match="not a readable zetaguard state file"):
        ZetaGuard().load_state(bad)
    assert not marker.exists()


def test_monitor_checkpoint_loads_weights_only(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from zetaguard.cli.monitor import CheckpointError, load_checkpoint

    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(3), "trap": Payload(marker)}, ckpt)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.ones(3)}, good)
    assert set(load_checkpoint(good).weights) == {"weight"}


def test_stress_runs_pickles_only_with_the_explicit_flag(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from zetaguard.cli.stress import ModelLoadError, load_model

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save(Payload(marker), path)
    with pytest.raises(ModelLoadError, match="--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    with pytest.raises(ModelLoadError):  # not a module, but the flag let the pickle run
        load_model(path, trust_pickle=True)
    assert marker.exists()


def test_state_files_are_written_without_pickle(tmp_path: Path) -> None:
    g = ZetaGuard()
    for t in range(3):
        g.monitor({"w": np.full(5, float(t), np.float32)})
    g.save_state(tmp_path / "s.zg")
    with np.load(tmp_path / "s.zg", allow_pickle=False) as z:  # raises if any array pickles
        assert all(z[name].dtype != object for name in z.files)


# ---- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_defaults_to_loopback_and_demands_a_token_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("starlette")
    from zetaguard.cli.dashboard import build_parser, main

    assert build_parser().parse_args([]).host == "127.0.0.1"
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(SystemExit):
            main(["--host", host, "--runs", str(tmp_path), "--port", "0"])
        assert "token" in capsys.readouterr().err


def _run_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    g = ZetaGuard(run_dir=runs, run_name="demo")
    for t in range(4):
        g.monitor({"w": np.full(5, float(t), np.float32)})
    if g.run_store is not None:
        g.run_store.close()
    return runs


def _start_dashboard(tmp_path: Path, *extra: str) -> Iterator[str]:
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    runs = _run_dir(tmp_path)
    code = "import sys; from zetaguard.cli.dashboard import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--runs", str(runs), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        assert "http://" in line, line + (proc.stderr.read() if proc.stderr else "")
        url = line.split("http://", 1)[1].split("/", 1)[0]
        yield f"http://{url}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


TOKEN = "s3cret-dashboard-token"


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    yield from _start_dashboard(tmp_path, "--token-file", str(token_file))


@pytest.fixture
def open_dashboard(tmp_path: Path) -> Iterator[str]:
    yield from _start_dashboard(tmp_path)


@pytest.mark.slow
def test_tokenless_dashboard_answers_only_to_loopback_names(open_dashboard: str) -> None:
    """DNS rebinding: a foreign page whose domain resolves to 127.0.0.1 sends its own name."""
    port = open_dashboard.rsplit(":", 1)[1]
    assert _get(open_dashboard + "/api/runs")[0] == 200
    assert _get(open_dashboard + "/api/runs", {"Host": f"localhost:{port}"})[0] == 200
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", ""):
        status, body, _ = _get(open_dashboard + "/api/runs", {"Host": host})
        assert status in (400, 403), (host, status)
        assert b"demo" not in body


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.mark.slow
def test_dashboard_token_and_paths(dashboard: str) -> None:
    host = dashboard.split("//", 1)[1].rsplit(":", 1)[0]
    assert host == "127.0.0.1"
    # Without the token (or with a wrong one) nothing is served, not even the page.
    for path in ("/", "/api/runs", "/api/runs/demo", "/static/app.js"):
        assert _get(dashboard + path)[0] == 403
        assert _get(dashboard + path, {"Authorization": "Bearer wrong"})[0] == 403
        assert _get(dashboard + path + "?token=" + TOKEN[:-1])[0] == 403
    status, body, _ = _get(dashboard + "/api/runs", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert "demo" in json.loads(body)["runs"][0]["name"]
    status, _, headers = _get(dashboard + f"/?token={TOKEN}")
    assert status == 200
    cookie = headers.get("set-cookie", "")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    # Path traversal: no request path reaches the filesystem outside the fixed static table.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in (
        "/static/..%2F__init__.py",
        "/static/%2e%2e%2fapp.py",
        "/static/..%2F..%2Fguard.py",
        "/static/../../guard.py",
        "/static/app.js%00.py",
        "/static/.%2F__init__.py",
        "/static/%2Fetc%2Fpasswd",
        "/api/runs/..",
        "/api/runs/..%2F..%2Fetc",
        "/api/runs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/runs/demo%2F..%2F..",
        "/api/runs/..%2Fruns%2Fdemo",
        "/api/runs/.%2Fdemo/stream",
    ):
        status, body, _ = _get(dashboard + path, auth)
        assert status in (400, 404), (path, status)
        assert b"import " not in body
        assert b"root:" not in body


# ---- webhooks ---------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, bytes]]
    redirect_to: str | None = None
    redirect_code = 302

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append((self.command, self.path, self.rfile.read(length)))
        if self.redirect_to:
            self.send_response(self.redirect_code)
            self.send_header("Location", self.redirect_to)
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _record

    def log_message(self, *args: Any) -> None:
        pass


def _server(
    redirect_to: str | None = None, code: int = 302
) -> tuple[http.server.HTTPServer, list[Any]]:
    seen: list[Any] = []
    handler = type(
        "H", (_Recorder,), {"seen": seen, "redirect_to": redirect_to, "redirect_code": code}
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_webhook_posts_only_to_the_configured_url() -> None:
    from zetaguard.protocols import EmergencyProtocol

    server, seen = _server()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/abc"
        assert EmergencyProtocol(webhook_url=url).notify_slack("step 7: CRITICAL")
        assert seen == [("POST", "/hooks/abc", json.dumps({"text": "step 7: CRITICAL"}).encode())]
    finally:
        server.shutdown()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_webhook_does_not_follow_redirects_elsewhere(code: int) -> None:
    """A redirect (a compromised or misconfigured endpoint) must not send the alarm, or even a
    request, to another address."""
    from zetaguard.protocols import EmergencyProtocol

    other, other_seen = _server()
    target = f"http://127.0.0.1:{other.server_address[1]}/stolen"
    hook, hook_seen = _server(redirect_to=target, code=code)
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/hook"
        assert not EmergencyProtocol(webhook_url=url).notify_slack("secret run status")
        assert len(hook_seen) == 1
        time.sleep(0.2)
        assert other_seen == []
    finally:
        hook.shutdown()
        other.shutdown()


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x", "javascript:x"])
def test_webhook_refuses_non_http_urls(url: str) -> None:
    from zetaguard.protocols import EmergencyProtocol

    with pytest.raises(ValueError, match="http"):
        EmergencyProtocol(webhook_url=url)


def test_no_webhook_is_contacted_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from zetaguard.protocols import EmergencyProtocol

    monkeypatch.delenv("ZETAGUARD_SLACK_WEBHOOK", raising=False)
    assert EmergencyProtocol().webhook_url is None
    assert not EmergencyProtocol().notify_slack("x")
