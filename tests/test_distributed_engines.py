"""The distributed engines users launch, run for real with 2 CPU processes (gloo), no mocks.

The HF Trainer (examples/distributed_hf_trainer.py) under ``torchrun`` and under
``accelerate launch``: an LR blown up again and again makes both ranks CRITICAL at the same
steps, take the same rungs, and stop together when the ladder says stop, with one guard
reduction per step; a rank that hangs makes the other raise ``RankFailureError`` within the
guard's deadline. Lightning ``strategy="ddp"``: a healthy fit and a blown-up one agree on both
ranks, and a hung rank gives the guard's error. Each launch costs about 10-50 s here (process
start-up and imports, by machine load)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.launch import free_port, run_group

pytest.importorskip("torch")

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HF_EXAMPLE = EXAMPLES / "distributed_hf_trainer.py"


def launch(
    launcher: str, script: Path, args: list[str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    port = str(free_port())
    if launcher == "torchrun":
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        # `--multi_gpu` is accelerate's torchrun-style launcher; the script's
        # TrainingArguments(use_cpu=True) keeps both processes on the CPU with gloo.
        head = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
        ]
    return run_group([*head, str(script), *args], cwd=cwd, env=env, timeout=timeout)


def ranks(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_hf_trainer_agrees_and_stops_together(launcher: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    proc = launch(
        launcher,
        HF_EXAMPLE,
        ["--out", str(tmp_path), "--blow-up-at", "12", "--blow-up-every", "12", "--steps", "80"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = ranks(tmp_path)
    assert r0["world"] == r1["world"] == 2
    assert r0["statuses"] == r1["statuses"]
    assert r0["recoveries"] == r1["recoveries"]
    assert r0["should_stop"]
    assert r1["should_stop"]
    assert r0["global_step"] == r1["global_step"] < 80  # both ranks ended the run together
    assert r0["recoveries"][-1]["actions"][-1] == "stop"
    assert "CRITICAL" not in r0["statuses"][:12]  # healthy before the first blow-up
    assert r0["statuses"][12] == "CRITICAL"  # the first blow-up is caught at once
    assert r0["collective_calls"] == len(r0["statuses"]) == r0["global_step"]
    assert r0["error"] is None
    assert r1["error"] is None


def test_hf_trainer_hung_rank_raises_within_the_deadline(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    timeout = 3.0
    proc = launch(
        "torchrun",
        HF_EXAMPLE,
        [
            "--out",
            str(tmp_path),
            "--steps",
            "40",
            "--hang-rank",
            "1",
            "--hang-at",
            "5",
            "--timeout",
            str(timeout),
        ],
        tmp_path,
    )
    # Rank 0 raised and exited with 3, so torchrun stopped the hung rank 1 and failed the job.
    assert proc.returncode != 0
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert not (tmp_path / "rank1.json").exists()  # rank 1 never got past its hang
    assert "the per-step reduction across 2 ranks failed on rank 0" in r0["error"]
    assert "timeout 3 s" in r0["error"]
    assert len(r0["statuses"]) == 4  # steps 1-4 monitored, step 5's collective never completed
    assert timeout <= r0["waited_s"] < timeout + 20  # the guard's deadline, not gloo's 30 min


def test_lightning_ddp_agrees_on_both_ranks(tmp_path: Path) -> None:
    """One launch, two fits in the same 2 processes (Lightning starts rank 1 itself): a healthy
    one with no CRITICAL, then an LR blow-up that is CRITICAL on both ranks at the same step
    and rolled back to the same snapshot on both. 15-50 s here, by load."""
    pytest.importorskip("lightning")
    script = EXAMPLES / "distributed_lightning.py"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    proc = run_group(
        [sys.executable, str(script), "--out", str(tmp_path)], cwd=tmp_path, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = ranks(tmp_path)
    assert r0["world"] == r1["world"] == 2
    for r in (r0, r1):
        assert r["error"] is None
        assert len(r["healthy"]["statuses"]) == r["healthy"]["collective_calls"] == 40
        assert "CRITICAL" not in r["healthy"]["statuses"]
        assert r["healthy"]["recoveries"] == []
        blow = r["blow_up"]["statuses"]
        assert "CRITICAL" not in blow[:40]
        assert blow[40] == "CRITICAL"  # the step the LR was blown up on every rank
    assert r0["blow_up"]["statuses"] == r1["blow_up"]["statuses"]
    assert r0["blow_up"]["recoveries"] == r1["blow_up"]["recoveries"]
    first = r0["blow_up"]["recoveries"][0]
    assert first["step"] == 40
    assert first["restored_step"] is not None
    assert first["restored_step"] < 40
    assert r0["blow_up"]["param_sum"] == r1["blow_up"]["param_sum"]  # replicas still equal


def test_lightning_ddp_hung_rank_raises_within_the_deadline(tmp_path: Path) -> None:
    """Rank 1 hangs before its guard call at step 10: rank 0 raises RankFailureError at the
    guard's 3 s deadline and writes its report. Under Lightning's own launcher rank 1 is rank
    0's child and is NOT stopped when rank 0 leaves, so the test ends the session itself."""
    pytest.importorskip("lightning")
    import time

    script = EXAMPLES / "distributed_lightning.py"
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "--out",
            str(tmp_path),
            "--hang-rank",
            "1",
            "--hang-at",
            "10",
            "--timeout",
            "3",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    report = tmp_path / "rank0.json"
    try:
        deadline = time.monotonic() + 180
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.wait(timeout=30) == 3  # rank 0 left at once after its report
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1, still asleep
    r0 = json.loads(report.read_text())
    assert "the per-step reduction across 2 ranks failed on rank 0" in r0["error"]
    assert "timeout 3 s" in r0["error"]
    assert 3.0 <= r0["healthy"]["waited_s"] < 23.0
