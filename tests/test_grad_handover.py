"""The gradient norm is read once per step: what ``guarded_step`` / ``should_skip_step`` read
for the veto is what the same step's ``monitor()`` reports (issue 18), never a later step's.

Reads are counted through the project's own read functions (``adapters.torch.grad_norm``, which
the recovery backend calls, and ``Snapshot.read_grads`` when it does read), patched by the test;
the values are checked against ``torch.linalg.vector_norm`` of the gradients themselves."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from zetaguard import ZetaGuard

from tests.support.grad_reads import count_grad_reads
from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts gradient reads: full norms (the veto's) and the snapshot's deferred read."""
    return count_grad_reads(monkeypatch)


def _setup(**kw: object) -> tuple[torch.nn.Module, torch.optim.Optimizer, ZetaGuard]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = ZetaGuard(model=model, optimizer=opt, warmup_steps=10, **kw)  # type: ignore[arg-type]
    return model, opt, guard


def _backward(model: torch.nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 32, generator=g)
    y = torch.randn(16, 4, generator=g)
    loss = scale * torch.nn.functional.mse_loss(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss


def _norm(model: torch.nn.Module) -> float:
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads).double()))


def test_guarded_step_then_monitor_reads_the_gradients_once(reads: Counter[str]) -> None:
    model, opt, guard = _setup(full_pass_interval=1000)  # no scheduled full pass in 30 steps
    steps = 30
    for t in range(steps):
        opt.zero_grad()
        loss = _backward(model, t)
        want = _norm(model)
        assert guard.guarded_step(opt, loss=loss)
        r = guard.monitor(model, loss=loss)
        assert r.channels["grad_norm"] == pytest.approx(want, rel=1e-9)
    # One read per step (the veto's); before the handover monitor() read them again.
    assert reads["grad_norm"] == steps
    assert reads["read_grads"] == 0


def test_should_skip_step_hands_over_too(reads: Counter[str]) -> None:
    model, opt, guard = _setup(full_pass_interval=1000)
    for t in range(12):
        opt.zero_grad()
        _backward(model, t)
        want = _norm(model)
        assert not guard.should_skip_step()
        opt.step()
        assert guard.monitor(model).channels["grad_norm"] == pytest.approx(want, rel=1e-9)
    assert (reads["grad_norm"], reads["read_grads"]) == (12, 0)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_later_step_never_reuses_the_veto_norm(reads: Counter[str], set_to_none: bool) -> None:
    """guarded_step at step 0 without a monitor(); step 1 monitors without a veto: its norm is
    read from its own gradients (replaced, or zeroed and accumulated in place)."""
    model, opt, guard = _setup(full_pass_interval=1000, sample_fraction=1.0)
    _backward(model, 0)
    guard.guarded_step(opt)
    opt.zero_grad(set_to_none=set_to_none)
    _backward(model, 1, scale=5.0)
    want = _norm(model)
    r = guard.monitor(model)
    # sample_fraction=1: the cheap tier's estimate is the exact norm of step 1's gradients.
    assert r.channels["grad_norm"] == pytest.approx(want, rel=1e-9)
    assert reads["read_grads"] == 1


def test_an_explicit_grad_norm_to_monitor_wins(reads: Counter[str]) -> None:
    model, opt, guard = _setup(full_pass_interval=1000)
    _backward(model, 0)
    guard.guarded_step(opt)
    assert guard.monitor(model, grad_norm=123.0).channels["grad_norm"] == 123.0
    # ... and the veto's value is gone with that step: the next monitor() reads its own.
    opt.zero_grad()
    _backward(model, 1)
    want = _norm(model)
    guard.guarded_step(opt)
    assert guard.monitor(model).channels["grad_norm"] == pytest.approx(want, rel=1e-9)


def test_a_clipped_step_reports_the_norm_it_applied(reads: Counter[str]) -> None:
    model, opt, guard = _setup(full_pass_interval=1000)
    for t in range(25):  # 20 norms make a clip value
        opt.zero_grad()
        loss = _backward(model, t)
        guard.guarded_step(opt, loss=loss)
        guard.monitor(model, loss=loss)
    limit = guard.recommended_clip_value()
    assert limit is not None
    opt.zero_grad()
    loss = _backward(model, 25, scale=3.0)  # a gradient three times the usual size
    assert _norm(model) > limit
    assert guard.guarded_step(opt, loss=loss)
    applied = _norm(model)  # the clipped gradients the optimizer used
    r = guard.monitor(model, loss=loss)
    # Not read again for it (a full pass on a DRIFT reads the gradients, for non-finite
    # values, but the norm channel is the handed-over one).
    assert r.channels["grad_norm"] == pytest.approx(applied, rel=1e-5)
    assert reads["grad_norm"] == 26


def test_a_vetoed_step_reports_no_gradient_norm(reads: Counter[str]) -> None:
    """The veto drops the gradients: monitor() reports the step without a gradient norm (as it
    did before the handover), and the veto is an incident that names the reason."""
    model, opt, guard = _setup(full_pass_interval=1000)
    _backward(model, 0)
    for p in model.parameters():
        p.grad[0] = float("nan")  # type: ignore[index]
        break
    assert not guard.guarded_step(opt)
    r = guard.monitor(model)
    assert "grad_norm" not in r.channels
    skipped = guard.get_statistics()["incidents"]["skipped"]
    assert len(skipped) == 1
    assert "non-finite" in skipped[0]["reason"]
