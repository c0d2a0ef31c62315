"""Launching multi-process jobs from a test: a free rendezvous port, and a run that cannot
leave a process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A port for the launcher's rendezvous: tests may run beside other distributed jobs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    cmd: list[str], *, cwd: os.PathLike[str] | str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a launcher in its own session; on timeout kill the whole session, so no rank is
    left behind (subprocess.run would kill only the launcher)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{cmd[:4]} ran past {timeout} s (a hang):\n{out[-2000:]}\n{err[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
