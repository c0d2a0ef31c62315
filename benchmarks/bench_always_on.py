"""Always on: the guard's cost per training step, every arm in the same run (issue 18).

Arms, on each workload, interleaved block by block so machine noise hits every arm alike:

* ``none``    the loop without any guard (the baseline of every ratio);
* ``zclip``   the real ``zclip.ZClip`` (PyPI ``zclip``; defaults), ``step(model)`` after
  ``backward()``: the peer, which reads every gradient once per step;
* ``tiered``  ``ZetaGuard(auto_recover=False)``, the default ``mode="auto"``:
  ``monitor(model, loss=...)`` after ``optimizer.step()``;
* ``recover`` (the MLPs) ``ZetaGuard()`` as the quick start builds it, recovery on, attached to
  the model and optimizer: the tiered arm plus the recovery snapshots (a copy of the weights and
  the optimizer state every 10 STABLE steps);
* ``thread``  the tiered default with ``full_pass="thread"``: its scheduled full pass on a
  worker thread, overlapped with the next step (the worker's time is not in the in-run share,
  only in the wall-clock overhead: on a busy machine it competes for the same cores);
* ``exact``   the same with ``mode="exact"`` (every element every step);
* ``sketch``  the same with ``mode="sketch"``;
* ``floor``   (the MLPs) what the tiered default cannot skip, with none of the guard's Python
  between the parts: the torch adapter's snapshot (the checks that make a raw read of every
  parameter and gradient safe), the sampled read and gradient norm on the default's sampler,
  the full pass every ``--full-pass-interval`` steps, and the C++ detector on the per-tensor
  rows. No result object, statistics, recovery bookkeeping or grouping: the gap between
  ``tiered`` and ``floor`` is what the guard's own layers cost.

Every arm calls ``loss.item()`` (the guard arms pass it on), so the baseline does the same work.

Printed per arm: the median step time, the overhead = median over blocks of (arm block time /
the same block's unguarded time) - 1 with the spread [min, max] over blocks, and the in-run
share = time inside the guard's call over the rest of the same steps (robust to noise from
other processes, since numerator and denominator come from the same steps).

Targets: the default (tiered) <= 1% of the step in every CPU torch loop, and never above ZClip.

Workloads: the MLPs (``PARAMS/BATCH``), ``gpt2`` (the tiny GPT-2 in the HF Trainer) and
``keras-<backend>`` (Keras ``fit`` on digits; tensorflow, torch, jax, each in a subprocess with
``KERAS_BACKEND`` set); those live in ``always_on_workloads.py``, with their arms' settings.

Usage: python benchmarks/bench_always_on.py [--quick] [--workloads 4.2M/256,gpt2,keras-jax]
       [--full-pass-interval N]   (the tiered and thread arms of the MLPs; default 50)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

import torch

# The same MLP as the per-call overhead benchmark (this directory is on sys.path when run).
from always_on_workloads import gpt2, keras_backend, print_table
from bench_torch_overhead import _mlp
from zclip import ZClip
from zetaguard import ZetaGuard, _core
from zetaguard.adapters import snapshot
from zetaguard.settings import GuardSettings
from zetaguard.tiered import new_sampler
from zetaguard.tiered_worker import scan

ARMS = ("none", "zclip", "tiered", "floor", "recover", "thread", "exact", "sketch")


class CheapTierFloor:
    """The ``floor`` arm: one tiered step's unavoidable parts, called back to back."""

    def __init__(self, settings: GuardSettings, interval: int) -> None:
        self.sampler = new_sampler(settings.sample_fraction, settings.seed, settings.max_sampled)
        self.detector = settings.detector()
        self.tracker = _core.Tracker(mode="exact", threads=settings.threads)  # norms passes only
        self.interval = interval
        self.steps = 0

    def __call__(self, model: torch.nn.Module, loss: float) -> None:
        snap = snapshot(model)
        grads = snap.read_grads()
        history = self.sampler.history
        rows = self.sampler.update_raw(snap.tensors)
        squares, bad = self.sampler.total_norm_raw(grads)
        if (self.steps + 1) % self.interval == 0:
            scan(self.steps, self.tracker, snap)
        self.steps += 1
        grad = math.sqrt(squares) if bad == 0 else math.inf
        self.detector.observe_tuple(rows, history, loss, grad)


