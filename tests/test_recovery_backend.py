"""Auto-recovery, the backend: rollback of parameters, optimizer and RNG state bit for bit,
buffer reuse, LR cuts that last under a scheduler."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from zetaguard.recovery import NumpyBackend, make_backend
from zetaguard.recovery.torch_backend import TorchBackend

from tests.support.torch_state import assert_same_state


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


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    ],
)
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

    assert_same_state(model.state_dict(), ref_model)
    assert_same_state(opt.state_dict(), ref_opt)
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
    assert_same_state(model.state_dict(), twin.state_dict())


def test_captures_reuse_the_buffers_of_dropped_snapshots_and_never_of_held_ones() -> None:
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    backend = make_backend(model, opt)

    def tensors(snap) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        return [
            *snap.params.values(),
            *(v for s in snap.optimizer_state["state"].values() for v in s.values()),
        ]

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
    assert_same_state(third.params, {k: v.detach() for k, v in model.state_dict().items()})
    assert_same_state(third.optimizer_state, opt.state_dict())
    assert_same_state(held.params, held_model)  # untouched by the two later captures
    assert_same_state(held.optimizer_state, held_opt)

    # A different layout (a parameter group added) gets fresh buffers of the right shapes.
    extra = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    opt.step()
    del third
    fourth = backend.capture(step=5)
    assert_same_state(fourth.optimizer_state, opt.state_dict())


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
    def build() -> tuple[
        torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
    ]:
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


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation.*:UserWarning")
def test_capture_keeps_names_order_and_byte_count() -> None:
    """What a capture holds, against torch's own state dicts: the same keys in the same order,
    equal values, and ``nbytes`` = numel x element size over model and optimizer state (a
    sparse buffer included: it has no ``nbytes`` of its own)."""
    model = _model()
    model.register_buffer("mask", torch.eye(3).to_sparse())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, 2)
    snap = make_backend(model, opt).capture(step=2)
    live = model.state_dict()
    assert list(snap.params) == list(live)
    for name, t in live.items():
        got = snap.params[name]
        assert torch.equal(got.to_dense(), t.to_dense()) if t.is_sparse else torch.equal(got, t)
    state = [t for s in opt.state_dict()["state"].values() for t in s.values()]
    want = sum(t.numel() * t.element_size() for t in [*live.values(), *state])
    assert snap.nbytes == want
