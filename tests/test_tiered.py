"""Tiered monitoring (the default ``mode="auto"``): settings, the schedule of full passes, the
DRIFT-triggered escalation in the same call, and how late a non-finite value outside the sample
is caught."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard, _core


def _walk(rng: np.random.Generator, n: int, size: int = 64 * 1024) -> list[dict[str, np.ndarray]]:
    w = {
        "a.weight": rng.standard_normal(size).astype(np.float32),
        "b.weight": rng.standard_normal(size // 2).astype(np.float32),
    }
    out = []
    for _ in range(n):
        w = {k: v - 1e-3 * rng.standard_normal(v.size).astype(np.float32) for k, v in w.items()}
        out.append(w)
    return out


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), float("inf")])
def test_bad_sample_fraction_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"sample_fraction must be in \(0, 1\]"):
        ZetaGuard(sample_fraction=bad)


@pytest.mark.parametrize("bad", [0, -1, 2**63, 2**64])
def test_max_sampled_out_of_range_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=r"max_sampled must be an integer >= 1 .* or None"):
        ZetaGuard(max_sampled=bad)


@pytest.mark.parametrize("bad", [2.5, 65536.0, True, "64k", np.int64(5)])
def test_max_sampled_of_another_type_is_refused(bad: Any) -> None:
    # A TypeError, as for sample_fraction and full_pass_interval of the wrong type.
    with pytest.raises(TypeError, match=r"max_sampled must be an integer >= 1 .* or None"):
        ZetaGuard(max_sampled=bad)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_full_pass_interval_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="full_pass_interval must be >= 1"):
        ZetaGuard(full_pass_interval=bad)
    with pytest.raises(TypeError, match="full_pass_interval must be an integer"):
        ZetaGuard(full_pass_interval=2.5)  # type: ignore[arg-type]


def test_default_is_tiered_and_exact_keeps_full_reads() -> None:
    steps = _walk(np.random.default_rng(0), 12)
    tiered, exact = ZetaGuard(auto_recover=False), ZetaGuard(auto_recover=False, mode="exact")
    for p in steps:
        tiered.monitor(p, loss=1.0)
        exact.monitor(p, loss=1.0)
    st = tiered.get_statistics()["tiered"]
    assert st["sampled_elements"] <= (64 + 32) * 1024 // 8  # 4096 per tensor at the least
    assert st["full_passes"] == 0
    assert "tiered" not in exact.get_statistics()


def test_tiered_estimates_are_the_formula_on_the_sample() -> None:
    """raw_jar of a cheap step is ||j|| / ||a|| over the sampled blocks (scale cancels per
    tensor only when one tensor: use one)."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(64 * 256).astype(np.float32)]
    for _ in range(5):
        xs.append(xs[-1] + rng.standard_normal(xs[0].size).astype(np.float32) * 1e-2)
    guard = ZetaGuard(auto_recover=False, group_by="none", sample_fraction=1 / 16)
    results = [guard.monitor({"w": x}) for x in xs]
    assert guard._engine.tiered is not None
    plan = guard._engine.tiered.sampler.plan(0)
    idx = np.concatenate([np.arange(s, s + plan["block"]) for s in plan["starts"]])
    h = [x.astype(np.float64)[idx] for x in xs[-4:]]
    a = (h[3] - h[2]) - (h[2] - h[1])
    j = a - ((h[2] - h[1]) - (h[1] - h[0]))
    assert results[-1].raw_jar == pytest.approx(
        math.sqrt(np.sum(j * j)) / (math.sqrt(np.sum(a * a)) + 1e-12), rel=1e-9
    )


def test_full_pass_runs_on_schedule() -> None:
    guard = ZetaGuard(auto_recover=False, full_pass_interval=5, warmup_steps=5)
    for p in _walk(np.random.default_rng(2), 20):
        guard.monitor(p, loss=1.0)
    assert guard.get_statistics()["tiered"]["full_passes"] == 4  # steps 4, 9, 14, 19


def _unsampled_index(guard: ZetaGuard, tensor: int, numel: int) -> int:
    assert guard._engine.tiered is not None
    plan = guard._engine.tiered.sampler.plan(tensor)
    sampled = np.zeros(numel, dtype=bool)
    for s in plan["starts"]:
        sampled[s : s + plan["block"]] = True
    return int(np.flatnonzero(~sampled)[0])


