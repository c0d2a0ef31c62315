"""The HF Trainer under torchrun with 2 CPU ranks (gloo), the example examples/distributed_hf_trainer.py
run for real: an LR blown up again and again makes both ranks CRITICAL at the same steps, take
the same rungs, and stop together when the ladder says stop, with one guard reduction per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "distributed_hf_trainer.py"


def test_hf_trainer_under_torchrun_agrees_and_stops_together(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(EXAMPLE),
           "--out", str(tmp_path), "--blow-up-at", "12", "--blow-up-every", "12", "--steps", "80"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["statuses"] == r1["statuses"]
    assert r0["recoveries"] == r1["recoveries"]
    assert r0["should_stop"]
    assert r1["should_stop"]
    assert r0["global_step"] == r1["global_step"] < 80  # both ranks ended the run together
    assert r0["recoveries"][-1]["actions"][-1] == "stop"
    assert "CRITICAL" not in r0["statuses"][:12]  # healthy before the first blow-up
    assert r0["collective_calls"] == len(r0["statuses"]) == r0["global_step"]
    assert r0["error"] is None
    assert r1["error"] is None
