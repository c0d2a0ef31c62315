"""The dashboard server as a real process: API against the store, live stream, security,
bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard.store import RunReader, RunStore

from tests.support.dashboard import dashboard


def _write_run(runs: Path, name: str, steps: int, blowup_at: int | None = None) -> ZetaGuard:
    guard = ZetaGuard(run_dir=runs, run_name=name, warmup_steps=10)
    rng = np.random.default_rng(0)
    w = {
        "a.weight": rng.normal(size=(16, 16)).astype(np.float32),
        "b.weight": rng.normal(size=(4, 16)).astype(np.float32),
    }
    for i in range(steps):
        scale = 0.01 if blowup_at is None or i < blowup_at else 0.01 * 3.0 ** (i - blowup_at + 1)
        for k in w:
            w[k] = w[k] - scale * rng.normal(size=w[k].shape).astype(np.float32)
        guard.monitor(w, loss=1.0 + 0.01 * i)
    return guard


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    _write_run(root, "healthy", 30)._store.close()
    g = _write_run(root, "unstable", 40, blowup_at=30)
    g.run_store.record_incident(35, "CRITICAL", {"update_norm": 9.0}, "a", 4, "lr_cut")
    g.run_store.close()
    (root / "junk").mkdir()
    (root / "junk" / "run.sqlite").write_bytes(b"not a database" * 50)
    return root


def test_api_serves_what_the_store_holds(runs: Path) -> None:
    with dashboard(runs) as url:
        status, body = _get(f"{url}/api/runs")
        assert status == 200
        listed = {r["name"]: r for r in json.loads(body)["runs"]}
        assert set(listed) == {"healthy", "unstable"}  # the corrupt one is skipped
        status, body = _get(f"{url}/api/runs/unstable")
        snap = json.loads(body)
        with RunReader(runs / "unstable") as r:
            stored = r.steps()
            alerts = r.alerts()
            incidents = r.incidents()
        assert listed["unstable"]["incidents"] == len(incidents)
        assert [s["zeta"] for s in snap["steps"]] == [s["zeta"] for s in stored]
        assert snap["alerts"] == alerts
        assert alerts
        assert alerts[0]["start"] >= 30
        assert snap["incidents"] == incidents
        assert [i["batch_index"] for i in incidents if i["action"] == "lr_cut"] == [4]
        assert set(snap["groups"]) == {"a", "b"}
        assert snap["thresholds"] == [0.707, 1.414]
        # The page and its assets, all local (no CDN reference anywhere).
        for asset in ("/", "/static/app.js", "/static/charts.js", "/static/style.css"):
            status, body = _get(url + asset)
            assert status == 200, asset
            assert b"http://" not in body
            assert b"https://" not in body


def test_stream_pushes_new_steps(tmp_path: Path) -> None:
    store_guard = _write_run(tmp_path, "live", 5)
    store_guard._store.flush()
    with dashboard(tmp_path) as url:
        req = urllib.request.Request(f"{url}/api/runs/live/stream?steps=5")
        with urllib.request.urlopen(req, timeout=20) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            # The writer commits three more steps while the stream is open.
            for _ in range(3):
                store_guard._store.record_step(
                    store_guard.last_result  # type: ignore[arg-type]
                )
            store_guard._store.flush()
            event = data = None
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "update":
                    data = json.loads(line.split(":", 1)[1])
                    break
            assert data is not None
            assert [s["id"] for s in data["steps"]] == [6, 7, 8]
    store_guard._store.close()


def test_no_file_outside_the_package(runs: Path) -> None:
    with dashboard(runs) as url:
        for path in (
            "/static/../store.py",
            "/static/..%2F..%2Fstore.py",
            "/static/%2e%2e/app.py",
            "/static/app.py",
            "/static/__init__.py",
            "/api/runs/..%2Fjunk",
            "/api/runs/..",
            "/api/runs/%2Fetc%2Fpasswd",
            "/api/runs/nope",
        ):
            status, body = _get(url + path)
            assert status == 404, path
            assert b"import" not in body


def test_token_required_when_set(runs: Path) -> None:
    env = {**os.environ, "ZETAGUARD_DASHBOARD_TOKEN": "s3cret-token-0123456789"}
    with dashboard(runs, env=env) as url:
        assert _get(f"{url}/api/runs")[0] == 403
        assert _get(f"{url}/api/runs?token=wrong")[0] == 403
        assert (
            _get(f"{url}/api/runs", {"Authorization": "Bearer s3cret-token-0123456789"})[0] == 200
        )
        req = urllib.request.Request(f"{url}/?token=s3cret-token-0123456789")
        with urllib.request.urlopen(req, timeout=10) as r:
            cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie
        cookie_value = cookie.split(";", 1)[0]
        assert _get(f"{url}/api/runs", {"Cookie": cookie_value})[0] == 200


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ZETAGUARD_DASHBOARD_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "zetaguard.cli.dashboard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_bad_input_exits_non_zero(runs: Path, tmp_path: Path) -> None:
    r = _run_cli("--runs", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode != 0
    assert "does not exist" in r.stderr
    r = _run_cli("--runs", str(runs / "junk"), "--port", "0")
    assert r.returncode != 0
    assert "not a readable run store" in r.stderr
    assert (runs / "junk" / "run.sqlite").read_bytes() == b"not a database" * 50
    r = _run_cli("--runs", str(runs), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode != 0
    assert "token" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _run_cli("--runs", str(runs), "--port", str(port))
    assert r.returncode != 0
    assert "cannot listen" in r.stderr
    assert "in use" in r.stderr.lower()


def test_one_run_directory_is_accepted(runs: Path) -> None:
    with dashboard(runs / "healthy") as url:
        listed = json.loads(_get(f"{url}/api/runs")[1])["runs"]
        assert [r["name"] for r in listed] == ["healthy"]
        assert _get(f"{url}/api/runs/unstable")[0] == 404


def test_store_appends_do_not_disturb_readers(tmp_path: Path) -> None:
    with RunStore(tmp_path, run_name="x") as s:
        s.flush()
    with RunReader(tmp_path / "x") as r:
        assert r.steps() == []
        assert r.alerts() == []
