"""Many SSE clients against one dashboard: server memory and ``/api/runs`` latency, idle and with
``--clients`` streams open from cursor 0, as ratios in the same run.

Each server is a real process serving a run store of ``--steps`` steps; the clients are raw
sockets that keep reading what the stream sends. With ``--baseline-app FILE`` (an ``app.py``
from another revision, e.g. ``git show main:python/zetaguard/dashboard/app.py > /tmp/app.py``)
the same measurement runs first against that module, so before and after share one run.

    python benchmarks/bench_dashboard_streams.py [--clients 200] [--steps 20000]
        [--baseline-app /tmp/app_main.py] [--max-streams N]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from zetaguard import ZetaGuard

SERVER = r"""
import importlib.util, inspect, socket, sys, uvicorn
spec = importlib.util.spec_from_file_location("bench_app", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
kwargs = {"poll": 0.5}
if int(sys.argv[3]) > 0 and "max_streams" in inspect.signature(mod.create_app).parameters:
    kwargs["max_streams"] = int(sys.argv[3])
app = mod.create_app(sys.argv[2], **kwargs)
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(1024)
print(sock.getsockname()[1], flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="error")).run(sockets=[sock])
"""


def _write_run(root: Path, steps: int) -> None:
    guard = ZetaGuard(run_dir=root, run_name="big", warmup_steps=10, auto_recover=False)
    rng = np.random.default_rng(0)
    w = {f"l{i}.weight": rng.normal(size=(8, 8)).astype(np.float32) for i in range(4)}
    for i in range(steps):
        for k in w:
            w[k] -= 0.01 * rng.normal(size=w[k].shape).astype(np.float32)
        guard.monitor(w, loss=1.0 / (i + 1))
    guard.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


LATENCY_TIMEOUT = 60.0


def _latency(port: int, n: int = 8) -> float:
    """Median seconds for GET /api/runs (a request not answered in LATENCY_TIMEOUT counts as
    that long; at most LATENCY_TIMEOUT is spent in all)."""
    times = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LATENCY_TIMEOUT)
        try:
            conn.request("GET", "/api/runs")
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"/api/runs answered {r.status}")
            times.append(time.perf_counter() - t)
        except TimeoutError:
            times.append(LATENCY_TIMEOUT)
        finally:
            conn.close()
        if time.perf_counter() - start >= LATENCY_TIMEOUT:
            break
    return statistics.median(times)


class _Clients:
    """``n`` stream clients from cursor 0, each a socket read by one reader thread."""

    def __init__(self, port: int, n: int) -> None:
        self.socks: list[socket.socket] = []
        self.statuses: list[str] = []
        self.received = 0
        self._stop = False
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /api/runs/big/stream?steps=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            self.socks.append(s)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        first: dict[socket.socket, bool] = {}
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            first[s] = True
        while not self._stop:
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                if first[s] and data:
                    self.statuses.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
                    first[s] = False
                if not data:
                    sel.unregister(s)
                    continue
                self.received += len(data)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        for s in self.socks:
            s.close()


def measure(app_file: Path, runs: Path, clients: int, hold: float, max_streams: int) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(app_file), str(runs), str(max_streams)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        _latency(port, 3)  # warm up
        idle_rss, idle_lat = _rss_mb(proc.pid), _latency(port)
        c = _Clients(port, clients)
        peak = idle_rss
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            peak = max(peak, _rss_mb(proc.pid))
            time.sleep(0.1)
        busy_lat = _latency(port)
        peak = max(peak, _rss_mb(proc.pid))
        c.close()
        accepted = sum("200" in s for s in c.statuses)
        return {
            "idle_rss": idle_rss,
            "peak_rss": peak,
            "idle_lat": idle_lat,
            "busy_lat": busy_lat,
            "accepted": accepted,
            "refused": len(c.statuses) - accepted,
            "mb_sent": c.received / 1e6,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--hold", type=float, default=10.0, help="seconds the streams stay open")
    ap.add_argument("--baseline-app", type=Path, default=None)
    ap.add_argument(
        "--max-streams",
        type=int,
        default=0,
        help="also measure the current app with this stream limit (e.g. --clients, so that every "
        "client is served)",
    )
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1] / "python" / "zetaguard" / "dashboard" / "app.py"
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        t = time.perf_counter()
        _write_run(runs, args.steps)
        print(f"run store: {args.steps} steps written in {time.perf_counter() - t:.1f} s")
        apps = [("baseline", args.baseline_app, 0)] if args.baseline_app else []
        apps.append(("current", here, 0))
        if args.max_streams:
            apps.append((f"cur/max{args.max_streams}", here, args.max_streams))
        print(
            f"{'app':<12}{'clients':>8}{'200':>6}{'503':>6}{'MB sent':>9}"
            f"{'RSS idle':>10}{'RSS peak':>10}{'ratio':>7}"
            f"{'runs idle':>11}{'runs busy':>11}{'ratio':>8}"
        )
        for label, app, max_streams in apps:
            m = measure(app, runs, args.clients, args.hold, max_streams)
            print(
                f"{label:<12}{args.clients:>8}{m['accepted']:>6}{m['refused']:>6}"
                f"{m['mb_sent']:>9.1f}{m['idle_rss']:>8.0f}MB{m['peak_rss']:>8.0f}MB"
                f"{m['peak_rss'] / m['idle_rss']:>7.2f}"
                f"{m['idle_lat'] * 1e3:>9.1f}ms{m['busy_lat'] * 1e3:>9.1f}ms"
                f"{m['busy_lat'] / m['idle_lat']:>8.1f}"
            )


if __name__ == "__main__":
    main()
