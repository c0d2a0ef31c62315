"""Each example runs in a shortened mode and does what its docstring says."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gan_rebalances_on_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _load("gan_rebalance").main(
        ["--steps", "150", "--g-lr", "2e-2", "--run-dir", str(tmp_path)]
    )
    assert out["STABLE"] + out["DRIFT"] + out["CRITICAL"] == 150
    text = capsys.readouterr().out
    # Every departure from STABLE outside a cool-down is met with a rebalance.
    if out["DRIFT"] + out["CRITICAL"]:
        assert out["rebalances"] >= 1
        assert "D steps per G step" in text
    assert "done:" in text
    from zetaguard.store import list_runs

    (run,) = list_runs(tmp_path)
    assert run.steps == 150


@pytest.mark.slow
def test_cartpole_damps_when_unstable(capsys: pytest.CaptureFixture[str]) -> None:
    gym = pytest.importorskip("gymnasium")
    del gym
    out = _load("cartpole_policy_gradient").main(["--episodes", "40", "--lr", "0.05"])
    assert out["episodes"] == 40
    assert out["final_return"] > 0
    text = capsys.readouterr().out
    assert text.count("-> lr") == out["damped"]


@pytest.mark.slow
def test_tiny_transformer_uses_clip_advice(capsys: pytest.CaptureFixture[str]) -> None:
    out = _load("tiny_transformer_lm").main(["--steps", "30", "--diag-every", "25"])
    assert out["final_loss"] < math.log(out["vocab"])  # it learned something
    text = capsys.readouterr().out
    assert "clip at" in text
    assert "done:" in text
