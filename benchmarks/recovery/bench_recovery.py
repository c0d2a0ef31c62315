"""Does recovery save runs? Unstable trainings with each guard in the loop, side by side.

Every run trains a small real model on sklearn's digits (an MLP with SGD-momentum, and a tiny
transformer over the image rows with AdamW) and injects one fault half-way:

* ``lr_jump``      the learning rate jumps 100x and stays there;
* ``lr_ramp``      the learning rate ramps up 1.15x per step to 100x (a warm-up with a wrong
                   peak) and holds it;
* ``corrupt``      5 batches with inputs scaled 50x and shuffled labels;
* ``nan``          one batch holds a NaN input;
* ``grad_explode`` 3 steps whose gradients are multiplied by 1000.

Arms (each sees the same data order and the same fault):

* ``none``         plain loop;
* ``clip1.0``      ``clip_grad_norm_(max_norm=1.0)`` every step;
* ``zclip``        the real ``zclip.ZClip`` (its defaults: alpha 0.97, z 2.5, warm-up 25, and
                   ``max_grad_norm=1.0``, so it also caps at clip 1.0);
* ``olmo_skip``    the OLMo-core skip-step rule, re-implemented as published: skip the update when
                   loss or gradient norm is not <= mean + 6 std of the last 128 values (active
                   after 64; non-finite values always skip);
* ``spike_stop``   the real ``lightning.fabric.utilities.spike.SpikeDetection`` (window 10, rtol 2,
                   NaN is a spike): it raises, and the run ends where it stood;
* ``zetaguard``    ``guard.guarded_step()`` before the update (veto + clip advice) and
                   ``guard.monitor()`` after it, ``recovery_mode="balanced"``, the scheduler
                   attached, ``guard.take_reference()`` before the first step; the loop stops
                   when ``guard.should_stop``.

The shared pieces (data, models, peers, one arm in the loop, judging) are in
``recovery_harness.py``; recurring bad batches, a loop-set LR, a run unstable from its first
step and healthy runs are in ``bench_families.py``.

A run is *rescued* when its final held-out loss is within 1.1x of the same seed's fault-free
reference run (no guard) and its held-out accuracy within 1 point of it.

The second table measures snapshot overhead: the time of one snapshot capture divided by the
time of ``snapshot_interval`` training steps (what it costs per step at the default interval),
and an end-to-end ratio of guarded step time with and without recovery snapshots.

Run: ``python benchmarks/recovery/bench_recovery.py [--seeds 4] [--quick] [--mode exact]
[--arms none,zetaguard] [--no-overhead]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recovery_harness import (
    ARMS,
    BATCH,
    MODELS,
    RESCUE_RULE,
    TRAIN,
    Arm,
    Model,
    Outcome,
    X,
    Y,
    batch,
    outcome,
    quiet,
    rescued,
)
from torch import nn
from zetaguard import ZetaGuard

SCENARIOS = ("lr_jump", "lr_ramp", "corrupt", "nan", "grad_explode")

__all__ = ["ARMS", "SCENARIOS", "Outcome", "main", "rescued", "run"]


def _schedule(spec: Model, scenario: str) -> Callable[[int], float]:
    """The LR fault as a schedule (every arm, reference included, runs a LambdaLR): a scheduler
    rewrites param_groups each step, so this is where a wrong LR really comes from."""

    def factor(t: int) -> float:
        if scenario == "lr_jump" and t >= spec.fault_at:
            return 100.0
        if scenario == "lr_ramp" and t >= spec.fault_at:
            return min(100.0, 1.15 ** (t - spec.fault_at + 1))
        return 1.0

    return factor


def run(spec: Model, scenario: str, seed: int, arm: str, mode: str | None = None) -> Outcome:
    """One training of ``spec`` into ``scenario`` ("stable": no fault) with ``arm`` in the loop;
    ``mode`` is the zetaguard arm's engine mode (default: ``--mode``)."""
    torch.manual_seed(seed)
    model = spec.build()
    opt = spec.optimizer(list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(spec, scenario))
    gen = torch.Generator().manual_seed(1000 + seed)  # the data order: the same in every arm
    corrupt_gen = torch.Generator().manual_seed(2000 + seed)
    params = list(model.parameters())
    loop = Arm(arm, model, opt, sched, mode or GUARD_MODE)
    f = spec.fault_at
    steps = 0
    for t in range(spec.steps):
        steps = t + 1
        x, y = batch(gen)
        if scenario == "corrupt" and f <= t < f + 5:
            x = 50.0 * x[torch.randperm(BATCH, generator=corrupt_gen)]
            y = y[torch.randperm(BATCH, generator=corrupt_gen)]
        if scenario == "nan" and t == f:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if scenario == "grad_explode" and f <= t < f + 3:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1000.0)
        if not loop.step(loss, t):
            break
        sched.step()
    return outcome(loop, steps)


