"""What reading the gradients once a step saves in a ``guarded_step(); monitor()`` loop, as
ratios to the same loop without the guard, every arm in the same run (issue 18).

Arms, interleaved in rounds so the load of a shared machine hits them alike (the guard's time:
the median per-step time of what follows ``backward()``, guard calls and ``optimizer.step()``,
less the same median of the unguarded arm's ``optimizer.step()``):

* ``none``: backward and ``optimizer.step()``, no guard;
* ``read twice``: what the loop cost before the handover, by construction: the veto's full
  gradient-norm read, passed to ``guarded_step(grad_norm=)`` (which then hands nothing over),
  and ``monitor()``, which reads the gradients again;
* ``handover``: ``guarded_step()`` reads the norm and the same step's ``monitor()`` takes it.

Each guarded arm also prints its gradient reads per step, counted through the project's own
read functions (``adapters.torch.grad_norm``, ``Snapshot.read_grads``).

Usage: python benchmarks/bench_grad_handover.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Any

import torch
import zetaguard.adapters.torch as torch_adapter
from zetaguard import ZetaGuard
from zetaguard.adapters import Snapshot

READS: Counter[str] = Counter()


def _count_reads() -> None:
    real_norm, real_read = torch_adapter.grad_norm, Snapshot.read_grads

    def grad_norm(parameters: Any) -> float | None:
        READS["grad_norm"] += 1
        return real_norm(parameters)

    def read_grads(self: Snapshot) -> Any:
        if self.grad_reader is not None:
            READS["read_grads"] += 1
        return real_read(self)

    torch_adapter.grad_norm = grad_norm
    Snapshot.read_grads = read_grads  # type: ignore[method-assign]


def _mlp(width: int, depth: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Linear(64, width), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def run(name: str, model: torch.nn.Module, batch: int, mode: str, rounds: int, steps: int) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    guards = {
        arm: ZetaGuard(model=model, optimizer=opt, mode=mode, auto_recover=False)  # type: ignore[arg-type]
        for arm in ("read twice", "handover")
    }

    def step(arm: str) -> tuple[float, float]:
        """(whole step, the part after backward: opt.step, or the guard's calls with it)."""
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        t1 = time.perf_counter()
        if arm == "none":
            opt.step()
        else:
            guard = guards[arm]
            if arm == "read twice":
                guard.guarded_step(opt, grad_norm=torch_adapter.grad_norm(model))
            else:
                guard.guarded_step(opt)
            guard.monitor(model)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    arms = ("none", "read twice", "handover")
    whole: dict[str, list[float]] = {arm: [] for arm in arms}
    tail: dict[str, list[float]] = {arm: [] for arm in arms}
    reads: dict[str, Counter[str]] = {arm: Counter() for arm in arms}
    for arm in arms:  # warm-up: allocator, the guards' first steps
        for _ in range(5):
            step(arm)
    for _ in range(rounds):
        for arm in arms:
            READS.clear()
            for _ in range(steps):
                w, t = step(arm)
                whole[arm].append(w)
                tail[arm].append(t)
            reads[arm].update(READS)
    params = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    base = statistics.median(whole["none"])
    base_tail = statistics.median(tail["none"])
    print(f"\n{name}: {params / 1e6:.1f}M parameters in {tensors} tensors, batch {batch}, {mode=}")
    print(f"{'arm':12}{'step (ms)':>10}{'guard (ms)':>12}{'guard / step':>14}{'reads/step':>22}")
    print(f"{'none':12}{base * 1e3:10.2f}")
    n = rounds * steps
    for arm in arms[1:]:
        guard_s = statistics.median(tail[arm]) - base_tail
        counted = f"norm {reads[arm]['grad_norm'] / n:.2f} snap {reads[arm]['read_grads'] / n:.2f}"
        print(
            f"{arm:12}{statistics.median(whole[arm]) * 1e3:10.2f}{guard_s * 1e3:12.3f}"
            f"{guard_s / base * 100:13.2f}%{counted:>22}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    args = parser.parse_args()
    rounds, steps = (5, 10) if args.quick else (11, 30)
    torch.set_num_threads(1)
    _count_reads()
    print("(a shared machine: compare arms within a run, not across runs)")
    for mode in ("auto", "exact"):
        run("MLP", _mlp(1024, 4), 256, mode, rounds, steps)
        run("MLP of small tensors", _mlp(16, 200), 32, mode, rounds, steps)


if __name__ == "__main__":
    main()
