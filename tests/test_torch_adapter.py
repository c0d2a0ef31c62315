"""The torch adapter: zero-copy CPU tensors of every float dtype, names, caches, gradients,
layers and clear errors, checked against a NumPy statement of the math (tests/support/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard
from zetaguard.adapters import snapshot

from tests.support.reference import channels
from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy().copy()


def _group_rows(result) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {n: result.group_rows[i] for i, n in enumerate(result.group_names)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_float_dtype_matches_numpy_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(33, 17).to(dtype))
    b = torch.nn.Parameter(torch.randn(17).to(dtype))
    guard = ZetaGuard(group_by="tensor", auto_recover=False)
    hist: dict[str, list[np.ndarray]] = {"w": [], "b": []}
    for _ in range(6):
        with torch.no_grad():
            w.add_(torch.randn_like(w) * 0.05)
            b.mul_(1.01)
        r = guard.monitor({"w": w, "b": b})
        hist["w"].append(_np(w))
        hist["b"].append(_np(b))
    rows = _group_rows(r)
    for name in ("w", "b"):
        ref = channels(hist[name])
        np.testing.assert_allclose(
            rows[name][:4], [ref["x2"], ref["v2"], ref["a2"], ref["j2"]], rtol=1e-9
        )


def test_cpu_tensors_are_read_in_place_not_copied() -> None:
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    snap = snapshot([p])
    assert snap.raw
    address, numel, dtype = snap.tensors[0]
    assert (address, numel, dtype) == (p.data_ptr(), 1000, "bfloat16")


def test_names_from_module_parameters_and_named_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for params in (model, model.named_parameters()):
        guard = ZetaGuard(auto_recover=False)
        r = guard.monitor(params)
        assert list(r.groups) == ["0", "2"]
    guard = ZetaGuard(auto_recover=False, group_by="tensor")
    r = guard.monitor(model.parameters())
    assert list(r.groups) == [f"param.{i}" for i in range(4)]


def test_shared_parameters_are_monitored_once() -> None:
    lin = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(lin, lin)
    snap = snapshot(model)
    assert snap.names == ["0.weight", "0.bias"]


def test_gradient_norm_read_automatically() -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3).to(torch.bfloat16)
    model(torch.randn(7, 5, dtype=torch.bfloat16)).square().sum().backward()
    guard = ZetaGuard(auto_recover=False)
    r = guard.monitor(model)
    expected = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert r.channels["grad_norm"] == pytest.approx(expected, rel=1e-12)


def test_sparse_and_missing_gradients() -> None:
    emb = torch.nn.Embedding(50, 4, sparse=True)
    head = torch.nn.Linear(4, 1)
    emb(torch.tensor([1, 2, 2])).sum().backward()  # head gets no gradient
    guard = ZetaGuard(auto_recover=False)
    r = guard.monitor([("emb", emb.weight), ("head", head.weight)])
    expected = float(emb.weight.grad.to_dense().norm())
    assert r.channels["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_swapped_storage_and_replaced_parameters_are_seen() -> None:
    model = torch.nn.Linear(4, 4, bias=False)
    guard = ZetaGuard(auto_recover=False)
    guard.monitor(model)
    model.weight.data = torch.full((4, 4), 3.0)  # new storage behind the same Parameter
    r = guard.monitor(model)
    assert r.channels["param_norm"] == pytest.approx(12.0)
    model.weight = torch.nn.Parameter(torch.full((4, 4), 5.0))  # a new Parameter object
    r = guard.monitor(model)
    assert r.channels["param_norm"] == pytest.approx(20.0)


def test_resized_parameter_is_a_clear_error() -> None:
    model = torch.nn.Linear(4, 4, bias=False)
    guard = ZetaGuard(auto_recover=False)
    guard.monitor(model)
    model.weight.data = torch.zeros(8, 4)
    with pytest.raises(Exception, match="changed"):
        guard.monitor(model)


@pytest.mark.parametrize(
    ("tensor", "error", "match"),
    [
        (torch.zeros(3, dtype=torch.int64), TypeError, "dtype torch.int64"),
        (torch.zeros(4, 4).t()[:, :2], ValueError, "contiguous"),
        (torch.zeros(3, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_tensors_name_the_problem(tensor: torch.Tensor, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ZetaGuard(auto_recover=False).monitor([tensor])


def test_monitor_pattern_on_parameter_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    guard = ZetaGuard(auto_recover=False, group_by="tensor").monitor_pattern(r"weight$")
    r = guard.monitor(model)
    assert list(r.groups) == ["0.weight", "1.weight"]


def test_monitor_layers_groups_by_layer() -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)), torch.nn.Linear(4, 2)
    )
    guard = ZetaGuard(auto_recover=False).attach(model=model)
    guard.monitor_layers([model[0], model[1]])
    r = guard.monitor()
    assert list(r.groups) == ["0", "1"]
    block_norm = math.sqrt(
        sum(float(p.detach().double().square().sum()) for p in model[0].parameters())
    )
    assert r.groups["0"].param_norm == pytest.approx(block_norm)
    assert guard.monitor(model).step == 1  # the attached model means its layers
    named = ZetaGuard(auto_recover=False).monitor_layers({"head": [model[1].weight]})
    assert list(named.monitor().groups) == ["head"]
    with pytest.raises(ValueError, match="monitor_layers"):
        named.monitor(model)
    with pytest.raises(ValueError, match="no parameters"):
        ZetaGuard().monitor_layers([torch.nn.ReLU()])


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(st.integers(1, 300), min_size=1, max_size=5),
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_any_parameter_set_matches_reference(
    shapes: list[int], dtype: torch.dtype, steps: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype) for n in shapes]
    guard = ZetaGuard(group_by="tensor", auto_recover=False)
    hist: list[list[np.ndarray]] = [[] for _ in shapes]
    for _ in range(steps):
        for i, p in enumerate(params):
            p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
            hist[i].append(_np(p))
        r = guard.monitor(params)
    for i, row in enumerate(r.group_rows):  # type: ignore[union-attr]
        ref = channels(hist[i])
        assert row[0] == pytest.approx(ref["x2"], rel=1e-9)
        if ref["j2"] is not None:
            assert row[3] == pytest.approx(ref["j2"], rel=1e-6, abs=1e-12)


def test_cached_layouts_follow_what_each_step_hands_over() -> None:
    """The adapter caches by tensor identity: a fresh generator of the same parameters hits the
    cache, a list with one tensor swapped for another misses it, and gradients that appear,
    move to new storage or vanish are read as they are now (against a NumPy reference)."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    guard = ZetaGuard(auto_recover=False, group_by="tensor")
    history: list[list[np.ndarray]] = []

    def check(params: object, expect_grad: float | None) -> None:
        r = guard.monitor(params)
        history.append([_np(p) for p in model.parameters()])
        for i, name in enumerate(r.group_names):
            ref = channels([h[i] for h in history])
            assert r.group_rows[i][0] == pytest.approx(ref["x2"], rel=1e-12), name
        if expect_grad is None:
            assert "grad_norm" not in r.channels
        else:
            assert r.channels["grad_norm"] == pytest.approx(expect_grad, rel=1e-12)

    check(model.parameters(), None)  # a generator, no gradients yet
    model(torch.randn(5, 3)).sum().backward()
    grad = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    check(model.parameters(), grad)  # gradients appeared
    for p in model.parameters():
        p.grad = p.grad * 2.0  # new gradient storage
    check(list(model.parameters()), 2 * grad)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # an in-place step, same tensors
    check(list(model.parameters()), 2 * grad)
    for p in model.parameters():
        p.grad = None
    check(model.parameters(), None)


