"""The adapters' caches hold no strong reference to the user's tensors (issue 15, item 4).

Before the fix, ``monitor([p.detach().clone()])`` kept every clone alive in the list cache
until it held 64 layouts (up to 63 clones: +1 GB for a 16 MB tensor), and a model monitored
then dropped kept its parameters alive the same way. Live tensors are counted with weak
references, in a real torch training loop.
"""

from __future__ import annotations

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")

from zetaguard import ZetaGuard  # noqa: E402


@pytest.mark.parametrize("auto_recover", [False, True])
def test_fresh_clones_each_step_do_not_accumulate(auto_recover: bool) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1 << 16), torch.nn.Linear(1 << 16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    guard = ZetaGuard(auto_recover=auto_recover, warmup_steps=5)
    refs: list[weakref.ref[torch.Tensor]] = []
    x = torch.randn(8, 64)
    for _ in range(80):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        clones = [p.detach().clone() for p in model.parameters()]  # 16 MB for the big weight
        refs += [weakref.ref(c) for c in clones]
        guard.monitor(clones)
        del clones
    gc.collect()
    alive = sum(r() is not None for r in refs)
    # Recovery keeps the parameters of the latest call (what a rollback writes back into);
    # nothing older survives. Before the fix: 16 of 80 steps' clones (64 with recovery on).
    assert alive <= 4, alive


def test_a_dropped_model_is_freed() -> None:
    # Recovery acts on another model, so only the adapter's caches could hold these.
    guard = ZetaGuard(auto_recover=False, model=torch.nn.Linear(1, 1))
    refs = []
    for _ in range(10):
        model = torch.nn.Linear(512, 512)
        refs.append(weakref.ref(model.weight))
        guard.monitor(model)
        guard.reset()
        del model
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_gradients_passed_as_tensors_each_step_do_not_accumulate() -> None:
    """The distributed path hands each step's gradients to the list cache as tensors."""
    from zetaguard.adapters import snapshot

    refs = []
    for _ in range(80):
        grads = [torch.randn(1024), torch.randn(16)]
        refs += [weakref.ref(g) for g in grads]
        snapshot([(f"g{i}", g) for i, g in enumerate(grads)])
        del grads
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
