"""Load and leak check: long runs must not grow memory, and concurrent guards must not deadlock.

1. 10,000 ``monitor()`` steps on a 200-tensor torch model whose weights move every step.
   Resident memory (VmRSS) is sampled every 500 steps; after a 1,000-step warm-up it must stay
   within 5% of its warm-up value. Python-level allocations (tracemalloc) are reported too,
   since a small leak hides in RSS noise.
2. Two guards in two threads at once, each on its own model, with the engine's thread pool
   (threads=2, models large enough to use it) and torch's intra-op threads busy with a matmul in
   every step. Each thread must finish within a watchdog timeout: a hang is a deadlock.
3. One guard shared by two threads (its lock serialises them): same watchdog.

Prints the figures and exits non-zero when a target is missed.

    python scripts/leak_check.py            # the full check
    python scripts/leak_check.py --steps 2000  # a quicker run
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
import tracemalloc

import torch
from zetaguard import ZetaGuard


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def model_with(tensors: int, width: int) -> torch.nn.Module:
    """tensors/2 Linear layers (weight + bias each)."""
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(tensors // 2)])


@torch.no_grad()
def nudge(model: torch.nn.Module, gen: torch.Generator, scale: float = 1e-3) -> None:
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen), alpha=scale)


def long_run(steps: int, warmup: int, tolerance: float) -> bool:
    model = model_with(200, 16)
    assert len(list(model.parameters())) == 200
    guard = ZetaGuard(warmup_steps=50, auto_recover=False)
    gen = torch.Generator().manual_seed(0)
    samples: list[tuple[int, float]] = []
    # tracemalloc slows every allocation, so it watches one window right after warm-up.
    window = (warmup, min(steps, warmup + 1000))
    traced = [0, 0]
    start = time.perf_counter()
    in_monitor = 0.0
    for step in range(1, steps + 1):
        nudge(model, gen)
        t0 = time.perf_counter()
        guard.monitor(model, loss=1.0)
        in_monitor += time.perf_counter() - t0
        if step == window[0]:
            tracemalloc.start()
            traced[0] = tracemalloc.get_traced_memory()[0]
        if step == window[1] and tracemalloc.is_tracing():
            traced[1] = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
        if step % 500 == 0:
            samples.append((step, rss_mb()))
    elapsed = time.perf_counter() - start
    base = next(mb for s, mb in samples if s >= warmup)
    after = [mb for s, mb in samples if s >= warmup]
    drift = (max(after) - base) / base
    print(
        f"long run: {steps} monitor() steps on a 200-tensor model in {elapsed:.1f} s "
        f"({elapsed / steps * 1e6:.0f} us/step with the weight update, "
        f"{in_monitor / steps * 1e6:.0f} us/step in monitor())"
    )
    print("  RSS MB by step: " + ", ".join(f"{s}:{mb:.1f}" for s, mb in samples))
    print(
        f"  RSS after warm-up (step {warmup}): {base:.1f} MB, max later {max(after):.1f} MB, "
        f"growth {drift * 100:+.2f}% (target within {tolerance * 100:.0f}%)"
    )
    grew = (traced[1] - traced[0]) / 1024.0
    print(
        f"  Python allocations (tracemalloc) steps {window[0]}->{window[1]}: {grew:+.1f} KiB "
        f"({grew * 1024 / max(window[1] - window[0], 1):+.1f} B/step)"
    )
    return drift <= tolerance


def run_threads(
    name: str, jobs: list[tuple[ZetaGuard, torch.nn.Module]], steps: int, timeout: float
) -> bool:
    errors: list[BaseException] = []
    done = [0] * len(jobs)

    def work(i: int, guard: ZetaGuard, model: torch.nn.Module) -> None:
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(256, 256, generator=gen)
        try:
            for _ in range(steps):
                x = torch.tanh(x @ x.T / 256.0)  # keeps torch's intra-op pool busy
                nudge(model, gen)
                guard.monitor(model)
                done[i] += 1
        except BaseException as e:  # reported below; a thread must not die silently
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(i, g, m), daemon=True) for i, (g, m) in enumerate(jobs)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, timeout - (time.perf_counter() - start)))
    elapsed = time.perf_counter() - start
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    status = "DEADLOCK" if hung else "ok"
    print(
        f"{name}: {len(jobs)} threads x {steps} steps, torch threads "
        f"{torch.get_num_threads()}, engine threads {jobs[0][0].threads}: "
        f"{elapsed:.1f} s, steps done {done}, {status}"
    )
    for e in errors:
        print(f"  error in a thread: {type(e).__name__}: {e}")
    return not hung and not errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--thread-steps", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    logging.getLogger("zetaguard").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    ok = long_run(args.steps, warmup=min(1000, args.steps // 2), tolerance=0.05)

    # Models over the engine's parallel threshold (2^18 elements), so its pool runs too.
    big = [model_with(20, 160), model_with(20, 160)]
    ok &= run_threads(
        "two guards, two threads",
        [(ZetaGuard(auto_recover=False, threads=2), m) for m in big],
        args.thread_steps,
        args.timeout,
    )
    shared = ZetaGuard(auto_recover=False, threads=2)
    ok &= run_threads(
        "one guard, two threads",
        [(shared, big[0]), (shared, big[0])],
        args.thread_steps,
        args.timeout,
    )
    print("leak check: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
