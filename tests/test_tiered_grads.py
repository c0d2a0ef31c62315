"""Tiered mode reads the gradients only in a step that uses them: with ``grad_norm=`` given, a
step without a full pass reads none; a full pass (scheduled, on DRIFT, or on the worker
thread) reads them, with every fact a raw read depends on checked then.

What a read would see is made observable with real tensors: a gradient whose storage was
shrunk beneath it is refused by any read, and a NaN gradient is counted by any full pass."""

from __future__ import annotations

import math
from typing import Any

import pytest
from zetaguard import ZetaGuard

torch = pytest.importorskip("torch")

INTERVAL = 4


def _shrunk_grad(p: Any) -> None:
    p.grad = torch.ones_like(p)
    p.grad.untyped_storage().resize_(16)  # a raw read of it is now refused


def test_grad_norm_given_spares_the_gradients_until_the_scheduled_full_pass() -> None:
    p = torch.nn.Parameter(torch.randn(64))
    _shrunk_grad(p)
    g = ZetaGuard(auto_recover=False, full_pass_interval=INTERVAL)
    for _ in range(INTERVAL - 1):  # no full pass: the gradient is never read
        assert g.monitor([p], grad_norm=1.0).channels["grad_norm"] == 1.0
    with pytest.raises(ValueError, match=r"gradient of param\.0 needs 256 bytes"):
        g.monitor([p], grad_norm=1.0)  # the scheduled full pass reads (and checks) it
    p.grad = torch.ones_like(p)
    r = g.monitor([p], grad_norm=1.0)
    assert r.step == INTERVAL - 1  # the refused call took no step
    assert g.get_statistics()["tiered"]["full_passes"] == 1


def test_without_grad_norm_and_in_exact_mode_the_gradients_are_read_every_step() -> None:
    """The estimate needs them; exact mode reads (and checks) them every step, as before."""
    cases: list[tuple[dict[str, Any], float | None]] = [
        ({}, None),
        ({"mode": "exact"}, 1.0),
        ({"mode": "sketch"}, 1.0),
    ]
    for kwargs, given in cases:
        p = torch.nn.Parameter(torch.randn(64))
        _shrunk_grad(p)
        g = ZetaGuard(auto_recover=False, full_pass_interval=INTERVAL, **kwargs)
        with pytest.raises(ValueError, match=r"gradient of param\.0 needs 256 bytes"):
            g.monitor([p], grad_norm=given)


def test_a_nonfinite_gradient_reaches_the_scheduled_full_pass_with_grad_norm_given() -> None:
    p = torch.nn.Parameter(torch.randn(64))
    p.grad = torch.ones(64)
    p.grad[7] = float("nan")
    g = ZetaGuard(auto_recover=False, full_pass_interval=INTERVAL)
    norms = [g.monitor([p], grad_norm=1.0).channels["grad_norm"] for _ in range(2 * INTERVAL)]
    assert norms == [math.inf if (t + 1) % INTERVAL == 0 else 1.0 for t in range(2 * INTERVAL)]


def test_a_drift_escalation_reads_the_gradients_in_the_same_call() -> None:
    """A learning-rate blow-up with the caller's gradient norm given and no scheduled pass:
    the steps before the first DRIFT read no gradient; the call that reaches DRIFT runs the
    full pass, which reads the NaN gradient there."""
    gen = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(64 * 512, generator=gen))
    p.grad = torch.ones_like(p)
    p.grad[123] = float("nan")
    g = ZetaGuard(auto_recover=False, warmup_steps=10, full_pass_interval=10_000)
    for t in range(60):
        lr = 1e-3 if t < 30 else 1e-3 * 2.0 ** (t - 29)
        with torch.no_grad():
            p -= lr * torch.randn(p.numel(), generator=gen)
        r = g.monitor([p], loss=1.0 + (0 if t < 30 else lr), grad_norm=1.0)
        if r.status != "STABLE":
            assert r.channels["grad_norm"] == math.inf  # the full pass read the gradient
            assert g.get_statistics()["tiered"]["full_passes"] == 1
            break
        assert r.channels["grad_norm"] == 1.0
    else:
        pytest.fail("the blow-up never left STABLE")


def test_a_threaded_full_pass_reads_the_gradients_of_its_own_step() -> None:
    """The scheduled step's gradients are read in its monitor() call, on the training thread:
    a NaN gradient dropped right after that call (``zero_grad(set_to_none=True)``) is still
    what the worker counts, one step late."""
    p = torch.nn.Parameter(torch.randn(64 * 256))
    g = ZetaGuard(auto_recover=False, full_pass_interval=INTERVAL, full_pass="thread")
    for t in range(INTERVAL):
        p.grad = torch.ones_like(p)
        if t == INTERVAL - 1:  # the scheduled step
            p.grad[5] = float("nan")
        assert g.monitor([p], grad_norm=1.0).status == "STABLE"
        p.grad = None
    late = g.monitor([p], grad_norm=1.0)
    assert late.channels["late_full_pass_step"] == INTERVAL - 1
    assert late.channels["late_full_pass_nonfinite"] == 1.0
    assert late.status == "CRITICAL"
    g.close()
