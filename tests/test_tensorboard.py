"""ZetaBoard: the guard's metrics written as TensorBoard scalars and read back from the event
file with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from zetaguard import ZetaGuard
from zetaguard.integrations.tensorboard import ZetaBoard

from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def _read(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_global_and_per_layer_scalars_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = ZetaGuard(warmup_steps=5, auto_recover=False)
    writer = SummaryWriter(log_dir=str(tmp_path))
    board = ZetaBoard(writer)
    expected: dict[str, list[float]] = {}
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for step in range(12):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        guard.monitor(model, loss=loss.item())
        metrics = guard.get_metrics()
        assert board.log_stability(metrics, step) == len(metrics) - 1  # all but "step"
        for key, value in metrics.items():
            expected.setdefault(board.tag(key), []).append(value)
    writer.close()

    acc = _read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {
        "zetaguard/zeta",
        "zetaguard/status_level",
        "zetaguard/raw_jar",
        "zetaguard/layers/0/zeta",
        "zetaguard/layers/2/update_ratio",
    } <= tags
    zeta = acc.Scalars("zetaguard/zeta")
    assert [e.step for e in zeta] == list(range(12))
    assert [e.value for e in zeta] == pytest.approx(expected["zetaguard/zeta"], rel=1e-6)
    layer = acc.Scalars("zetaguard/layers/0/zeta")
    assert [e.value for e in layer] == pytest.approx(
        expected["zetaguard/layers/0/zeta"], rel=1e-6, abs=1e-7
    )


def test_nonfinite_and_layer_switch_and_logdir(tmp_path: Path) -> None:
    board = ZetaBoard(tmp_path / "run", layers=False)  # a log directory opens a writer
    n = board.log_stability(
        {"zeta": math.inf, "loss": math.nan, "group/fc/zeta": 1.0, "step": 3.0}, step=3
    )
    assert n == 2
    board.writer.close()
    acc = _read(tmp_path / "run")
    assert set(acc.Tags()["scalars"]) == {"zetaguard/zeta", "zetaguard/loss"}
    assert acc.Scalars("zetaguard/zeta")[0].value == pytest.approx(3.4e38, rel=1e-6)
    assert math.isfinite(acc.Scalars("zetaguard/loss")[0].value)


def test_a_writer_is_required() -> None:
    with pytest.raises(TypeError, match="add_scalar"):
        ZetaBoard(object())
