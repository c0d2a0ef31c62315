"""``model.parameters()`` / ``named_parameters()`` handed to ``monitor()``: read from the torch
adapter's cached walk of the module instead of iterating torch's generator. Each case checks
the result against what iterating the very generator gives (torch itself as the reference)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("torch")

import torch
from zetaguard import ZetaGuard
from zetaguard.adapters import materialize


class Tied(torch.nn.Module):
    """Shared weights, a submodule used twice, a None parameter, a frozen one, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 3)
        self.block = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.LayerNorm(3))
        self.again = self.block
        self.head = torch.nn.Linear(3, 7)
        self.head.weight = self.emb.weight
        self.register_parameter("missing", None)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("count", torch.zeros(1))


class OwnWalk(torch.nn.Linear):
    """A module whose named_parameters() is its own: its generators must be iterated."""

    def named_parameters(
        self, *args: Any, **kwargs: Any
    ) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in super().named_parameters(*args, **kwargs):
            if name != "bias":
                yield name, p


def _same(got: list[Any], want: list[Any]) -> bool:
    if len(got) != len(want):
        return False
    for a, b in zip(got, want, strict=True):
        if isinstance(b, tuple):
            if not (isinstance(a, tuple) and a[0] == b[0] and a[1] is b[1]):
                return False
        elif a is not b:
            return False
    return True


MODELS: list[Callable[[], torch.nn.Module]] = [
    lambda: Tied(),
    lambda: torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)]),
    lambda: torch.nn.Linear(4, 4),
    lambda: OwnWalk(3, 3),
    lambda: torch.nn.Module(),  # no parameters
]
CALLS: list[Callable[[torch.nn.Module], Iterator[Any]]] = [
    lambda m: m.parameters(),
    lambda m: m.named_parameters(),
    lambda m: m.parameters(recurse=False),
    lambda m: m.named_parameters(prefix="model"),
    lambda m: m.named_parameters(remove_duplicate=False),
]


@pytest.mark.parametrize("make", MODELS)
@pytest.mark.parametrize("call", CALLS)
def test_same_items_as_iterating_the_generator(
    make: Callable[[], torch.nn.Module], call: Callable[[torch.nn.Module], Iterator[Any]]
) -> None:
    model = make()
    for _ in range(2):  # the first call walks the module, the second reads the cache
        gen = call(model)
        got = materialize(gen)
        assert _same(got, list(call(model)))
        assert list(gen) == []  # consumed, as list() would leave it


def test_started_generator_gives_the_rest() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    gen = model.parameters()
    next(gen)
    assert _same(materialize(gen), list(model.parameters())[1:])


def test_model_surgery_and_new_parameters_are_seen() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    materialize(model.parameters())
    model[1] = torch.nn.Linear(2, 3)
    assert _same(materialize(model.parameters()), list(model.parameters()))
    model[0].weight = torch.nn.Parameter(torch.ones(2, 2))
    assert _same(materialize(model.named_parameters()), list(model.named_parameters()))
    model.append(torch.nn.Linear(3, 1))
    assert _same(materialize(model.parameters()), list(model.parameters()))


def test_monitor_reads_the_same_as_a_list() -> None:
    torch.manual_seed(0)
    model = Tied()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    by_gen = ZetaGuard(auto_recover=False, warmup_steps=2)
    by_list = ZetaGuard(auto_recover=False, warmup_steps=2)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)
        a = by_gen.monitor(model.parameters())
        b = by_list.monitor(list(model.parameters()))
        assert a.status == b.status
        assert a.channels["grad_norm"] == b.channels["grad_norm"]
        assert a.zeta_value == b.zeta_value or (
            math.isnan(a.zeta_value) and math.isnan(b.zeta_value)
        )
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    want = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert a.channels["grad_norm"] == pytest.approx(want, rel=1e-6)


def test_storage_shrunk_behind_a_cached_module_is_still_refused() -> None:
    first = torch.nn.Linear(64, 64)
    model = torch.nn.Sequential(first, torch.nn.Linear(64, 2))
    guard = ZetaGuard(auto_recover=False)
    guard.monitor(model.parameters())
    guard.monitor(model.parameters())
    first.weight.untyped_storage().resize_(16)
    with pytest.raises(
        ValueError, match=r"param\.0 needs 16384 bytes of its storage but the storage holds 16"
    ):
        guard.monitor(model.parameters())


def test_an_unmonitorable_parameter_is_named_as_before() -> None:
    model = torch.nn.Linear(2, 2)
    model.steps = torch.nn.Parameter(torch.zeros(1, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"param\.2 has dtype torch\.int64"):
        ZetaGuard(auto_recover=False).monitor(model.parameters())


def test_which_generators_take_the_cached_walk() -> None:
    from zetaguard.adapters.torch_layout import unwalked

    model = Tied()
    assert unwalked(model.parameters()) is not None
    assert unwalked(model.named_parameters()) is not None
    assert (
        unwalked(model.named_parameters(prefix="", recurse=True, remove_duplicate=True)) is not None
    )
    for gen in (
        model.parameters(recurse=False),
        model.named_parameters(prefix="m"),
        model.named_parameters(remove_duplicate=False),
        OwnWalk(2, 2).parameters(),
        model.buffers(),
        (p for p in model.parameters()),
    ):
        assert unwalked(gen) is None
    started = model.parameters()
    next(started)
    assert unwalked(started) is None
