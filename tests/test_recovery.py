"""Auto-recovery: snapshots, rollback, LR control, the ladder, the pre-step veto."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import RecoveryReport, StabilityResult, ZetaGuard
from zetaguard.recovery import NumpyBackend, make_backend
from zetaguard.recovery.clip import recommended_clip_value
from zetaguard.recovery.ladder import LADDERS, MAX_TOTAL_RECOVERIES
from zetaguard.recovery.manager import MIN_LR_FACTOR, lr_factor
from zetaguard.recovery.snapshots import SnapshotKeeper
from zetaguard.recovery.torch_backend import TorchBackend
from zetaguard.store import RunReader, find_runs


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(32, 8)
        # dropout-like randomness drawn from the global RNG, so RNG restore matters
        mask = (torch.rand(32, 3) > 0.1).float()
        loss = (model(x) * mask).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _assert_same_state(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            _assert_same_state(va, vb)
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), k
        elif isinstance(va, list):
            assert len(va) == len(vb)
            for x, y in zip(va, vb, strict=True):
                if isinstance(x, dict):
                    _assert_same_state(x, y)
                else:
                    assert x == y
        else:
            assert va == vb, k


# ---- the backend -----------------------------------------------------------------------------


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
def test_rollback_restores_parameters_and_optimizer_state_bit_for_bit(make_opt) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = _model()
    opt = make_opt(model.parameters())
    _train(model, opt, 5)
    backend = make_backend(model, opt)
    snap = backend.capture(step=5)
    # An independent reference: deep copies taken at the same moment.
    ref_model = copy.deepcopy(model.state_dict())
    ref_opt = copy.deepcopy(opt.state_dict())
    ref_rng = torch.get_rng_state()
    params_before = [id(p) for p in model.parameters()]

    _train(model, opt, 7)
    assert not torch.equal(model[0].weight, ref_model["0.weight"])
    backend.restore(snap)

    _assert_same_state(model.state_dict(), ref_model)
    _assert_same_state(opt.state_dict(), ref_opt)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    assert [id(p) for p in model.parameters()] == params_before  # in place

    # Continuing from the restored state equals continuing from the reference copies.
    twin = _model()
    twin.load_state_dict(ref_model)
    twin_opt = make_opt(twin.parameters())
    twin_opt.load_state_dict(ref_opt)
    torch.set_rng_state(ref_rng)
    _train(twin, twin_opt, 3)
    backend.restore(snap)  # a snapshot can be restored twice: live state never aliases it
    _train(model, opt, 3)
    _assert_same_state(model.state_dict(), twin.state_dict())


def test_captures_reuse_the_buffers_of_dropped_snapshots_and_never_of_held_ones() -> None:
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    backend = make_backend(model, opt)

    def tensors(snap) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        return [*snap.params.values(),
                *(v for s in snap.optimizer_state["state"].values() for v in s.values())]

    def pointers(snap) -> set[int]:  # type: ignore[no-untyped-def]
        return {t.data_ptr() for t in tensors(snap)}

    held = backend.capture(step=2)
    held_model = copy.deepcopy(held.params)
    held_opt = copy.deepcopy(held.optimizer_state)
    _train(model, opt, 1)
    second = backend.capture(step=3)
    assert not pointers(second) & pointers(held)  # a held snapshot is never written to
    second_buffers = tensors(second)
    del second  # the keeper drops it: its buffers serve the next capture
    _train(model, opt, 1)
    third = backend.capture(step=4)
    assert all(a is b for a, b in zip(tensors(third), second_buffers, strict=True))
    _assert_same_state(third.params, {k: v.detach() for k, v in model.state_dict().items()})
    _assert_same_state(third.optimizer_state, opt.state_dict())
    _assert_same_state(held.params, held_model)  # untouched by the two later captures
    _assert_same_state(held.optimizer_state, held_opt)

    # A different layout (a parameter group added) gets fresh buffers of the right shapes.
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    opt.step()
    del third
    fourth = backend.capture(step=5)
    _assert_same_state(fourth.optimizer_state, opt.state_dict())


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation.*:UserWarning")
def test_sparse_and_quantized_state_is_captured_and_restored() -> None:
    model = torch.nn.Linear(3, 3)
    model.register_buffer("mask", torch.eye(3).to_sparse())
    model.register_buffer("q", torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.qint8))
    backend = make_backend(model)
    snap = backend.capture(step=0)
    assert snap.params["mask"].is_sparse
    assert snap.params["q"].is_quantized
    with torch.no_grad():
        model.weight.add_(1.0)
        model.mask.mul_(2.0)
    del snap
    again = backend.capture(step=1)  # reuses the dense buffers, copies the others afresh
    assert torch.equal(again.params["mask"].to_dense(), 2 * torch.eye(3))
    assert torch.equal(again.params["weight"], model.weight.detach())
    with torch.no_grad():
        model.mask.mul_(3.0)
    backend.restore(again)
    assert torch.equal(model.mask.to_dense(), 2 * torch.eye(3))


def test_restore_keeps_the_current_learning_rate() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    backend = make_backend(model, opt)
    snap = backend.capture(step=2)
    backend.scale_lr(0.1)
    backend.restore(snap)
    assert backend.get_lrs() == [pytest.approx(1e-3)]


def test_numpy_parameters_roll_back_in_place() -> None:
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(4, 5)), "b": rng.normal(size=5).astype(np.float32)}
    backend = make_backend(arrays)
    assert isinstance(backend, NumpyBackend)
    expected = {k: v.copy() for k, v in arrays.items()}
    snap = backend.capture(step=0)
    w_id = id(arrays["w"])
    arrays["w"] += 1.0
    arrays["b"][:] = np.nan
    backend.restore(snap)
    assert id(arrays["w"]) == w_id
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], expected[k])


def test_read_only_arrays_cannot_roll_back_and_say_why() -> None:
    a = np.ones(3)
    backend = NumpyBackend([a])
    snap = backend.capture(step=0)
    a.flags.writeable = False
    with pytest.raises(TypeError, match="cannot be written in place"):
        backend.restore(snap)


def test_generator_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match="not a one-shot generator"):
        make_backend(_model().parameters())


@pytest.mark.parametrize("kind", ["lambda", "step", "onecycle", "cosine", "cyclic", "sequential"])
def test_lr_cut_persists_under_a_scheduler(kind: str) -> None:
    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 2)
        o = torch.optim.SGD(m.parameters(), lr=0.1)
        s: torch.optim.lr_scheduler.LRScheduler
        if kind == "lambda":  # what transformers' get_linear_schedule_with_warmup returns
            s = torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 10))
        elif kind == "step":
            s = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
        elif kind == "onecycle":
            s = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=50)
        elif kind == "cosine":
            s = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=0.01)
        elif kind == "cyclic":
            s = torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3)
        else:
            warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20)
            s = torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[3])
        return m, o, s

    m, o, s = build()
    _ref_m, ref_o, ref_s = build()
    for _ in range(4):
        o.step()
        s.step()
        ref_o.step()
        ref_s.step()
    backend = TorchBackend(m, o, s)
    backend.scale_lr(0.1)
    for _ in range(10):
        o.step()
        s.step()
        ref_o.step()
        ref_s.step()
        assert o.param_groups[0]["lr"] == pytest.approx(0.1 * ref_o.param_groups[0]["lr"])


# ---- snapshots -------------------------------------------------------------------------------


def test_snapshot_is_verified_only_after_interval_stable_steps() -> None:
    arr = np.zeros(3)
    backend = NumpyBackend([arr])
    keeper = SnapshotKeeper(interval=3, keep=2)
    keeper.capture_initial(backend, -1)
    for step in range(3):
        arr[:] = step
        keeper.observe("STABLE", step, backend)
    assert keeper.pending is not None
    assert keeper.pending.step == 2
    assert not keeper.verified
    arr[:] = 99
    keeper.observe("CRITICAL", 3, backend)  # trouble before verification: pending discarded
    assert keeper.pending is None
    assert keeper.pick(0) is keeper.initial
    for step in range(4, 10):
        arr[:] = step
        keeper.observe("STABLE", step, backend)
    assert [s.step for s in keeper.verified] == [6]
    assert keeper.pending is not None
    assert keeper.pending.step == 9


def test_snapshot_memory_budget_bounds_what_is_held() -> None:
    arr = np.zeros(1000)  # 8000 bytes per snapshot
    backend = NumpyBackend([arr])
    keeper = SnapshotKeeper(interval=1, keep=5, memory_budget=20_000)
    keeper.capture_initial(backend, -1)
    for step in range(20):
        keeper.observe("STABLE", step, backend)
        assert keeper.nbytes <= 20_000
    tiny = SnapshotKeeper(interval=1, memory_budget=100)
    tiny.observe("STABLE", 0, backend)
    assert tiny.disabled
    assert tiny.nbytes == 0


def test_keep_bounds_the_verified_snapshots() -> None:
    backend = NumpyBackend([np.zeros(2)])
    keeper = SnapshotKeeper(interval=1, keep=2)
    for step in range(10):
        keeper.observe("STABLE", step, backend)
    assert len(keeper.verified) == 2
    assert keeper.pick(5) is keeper.verified[0]


# ---- the ladder ------------------------------------------------------------------------------


def _result(step: int, status: str, zeta: float) -> StabilityResult:
    return StabilityResult(
        status=status,  # type: ignore[arg-type]
        zeta_value=zeta,
        raw_jar=None,
        smoothed_jar=None,
        confidence=1.0,
        step=step,
        nonfinite=0 if math.isfinite(zeta) else 1,
    )


_STATUS = st.sampled_from([("STABLE", 0.1), ("DRIFT", 0.9), ("CRITICAL", 2.0), ("CRITICAL", math.inf)])


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
    batch_only = _result(1, "CRITICAL", math.inf)  # a NaN loss: the batch's channel only
    batch_only.channels["score_nonfinite"] = math.inf
    batch_only.nonfinite = 0  # the parameters themselves are finite
    manager.record_skip("non-finite loss")
    assert manager.after_step(batch_only) is None
    damaged = _result(2, "CRITICAL", 3.0)  # the update before landed and blew the weights up
    damaged.channels["score_param"] = 2.0
    manager.record_skip("gradient spike")
    report = manager.after_step(damaged)
    assert report is not None
    assert report.restored_step == 0


# ---- end to end through the guard -----------------------------------------------------------


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
    """The seed README's example, as written there."""
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
    guard._store.flush()
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
    assert guard._tracker is not None
    assert guard._tracker.history == 0
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


