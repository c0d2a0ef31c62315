"""Lightning ``strategy="ddp"`` with ZetaCallback on 2 CPU processes (gloo). Start it with:

    python examples/distributed_lightning.py --out runs/pl

Lightning starts the second process itself (it runs this script again with ``LOCAL_RANK=1``);
under ``torchrun --nproc_per_node 2`` it uses torchrun's processes instead. The guard sees the
process group the strategy created and sums its one packet per step over the ranks, so both
ranks get the same status and take the same recovery action (a rollback restores both
replicas to the same snapshot).

One launch runs two fits in the same processes: a healthy one (``--healthy-steps``), then one
whose LR is blown up x1000 at ``--blow-up-at`` on every rank (``--steps``). ``--hang-rank R
--hang-at N`` instead makes rank R stop before its guard call at step N of the first fit, so the
other rank raises ``RankFailureError`` after ``--timeout`` seconds. Each rank writes what its
guard saw to ``OUT/rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from zetaguard import ZetaGuard, distributed
from zetaguard.integrations.pytorch_lightning import ZetaCallback


def data() -> DataLoader:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(0)  # the same data set on every rank; Lightning splits it
    x = torch.randn(4096, 32, generator=g)
    y = (x @ torch.randn(32, 1, generator=g)).squeeze(1).gt(0).long()
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


class Hang(pl.Callback):
    """Placed before ZetaCallback (callbacks run in order, before the module's own hook): the
    hung rank never reaches the guard's collective for this step. A hang anywhere else meets
    DDP's next gradient all-reduce first, whose deadline is the process group's (30 min)."""

    def __init__(self, rank: int | None, at: int | None) -> None:
        self.rank, self.at = rank, at
        self.started: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            self.started = time.monotonic()
            if trainer.global_rank == self.rank:
                time.sleep(3600)


class Net(pl.LightningModule):
    def __init__(self, blow_up_at: int | None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)
        )
        self.blow_up_at = blow_up_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.blow_up_at:
            for g in self.trainer.optimizers[0].param_groups:
                g["lr"] *= 1000.0

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.Adam(self.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(steps: int, blow_up_at: int | None, a: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    guard = ZetaGuard(warmup_steps=15, mode="exact", recovery_mode="balanced")
    distributed.configure(guard, timeout_s=a.timeout)
    statuses: list[str] = []
    orig = guard.monitor

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = orig(*args, **kwargs)
        statuses.append(result.status)
        return result

    guard.monitor = recording  # type: ignore[method-assign]
    model = Net(blow_up_at)
    hang = Hang(a.hang_rank, a.hang_at)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[hang, ZetaCallback(guard, log_metrics=False)],
    )
    error = None
    try:
        trainer.fit(model, data())
    except distributed.RankFailureError as e:
        error = str(e)
    waited = None if hang.started is None else time.monotonic() - hang.started
    ctx = distributed.current(guard)
    return {
        "statuses": statuses,
        "global_step": trainer.global_step,
        "should_stop": guard.should_stop,
        "collective_calls": ctx.calls if ctx is not None else 0,
        "recoveries": [
            {
                "step": r.step,
                "actions": [str(x) for x in r.actions],
                "restored_step": r.restored_step,
                "lr_after": r.lr_after,
            }
            for r in guard.recovery_reports
        ],
        # Replicas stay identical when both ranks took the same rollback.
        "param_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "error": error,
        "waited_s": waited if error else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--healthy-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=70)
    p.add_argument("--blow-up-at", type=int, default=40)
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="the guard's collective deadline")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    out: dict[str, Any] = {"healthy": fit(a.healthy_steps, None, a)}
    if out["healthy"]["error"] is None and a.hang_rank is None:
        out["blow_up"] = fit(a.steps, a.blow_up_at, a)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out["rank"] = rank
    out["world"] = dist.get_world_size() if dist.is_initialized() else 1
    out["error"] = next(
        (r["error"] for k, r in out.items() if isinstance(r, dict) and r["error"]), None
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{rank}.json").write_text(json.dumps(out))
    for name in ("healthy", "blow_up"):
        if name in out:
            s = out[name]["statuses"]
            print(
                f"rank {rank} {name}: {len(s)} steps, {s.count('CRITICAL')} CRITICAL"
                + (f", error: {out[name]['error']}" if out[name]["error"] else "")
            )
    return out


if __name__ == "__main__":
    if main()["error"]:
        # The group is broken: a normal exit would run gloo's teardown, which waits for the
        # collective the hung rank never joined, up to the process group's own timeout.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
