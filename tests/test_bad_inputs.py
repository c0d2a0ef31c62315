"""The bad-input matrix (docs/bad-inputs.md): every public entry point meets empty parameter
sets; integer, bool, complex, sparse and meta-device tensors; shapes, dtypes and parameter sets
that change between steps; NaN, Inf, 1e38 and denormals. Each gets either a clear error that
names the problem and the fix, or a CRITICAL status; never a crash and never a silent wrong
number."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from zetaguard import ZetaGuard, _core

WARMUP = 5


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("zetaguard").setLevel(logging.ERROR)  # CRITICAL steps are expected


def guard(**kw: Any) -> ZetaGuard:
    return ZetaGuard(warmup_steps=WARMUP, auto_recover=False, **kw)


# ---- entry points: each turns a list of tensors into one call ------------------------------------


def via_numpy_list(ts: list[Any]) -> Callable[[ZetaGuard], Any]:
    return lambda g: g.monitor(ts)


def via_dict(ts: list[Any]) -> Callable[[ZetaGuard], Any]:
    return lambda g: g.monitor({f"layer{i}.w": t for i, t in enumerate(ts)})


def via_torch_module(ts: list[torch.Tensor]) -> Callable[[ZetaGuard], Any]:
    module = torch.nn.Module()
    for i, t in enumerate(ts):
        module.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
    return lambda g: g.monitor(module)


def via_tracker(ts: list[Any]) -> Callable[[ZetaGuard], Any]:
    return lambda _g: _core.Tracker().update(ts)


def via_tracker_norms(ts: list[Any]) -> Callable[[ZetaGuard], Any]:
    return lambda _g: _core.Tracker().norms(ts)


NUMPY_ENTRIES = [via_numpy_list, via_dict, via_tracker, via_tracker_norms]
TORCH_ENTRIES = [via_numpy_list, via_dict, via_torch_module, via_tracker, via_tracker_norms]

# ---- unsupported element types ---------------------------------------------------------------------

NUMPY_BAD = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, np.longdouble]
TORCH_BAD = [
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
]


@pytest.mark.parametrize("entry", NUMPY_ENTRIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", NUMPY_BAD, ids=lambda d: np.dtype(d).name)
def test_numpy_unsupported_dtype_names_the_fix(entry: Callable[..., Any], dtype: Any) -> None:
    good = np.ones(6, np.float32)
    bad = np.ones(6).astype(dtype)
    with pytest.raises(TypeError, match=r"dtype .*float32, float64, float16 and bfloat16"):
        entry([good, bad])(guard())


@pytest.mark.parametrize("entry", TORCH_ENTRIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", TORCH_BAD, ids=str)
def test_torch_unsupported_dtype_names_the_fix(entry: Callable[..., Any], dtype: Any) -> None:
    bad = torch.ones(6).to(dtype)
    # DLPack may refuse the type before the engine sees it (float8): still a clear ValueError.
    with pytest.raises((TypeError, ValueError), match=r"dtype|DLPack"):
        entry([torch.ones(6), bad])(guard())
    if entry is not via_tracker and entry is not via_tracker_norms:
        with pytest.raises(TypeError, match=r"float32, float64, float16 and bfloat16"):
            entry([torch.ones(6), bad])(guard())


# A module entry is left out: a sparse nn.Parameter reaches the adapter as the same sparse
# tensor the list entries already give it.
@pytest.mark.parametrize(
    "entry", [e for e in TORCH_ENTRIES if e is not via_torch_module], ids=lambda f: f.__name__
)
def test_sparse_tensor_names_the_fix(entry: Callable[..., Any]) -> None:
    sparse = torch.eye(4).to_sparse()
    with pytest.raises((TypeError, ValueError), match=r"to_dense|layout|strided"):
        entry([torch.ones(3), sparse])(guard())


@pytest.mark.parametrize("entry", TORCH_ENTRIES, ids=lambda f: f.__name__)
def test_meta_tensor_names_the_fix(entry: Callable[..., Any]) -> None:
    meta = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match=r"meta"):
        entry([torch.ones(3), meta])(guard())


def test_meta_module_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"meta device .*materialise"):
        guard().monitor(torch.nn.Linear(3, 3, device="meta"))


# ---- empty parameter sets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty",
    [[], {}, (), torch.nn.Sequential(), torch.nn.ReLU(), iter([])],
    ids=["list", "dict", "tuple", "Sequential", "ReLU", "generator"],
)
def test_empty_parameter_set_names_the_fix(empty: Any) -> None:
    with pytest.raises(ValueError, match=r"no parameters: pass a model with trainable"):
        guard().monitor(empty)


def test_no_params_and_no_model_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"attach a model"):
        guard().monitor()


def test_pattern_matching_nothing_names_the_fix() -> None:
    g = guard().monitor_pattern(r"^nothing$")
    with pytest.raises(ValueError, match=r"matches none of the"):
        g.monitor({"a.w": np.ones(3, np.float32)})


def test_refused_first_step_does_not_poison_the_guard() -> None:
    g = guard()
    with pytest.raises(TypeError, match="dtype int64"):
        g.monitor({"w": np.ones(3, np.float32), "steps": np.arange(3)})
    assert g.monitor({"w": np.ones(3, np.float32)}).status == "STABLE"


# ---- the monitored set changes between steps ------------------------------------------------------------


def _steps(g: ZetaGuard, params: Callable[[int], Any], n: int) -> None:
    for t in range(n):
        g.monitor(params(t))


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize(
    "change",
    ["resized", "recast", "added", "removed", "renamed"],
)
def test_numpy_group_change_names_reset(mode: str, change: str) -> None:
    g = guard(mode=mode, sketch_buckets=8)
    base = {"a.w": np.ones(40, np.float32), "b.w": np.ones(30, np.float32)}
    _steps(g, lambda t: {k: v * (1 + 0.01 * t) for k, v in base.items()}, 4)
    changed = dict(base)
    if change == "resized":
        changed["b.w"] = np.ones(31, np.float32)
    elif change == "recast":
        changed["b.w"] = np.ones(30, np.float64)
    elif change == "added":
        changed["c.w"] = np.ones(3, np.float32)
    elif change == "removed":
        del changed["b.w"]
    else:
        changed = {"z.w": changed.pop("a.w"), **changed}
    with pytest.raises(ValueError, match=r"reset\(\)"):
        g.monitor(changed)
    g.reset()
    assert g.monitor(changed).status == "STABLE"


@pytest.mark.parametrize("change", ["resized", "added", "removed", "half"])
def test_torch_module_change_names_reset(change: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    g = guard()
    for _ in range(3):
        g.monitor(model)
    if change == "resized":
        model[1] = torch.nn.Linear(8, 3)
    elif change == "added":
        model.append(torch.nn.Linear(2, 2))
    elif change == "removed":
        del model[1]
    else:
        model.half()
    with pytest.raises(ValueError, match=r"reset\(\)"):
        g.monitor(model)


def test_storage_swapped_behind_a_parameter_is_caught() -> None:
    """`p.data = ...` with a narrower dtype: the new buffer often reuses the old address, and a
    cached float32 layout would read twice the buffer's length. It must be a clear error."""
    for _ in range(5):
        model = torch.nn.Linear(512, 512, bias=False)
        g = guard()
        g.monitor(model)
        with torch.no_grad():
            model.weight.data = torch.empty(0)
            model.weight.data = torch.zeros(512, 512, dtype=torch.float16)
        with pytest.raises(ValueError, match=r"float32 to .*float16.*reset\(\)"):
            g.monitor(model)


