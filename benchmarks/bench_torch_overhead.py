"""The guard's overhead in PyTorch training, as ratios to the same loop without it, same run.

Three measurements:

1. adapter cost: fixed cost of one ``monitor()`` and cost per tensor (a model of many tiny
   tensors, so the engine's arithmetic is negligible and the Python path shows);
2. a 25M-parameter plain loop (MLP, Adam) at batch 32 and at batch 512: step time with the
   guard (exact and sketch mode, monitoring alone and with recovery on) over step time
   without, blocks interleaved so machine noise hits every arm alike. The guard reads every parameter (and gradient) once per step whatever
   the batch, so its share shrinks as the step does more work per parameter: batch 32 is the
   worst case (the step itself is mostly memory traffic), batch 512 a step with real compute;
3. a tiny GPT-2 in the Hugging Face Trainer: ``train()`` time with ``ZetaGuardCallback``
   (added with ``install(trainer)``) over ``train()`` without.

Targets (issue #5): <= 30 us fixed + <= 2 us per tensor; overhead <= 5% exact, <= 2% sketch.

Usage: python benchmarks/bench_torch_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from zetaguard import ZetaGuard
from zetaguard.adapters import snapshot


def best_of(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Best mean seconds per call over ``repeat`` blocks of ``number`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def adapter_cost() -> None:
    print("== 1. adapter and monitor() cost (tiny tensors, gradients set) ==")
    rows = []
    for n_tensors in (20, 2000):
        model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n_tensors // 2)])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        guard = ZetaGuard(warmup_steps=5, auto_recover=False, group_by="none")
        for _ in range(10):
            guard.monitor(model)
        snap = best_of(lambda m=model: snapshot(m), 10, 20)  # type: ignore[misc]
        mon = best_of(lambda m=model, g=guard: g.monitor(m), 10, 20)  # type: ignore[misc]
        rows.append((n_tensors, snap, mon))
    (n0, s0, m0), (n1, s1, m1) = rows
    per_snap = (s1 - s0) / (n1 - n0)
    per_mon = (m1 - m0) / (n1 - n0)
    print(f"{'':24}{'fixed (us)':>12}{'per tensor (us)':>18}{'upper bound (us)':>19}")
    print(
        f"{'adapter snapshot()':24}{max(s0 - n0 * per_snap, 0) * 1e6:12.1f}"
        f"{per_snap * 1e6:18.3f}{s1 / n1 * 1e6:19.3f}"
    )
    print(
        f"{'guard.monitor() total':24}{max(m0 - n0 * per_mon, 0) * 1e6:12.1f}"
        f"{per_mon * 1e6:18.3f}{m1 / n1 * 1e6:19.3f}"
    )
    print("(per tensor: slope between 20 and 2000 tensors; upper bound: 2000-tensor call / 2000)")
    print("targets: adapter <= 2 us per tensor; monitor <= 30 us fixed")


def _mlp(params: float) -> torch.nn.Module:
    width = int((params / 5) ** 0.5)
    layers: list[torch.nn.Module] = []
    for _ in range(5):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


# The arms every workload runs: monitoring alone, and monitoring with recovery on (the default:
# verified snapshots of model and optimizer every 10 stable steps, ready for a rollback).
ARMS = {
    "exact": {"mode": "exact", "auto_recover": False},
    "sketch": {"mode": "sketch", "auto_recover": False},
    "exact+recovery": {"mode": "exact", "auto_recover": True},
    "sketch+recovery": {"mode": "sketch", "auto_recover": True},
}


def print_arms(base: float, steps: dict[str, float], shares: dict[str, float]) -> None:
    """The table both workloads print: each arm's step time, its overhead over the step
    without a guard (``base``) and its in-run share."""
    print(f"{'arm':18}{'step (ms)':>11}{'overhead':>10}{'in-run share':>14}")
    print(f"{'no guard':18}{base * 1e3:11.2f}")
    for name, t in steps.items():
        share = shares[name] * 100
        print(f"{name:18}{t * 1e3:11.2f}{(t / base - 1) * 100:9.1f}%{share:13.1f}%")


def plain_loop(params: int, steps: int, blocks: int, batch: int = 32) -> None:
    print(f"\n== 2. plain loop, {params / 1e6:.0f}M-parameter MLP, Adam, batch {batch} ==")
    torch.manual_seed(0)
    model = _mlp(params)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    width = model[0].in_features
    x = torch.randn(batch, width)
    guards = {name: ZetaGuard(warmup_steps=5, **kw) for name, kw in ARMS.items()}
    for g in guards.values():
        if g.auto_recover:
            g.attach(model=model, optimizer=opt)

    in_run = dict.fromkeys(guards, 0.0)
    current = [""]

    def step(guard: ZetaGuard | None) -> None:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        if guard is not None:
            t = time.perf_counter()
            guard.monitor(model, loss=loss.item())
            in_run[current[0]] += time.perf_counter() - t

    for name in ("none", *guards):
        current[0] = name
        for _ in range(3):
            step(guards.get(name))  # warm caches, allocate rings
    times: dict[str, list[float]] = {name: [] for name in ("none", *guards)}
    in_run = dict.fromkeys(guards, 0.0)
    for _ in range(blocks):  # interleaved: noise from other processes hits every arm
        for name in times:
            current[0] = name
            g = guards.get(name)
            t = time.perf_counter()
            for _ in range(steps):
                step(g)
            times[name].append((time.perf_counter() - t) / steps)
    base = statistics.median(times["none"])
    print(f"parameters: {n:,}; torch threads: {torch.get_num_threads()}")
    shares = {}
    for name in guards:
        total = sum(times[name]) * steps
        shares[name] = in_run[name] / (total - in_run[name])
    print_arms(base, {name: statistics.median(times[name]) for name in guards}, shares)
    print("in-run share: time inside monitor() over the rest of the same steps")
    for name in ("exact", "sketch"):
        g = guards[name]
        direct = best_of(lambda g=g: g.monitor(model), 3, 3)  # type: ignore[misc]
        print(
            f"monitor() alone, {name}: {direct * 1e3:.2f} ms "
            f"({n * 4 / direct / 1e9:.1f} GB/s of parameters)"
        )
    # The floor of any monitor that looks at every parameter and gradient: reading both once.
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    floor = best_of(lambda: [t.sum() for t in tensors], 3, 3)
    print(
        f"floor: reading parameters and gradients once (torch.sum, {torch.get_num_threads()} "
        f"threads) {floor * 1e3:.2f} ms = {floor / base * 100:.1f}% of the step"
    )
    print("targets: exact <= 5%, sketch <= 2%")


def hf_trainer(steps: int, repeats: int) -> None:
    print(f"\n== 3. Hugging Face Trainer, tiny GPT-2 (2 layers, 32 wide), {steps} steps ==")
    from bench_support import tiny_gpt2_trainer
    from zetaguard.integrations.transformers import ZetaGuardCallback

    def run(mode: str | None) -> float:
        callbacks = [] if mode is None else [_Timed(warmup_steps=10, **ARMS[mode])]
        trainer = tiny_gpt2_trainer(steps, "/tmp/zg_bench_hf")
        for cb in callbacks:
            cb.install(trainer)  # the documented way: first in line, pre-clip gradient norm
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
        if callbacks:
            spent = callbacks[0].spent
            shares[mode or ""].append(spent / (total - spent))
        return total / steps

    class _Timed(ZetaGuardCallback):
        """Accumulates the time spent in the guard's hooks, inside the same run."""

        spent = 0.0

        def on_pre_optimizer_step(self, *a: object, **kw: object) -> None:
            t = time.perf_counter()
            super().on_pre_optimizer_step(*a, **kw)  # type: ignore[arg-type]
            self.spent += time.perf_counter() - t

        def on_step_end(self, *a: object, **kw: object) -> object:
            t = time.perf_counter()
            out = super().on_step_end(*a, **kw)  # type: ignore[arg-type]
            self.spent += time.perf_counter() - t
            return out

    shares: dict[str, list[float]] = {name: [] for name in ARMS}
    run(None)  # warm imports
    times: dict[str, list[float]] = {name: [] for name in ("none", *ARMS)}
    for _ in range(repeats):
        for name in times:
            times[name].append(run(None if name == "none" else name))
    base = statistics.median(times["none"])
    print_arms(
        base,
        {name: statistics.median(times[name]) for name in ARMS},
        {name: statistics.median(shares[name]) for name in ARMS},
    )
    print("in-run share: time inside the guard's hooks over the rest of the same train()")
    print("targets: exact <= 5%, sketch <= 2%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--batches", default="32,512", help="plain-loop batch sizes")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f} (other processes share this machine)"
    )
    adapter_cost()
    for batch in (int(b) for b in args.batches.split(",")):
        plain_loop(
            int(args.params),
            steps=3 if args.quick else 5,
            blocks=3 if args.quick else 5,
            batch=batch,
        )
    hf_trainer(steps=40 if args.quick else 80, repeats=2 if args.quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