# ---- the pre-step veto and clipping ---------------------------------------------------------


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
    _assert_same_state(model.state_dict(), params)
    _assert_same_state(opt.state_dict(), state)
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
def test_clip_value_is_above_the_median_and_scale_equivariant(norms: list[float], scale: float) -> None:
    value = recommended_clip_value(norms)
    assert value is not None
    recent = norms[-200:]
    assert value >= float(np.median(recent)) * 0.999
    scaled = recommended_clip_value([scale * n for n in norms])
    assert scaled == pytest.approx(scale * value, rel=1e-9)


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
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "assigns the learning rate" in r.getMessage()]
    assert len(warnings) == 1
    assert "guard.attach(scheduler=...)" in warnings[0].getMessage()
    for loop_value, used in steps:
        # The cut is in force on whatever the loop set, from the very first step after it, and
        # a relative ramp does not compound it.
        assert used == pytest.approx(loop_value * factor, rel=1e-3)
    if relative:
        assert steps[-1][0] == pytest.approx(report.lr_before * factor * 1.01 ** 30, rel=1e-6)
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
    report = guard.emergency_protocol()
    assert report.lr_after is not None
    assert report.lr_before is not None
    with caplog.at_level("WARNING", logger="zetaguard"):
        steps = _lr_loop(guard, model, opt, range(30, 40), keep, sched=sched)
    assert not any("assigns the learning rate" in r.getMessage() for r in caplog.records)
    assert not guard.recovery.lr_watch.overridden
    # The rollback rewound the schedule to the snapshot's position; the cut scales it.
    assert report.restored_step is not None
    position = report.restored_step + 1
    cut = report.lr_after / (0.01 * (1.0 + 0.02 * position))
    assert cut < 0.5
    for t, (_, used) in zip(range(30, 40), steps, strict=True):
        assert used == pytest.approx(0.01 * (1.0 + 0.02 * (position + t - 30)) * cut, rel=1e-3)


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
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=6),
            torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9),
        ], milestones=[6])

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
