"""zeta-monitor as a real process: checkpoints rewritten by a training loop, run-store tailing,
Ctrl-C, and bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard.cli.monitor import CheckpointError, format_line, load_checkpoint, main

torch = pytest.importorskip("torch")

LINE = re.compile(
    r"^(Epoch|Step|Version) (\d+) \| Loss: (\S+) \| zeta: (\S+) (STABLE|DRIFT|CRITICAL)$"
)


def _monitor(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "zetaguard.cli.monitor", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # what a careful training job does; the monitor also copes without


@pytest.mark.slow
def test_watches_a_rewritten_torch_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    ckpt = tmp_path / "checkpoint.pt"
    versions = []

    def train_epoch(epoch: int) -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        versions.append((state, float(loss.detach())))
        _save({"epoch": epoch, "loss": float(loss.detach()), "state_dict": state}, ckpt)

    train_epoch(0)
    n = 8
    proc = _monitor("--model", str(ckpt), "--interval", "0.05", "--warmup", "3", "--count", str(n))
    assert proc.stdout is not None
    lines = []
    for epoch in range(n):
        lines.append(proc.stdout.readline().strip())  # the monitor has seen version `epoch`
        if epoch + 1 < n:
            train_epoch(epoch + 1)
    assert proc.wait(timeout=60) == 0
    # The same versions through an in-process guard give the same zeta values.
    ref = ZetaGuard(warmup_steps=3, auto_recover=False)
    for epoch, (line, (state, loss)) in enumerate(zip(lines, versions, strict=True)):
        m = LINE.match(line)
        assert m, line
        r = ref.monitor({k: v.numpy() for k, v in state.items()}, loss=loss)
        assert line == format_line("Epoch", epoch, loss, r.zeta_value, r.status)


@pytest.mark.slow
def test_ctrl_c_exits_cleanly(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.pt"
    _save({"w": torch.ones(3, 3)}, ckpt)
    proc = _monitor("--model", str(ckpt), "--interval", "0.1")
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert LINE.match(first.strip())
    assert first.startswith("Version 0 | Loss: n/a")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "Traceback" not in err
    assert "stopped" in err


def test_safetensors_and_keras_h5_read_back_exactly(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    arrays = {
        "dense.kernel": rng.normal(size=(4, 3)).astype(np.float32),
        "dense.bias": np.zeros(3, np.float32),
    }
    save_file(arrays, str(tmp_path / "w.safetensors"), metadata={"epoch": "12", "loss": "0.5"})
    ck = load_checkpoint(tmp_path / "w.safetensors")
    assert ck.epoch == 12
    assert ck.loss == 0.5
    for k, v in arrays.items():
        np.testing.assert_array_equal(ck.weights[k], v)

    h5py = pytest.importorskip("h5py")
    # The layout Keras 3 writes for model.save_weights("x.weights.h5").
    with h5py.File(tmp_path / "model.weights.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", data=arrays["dense.kernel"])
        f.create_dataset("layers/dense/vars/1", data=arrays["dense.bias"])
        f.create_dataset("optimizer/vars/0", data=np.array(3, dtype=np.int64))  # not a weight
    ck = load_checkpoint(tmp_path / "model.weights.h5")
    assert set(ck.weights) == {"layers/dense/vars/0", "layers/dense/vars/1"}
    np.testing.assert_array_equal(ck.weights["layers/dense/vars/0"], arrays["dense.kernel"])


def test_bad_checkpoints_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(text)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(4)}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Evil()}, evil)
    for path, message in (
        (text, "not a checkpoint"),
        (truncated, "cannot read"),
        (evil, "cannot read"),
        (tmp_path / "missing.pt", "does not exist"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["--model", str(path), "--interval", "0.1", "--count", "1"])
        assert exc.value.code == 2, path
        assert message in capsys.readouterr().err
    assert not marker.exists()  # weights_only=True never ran the pickle's code
    assert text.read_text() == "hello"


def test_tails_a_run_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    guard = ZetaGuard(run_dir=tmp_path, run_name="r", warmup_steps=10, auto_recover=False)
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(8, 8)).astype(np.float32)]
    results = []
    for i in range(40):
        scale = 0.01 if i < 30 else 0.01 * 3.0 ** (i - 29)
        w = [w[0] - scale * rng.normal(size=(8, 8)).astype(np.float32)]
        results.append(guard.monitor(w, loss=1.0 + i))
    guard.run_store.close()
    want = [r for r in results if r.status != "STABLE"]
    want = want + ([results[-1]] if results[-1].status == "STABLE" else [])
    capsys.readouterr()
    code = main(
        [
            "--run",
            str(tmp_path / "r"),
            "--from-start",
            "--interval",
            "0.05",
            "--count",
            str(len(want)),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == len(want)
    for line, r in zip(lines, want, strict=True):
        assert line == format_line("Step", r.step, r.channels["loss"], r.zeta_value, r.status)
    assert any("CRITICAL" in line for line in lines)

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "run.sqlite").write_bytes(b"garbage" * 100)
    for bad in (junk, tmp_path / "nope"):
        with pytest.raises(SystemExit) as exc:
            main(["--run", str(bad), "--count", "1"])
        assert exc.value.code == 2
        assert "run store" in capsys.readouterr().err
