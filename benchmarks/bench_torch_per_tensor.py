"""The torch glue's cost per tensor, before and after a change, in the same run.

"Before" is the package as committed at ``--base`` (default ``main``), unpacked with
``git archive`` into a temporary folder beside this checkout's built engine (``_core``), so only
the Python differs; "after" is this checkout. Each round runs one process of each, alternating,
and every arm keeps its best round (a neighbour's burst on a shared machine lands in some
rounds, not in the best one).

Workload: ``nn.Sequential`` of ``Linear(2, 2)`` layers (tiny tensors, so the engine's arithmetic
is negligible and the Python path shows), every gradient set. Each arm is timed at 20 and at
2000 tensors: per tensor is the slope between the two, fixed the intercept.

Arms: the adapter alone (``snapshot``) on the module and on ``model.parameters()``, and
``monitor()`` on both, for the tiered default and ``mode="exact"``; ``+ gradients`` also reads
the gradients (``Snapshot.read_grads()``, where the package defers that read to the step that
needs it); ``grad_norm=`` is a caller passing the norm it has (HF Trainer, ``clip_grad_norm_``),
so the tiered step reads no gradient but on a full pass (every 50 steps); ``bare`` is
``auto_recover=False, group_by="none"``, ``defaults`` is ``ZetaGuard()`` (recovery on: every
10th stable step copies the parameters, which the 20-call blocks include).

Usage: python benchmarks/bench_torch_per_tensor.py [--quick] [--base REF] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench_support import alternate, before_after, run_worker, use_package

SIZES = (20, 2000)
ARMS = (
    "snapshot(model)",
    "snapshot(model) + gradients",
    "snapshot(model.parameters())",
    "monitor(model) auto bare",
    "monitor(model, grad_norm=) auto bare",
    "monitor(model) exact bare",
    "monitor(model.parameters()) auto defaults",
    "monitor(model.parameters()) exact defaults",
)


def best_of(fn: Callable[[], object], repeat: int, number: int) -> float:
    """Best mean seconds per call over ``repeat`` blocks of ``number`` calls. (bench_torch_overhead
    has the same helper, but importing it imports zetaguard before a worker picks which copy.)"""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def _snapshot_with_grads(snapshot: Callable[[object], object], model: object) -> object:
    snap = snapshot(model)
    read = getattr(snap, "read_grads", None)  # absent where the snapshot reads them at once
    return read() if read is not None else snap


def worker(repeat: int, package: str | None) -> None:
    """Time every arm with the zetaguard under ``package`` (else the installed one); print JSON."""
    use_package(package)
    import torch
    import zetaguard
    from zetaguard import ZetaGuard
    from zetaguard.adapters import snapshot

    out: dict[str, object] = {"package": str(Path(zetaguard.__file__).parent)}
    for n in SIZES:
        model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n // 2)])
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        guards = {
            "auto bare": ZetaGuard(warmup_steps=5, auto_recover=False, group_by="none"),
            "auto bare given": ZetaGuard(warmup_steps=5, auto_recover=False, group_by="none"),
            "exact bare": ZetaGuard(
                warmup_steps=5, auto_recover=False, group_by="none", mode="exact"
            ),
            "auto defaults": ZetaGuard(),
            "exact defaults": ZetaGuard(mode="exact"),
        }
        calls: dict[str, Callable[[], object]] = {
            "snapshot(model)": partial(snapshot, model),
            "snapshot(model.parameters())": lambda m=model: snapshot(m.parameters()),  # type: ignore[misc]
            "snapshot(model) + gradients": partial(_snapshot_with_grads, snapshot, model),
            "monitor(model) auto bare": partial(guards["auto bare"].monitor, model),
            "monitor(model, grad_norm=) auto bare": partial(
                guards["auto bare given"].monitor, model, grad_norm=1.0
            ),
            "monitor(model) exact bare": partial(guards["exact bare"].monitor, model),
        }
        for kind in ("auto", "exact"):
            monitor = guards[f"{kind} defaults"].monitor
            calls[f"monitor(model.parameters()) {kind} defaults"] = (
                lambda m=model, f=monitor: f(m.parameters())  # type: ignore[misc]
            )
        for arm in ARMS:
            for _ in range(12):  # past warm-up, tracker built, layouts cached
                calls[arm]()
            out[f"{arm}@{n}"] = best_of(calls[arm], repeat, 20)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="3 rounds of 6 blocks")
    ap.add_argument("--base", default="main", help="git ref of the 'before' package")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--package", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.repeat, args.package)
        return
    rounds, repeat = (3, 6) if args.quick else (args.rounds, 10)
    runs = alternate(
        args.base, rounds, lambda package: run_worker(__file__, ["--repeat", str(repeat)], package)
    )
    best: dict[str, dict[str, float]] = {
        label: {
            key: min(r[key] for r in rows) for key in rows[0] if isinstance(rows[0][key], float)
        }
        for label, rows in runs.items()
    }
    (n0, n1) = SIZES
    print(f"{before_after(args.base)}; best of {rounds} alternating rounds")
    print(
        f"{'arm':44}{'ns/tensor before':>17}{'after':>8}{'change':>8}"
        f"{'fixed us before':>16}{'after':>8}"
    )
    for arm in ARMS:
        row = []
        for label in ("before", "after"):
            t0, t1 = best[label][f"{arm}@{n0}"], best[label][f"{arm}@{n1}"]
            slope = (t1 - t0) / (n1 - n0)
            row.append((slope * 1e9, (t0 - n0 * slope) * 1e6))
        (b, bf), (a, af) = row
        print(f"{arm:44}{b:17.0f}{a:8.0f}{(a / b - 1) * 100:7.0f}%{bf:16.1f}{af:8.1f}")
    print(
        "(per tensor: slope between 20 and 2000 tensors; fixed: the intercept; the machine is "
        "shared, so compare the two columns of a row, not rows across runs)"
    )


if __name__ == "__main__":
    main()
