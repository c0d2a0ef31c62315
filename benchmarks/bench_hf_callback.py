"""The Hugging Face callback's per-step cost, before and after a change, in the same run.

"Before" is the package as committed at ``--base`` (default ``main``), unpacked with
``git archive`` beside this checkout's built engine (``_core``), so only the Python differs;
"after" is this checkout. Each round runs one process of each, alternating.

Workload: the tiny GPT-2 of ``bench_always_on.py`` (2 layers, 32 wide, ~30k parameters,
batch 16) in the ``Trainer``, with ``ZetaGuardCallback(warmup_steps=10)`` (recovery on) added
two ways: ``install()`` (the Trainer's pre-clip norm) and ``add_callback`` (the callback's own
gradient hooks). Timed: the callback's ``on_pre_optimizer_step`` and ``on_step_end`` after the
first 30 steps (warm-up and first-call paths left out); the hooks arm's gradient hooks run
inside ``backward()`` and show in its step time only. Printed per arm: the median over rounds
of the callback's microseconds per step and of its in-run share (callback time / rest of the
step).

Usage: python benchmarks/bench_hf_callback.py [--quick] [--base REF] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_support import alternate, before_after, run_worker, tiny_gpt2_trainer, use_package

ARMS = ("install", "hooks")
SKIP = 30


def worker(steps: int, package: str | None) -> None:
    use_package(package)
    from zetaguard.integrations.transformers import ZetaGuardCallback

    where = Path(sys.modules["zetaguard"].__file__ or "").parent
    assert package is None or where.is_relative_to(package), f"imported {where}"

    class Timed(ZetaGuardCallback):
        spent = 0.0
        begun = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == SKIP:
                self.begun = time.perf_counter()

        def on_pre_optimizer_step(self, *a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            super().on_pre_optimizer_step(*a, **kw)
            if a[1].global_step >= SKIP:  # (args, state, control)
                self.spent += time.perf_counter() - t

        def on_step_end(self, *a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = super().on_step_end(*a, **kw)
            if a[1].global_step >= SKIP + 1:  # global_step is already incremented here
                self.spent += time.perf_counter() - t
            return out

    out: dict[str, float] = {}
    for arm in ARMS:
        trainer = tiny_gpt2_trainer(steps, tempfile.gettempdir() + "/zg_bench_hf_callback")
        cb = Timed(warmup_steps=10)
        if arm == "install":
            cb.install(trainer)
        else:
            trainer.add_callback(cb)
        trainer.train()
        total = time.perf_counter() - cb.begun
        timed = steps - SKIP
        out[f"{arm} us"] = cb.spent / timed * 1e6
        out[f"{arm} step ms"] = total / timed * 1e3
        out[f"{arm} share"] = cb.spent / (total - cb.spent)
        cb.guard.close()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds of 150 steps")
    ap.add_argument("--base", default="main", help="git ref of the 'before' package")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--package", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.package)
        return
    rounds, steps = (3, 150) if args.quick else (args.rounds, args.steps)
    runs = alternate(
        args.base, rounds, lambda package: run_worker(__file__, ["--steps", str(steps)], package)
    )
    print(
        f"{before_after(args.base)}; median of {rounds} alternating rounds, {steps - SKIP} "
        "timed steps each"
    )
    print(f"{'arm':18}{'step ms':>9}{'us/step':>10}{'in-run share':>13}")
    for arm in ARMS:
        for label in ("before", "after"):
            rows = runs[label]
            step = statistics.median(r[f"{arm} step ms"] for r in rows)
            us = statistics.median(r[f"{arm} us"] for r in rows)
            share = statistics.median(r[f"{arm} share"] for r in rows)
            print(f"{arm + ' ' + label:18}{step:9.2f}{us:10.1f}{share * 100:13.2f}%")


if __name__ == "__main__":
    main()