# ---- layouts: non-contiguous, misaligned, read-only, offsets ---------------------------------------------


def test_non_contiguous_names_the_fix() -> None:
    a = np.ones((4, 6), np.float32)
    for bad in (a.T, a[:, ::2], np.broadcast_to(np.float32(1), (5,))):
        with pytest.raises(ValueError, match=r"contiguous.*ascontiguousarray"):
            guard().monitor([bad])
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        guard().monitor([torch.ones(4, 6).t()])


def test_misaligned_view_names_the_fix() -> None:
    raw = np.zeros(4 * 10 + 1, np.uint8)
    view = np.frombuffer(raw.data, dtype=np.float32, count=10, offset=1)
    with pytest.raises(ValueError, match=r"not aligned.*copy"):
        guard().monitor([view])
    assert _core.Tracker().norms([np.array(view)])[0, 0] == 0.0


def test_read_only_and_offset_views_read_the_right_memory() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=101).astype(np.float32)
    ro = base.copy()
    ro.flags.writeable = False
    offset_view = base[1:]  # contiguous, one element in
    rows = _core.Tracker().norms([ro, offset_view])
    assert rows[0, 0] == pytest.approx(float(np.sum(base.astype(np.float64) ** 2)), rel=1e-12)
    assert rows[1, 0] == pytest.approx(float(np.sum(base[1:].astype(np.float64) ** 2)), rel=1e-12)


