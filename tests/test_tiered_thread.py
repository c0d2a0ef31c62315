"""``ZetaGuard(full_pass="thread")``: the scheduled full pass on a worker thread, its finding one
step late, on real torch training runs, against the inline guard on the same run."""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard, _core, tiered_worker
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot
from zetaguard.engine.session import EngineSession

torch = pytest.importorskip("torch")

INTERVAL = 5


def _model() -> Any:
    torch.manual_seed(0)
    # 256x512 weights: 512 blocks of 256 float32, of which the sample reads 16.
    return torch.nn.Sequential(
        torch.nn.Linear(512, 256), torch.nn.Tanh(), torch.nn.Linear(256, 512)
    )


def _batches() -> Any:
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randn(64, 512, generator=g)


def _train_step(model: Any, opt: Any, data: Any) -> float:
    x = next(data)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), x)
    loss.backward()
    opt.step()
    return float(loss.item())


def _guards() -> tuple[ZetaGuard, ZetaGuard]:
    kw: dict[str, Any] = {"auto_recover": False, "full_pass_interval": INTERVAL, "warmup_steps": 10}
    return ZetaGuard(**kw), ZetaGuard(full_pass="thread", **kw)


def _unsampled(weight: Any, index: int) -> int:
    """An element of tensor ``index`` (engine order) outside its sampled blocks, from a sampler
    built with the guard's defaults (the plan is a function of the seed, index, size, dtype)."""
    sampler = _core.Sampler(1 / 64, 1024, 0x5EED)
    sampler.update([np.zeros(n, dtype=np.float32) for n in _SIZES])
    plan = sampler.plan(index)
    taken = np.zeros(weight.numel(), dtype=bool)
    for s in plan["starts"]:
        taken[s : s + plan["block"]] = True
    return int(np.flatnonzero(~taken)[weight.numel() // 2])


_SIZES = [p.numel() for p in _model().parameters()]


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zetaguard-full-pass")]


def test_thread_results_equal_inline_results_on_a_healthy_run() -> None:
    """Every step's status and scores are the inline guard's; each scheduled full pass arrives
    at the next step, naming the step it read, with the count the inline pass found (0)."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = _batches()
    inline, thread = _guards()
    for t in range(31):
        loss = _train_step(model, opt, x)
        a = inline.monitor(model, loss=loss)
        b = thread.monitor(model, loss=loss)
        assert (a.status, a.zeta_value, a.raw_jar, a.nonfinite) == (
            b.status,
            b.zeta_value,
            b.raw_jar,
            b.nonfinite,
        )
        late = b.channels.get("late_full_pass_step")
        assert late == (t - 1 if t % INTERVAL == 0 and t > 0 else None)
        if late is not None:
            assert b.channels["late_full_pass_nonfinite"] == 0.0
    si, st = inline.get_statistics()["tiered"], thread.get_statistics()["tiered"]
    assert (si["full_passes"], si["late_full_passes"]) == (6, 0)
    assert (st["full_passes"], st["late_full_passes"]) == (0, 6)
    thread.close()


def test_nan_outside_the_sample_arrives_one_step_late_with_the_inline_count() -> None:
    """A NaN written into an unsampled weight at a scheduled step, no loss given: the inline
    guard says CRITICAL at that step; the threaded one at the next, on full data (it runs an
    inline full pass then), with the inline step's non-finite count."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = _batches()
    inline, thread = _guards()
    weight = model[0].weight
    bad = _unsampled(weight, 0)
    results = []
    for t in range(2 * INTERVAL):
        _train_step(model, opt, x)
        if t == 2 * INTERVAL - 1:  # a scheduled full pass
            with torch.no_grad():
                weight.view(-1)[bad] = float("nan")
        results.append((inline.monitor(model), thread.monitor(model)))
    a, b = results[-1]
    assert (a.status, a.nonfinite) == ("CRITICAL", 1)
    assert b.status == "STABLE"  # the sample cannot see it; the worker is reading it
    late = thread.monitor(model)  # the next call (the model unchanged: the same tensors)
    assert late.status == "CRITICAL"
    assert late.channels["late_full_pass_step"] == 2 * INTERVAL - 1
    assert late.channels["late_full_pass_nonfinite"] == a.nonfinite
    assert late.nonfinite == a.nonfinite
    st = thread.get_statistics()["tiered"]
    assert (st["full_passes"], st["escalations"]) == (1, 1)  # the CRITICAL read everything
    thread.close()


def test_an_error_on_the_worker_surfaces_in_the_next_monitor_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault injection: the pass raises on the worker thread; the next monitor() raises it,
    chained, naming the fix; the guard then goes on."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = _batches()
    _, thread = _guards()

    def broken(*_: Any) -> Any:
        raise MemoryError("injected")

    monkeypatch.setattr(tiered_worker, "scan", broken)
    for _ in range(INTERVAL):
        thread.monitor(model, loss=_train_step(model, opt, x))
    with pytest.raises(RuntimeError, match=r"worker thread.*failed: injected.*full_pass='inline'"):
        thread.monitor(model, loss=_train_step(model, opt, x))
    monkeypatch.undo()
    assert thread.monitor(model, loss=_train_step(model, opt, x)).status == "STABLE"
    thread.close()


@pytest.mark.parametrize("how", ["reset", "reset_trajectory", "load_state"])
def test_a_pending_pass_is_dropped_by_reset_rollback_and_load_state(
    how: str, tmp_path: Path
) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = _batches()
    inline, thread = _guards()
    for _ in range(INTERVAL):  # the last step hands its full pass to the worker
        loss = _train_step(model, opt, x)
        inline.monitor(model, loss=loss)
        thread.monitor(model, loss=loss)
    if how == "reset":
        thread.reset()
    elif how == "reset_trajectory":  # what a rollback calls
        thread.reset_trajectory()
    else:
        inline.save_state(tmp_path / "g.npz")
        thread.load_state(tmp_path / "g.npz")
    r = thread.monitor(model, loss=_train_step(model, opt, x))
    assert "late_full_pass_step" not in r.channels
    assert r.status == "STABLE"
    thread.close()


def test_the_worker_thread_ends_on_close_and_when_the_guard_is_dropped() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = _batches()
    before = set(_worker_threads())
    for closing in (True, False):
        _, thread = _guards()
        for _ in range(INTERVAL):
            thread.monitor(model, loss=_train_step(model, opt, x))
        started = [t for t in _worker_threads() if t not in before]
        assert len(started) == 1
        if closing:
            thread.close()
        else:
            del thread
            gc.collect()
        started[0].join(timeout=10)
        assert not started[0].is_alive()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "exact"}, "needs mode='auto'"),
        ({"mode": "sketch"}, "needs mode='auto'"),
        ({"device": "cuda"}, "device path"),
        ({"device": "cpu"}, "device path"),
    ],
)
def test_thread_on_a_path_without_a_full_pass_is_refused(
    kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match + r".*full_pass='inline'"):
        ZetaGuard(full_pass="thread", **kwargs)