def test_nonfinite_outside_the_sample_is_caught_by_the_next_full_pass() -> None:
    """No loss, no gradients: a NaN in an element the sample never reads is invisible to the
    cheap tier and is caught by the next scheduled full pass, at most interval - 1 steps late."""
    interval = 8
    for inject_at in (9, 12, 15):
        steps = _walk(np.random.default_rng(3), 30)
        guard = ZetaGuard(auto_recover=False, full_pass_interval=interval, warmup_steps=5)
        caught = None
        for t, p in enumerate(steps):
            if t == 1:
                i = _unsampled_index(guard, 0, p["a.weight"].size)
            if t >= inject_at:
                p["a.weight"][i] = np.nan
            r = guard.monitor(p)
            if r.status == "CRITICAL":
                caught = t
                break
        assert caught is not None
        next_full = (inject_at // interval + 1) * interval - 1
        if (inject_at + 1) % interval == 0:
            next_full = inject_at
        assert caught == next_full
        assert caught - inject_at <= interval - 1
        assert r.nonfinite >= 1  # the full pass counted it


def test_nonfinite_outside_the_sample_is_caught_at_once_through_the_loss() -> None:
    """With the loss given (as every integration does), a NaN weight outside the sample makes
    the loss of the same step non-finite: CRITICAL in the same call, after a full pass."""
    steps = _walk(np.random.default_rng(4), 20)
    guard = ZetaGuard(auto_recover=False, warmup_steps=5)
    for t, p in enumerate(steps):
        if t == 1:
            i = _unsampled_index(guard, 0, p["a.weight"].size)
        loss = 1.0
        if t >= 10:
            p["a.weight"][i] = np.nan
            loss = float(np.sum(p["a.weight"]))  # what a forward pass through it gives
        r = guard.monitor(p, loss=loss)
        if t < 10:
            assert r.status != "CRITICAL"
        else:
            assert r.status == "CRITICAL"
            assert r.nonfinite >= 1  # the full pass in the same call saw the parameter
            break
    assert guard._engine.tiered is not None
    assert guard._engine.tiered.escalations == 1


def test_drift_escalates_in_the_same_call_and_critical_rests_on_a_full_pass() -> None:
    """A learning-rate blow-up: every step whose status is not STABLE ran a full pass in the
    same monitor() call, and the escalation ends after the run calms down."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal(64 * 512).astype(np.float32)
    guard = ZetaGuard(auto_recover=False, warmup_steps=10)
    assert guard._engine.tiered is not None
    statuses = []
    for t in range(60):
        lr = 1e-3 if t < 30 else 1e-3 * 2.0 ** (t - 29)
        before = guard._engine.tiered.full_passes
        w = w - lr * rng.standard_normal(w.size).astype(np.float32)
        r = guard.monitor({"w": w}, loss=1.0 + (0 if t < 30 else lr))
        statuses.append(r.status)
        if r.status != "STABLE":
            assert guard._engine.tiered.full_passes == before + 1
    assert "CRITICAL" in statuses
    assert guard._engine.tiered.escalations >= 1


def test_detector_rollback_scores_a_step_once() -> None:
    """A cheap observation that reached DRIFT is undone before the full one: the detector has
    counted each step once."""
    d = _core.Detector(0.707, 1.414, 0.3, 5, "auto")
    rows = np.array([[4.0, 0.01, 0.001, 0.001, 0.0]])
    for _ in range(3):
        d.observe(rows, 3, 1.0, 1.0)
    d.checkpoint()
    d.observe(rows, 3, 1.0, 1.0)
    d.rollback()
    assert d.steps == 3


def test_load_state_restores_the_mode_and_tiered_settings(tmp_path: Path) -> None:
    steps = _walk(np.random.default_rng(6), 6)
    exact = ZetaGuard(auto_recover=False, mode="exact")
    tiered = ZetaGuard(auto_recover=False, sample_fraction=0.25, full_pass_interval=7)
    for p in steps:
        exact.monitor(p)
        tiered.monitor(p)
    exact.save_state(tmp_path / "exact.npz")
    tiered.save_state(tmp_path / "tiered.npz")
    a = ZetaGuard(auto_recover=False)
    a.load_state(tmp_path / "exact.npz")
    assert a.mode == "exact"
    assert a._engine.tiered is None
    b = ZetaGuard(auto_recover=False, mode="sketch")
    b.load_state(tmp_path / "tiered.npz")
    assert (b.mode, b.sample_fraction, b.full_pass_interval) == ("auto", 0.25, 7)
    assert b._engine.tiered is not None
    assert b.monitor(steps[-1]).status == "STABLE"
