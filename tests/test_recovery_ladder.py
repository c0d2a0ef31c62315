"""Auto-recovery, the escalation ladder: its cap, its rungs, resume from a saved state, calm
periods, LR factors, vetoed steps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard
from zetaguard.recovery.ladder import LADDERS, MAX_TOTAL_RECOVERIES, MIN_LR_FACTOR, lr_factor

from tests.support.results import make_result as _result

_STATUS = st.sampled_from(
    [("STABLE", 0.1), ("DRIFT", 0.9), ("CRITICAL", 2.0), ("CRITICAL", math.inf)]
)


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(sorted(LADDERS)),
    statuses=st.lists(_STATUS, min_size=1, max_size=400),
)
def test_ladder_never_exceeds_its_cap(mode: str, statuses: list[tuple[str, float]]) -> None:
    arr = np.zeros(4)
    guard = ZetaGuard(recovery_mode=mode)  # type: ignore[arg-type]
    manager = guard.recovery
    manager.bind_params([arr])
    ladder = LADDERS[mode]
    episode = 0
    since = math.inf
    for step, (status, zeta) in enumerate(statuses):
        before = len(guard.recovery_reports)
        report = manager.after_step(_result(step, status, zeta))
        since += 1
        assert len(guard.recovery_reports) - before == (report is not None)
        if report is None:
            continue
        if status != "CRITICAL":
            pytest.fail("a recovery ran on a non-CRITICAL step")
        assert since > ladder.cooldown or not math.isfinite(zeta)
        since = 0
        if report.stopped:
            break
        episode = manager.episode
        assert episode <= ladder.max_recoveries
    reports = guard.recovery_reports
    assert sum(not r.stopped for r in reports) <= MAX_TOTAL_RECOVERIES
    assert sum(r.stopped for r in reports) <= 1
    if guard.should_stop:
        assert reports[-1].stopped
        assert "stop" in reports[-1].actions
        assert manager.after_step(_result(10_000, "CRITICAL", math.inf)) is None


def test_persistent_trouble_climbs_every_rung_then_stops() -> None:
    arr = np.zeros(4)
    guard = ZetaGuard(recovery_mode="balanced")
    guard.recovery.bind_params([arr])
    ladder = LADDERS["balanced"]
    for step in range(1000):
        guard.recovery.after_step(_result(step, "CRITICAL", 3.0))
    reports = guard.recovery_reports
    assert len(reports) == ladder.max_recoveries + 1
    assert [r.stopped for r in reports] == [False] * ladder.max_recoveries + [True]
    assert guard.should_stop
    steps = [r.step for r in reports]
    assert all(b - a == ladder.cooldown + 1 for a, b in itertools.pairwise(steps))


def _feed(guard: ZetaGuard, steps: list[tuple[int, str, float, float]]) -> list[object]:
    """Each step: the pre-step veto on its gradient norm, then the ladder on its status. What
    the guard decided, without the rollback targets (those depend on the snapshots held)."""
    out: list[object] = []
    for step, status, zeta, grad in steps:
        vetoed = guard.should_skip_step(grad_norm=grad)
        result = _result(step, status, zeta)
        result.channels.update(grad_norm=grad, loss=1.0)
        report = guard.recovery.after_step(result)
        out.append((vetoed, None if report is None else (report.message, report.stopped)))
    return out


def test_saved_state_resumes_the_ladder_the_budget_and_the_veto_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(3)
    cooldown = LADDERS["balanced"].cooldown
    steps = []
    for step in range(160):
        trouble = step >= 40 and (step - 40) % (cooldown + 15) == 0  # outside the cooldown
        status, zeta = ("CRITICAL", 3.0) if trouble else ("STABLE", 0.1)
        grad = float(rng.lognormal(0.0, 0.2)) * (30.0 if step in (70, 130) else 1.0)
        steps.append((step, status, zeta, grad))
    first, rest = steps[:100], steps[100:]

    def fresh() -> ZetaGuard:
        guard = ZetaGuard(recovery_mode="balanced")
        guard.recovery.bind_params([np.zeros(3)])
        return guard

    original = fresh()
    _feed(original, first)
    assert original.recovery.episode >= 2  # mid-episode, several rungs up
    path = tmp_path / "guard.npz"
    original.save_state(path)
    resumed = fresh()
    resumed.load_state(path)
    assert resumed.recovery.counters() == original.recovery.counters()
    expected = _feed(original, rest)
    assert _feed(resumed, rest) == expected
    assert _feed(fresh(), rest) != expected  # a guard that forgot would decide otherwise
    assert any(vetoed for vetoed, _ in expected)  # the veto history was exercised too


def test_calm_period_restarts_the_ladder() -> None:
    guard = ZetaGuard(recovery_mode="balanced")
    guard.recovery.bind_params([np.zeros(2)])
    calm = LADDERS["balanced"].calm_steps
    step = 0
    for _ in range(10):  # ten separate episodes: far more incidents than one episode allows
        guard.recovery.after_step(_result(step, "CRITICAL", 3.0))
        step += 1
        for _ in range(calm):
            guard.recovery.after_step(_result(step, "STABLE", 0.1))
            step += 1
    assert len(guard.recovery_reports) == 10
    assert not guard.should_stop
    assert all("rung 1/" in r.message for r in guard.recovery_reports)


def test_lr_factor_cuts_deeper_when_the_update_overshot() -> None:
    r = _result(0, "CRITICAL", 3.0)
    r.channels["update_overshoot"] = 100.0  # update norm at 100x its healthy level
    assert lr_factor(0.1, r) == pytest.approx(0.01)
    r.channels["update_overshoot"] = 3.0  # less than the rung's own cut
    assert lr_factor(0.1, r) == pytest.approx(0.1)
    r.channels["update_overshoot"] = 1e30
    assert lr_factor(0.1, r) == MIN_LR_FACTOR
    r.channels["update_overshoot"] = math.inf  # a non-finite overshoot says nothing usable
    assert lr_factor(0.1, r) == pytest.approx(0.1)
    # The LR rose 100x since the stable snapshot: back to the stable level.
    assert lr_factor(0.1, None, [2.0], [0.02]) == pytest.approx(0.01)
    assert lr_factor(0.1, None, [0.02], [0.02]) == pytest.approx(0.1)


def test_a_vetoed_step_is_not_acted_on_unless_the_weights_are_damaged() -> None:
    guard = ZetaGuard()
    manager = guard.recovery
    manager.bind_params([np.zeros(3)])
    manager.after_step(_result(0, "STABLE", 0.1))
    # A NaN loss: the batch's channel only; the parameters themselves are finite.
    batch_only = _result(1, "CRITICAL", math.inf, nonfinite=0)
    batch_only.channels["score_nonfinite"] = math.inf
    manager.record_skip("non-finite loss")
    assert manager.after_step(batch_only) is None
    damaged = _result(2, "CRITICAL", 3.0)  # the update before landed and blew the weights up
    damaged.channels["score_param"] = 2.0
    manager.record_skip("gradient spike")
    report = manager.after_step(damaged)
    assert report is not None
    assert report.restored_step == 0
