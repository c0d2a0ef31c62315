"""The demonstration: a small real model trained into a learning-rate blow-up, twice.

    python -m zetaguard.demo

An MLP on scikit-learn's bundled digits trains with Adam; at ``--spike-step`` a bad schedule
multiplies the learning rate by ``--spike``. Without the guard the run collapses. With the guard
the same run (same seed, same batches) is detected, rolled back to its last verified-stable
snapshot with the learning rate cut, and finishes; every step goes to a run store that
``zeta-dashboard --runs zetaguard_runs`` shows.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zetaguard import ZetaGuard


@dataclass
class RunOutcome:
    label: str
    losses: list[float] = field(default_factory=list)
    final_loss: float = math.nan
    accuracy: float = math.nan
    statuses: dict[str, int] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)
    run_path: str | None = None


def _data(seed: int) -> tuple[Any, Any, Any, Any]:
    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _fresh_run_name(run_dir: Path, base: str) -> str:
    """``base``, or ``base-2``, ``base-3``... when an earlier demo already wrote that run: a run
    store holds one history, so a second demo must not append to the first one's."""
    name, n = base, 1
    while (run_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def train(
    *,
    guarded: bool,
    steps: int,
    spike_step: int,
    spike: float,
    seed: int,
    run_dir: Path | None,
    verbose: bool,
) -> RunOutcome:
    import torch

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = _data(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The "bad schedule": the learning rate jumps `spike` times at `spike_step`.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: spike if s >= spike_step else 1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = torch.Generator().manual_seed(seed)
    outcome = RunOutcome(label="with zetaguard" if guarded else "without a guard")
    guard: ZetaGuard | None = None
    if guarded:
        guard = ZetaGuard(
            warmup_steps=50,
            model=model,
            optimizer=opt,
            run_dir=run_dir,
            run_name=_fresh_run_name(run_dir, f"demo-seed{seed}") if run_dir else None,
            checkpoint_dir=(run_dir / "checkpoints") if run_dir else None,
        )
        guard.attach(scheduler=sched)  # LR cuts must outlive the scheduler's next step

    for step in range(steps):
        idx = torch.randint(0, len(x_train), (64,), generator=batches)
        opt.zero_grad()
        loss = loss_fn(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.item())
        outcome.losses.append(value)
        if guard is None:
            if verbose and (step % 25 == 0 or not math.isfinite(value)):
                print(f"  step {step:4d} | loss {value:10.4g} | lr {opt.param_groups[0]['lr']:.2e}")
            continue
        result = guard.monitor(model, loss=value, batch_index=step)
        outcome.statuses[result.status] = outcome.statuses.get(result.status, 0) + 1
        if verbose and (step % 25 == 0 or result.status != "STABLE"):
            print(
                f"  step {step:4d} | loss {value:10.4g} | lr {opt.param_groups[0]['lr']:.2e} | "
                f"zeta {result.zeta_value:7.3f} {result.status:<8} | jar "
                f"{'   -  ' if result.raw_jar is None else f'{result.raw_jar:6.3f}'}"
            )
        for report in guard.recovery_reports[len(outcome.recoveries) :]:
            line = (
                f"step {report.step}: {', '.join(report.actions)}"
                + (
                    f"; restored step {report.restored_step}"
                    if report.restored_step is not None
                    else ""
                )
                + (
                    f"; lr {report.lr_before:.2e} -> {report.lr_after:.2e}"
                    if report.lr_before is not None and report.lr_after is not None
                    else ""
                )
            )
            outcome.recoveries.append(line)
            if verbose:
                print(f"  >> recovery at {line}")
        if guard.should_stop:
            if verbose:
                print("  >> the guard stopped the run cleanly (retry cap reached)")
            break

    with torch.no_grad():
        logits = model(x_test)
        outcome.final_loss = float(loss_fn(logits, y_test))
        outcome.accuracy = float((logits.argmax(1) == y_test).float().mean())
    store = guard.run_store if guard is not None else None
    if guard is not None and store is not None:
        outcome.run_path = str(getattr(store, "path", run_dir))
        guard.close()
    return outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--spike-step", type=int, default=200)
    ap.add_argument(
        "--spike", type=float, default=300.0, help="learning-rate multiplier at the spike"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=Path("zetaguard_runs"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    verbose = not args.quiet
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")

    print(
        f"zetaguard demo: MLP on sklearn digits, Adam lr 1e-3, x{args.spike:g} LR at step {args.spike_step}\n"
    )
    print("1) without a guard")
    bare = train(
        guarded=False,
        run_dir=None,
        verbose=verbose,
        steps=args.steps,
        spike_step=args.spike_step,
        spike=args.spike,
        seed=args.seed,
    )
    print("\n2) with zetaguard (auto_recover, balanced ladder)")
    kept = train(
        guarded=True,
        run_dir=args.run_dir,
        verbose=verbose,
        steps=args.steps,
        spike_step=args.spike_step,
        spike=args.spike,
        seed=args.seed,
    )

    print("\nsummary")
    print(f"  {'run':<18}{'test loss':>12}{'test acc':>10}  statuses")
    for o in (bare, kept):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(o.statuses.items())) or "-"
        print(f"  {o.label:<18}{o.final_loss:>12.4g}{o.accuracy:>10.1%}  {counts}")
    print(f"  recoveries: {len(kept.recoveries)}")
    for line in kept.recoveries:
        print(f"    {line}")
    if kept.run_path:
        print(f"\n  run store: {kept.run_path}")
        print(f"  look at it: zeta-dashboard --runs {args.run_dir}")
    rescued = (
        math.isfinite(kept.final_loss) and kept.accuracy > max(bare.accuracy, 0.5) + 0.05
    ) or (math.isfinite(kept.final_loss) and not math.isfinite(bare.final_loss))
    print(f"\n  {'the guard saved the run' if rescued else 'the guard did not save this run'}")
    return 0 if rescued else 1


if __name__ == "__main__":
    raise SystemExit(main())
