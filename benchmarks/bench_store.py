"""Cost of the run store per step, against monitoring without it, in the same run.

Prints a table: per-step time of ``guard.monitor()`` without a store, with a store, the
store's own ``record_step`` cost (amortised over its batched commits), and
the same store committing every step as the baseline the batching is measured against.

    python benchmarks/bench_store.py [--steps 3000] [--groups 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from zetaguard import ZetaGuard
from zetaguard.store import RunStore


def _params(groups: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"layer{i}.weight": rng.normal(size=(64, 64)).astype(np.float32) for i in range(groups)}


def _monitor_loop(guard: ZetaGuard, steps: int, groups: int) -> tuple[float, list]:
    rng = np.random.default_rng(0)
    w = _params(groups, rng)
    noise = [
        {k: 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in w.items()}
        for _ in range(8)
    ]
    results = []
    t = time.perf_counter()
    for i in range(steps):
        for k in w:
            w[k] -= noise[i % 8][k]
        results.append(guard.monitor(w, loss=1.0 / (i + 1)))
    return (time.perf_counter() - t) / steps, results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--groups", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, results = _monitor_loop(
            ZetaGuard(warmup_steps=50, auto_recover=False), args.steps, args.groups
        )
        guard = ZetaGuard(warmup_steps=50, auto_recover=False, run_dir=tmp, run_name="bench")
        stored, _ = _monitor_loop(guard, args.steps, args.groups)
        guard.close()

        store = RunStore(tmp, run_name="direct")
        t = time.perf_counter()
        for r in results:
            store.record_step(r)
        store.close()
        direct = (time.perf_counter() - t) / len(results)

        # Baseline for the batching: the same store committing every step.
        unbatched = RunStore(tmp, run_name="unbatched", flush_rows=1)
        t = time.perf_counter()
        for r in results:
            unbatched.record_step(r)
        unbatched.close()
        naive = (time.perf_counter() - t) / len(results)
        size = (Path(tmp) / "direct" / "run.sqlite").stat().st_size
    us = 1e6
    print(f"run store cost, {args.steps} steps, {args.groups} groups of 64x64 float32")
    print(f"{'measurement':48s} {'us/step':>10s} {'ratio':>8s}")
    print(f"{'monitor() without a store (baseline)':48s} {plain * us:10.1f} {1.0:8.2f}")
    print(f"{'monitor() with a run store':48s} {stored * us:10.1f} {stored / plain:8.2f}")
    print(
        f"{'RunStore.record_step alone (batched, amortised)':48s} {direct * us:10.1f} {direct / plain:8.2f}"
    )
    print(
        f"{'same store, one commit per step (flush_rows=1)':48s} {naive * us:10.1f} {naive / plain:8.2f}"
    )
    print(
        f"batching: {naive / direct:.1f}x cheaper than a commit per step; {size / len(results):.0f} bytes/step on disk"
    )
    print("target: record_step <= 50 us/step amortised")


if __name__ == "__main__":
    main()
