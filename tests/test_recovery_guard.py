"""Auto-recovery end to end through the guard: unstable training rescued, parameters alone
rolled back, an LR jump on digits recovered, the trajectory reset after a rollback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zetaguard import RecoveryReport, ZetaGuard
from zetaguard.store import RunReader, find_runs


class UnstableModel(torch.nn.Module):
    """Healthy noisy updates, then from step 60 a multiplicative blow-up."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layer = torch.nn.Linear(16, 16)
        self.gen = gen
        self.t = 0

    @torch.no_grad()
    def update(self) -> None:
        self.t += 1
        for p in self.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=self.gen))
            if self.t > 60:
                p.mul_(1.5)


def test_training_stability() -> None:
    """The example in the specification's README, as written there."""
    model = UnstableModel()
    guard = ZetaGuard(auto_recover=True)
    saw_critical = False
    for _ in range(100):
        model.update()
        result = guard.monitor(model.parameters())
        if result.status == "CRITICAL":
            saw_critical = True
            assert guard.recovery_triggered is True
    assert saw_critical
    assert guard.recovery_triggered is True


def test_parameters_alone_roll_back_in_place_and_stop_at_the_cap() -> None:
    model = UnstableModel()
    guard = ZetaGuard()
    for _ in range(100):
        model.update()
        guard.monitor(model.parameters())
        if guard.should_stop:
            break
    reports = guard.recovery_reports
    assert reports[0].restored_step is not None
    assert reports[0].lr_before is None
    assert guard.should_stop
    assert reports[-1].stopped
    # The model ends in the stable state it was rolled back to, not blown up.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.layer.weight.detach().norm()) < 10.0


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _digits_run(guard: ZetaGuard | None, steps: int, jump_at: int | None) -> float:
    """Train a digits MLP (Adam, lr 1e-3), optionally jumping the LR 300x; returns held-out
    accuracy."""
    x, y = _digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if guard is not None:
        guard.attach(model, opt)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == jump_at:
            for g in opt.param_groups:
                g["lr"] = 0.3
        idx = torch.randint(0, 1500, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if guard is not None:
            guard.monitor(model, loss=loss.item(), batch_index=step)
    if guard is not None:
        assert opt.param_groups[0]["lr"] == pytest.approx(guard.recovery_reports[0].lr_after)
    with torch.no_grad():
        return (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()


@pytest.mark.slow
def test_lr_jump_is_rolled_back_and_cut_and_the_run_recovers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reference = _digits_run(None, 140, jump_at=None)
    unguarded = _digits_run(None, 140, jump_at=100)
    guard = ZetaGuard(checkpoint_dir=tmp_path / "ckpt", run_dir=tmp_path / "runs")
    guarded = _digits_run(guard, 140, jump_at=100)
    assert unguarded < reference - 0.1  # the jump does real damage without the guard
    assert guarded >= reference - 0.03
    assert guard.recovery_triggered
    assert not guard.should_stop
    first = guard.recovery_reports[0]
    assert 100 <= first.step <= 102
    assert first.restored_step is not None
    assert first.restored_step < 100
    assert first.lr_before == pytest.approx(0.3)
    assert first.lr_after is not None
    assert first.lr_after < 0.03

    # The emergency checkpoint loads without unpickling code, in both formats.
    assert first.checkpoint_path is not None
    ckpt = torch.load(first.checkpoint_path, weights_only=True)
    assert set(ckpt) >= {"model", "optimizer", "guard"}
    assert ckpt["guard"]["step"] == first.step
    from safetensors.numpy import load_file

    weights = load_file(first.checkpoint_path.replace(".pt", ".safetensors"))
    assert set(weights) == set(ckpt["model"])

    # The incident and the recovery reached the run store.
    guard.run_store.flush()
    with RunReader(find_runs(tmp_path / "runs")[0]) as reader:
        incidents = reader.incidents()
        recoveries = reader.recoveries()
    assert any(i["step"] == first.step and "rollback" in i["action"] for i in incidents)
    assert recoveries[0]["report"]["restored_step"] == first.restored_step


def test_rollback_resets_the_trajectory_but_keeps_calibration() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=100)
    guard = ZetaGuard(warmup_steps=10, snapshot_interval=5)
    for _ in range(30):
        w += 0.01 * rng.normal(size=100)
        guard.monitor([w])
    # Trajectory averages restart; everything calibration learned stays.
    baselines = guard._detector.state_dict()
    baselines.pop("smoothed_jar")
    baselines.pop("growth")
    report = guard.emergency_protocol()
    assert report.restored_step is not None
    assert guard._engine.tracker is not None
    assert guard._engine.tracker.history == 0
    kept = guard._detector.state_dict()
    assert kept.pop("smoothed_jar") is None
    assert kept.pop("growth") == kept["growth_base"]
    assert kept == baselines
    w += 0.01 * rng.normal(size=100)
    after = guard.monitor([w])
    assert after.raw_jar is None  # no difference across the rollback


def test_emergency_protocol_report_fields() -> None:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = ZetaGuard(model=model, optimizer=opt)
    guard.attach(model, opt)
    with torch.no_grad():
        model.weight.add_(1.0)
    report = guard.emergency_protocol()
    assert isinstance(report, RecoveryReport)
    assert report.lr_before == pytest.approx(0.5)
    assert report.lr_after == pytest.approx(0.05)
    assert report.restored_step == -1  # the state at attach time
    assert guard.recovery_triggered
