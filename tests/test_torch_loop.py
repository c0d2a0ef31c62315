"""A plain PyTorch loop on sklearn's digits: a healthy run stays out of CRITICAL; a learning
rate blown up x1000 mid-run, or a NaN written into the weights, is caught and handled."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from zetaguard import ZetaGuard

from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _train(
    steps: int,
    guard: ZetaGuard,
    *,
    blow_up_at: int | None = None,
    nan_at: int | None = None,
    device: str = "auto",
) -> tuple[list[str], list[float]]:
    torch.manual_seed(0)
    x, y = _data()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard.attach(model=model, optimizer=opt)
    statuses, losses = [], []
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == blow_up_at:
            for g in opt.param_groups:
                g["lr"] *= 1000.0
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step == nan_at:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        r = guard.monitor(model, loss=loss.item(), batch_index=step)
        statuses.append(r.status)
        losses.append(loss.item())
        if guard.should_stop:
            break
    return statuses, losses


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_healthy_run_raises_no_critical(device: str) -> None:
    guard = ZetaGuard(warmup_steps=30, device=device)  # type: ignore[arg-type]
    statuses, losses = _train(150, guard)
    assert "CRITICAL" not in statuses
    assert not guard.recovery_triggered
    assert losses[-1] < losses[0]


def test_learning_rate_blow_up_is_caught_and_handled() -> None:
    guard = ZetaGuard(warmup_steps=30)
    statuses, _ = _train(120, guard, blow_up_at=80)
    assert "CRITICAL" not in statuses[:80]
    first = statuses.index("CRITICAL")
    assert 80 <= first <= 85  # within a few steps of the blow-up
    assert guard.recovery_triggered
    report = guard.recovery_reports[0]
    assert report.lr_after is not None
    assert report.lr_before is not None
    assert report.lr_after < report.lr_before


def test_nan_in_weights_is_caught_and_rolled_back() -> None:
    guard = ZetaGuard(warmup_steps=30)
    statuses, _ = _train(100, guard, nan_at=70)
    assert statuses[70] == "CRITICAL"
    assert guard.recovery_triggered
    model = guard.model
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    diag = guard.full_diagnostics()
    assert all(math.isfinite(row.param_norm) for row in diag.layers)
