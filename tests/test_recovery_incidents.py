"""Incident classes: a bad batch undone or vetoed, the same bad batch again skipped, only a
bad setting climbing the LR ladder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from zetaguard import ZetaGuard

from tests.support.results import make_result as _result

# ---- incident classes: a bad batch, the same bad batch again, a bad setting ----------------


def _bad_batch_run(
    bad: bool, guarded: bool | None, steps: int = 240, k: int = 25, start: int = 60
) -> tuple[float, ZetaGuard | None, list[int], float]:
    """The digits MLP, SGD-momentum; from ``start`` every ``k``-th batch is corrupted (inputs
    x1000, labels shuffled). ``guarded``: None no guard, False plain ``opt.step()`` with the
    guard monitoring, True ``guard.guarded_step()``. Returns held-out accuracy, the guard, the
    bad steps and the final LR."""
    x_all, y_all = _digits_standardised()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = ZetaGuard(warmup_steps=30).attach(model, opt) if guarded is not None else None
    gen = torch.Generator().manual_seed(1)
    bad_steps = []
    for t in range(steps):
        idx = torch.randint(0, 1400, (64,), generator=gen)
        x, y = x_all[idx], y_all[idx]
        if bad and t >= start and (t - start) % k == 0:
            x, y = 1000.0 * x, y[torch.randperm(64, generator=gen)]
            bad_steps.append(t)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if guard is not None and guarded:
            guard.guarded_step(opt, loss=float(loss.detach()), batch_index=t)
        else:
            opt.step()
        if guard is not None:
            guard.monitor(model, loss=float(loss.detach()), batch_index=t)
            assert not guard.should_stop
    with torch.no_grad():
        accuracy = float((model(x_all[1400:]).argmax(1) == y_all[1400:]).float().mean())
    return accuracy, guard, bad_steps, opt.param_groups[0]["lr"]


def _digits_standardised() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 0.1), torch.tensor(d.target)


def test_a_recurring_bad_batch_is_undone_each_time_without_an_lr_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clean, _, _, _ = _bad_batch_run(False, None)
    unguarded, _, _, _ = _bad_batch_run(True, None)
    with caplog.at_level("WARNING", logger="zetaguard"):
        accuracy, guard, bad_steps, lr = _bad_batch_run(True, False)
    assert guard is not None
    assert unguarded < clean - 0.3  # the bad batches ruin the run without the guard
    assert accuracy >= clean - 0.04
    assert lr == 0.05  # the learning rate was left alone ...
    assert guard.recovery.episode == 0  # ... and the LR ladder never climbed
    summary = guard.get_statistics()["incidents"]
    assert [u["step"] for u in summary["undone"]] == bad_steps
    assert [u["batch"] for u in summary["undone"]] == bad_steps  # where the bad data is
    assert [u["class"] for u in summary["undone"]] == (
        ["transient"] + ["recurring transient"] * (len(bad_steps) - 1)
    )
    assert summary["persistent"] == 0
    assert all(u["restored_step"] is not None for u in summary["undone"])
    lines = [r.getMessage() for r in caplog.records if "CRITICAL" in r.getMessage()]
    assert len(lines) == len(bad_steps)  # one line per action, naming the class and why
    assert "transient: one-step excursion" in lines[0]
    assert "recurring transient" in lines[1]
    assert "after the one at step" in lines[1]


def test_a_recurring_bad_batch_is_skipped_before_it_lands_with_guarded_step() -> None:
    clean, _, _, _ = _bad_batch_run(False, None)
    accuracy, guard, bad_steps, lr = _bad_batch_run(True, True)
    assert guard is not None
    summary = guard.get_statistics()["incidents"]
    assert [s["batch"] for s in summary["skipped"]] == bad_steps
    assert summary["undone"] == []
    assert lr == 0.05
    assert accuracy >= clean - 0.02


def _steps(manager, statuses, start=0):  # type: ignore[no-untyped-def]
    out = []
    for i, (status, channels) in enumerate(statuses):
        r = _result(start + i, status, 3.0 if status == "CRITICAL" else 0.1)
        r.channels.update(channels)
        out.append(manager.after_step(r))
    return out


def test_incidents_are_classified_by_what_the_steps_around_them_show() -> None:
    guard = ZetaGuard()
    manager = guard.recovery
    manager.bind_params([np.zeros(3)])
    healthy = [("STABLE", {})] * 10
    spike = ("CRITICAL", {"score_loss": 2.0, "score_grad": 3.0})
    _steps(manager, healthy)
    first = _steps(manager, [spike], 10)[0]
    assert first is not None
    assert first.message.startswith("transient:")
    assert "lr x" not in " ".join(first.actions)
    _steps(manager, healthy, 11)
    again = _steps(manager, [spike], 21)[0]
    assert again is not None
    assert again.message.startswith("recurring transient:")
    # Right after it: persistent (the LR ladder's rung 1).
    after = _steps(manager, [spike], 22)[0]
    assert after is None or after.message.startswith("persistent:")
    assert manager.incidents.persistent == 1
    # DRIFT before it, or an oscillation: persistent.
    _steps(manager, [("STABLE", {})] * 3 + [("DRIFT", {})] * 2, 23)
    drift = _steps(manager, [spike], 28)[0]
    assert manager.incidents.persistent == 2
    assert drift is None or drift.message.startswith("persistent: trouble in the")
    guard2 = ZetaGuard()
    guard2.recovery.bind_params([np.zeros(3)])
    _steps(guard2.recovery, healthy)
    osc = _steps(guard2.recovery, [("CRITICAL", {"score_jar": 2.0})], 10)[0]
    assert osc is not None
    assert osc.message.startswith("persistent: jar critical")
    assert guard2.recovery.episode == 1  # it climbed the ladder


def _unstable_start_run(lr: float, steps: int = 40) -> tuple[ZetaGuard, list[float]]:
    """The digits MLP with SGD-momentum at ``lr`` from its first update, ``guarded_step`` and
    ``monitor`` every step (the reference taken before the first update). Returns the guard and
    the learning rate each step ended with."""
    x_all, y_all = _digits_standardised()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    guard = ZetaGuard().attach(model, opt)
    guard.take_reference()
    gen = torch.Generator().manual_seed(1000)
    lrs = []
    for t in range(steps):
        idx = torch.randint(0, 1200, (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        guard.guarded_step(opt, loss=float(loss.detach()), batch_index=t)
        guard.monitor(model, loss=float(loss.detach()), batch_index=t)
        lrs.append(opt.param_groups[0]["lr"])
        if guard.should_stop:
            break
    return guard, lrs


def test_vetoes_do_not_hide_a_run_unstable_from_its_first_step() -> None:
    # At lr 2.0 (100x this model's) the loss of each new batch rises past the veto's 4x median
    # while the updates that do land are DRIFT. Before the fix every such step was dismissed as
    # "skipped before the update": 17 vetoes, and the first recovery came at step 34.
    guard, lrs = _unstable_start_run(2.0)
    reports = guard.recovery_reports
    assert reports, "no recovery at all"
    first = reports[0]
    assert first.step <= 20  # 13 here; 34 before
    assert first.message.startswith("persistent: vetoed, but ")
    assert first.restored_step is not None
    assert first.restored_step < first.step
    assert lrs[first.step] == pytest.approx(0.2)  # the LR ladder's x0.1 cut
    skipped = guard.get_statistics()["incidents"]["skipped"]
    assert len([s for s in skipped if s["step"] < first.step]) <= 3
    # The same model at its own LR: no veto, no recovery.
    healthy, healthy_lrs = _unstable_start_run(0.02)
    assert healthy.recovery_reports == []
    assert healthy.get_statistics()["incidents"]["skipped"] == []
    assert healthy_lrs[-1] == 0.02