def test_a_replaced_entry_in_the_same_list_is_read_afresh() -> None:
    a, b, c = (torch.full((3,), v) for v in (1.0, 2.0, 7.0))
    guard = ZetaGuard(auto_recover=False, group_by="tensor")
    guard.monitor([a, b])
    r = guard.monitor([a, c])  # same names (param.0, param.1), another tensor in slot 1
    assert r.group_rows[1][0] == pytest.approx(3 * 49.0)
    assert r.group_rows[1][1] == pytest.approx(3 * 25.0)  # ||c - b||^2


def test_grad_norm_matches_torch_on_every_path() -> None:
    """The engine-read gradient norm (host tensors) against torch's own, and the fallbacks."""
    from zetaguard.adapters.torch import grad_norm

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).to(torch.bfloat16)
    assert grad_norm(model) is None  # no gradients yet
    model(torch.randn(4, 6, dtype=torch.bfloat16)).sum().backward()
    want = float(torch.nn.utils.get_total_norm([p.grad.double() for p in model.parameters()]))
    assert grad_norm(model) == pytest.approx(want, rel=1e-12)
    assert grad_norm(list(model.parameters())) == pytest.approx(want, rel=1e-12)
    model[1].bias.grad = None  # a missing gradient is left out
    want = float(
        torch.nn.utils.get_total_norm(
            [p.grad.double() for p in model.parameters() if p.grad is not None]
        )
    )
    assert grad_norm(model) == pytest.approx(want, rel=1e-12)
    model[0].weight.grad[0, 0] = float("nan")
    assert grad_norm(model) == math.inf
    # A non-contiguous parameter is not engine-readable: torch's reduction takes over.
    strided = torch.nn.Parameter(torch.randn(4, 6).t())
    strided.grad = torch.ones(4, 6).t()
    assert grad_norm([strided]) == pytest.approx(math.sqrt(24.0))
