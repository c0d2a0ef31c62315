"""Recovery when the loop sets the learning rate itself: the cut is detected as overridden,
warned once and held as a factor; a rollback rewinds an attached scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
from zetaguard import ZetaGuard
from zetaguard.recovery.ladder import LADDERS
from zetaguard.recovery.torch_backend import TorchBackend

from tests.support.results import make_result as _result

# ---- a learning rate the loop sets itself ---------------------------------------------------


def _lr_loop(
    guard: ZetaGuard,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    steps: range,
    loop_lr,  # type: ignore[no-untyped-def]
    *,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> list[tuple[float, float]]:
    """Plain SGD (no momentum): the update is lr x grad, so the LR a step really used is read
    back from the weights. Each step the loop assigns ``loop_lr(t, current)`` to every group
    (unless it returns None), steps, and monitors. Returns (the loop's LR, the LR used)."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for t in steps:
        x = torch.randn(32, 8, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        lr = loop_lr(t, opt.param_groups[0]["lr"])
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = lr
        loop_value = opt.param_groups[0]["lr"]
        w = model.weight.detach().clone()
        grad = model.weight.grad.detach().clone()  # type: ignore[union-attr]
        opt.step()
        if sched is not None:
            sched.step()
        used = (w - model.weight.detach()) / grad
        out.append((loop_value, float(used[grad.abs() > 1e-4].median())))
        guard.monitor(model, loss=float(loss.detach()))
    return out


def _lr_guard(hold: bool = True) -> tuple[ZetaGuard, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = ZetaGuard(warmup_steps=10).attach(model, opt)
    guard.recovery.hold_lr_cut = hold
    return guard, model, opt


@pytest.mark.parametrize("relative", [False, True])
def test_a_loop_that_sets_the_lr_every_step_is_warned_once_and_the_cut_held(
    relative: bool, caplog: pytest.LogCaptureFixture
) -> None:
    def ramp(t: int, current: float) -> float:  # absolute (a warm-up formula) or relative
        return current * 1.01 if relative else 0.01 * (1.0 + 0.02 * t)

    guard, model, opt = _lr_guard()
    _lr_loop(guard, model, opt, range(30), ramp)
    report = guard.emergency_protocol()
    assert report.lr_before is not None
    assert report.lr_after is not None
    factor = report.lr_after / report.lr_before
    assert factor < 0.5
    with caplog.at_level("INFO", logger="zetaguard"):
        steps = _lr_loop(guard, model, opt, range(30, 60), ramp)
    warnings = [
        r
        for r in caplog.records
        if r.levelname == "WARNING" and "assigns the learning rate" in r.getMessage()
    ]
    assert len(warnings) == 1
    assert "guard.attach(scheduler=...)" in warnings[0].getMessage()
    for loop_value, used in steps:
        # The cut is in force on whatever the loop set, from the very first step after it, and
        # a relative ramp does not compound it.
        assert used == pytest.approx(loop_value * factor, rel=1e-3)
    if relative:
        assert steps[-1][0] == pytest.approx(report.lr_before * factor * 1.01**30, rel=1e-6)
    assert guard.recovery.lr_watch.overridden


def test_hold_lr_cut_off_lets_the_loop_lr_apply_and_still_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, model, opt = _lr_guard(hold=False)
    ramp = lambda t, _: 0.01 * (1.0 + 0.02 * t)  # noqa: E731
    _lr_loop(guard, model, opt, range(30), ramp)
    guard.emergency_protocol()
    with caplog.at_level("WARNING", logger="zetaguard"):
        steps = _lr_loop(guard, model, opt, range(30, 40), ramp)
    assert sum("assigns the learning rate" in r.getMessage() for r in caplog.records) == 1
    for loop_value, used in steps:
        assert used == pytest.approx(loop_value, rel=1e-3)


def test_the_held_cut_ends_with_the_episode() -> None:
    guard, model, opt = _lr_guard()
    ramp = lambda t, _: 0.01 * (1.0 + 0.02 * t)  # noqa: E731
    _lr_loop(guard, model, opt, range(30), ramp)
    guard.emergency_protocol()
    held = _lr_loop(guard, model, opt, range(30, 35), ramp)
    assert all(used < 0.5 * loop for loop, used in held)
    for step in range(LADDERS["balanced"].calm_steps):  # a calm period ends the episode
        guard.recovery.after_step(_result(1000 + step, "STABLE", 0.1))
    assert guard.recovery.episode == 0
    released = _lr_loop(guard, model, opt, range(35, 40), ramp)
    for loop_value, used in released:
        assert used == pytest.approx(loop_value, rel=1e-3)


def test_an_attached_scheduler_is_no_override(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 + 0.02 * t)
    guard = ZetaGuard(warmup_steps=10).attach(model, opt, sched)
    keep = lambda t, _: None  # noqa: E731  (the loop leaves the LR to the scheduler)
    _lr_loop(guard, model, opt, range(30), keep, sched=sched)
    trouble = sched.last_epoch
    report = guard.emergency_protocol()
    assert report.lr_after is not None
    assert report.lr_before is not None
    with caplog.at_level("WARNING", logger="zetaguard"):
        steps = _lr_loop(guard, model, opt, range(30, 40), keep, sched=sched)
    assert not any("assigns the learning rate" in r.getMessage() for r in caplog.records)
    assert not guard.recovery.lr_watch.overridden
    # The rollback rewound the schedule to the snapshot's position; the cut scales it, and
    # until it is back at the trouble's position the LR is not below the one the cut intended.
    assert report.restored_step is not None
    position = report.restored_step + 1
    cut = report.lr_after / report.lr_before
    assert cut < 0.5
    for t, (_, used) in zip(range(30, 40), steps, strict=True):
        schedule = 0.01 * (1.0 + 0.02 * (position + t - 30)) * cut
        floor = report.lr_after if position + t - 30 < trouble else 0.0
        assert used == pytest.approx(max(schedule, floor), rel=1e-3)


@pytest.mark.parametrize("kind", ["lambda", "step", "sequential"])
def test_rollback_rewinds_the_scheduler_and_keeps_the_cut(kind: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched: torch.optim.lr_scheduler.LRScheduler
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 + 0.1 * t)
    elif kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    else:
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=6),
                torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
            ],
            milestones=[6],
        )

    def step() -> None:
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    backend = TorchBackend(model, opt, sched)
    for _ in range(5):
        step()
    snap = backend.capture(5)
    expected = copy.deepcopy(sched.state_dict())
    for _ in range(7):  # a reference: the schedule from the snapshot on, without any cut
        step()
    assert sched.last_epoch == 12
    backend.scale_lr(0.1)
    base_now = copy.deepcopy(getattr(sched, "base_lrs", None))
    backend.restore(snap)
    assert sched.last_epoch == expected["last_epoch"] == 5  # the schedule's position came back
    assert getattr(sched, "base_lrs", None) == base_now  # ... its base LRs kept the cut
    assert opt.param_groups[0]["lr"] == pytest.approx(snap.lrs[0] * 0.1)  # the snapshot's, cut
    # From the restored position, the schedule continues as it did the first time, times the cut.
    reference = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=0.01)
    ref_sched = type(sched)(reference, **_sched_kwargs(kind, reference))
    for _ in range(5):
        reference.step()
        ref_sched.step()
    for _ in range(3):
        step()
        reference.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"])