# ---- snapshot overhead -----------------------------------------------------------------------


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    idx = torch.randint(0, TRAIN, (BATCH,), generator=gen)
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _guarded_loop(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    auto_recover: bool,
    steps: int,
) -> float:
    guard = ZetaGuard(auto_recover=auto_recover).attach(model, opt)
    t0 = time.perf_counter()
    for _ in range(steps):
        guard.monitor(model, loss=_train_step(model, opt, gen))
    return time.perf_counter() - t0


def snapshot_overhead(repeats: int = 100) -> list[tuple[str, int, float, float, float]]:
    """Per model: parameters, step ms, capture time / (interval x step time), and the
    end-to-end time ratio of a guarded loop with snapshots on / off."""
    rows = []
    wide = Model(
        "mlp-1M-adam",
        0,
        0,
        lambda: nn.Sequential(
            nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        ),
        lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    for spec in (*MODELS, wide):
        torch.manual_seed(0)
        model = spec.build()
        opt = spec.optimizer(list(model.parameters()))
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            _train_step(model, opt, gen)
        guard = ZetaGuard().attach(model, opt)
        interval = guard.recovery.keeper.interval
        backend = guard.recovery.backend
        assert backend is not None
        step_times, capture_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _train_step(model, opt, gen)
            step_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backend.capture(0)
            capture_times.append(time.perf_counter() - t0)
        amortised = statistics.median(capture_times) / (interval * statistics.median(step_times))
        # Interleaved blocks, best of three each, so load changes hit both sides alike.
        on, off = [], []
        for _ in range(3):
            off.append(_guarded_loop(model, opt, gen, False, 4 * interval))
            on.append(_guarded_loop(model, opt, gen, True, 4 * interval))
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (spec.name, params, statistics.median(step_times) * 1e3, amortised, min(on) / min(off))
        )
    return rows


# The zetaguard arm's engine mode (--mode): "auto" is the default, tiered monitoring.
GUARD_MODE = "auto"


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, for a smoke run")
    ap.add_argument(
        "--mode",
        choices=("auto", "exact", "sketch"),
        default="auto",
        help="the zetaguard arm's engine mode (default auto: tiered monitoring)",
    )
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run")
    ap.add_argument("--no-overhead", action="store_true", help="skip the snapshot-overhead table")
    args = ap.parse_args(argv)
    quiet()
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        ap.error(
            f"--arms: unknown {sorted(set(arms) - set(ARMS)) or 'empty'}; "
            f"choose from {', '.join(ARMS)}"
        )
    global GUARD_MODE
    GUARD_MODE = args.mode
    print(f"zetaguard arm: ZetaGuard(mode={args.mode!r})")
    seeds = 1 if args.quick else args.seeds
    started = time.perf_counter()
    wins: dict[str, int] = dict.fromkeys(arms, 0)
    per_scenario: dict[tuple[str, str], int] = {}
    stops: dict[str, int] = dict.fromkeys(arms, 0)
    total = 0
    details: list[str] = []
    for spec in MODELS:
        for seed in range(seeds):
            ref = run(spec, "stable", seed, "none")
            for scenario in SCENARIOS:
                total += 1
                for arm in arms:
                    out = run(spec, scenario, seed, arm)
                    ok = rescued(out, ref)
                    wins[arm] += ok
                    stops[arm] += out.stopped
                    per_scenario[(scenario, arm)] = per_scenario.get((scenario, arm), 0) + ok
                    if arm == "zetaguard" and not ok:
                        details.append(
                            f"  not rescued: {spec.name} {scenario} seed {seed}: loss "
                            f"{out.loss:.3f} vs ref {ref.loss:.3f}, acc {out.accuracy:.3f} vs "
                            f"{ref.accuracy:.3f}, recoveries {out.recoveries}, skips {out.skips}, "
                            f"stopped {out.stopped}"
                        )
    elapsed = time.perf_counter() - started
    n_per = total // len(SCENARIOS)
    print(
        f"Recovery benchmark: {len(MODELS)} models x {len(SCENARIOS)} faults x {seeds} seeds "
        f"= {total} unstable runs per arm ({elapsed:.0f} s)"
    )
    print(RESCUE_RULE + "\n")
    head = f"{'fault':<14}" + "".join(f"{a:>12}" for a in arms)
    print(head)
    print("-" * len(head))
    for scenario in SCENARIOS:
        print(
            f"{scenario:<14}"
            + "".join(f"{per_scenario[(scenario, a)]:>7}/{n_per:<4}" for a in arms)
        )
    print("-" * len(head))
    print(f"{'rescued':<14}" + "".join(f"{100.0 * wins[a] / total:>11.0f}%" for a in arms))
    print(f"{'stopped':<14}" + "".join(f"{stops[a]:>12}" for a in arms))
    if details:
        print("\n".join(details))
    if args.no_overhead:
        return 0
    print("\nSnapshot overhead at the default interval (10 STABLE steps)")
    print(
        f"{'model':<20}{'params':>10}{'step ms':>10}{'capture/10 steps':>18}{'guarded on/off':>16}"
    )
    for name, params, step_ms, amortised, ratio in snapshot_overhead():
        print(f"{name:<20}{params:>10}{step_ms:>10.2f}{100 * amortised:>17.2f}%{ratio:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
