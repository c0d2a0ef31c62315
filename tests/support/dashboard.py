"""Shared by the dashboard tests: start ``zeta-dashboard`` as a real process and find its port."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def dashboard(runs: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run the dashboard on a free port; yield its base URL."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zetaguard.cli.dashboard",
            "--runs",
            str(runs),
            "--port",
            "0",
            "--poll",
            "0.2",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://([\d.]+):(\d+)/", line)
        if not m:
            raise AssertionError(
                f"dashboard did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
            )
        yield f"http://{m.group(1)}:{m.group(2)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate: object, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