def test_bad_full_pass_value_is_refused() -> None:
    with pytest.raises(ValueError, match=r"full_pass must be 'inline'.*or 'thread'"):
        ZetaGuard(full_pass="background")  # type: ignore[arg-type]


def test_device_tensors_reaching_a_threaded_guard_are_refused() -> None:
    """CUDA tensors under device='auto' go through the device path, which has no separate full
    pass (no GPU here: the session is handed such a snapshot directly)."""
    guard = ZetaGuard(full_pass="thread")
    session = EngineSession(guard)
    session.tiered = _pipeline()
    snap = Snapshot(names=["w"], tensors=[torch.zeros(4)], framework=DEVICE_FRAMEWORK)
    with pytest.raises(ValueError, match=r"CUDA device.*full_pass='inline'"):
        session.uses_tiers(snap, None)


def _pipeline() -> Any:
    from zetaguard.tiered import TieredPipeline

    return TieredPipeline(1 / 64, INTERVAL, 0x5EED, "thread")


def test_arrays_the_next_step_may_free_are_refused_and_numpy_arrays_run() -> None:
    """JAX arrays may be donated to (deleted by) the next step while the worker reads them: a
    threaded guard refuses them at the first call; NumPy arrays (kept alive) run."""
    jnp = pytest.importorskip("jax.numpy")
    guard = ZetaGuard(full_pass="thread")
    with pytest.raises(ValueError, match=r"ArrayImpl.*freed or reused.*full_pass='inline'"):
        guard.monitor({"w": jnp.ones(4096)})
    rng = np.random.default_rng(0)
    numpy_guard = ZetaGuard(full_pass="thread", full_pass_interval=2, auto_recover=False)
    for _ in range(4):
        numpy_guard.monitor({"w": rng.standard_normal(8192).astype(np.float32)})
    assert numpy_guard.get_statistics()["tiered"]["late_full_passes"] == 2
    numpy_guard.close()


def test_a_threaded_guard_refuses_a_state_file_of_another_mode(tmp_path: Path) -> None:
    exact = ZetaGuard(mode="exact", auto_recover=False)
    rng = np.random.default_rng(1)
    for _ in range(4):
        exact.monitor({"w": rng.standard_normal(4096).astype(np.float32)})
    exact.save_state(tmp_path / "exact.npz")
    thread = ZetaGuard(full_pass="thread")
    with pytest.raises(ValueError, match=r"needs mode='auto'.*full_pass='inline'"):
        thread.load_state(tmp_path / "exact.npz")
    assert (thread.mode, thread.step) == ("auto", 0)  # unchanged
