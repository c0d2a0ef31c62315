"""Emergency checkpoints: atomic, loadable without pickle, intact after a writer is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from zetaguard.checkpoint import checkpoint_stem, latest_checkpoint, save_safetensors, save_torch

# A child that writes a first checkpoint completely, then starts a second one and is frozen
# inside it (just before the fsync that precedes the rename), where the parent kills it.
_CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from zetaguard import checkpoint

    path, fmt = sys.argv[1], sys.argv[2]
    def write(value):
        tensors = {"w": torch.full((256, 256), float(value))}
        if fmt == "pt":
            checkpoint.save_torch(path, {"model": tensors, "guard": {"step": value}})
        else:
            checkpoint.save_safetensors(path, tensors, {"step": value})
    write(1)
    real_fsync = os.fsync
    def frozen(fd):
        print("writing", flush=True)
        time.sleep(600)
    os.fsync = frozen
    write(2)
    """
)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"{checkpoint_stem(7)}.{fmt}"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), fmt],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        # The second checkpoint's bytes are in a temporary file beside the target.
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(partial) == 1
        assert partial[0].stat().st_size > 0
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if fmt == "pt":
        loaded = torch.load(path, weights_only=True)
        assert loaded["guard"]["step"] == 1
        assert torch.equal(loaded["model"]["w"], torch.full((256, 256), 1.0))
    else:
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            assert f.get_tensor("w").max() == 1.0
            assert f.metadata()["zetaguard"] == '{"step": 1}'
    assert latest_checkpoint(tmp_path, suffix=f".{fmt}") == path


def test_torch_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_torch(tmp_path / "c.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(back["model"]["weight"], model.weight.detach())
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(back["optimizer"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_safetensors_from_numpy_and_tied_torch_tensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    save_safetensors(tmp_path / "a.safetensors", {"x": np.arange(6.0).reshape(2, 3)})
    np.testing.assert_array_equal(
        load_file(tmp_path / "a.safetensors")["x"], np.arange(6.0).reshape(2, 3)
    )
    shared = torch.randn(4, 4)
    save_safetensors(tmp_path / "t.safetensors", {"emb": shared, "head": shared})  # tied weights
    back = load_file(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back["emb"], back["head"])


def test_latest_checkpoint_picks_the_highest_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (3, 120, 45):
        save_torch(tmp_path / f"{checkpoint_stem(step)}.pt", {"step": step})
    (tmp_path / "notes.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / f"{checkpoint_stem(120)}.pt"


def test_old_emergency_checkpoints_are_pruned(tmp_path: Path) -> None:
    from zetaguard import ZetaGuard

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = ZetaGuard(model=model, optimizer=opt, checkpoint_dir=tmp_path)
    guard.attach(model, opt)
    guard.recovery.keep_checkpoints = 2
    for step in range(4):
        guard.monitor(step=step * 10)
        guard.emergency_protocol()
    stems = sorted({p.name.split(".")[0] for p in tmp_path.iterdir()})
    assert len(stems) == 2