def _sched_kwargs(kind: str, opt: torch.optim.Optimizer) -> dict[str, object]:
    if kind == "lambda":
        return {"lr_lambda": lambda t: 1.0 + 0.1 * t}
    if kind == "step":
        return {"step_size": 4, "gamma": 0.5}
    return {
        "schedulers": [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=6),
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
        ],
        "milestones": [6],
    }


def test_a_guard_rollback_rewinds_the_attached_scheduler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 + 0.01 * t)
    guard = ZetaGuard(warmup_steps=5, snapshot_interval=5).attach(model, opt, sched)
    for _ in range(40):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        guard.monitor(model)
    report = guard.emergency_protocol()
    assert report.restored_step is not None
    assert report.restored_step >= 0
    # The snapshot of step s was taken after s+1 optimizer (and scheduler) steps.
    assert sched.last_epoch == report.restored_step + 1


@pytest.mark.parametrize("shape", ["ramp", "decay"])
def test_a_rollback_that_rewinds_a_ramp_replays_at_the_intended_lr_not_below(shape: str) -> None:
    """Regression (issue 16, after item 5): the cut is sized on the LR at the trouble (stable LR
    over the ramp's LR), and the rollback rewinds the LambdaLR to the snapshot's position. The
    cut schedule alone would replay the ramp from cut x the stable LR (a real run then trained
    ~30 steps at x0.015 and missed its fault-free reference); the LR each step really uses
    (read back from SGD's weights) is the intended LR (LR at the trouble x cut) until the
    schedule is back where the trouble was, then the cut schedule. On a decay the cut schedule
    stays above that floor: the plain cut schedule all along."""

    def ramp(t: int) -> float:
        if shape == "decay":
            return 0.97**t
        return 1.0 if t < 20 else min(100.0, 1.15 ** (t - 19))

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    guard = ZetaGuard(warmup_steps=5, snapshot_interval=5).attach(model, opt, sched)
    _lr_loop(guard, model, opt, range(30), lambda t, lr: None, sched=sched)
    assert guard.recovery_reports == []  # the ramp is still mild: the guard has not acted
    trouble = sched.last_epoch
    lr_now = 0.01 * ramp(trouble)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_now)

    report = guard.emergency_protocol()
    assert report.restored_step is not None
    restored = sched.last_epoch
    assert restored == report.restored_step + 1 < trouble  # the schedule was rewound
    stable = 0.01 * ramp(restored)  # the LR the restored state trained at
    intended = min(0.1 * lr_now, stable)  # the balanced rung's x0.1, or back to the stable LR
    cut = intended / lr_now
    assert report.lr_after == pytest.approx(max(intended, cut * stable))
    assert any(a.startswith("lr x") for a in report.actions)

    steps = _lr_loop(
        guard, model, opt, range(trouble - restored + 5), lambda t, lr: None, sched=sched
    )
    for i, (_, used) in enumerate(steps):
        position = restored + i
        schedule = cut * 0.01 * ramp(position)  # the rewound schedule with the cut kept
        expected = max(schedule, intended) if position < trouble else schedule
        assert used == pytest.approx(expected, rel=1e-3), (position, used, expected)
        if shape == "decay":
            assert expected == schedule
    assert steps[-1][1] == pytest.approx(cut * 0.01 * ramp(restored + len(steps) - 1), rel=1e-3)