# ---- values: NaN, Inf, 1e38, denormals ----------------------------------------------------------------

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def trajectory(n_steps: int, dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = [
        torch.randn(600, generator=gen, dtype=torch.float64),  # sketched in sketch mode
        torch.randn(40, generator=gen, dtype=torch.float64),
    ]
    out = []
    for _ in range(n_steps):
        x = [
            v - 0.01 * (0.1 * v + torch.randn(v.shape, generator=gen, dtype=torch.float64))
            for v in x
        ]
        out.append([v.to(dtype) for v in x])
    return out


def run_with(values: list[list[torch.Tensor]], mode: str) -> list[Any]:
    g = guard(mode=mode, sketch_buckets=16)
    return [g.monitor(step) for step in values]


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("at", [0, 2, 8], ids=["first-step", "warm-up", "after-warm-up"])
def test_non_finite_parameter_is_critical(mode: str, dtype: str, value: float, at: int) -> None:
    steps = trajectory(10, DTYPES[dtype])
    steps[at][0][7] = value
    steps[at][1][3] = value
    results = run_with(steps, mode)
    hit = results[at]
    assert hit.status == "CRITICAL"
    assert hit.nonfinite == 2  # the engine's count equals what was injected
    assert all(r.status != "CRITICAL" for r in results[:at])


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_huge_finite_weight_is_critical(mode: str, dtype: str) -> None:
    steps = trajectory(10, DTYPES[dtype])
    steps[8][0][5] = 1e38
    results = run_with(steps, mode)
    assert results[8].status == "CRITICAL"
    assert results[8].nonfinite == 0
    assert all(r.status == "STABLE" for r in results[6:8])


def test_1e38_in_float16_overflows_to_inf_and_is_critical() -> None:
    steps = trajectory(10, torch.float16)
    steps[8][0][5] = 1e38  # beyond float16's range: stored as inf
    assert torch.isinf(steps[8][0][5])
    assert run_with(steps, "exact")[8].status == "CRITICAL"


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_denormals_are_ordinary_numbers(mode: str, dtype: str) -> None:
    """Subnormal elements in a healthy run change nothing: same statuses as without them, all
    values finite, and the engine's ||x||^2 equals NumPy's."""
    tiny = float(np.finfo(np.float32).smallest_subnormal) * 3
    clean = trajectory(12, DTYPES[dtype])
    dirty = [[v.clone() for v in step] for step in clean]
    for step in dirty:
        step[0][:10] = tiny
    a, b = run_with(clean, mode), run_with(dirty, mode)
    assert [r.status for r in a] == [r.status for r in b]
    assert all(np.isfinite(r.zeta_value) and r.nonfinite == 0 for r in b)
    rows = _core.Tracker().norms([t.numpy() for t in dirty[-1]])
    ref = [float(np.sum(t.numpy().astype(np.float64) ** 2)) for t in dirty[-1]]
    assert rows[:, 0].tolist() == pytest.approx(ref, rel=1e-12)


def test_denormal_sized_updates_stay_finite() -> None:
    """Weights and updates in the subnormal range: no division by zero, no NaN score."""
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    g = guard()
    for t in range(10):
        r = g.monitor([np.full(16, tiny * (100 + (t % 3)), np.float32)])
        assert np.isfinite(r.zeta_value)
        assert r.nonfinite == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
@pytest.mark.parametrize("channel", ["loss", "grad_norm"])
def test_non_finite_loss_or_grad_norm_is_critical(channel: str, value: float) -> None:
    g = guard()
    steps = trajectory(8, torch.float32)
    for t, step in enumerate(steps):
        r = g.monitor(step, **{channel: value if t == 6 else 1.0})
        assert (r.status == "CRITICAL") == (t == 6)


def test_non_finite_gradient_is_critical() -> None:
    # Seeded: on unseeded random data this 10-parameter model, 5 steps past a 5-step warm-up,
    # scores the step after the NaN CRITICAL in about 1 run in 100-300 (growth channel, in
    # exact mode too), which made the test flaky.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    g = guard()
    for t in range(8):
        model.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        if t == 6:
            model.weight.grad[0, 0] = float("nan")
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad.nan_to_num()
        r = g.monitor(model)
        assert (r.status == "CRITICAL") == (t == 6), (t, r.status)


@pytest.mark.parametrize("bad", ["1.0x", [1.0], object()], ids=["str", "list", "object"])
def test_loss_of_wrong_type_names_the_fix(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"loss must be a number or a 0-d tensor"):
        guard().monitor([np.ones(3, np.float32)], loss=bad)


@pytest.mark.parametrize(
    "bad",
    [None, 3, "abc", [1.0, 2.0], [[1.0]], [object()]],
    ids=["None-list", "int", "str", "floats", "nested", "object"],
)
def test_non_tensor_inputs_name_the_fix(bad: Any) -> None:
    items = [bad] if bad is None else bad
    with pytest.raises(TypeError, match=r"neither DLPack nor the buffer protocol; pass NumPy"):
        guard().monitor(items)
