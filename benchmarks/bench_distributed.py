"""The guard's per-step collective against the step's DDP gradient all-reduce, in the same run.

Starts a 2-process gloo world on this machine (CPU), trains an MLP under DDP and, each step,
times (after a barrier, so both ranks start together):

* ``grad all-reduce``: one all-reduce of a float32 buffer the size of all gradients, which is
  what DDP moves per step (its buckets add up to it);
* ``guard collective``: the guard's own all-reduce (its float64 packet, of the size the guard
  really sends for this model);
* ``8-byte all-reduce``: one float64 (the latency floor of any collective on this group);
* ``guard monitor()``: the guard's whole step (local engine pass + the collective);
* ``DDP step``: forward, backward (with DDP's own all-reduce) and the optimizer step.

Usage: python benchmarks/bench_distributed.py [--width 1024] [--layers 4] [--steps 30]
Prints a table; the ratios are the result (absolute times depend on the machine's load).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _timed(barrier: Callable[[], object], fn: Callable[..., object], *args: Any) -> float:
    """Seconds ``fn(*args)`` takes once every rank has reached the barrier."""
    barrier()
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def worker(rank: int, world: int, rendezvous: str, args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from zetaguard import ZetaGuard

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=rendezvous,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.width, args.width), torch.nn.ReLU()]
    model = DistributedDataParallel(torch.nn.Sequential(*layers, torch.nn.Linear(args.width, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n_params = sum(p.numel() for p in model.parameters())
    grads = torch.zeros(n_params, dtype=torch.float32)
    gen = torch.Generator().manual_seed(rank)
    rows: list[dict[str, float]] = []
    for mode in ("exact", "sketch"):
        guard = ZetaGuard(mode=mode, warmup_steps=5, auto_recover=False)
        times: dict[str, list[float]] = {
            "step": [],
            "grad": [],
            "guard": [],
            "floor": [],
            "monitor": [],
        }
        one = torch.zeros(1, dtype=torch.float64)
        packet_floats = 0
        for step in range(args.steps):
            x = torch.randn(args.batch, args.width, generator=gen)
            y = torch.randint(0, 10, (args.batch,), generator=gen)

            def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            t_step = _timed(dist.barrier, train_step, x, y)
            t_grad = _timed(dist.barrier, dist.all_reduce, grads)
            t_monitor = _timed(dist.barrier, guard.monitor, model)
            ctx = guard._dist
            assert ctx is not None, "the guard did not see the process group"
            last = guard.last_result
            assert last is not None
            packet_floats = 10 + last.group_rows.size + 2 * world
            packet = np.zeros(packet_floats)
            t_guard = _timed(dist.barrier, ctx.all_reduce, packet, "the benchmark")
            t_floor = _timed(dist.barrier, dist.all_reduce, one)
            if step >= 3:  # warm-up: first steps allocate rings and buckets
                times["step"].append(t_step)
                times["grad"].append(t_grad)
                times["guard"].append(t_guard)
                times["floor"].append(t_floor)
                times["monitor"].append(t_monitor)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "mode": mode,  # type: ignore[dict-item]
                "params": n_params,
                "grad_bytes": 4 * n_params,
                "guard_bytes": 8 * packet_floats,
                **{f"t_{k}": v for k, v in med.items()},
            }
        )
    if rank == 0:
        print(
            f"2 ranks, gloo on CPU, MLP {args.layers}x{args.width}, {n_params:,} parameters, "
            f"median of {args.steps - 3} steps"
        )
        head = (
            f"{'mode':<7} {'grad AR bytes':>13} {'guard bytes':>11} {'grad AR ms':>10} "
            f"{'guard AR ms':>11} {'8 B AR ms':>9} {'guard/grad':>10} {'monitor ms':>10} "
            f"{'DDP step ms':>11} "
            f"{'monitor/step':>12}"
        )
        print(head)
        for r in rows:
            print(
                f"{r['mode']:<7} {r['grad_bytes']:>13,} {r['guard_bytes']:>11,} "
                f"{1e3 * r['t_grad']:>10.3f} {1e3 * r['t_guard']:>11.3f} "
                f"{1e3 * r['t_floor']:>9.3f} "
                f"{r['t_guard'] / r['t_grad']:>10.4f} {1e3 * r['t_monitor']:>10.3f} "
                f"{1e3 * r['t_step']:>11.3f} {r['t_monitor'] / r['t_step']:>12.4f}"
            )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rendezvous", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    world = 2
    if args.rank is not None:
        worker(args.rank, world, args.rendezvous, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = f"file://{Path(tmp) / 'rendezvous'}"
        base = [
            sys.executable,
            __file__,
            "--rendezvous",
            rendezvous,
            "--width",
            str(args.width),
            "--layers",
            str(args.layers),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([*base, "--rank", str(r)], env=env) for r in range(world)]
        codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a rank failed (exit codes {codes})")


if __name__ == "__main__":
    main()
