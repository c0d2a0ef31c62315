"""Auto-recovery, the pre-step veto and gradient clipping."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard
from zetaguard.recovery.clip import recommended_clip_value

from tests.support.torch_state import assert_same_state


def test_guarded_step_skips_a_nan_batch_and_leaves_everything_untouched() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = ZetaGuard(model=model, optimizer=opt)
    for _ in range(3):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert guard.guarded_step(loss=loss.item())
        guard.monitor(loss=loss.item())
    params = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(opt.state_dict())
    bad = torch.randn(4, 8)
    bad[0, 0] = math.nan
    loss = model(bad).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    assert not guard.guarded_step(loss=loss.item())
    assert_same_state(model.state_dict(), params)
    assert_same_state(opt.state_dict(), state)
    assert guard.recovery.skips == 1


def test_gradient_spike_is_vetoed_after_a_healthy_history() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    guard = ZetaGuard(model=model, optimizer=opt)
    for _ in range(30):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert guard.guarded_step(loss=loss.item())
        guard.monitor(loss=loss.item())
    loss = model(1000.0 * torch.randn(16, 8)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    assert guard.should_skip_step(loss=loss.item())


def test_guarded_step_needs_an_optimizer() -> None:
    with pytest.raises(ValueError, match="needs an optimizer"):
        ZetaGuard().guarded_step()


@settings(max_examples=50, deadline=None)
@given(
    norms=st.lists(st.floats(1e-3, 1e3), min_size=20, max_size=300),
    scale=st.floats(1e-3, 1e3),
)
def test_clip_value_is_above_the_median_and_scale_equivariant(
    norms: list[float], scale: float
) -> None:
    value = recommended_clip_value(norms)
    assert value is not None
    recent = norms[-200:]
    assert value >= float(np.median(recent)) * 0.999
    scaled = recommended_clip_value([scale * n for n in norms])
    assert scaled == pytest.approx(scale * value, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(norms=st.lists(st.floats(1e-6, 1e6), min_size=20, max_size=260))
def test_clip_value_matches_a_numpy_reference_exactly(norms: list[float]) -> None:
    # The rule of zetaguard.recovery.clip written with np.median over the last 200 logs: the
    # package's sorted-list medians must give the same bits (even and odd counts).
    logs = np.array([math.log(v) for v in norms[-200:]], dtype=np.float64)
    median = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - median)))
    expected = math.exp(median + 3.0 * max(spread, 0.1))
    assert recommended_clip_value(norms) == expected


def test_clip_value_ignores_spikes_that_would_drag_an_ema() -> None:
    rng = np.random.default_rng(0)
    norms = list(np.exp(rng.normal(0.0, 0.2, size=180)))
    clean = recommended_clip_value(norms)
    spiked = recommended_clip_value(norms + [1e4] * 20)  # 10% spikes
    assert clean is not None
    assert spiked is not None
    assert spiked < 1.5 * clean
    assert recommended_clip_value(norms[:5]) is None


def test_should_clip_gradients_follows_the_latest_norm() -> None:
    guard = ZetaGuard()
    rng = np.random.default_rng(0)
    w = rng.normal(size=10)
    for _ in range(30):
        w += 0.01 * rng.normal(size=10)
        guard.monitor([w], grad_norm=float(np.exp(rng.normal(0.0, 0.1))))
    limit = guard.recommended_clip_value()
    assert limit is not None
    assert guard.should_clip_gradients(grad_norm=10 * limit)
    assert not guard.should_clip_gradients(grad_norm=0.5 * limit)


def test_numpy_arrays_rebound_each_step_are_what_a_rollback_restores() -> None:
    """A NumPy loop that rebinds its arrays (w = w - lr * g) hands monitor() new objects each
    step: the guard must snapshot and roll back those, not the first step's arrays."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=16)
    guard = ZetaGuard(warmup_steps=10, snapshot_interval=2)
    first = w
    for step in range(60):
        w = w - 0.01 * w + 0.001 * rng.normal(size=16)  # a new array every step
        r = guard.monitor([w], loss=float(np.exp(-0.01 * step)))
        assert r.status == "STABLE"
    kept = w.copy()
    w[:] = 1e6  # blow-up written into the current array in place
    r = guard.monitor([w], loss=1e9)
    assert r.status == "CRITICAL"
    assert guard.recovery_reports, "the CRITICAL step must trigger recovery"
    restored_step = guard.recovery_reports[-1].restored_step
    assert restored_step is not None
    assert np.all(np.abs(w) < 10)  # rolled back in place, into the array monitored now
    assert not np.shares_memory(w, first)
    assert np.linalg.norm(w - kept) < np.linalg.norm(kept)  # a recent state, not the start