def workload(params: float, batch: int, steps: int, blocks: int, interval: int) -> None:
    torch.manual_seed(0)
    model = _mlp(params)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    width = model[0].in_features
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)
    print(
        f"\n== {n / 1e6:.1f}M-parameter MLP ({len(list(model.parameters()))} tensors), AdamW, "
        f"batch {batch}; {blocks} blocks of {steps} steps per arm =="
    )
    guards = {
        "tiered": ZetaGuard(auto_recover=False, full_pass_interval=interval),
        "recover": ZetaGuard(full_pass_interval=interval).attach(model, opt),
        "thread": ZetaGuard(auto_recover=False, full_pass_interval=interval, full_pass="thread"),
        "exact": ZetaGuard(auto_recover=False, mode="exact"),
        "sketch": ZetaGuard(auto_recover=False, mode="sketch"),
    }
    zclip = ZClip()
    floor = CheapTierFloor(guards["tiered"].settings, interval)
    spent = dict.fromkeys(ARMS, 0.0)

    def make_step(arm: str) -> Callable[[], None]:
        guard = guards.get(arm)

        def step() -> None:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if arm == "zclip":
                t = time.perf_counter()
                zclip.step(model)
                spent[arm] += time.perf_counter() - t
            opt.step()
            value = loss.item()
            if arm == "floor":
                t = time.perf_counter()
                floor(model, value)
                spent[arm] += time.perf_counter() - t
            if guard is not None:
                t = time.perf_counter()
                guard.monitor(model, loss=value)
                spent[arm] += time.perf_counter() - t

        return step

    steps_of = {arm: make_step(arm) for arm in ARMS}
    for arm in ARMS:  # warm caches, allocate rings, leave warm-up behind
        for _ in range(3):
            steps_of[arm]()
    spent = dict.fromkeys(ARMS, 0.0)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(blocks):
        for arm in ARMS:
            fn = steps_of[arm]
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            times[arm].append((time.perf_counter() - t) / steps)
    shares = {arm: [spent[arm] / (sum(times[arm]) * steps - spent[arm])] for arm in ARMS}
    print_table(times, shares)
    g = guards["tiered"]
    stats = g.get_statistics().get("tiered")
    if stats is not None:
        print(
            f"tiered: {stats['sampled_elements']:,} of {n:,} elements sampled "
            f"({stats['effective_fraction']:.4f} of the blocks; sample_fraction "
            f"{stats['sample_fraction']:.4f}, max_sampled {stats['max_sampled']}), full passes "
            f"{stats['full_passes']} (every {stats['full_pass_interval']} steps, escalations "
            f"{stats['escalations']}) over {g.step} steps"
        )
    guards["thread"].close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer blocks")
    ap.add_argument(
        "--workloads",
        default="4.2M/256,25M/32,25M/512,gpt2,keras-tensorflow,keras-torch,keras-jax",
        help="comma-separated PARAMS/BATCH (M = millions), gpt2, keras-<backend>",
    )
    ap.add_argument(
        "--full-pass-interval",
        type=int,
        default=50,
        help="full_pass_interval of the MLPs' tiered and thread arms",
    )
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, load {os.getloadavg()[0]:.1f} (other processes share this machine)"
    )
    print(
        "overhead: median over blocks of arm/none - 1 (same block); in-run share: time in "
        "the guard's call / the rest of the same steps"
    )
    for item in args.workloads.split(","):
        if item == "gpt2":
            gpt2(steps=60 if args.quick else 120, rounds=3 if args.quick else 7)
            continue
        if item.startswith("keras-"):
            keras_backend(item.removeprefix("keras-"), epochs=1, rounds=5 if args.quick else 11)
            continue
        p, b = item.split("/")
        params = float(p.rstrip("M")) * 1e6
        batch = int(b)
        # At least one full_pass_interval (50) of steps per arm, so the tiered arm's figure
        # includes its scheduled full pass, amortised as in a real run.
        steps = 10 if args.quick else 20
        blocks = 5 if args.quick else 9
        workload(params, batch, steps=steps, blocks=blocks, interval=args.full_pass_interval)
    print("\ntargets: tiered <= 1% of the step and never above zclip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
