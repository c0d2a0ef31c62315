"""One rank of the 2-process gloo world that tests/test_distributed.py starts.

Runs every scenario in one process group (process start-up dominates on a small machine) and
writes what each rank saw under ``--out``; the tests compare it with single-process references.

Usage: python _distributed_worker.py --out DIR --rank R --world W
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from zetaguard import ZetaGuard, distributed
from zetaguard.recovery.sharded import ShardedBackend

STEPS = 12
NAN_LOSS_STEP = 9  # rank 1 reports a NaN loss at this step
SKETCH_BUCKETS = 128
RECOVER_STEPS = 10
RECOVER_NAN_STEP = 8  # rank 1 reports a NaN loss here, with the guard's recovery on
VETO_STEPS = 6
VETO_NAN_STEP = 4  # rank 1 alone vetoes this step


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(
        # Wide enough that sketch mode sketches the first layer's shards (a tensor is only
        # sketched when that compresses it 8x; smaller ones are tracked exactly).
        torch.nn.Linear(16, 128),
        torch.nn.Tanh(),
        torch.nn.Linear(128, 4),
    ).double()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # each rank sees its own data
    return torch.randn(8, 16, generator=g, dtype=torch.float64), torch.randn(
        8, 4, generator=g, dtype=torch.float64
    )


def full(t: Any) -> np.ndarray:
    """The whole tensor on every rank (a collective for DTensors)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().numpy().copy()


def as_record(r: Any) -> dict[str, Any]:
    return {
        "step": r.step,
        "status": r.status,
        "zeta": r.zeta_value,
        "raw_jar": r.raw_jar,
        "channels": {k: float(v) for k, v in r.channels.items()},
        "rows": np.asarray(r.group_rows).tolist(),
    }


def train(
    kind: str, rank: int, out: Path, run_dir: Path | None = None
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model()
    if kind == "fsdp":
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        monitored: torch.nn.Module = model
    else:
        monitored = DistributedDataParallel(model)
    opt = torch.optim.SGD(monitored.parameters(), lr=0.05, momentum=0.9)
    guards = {
        "exact": ZetaGuard(warmup_steps=4, mode="exact", auto_recover=False, run_dir=run_dir),
        "sketch": ZetaGuard(
            warmup_steps=4, mode="sketch", sketch_buckets=SKETCH_BUCKETS, auto_recover=False
        ),
    }
    records: dict[str, list[dict[str, Any]]] = {k: [] for k in guards}
    arrays: dict[str, np.ndarray] = {}
    losses = []
    for step in range(STEPS):
        x, y = batch(rank, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(monitored(x), y)
        loss.backward()
        opt.step()
        reported = math.nan if (rank == 1 and step == NAN_LOSS_STEP) else loss.item()
        losses.append(reported)
        for name, guard in guards.items():
            records[name].append(as_record(guard.monitor(monitored, loss=reported)))
        for pname, p in monitored.named_parameters():
            arrays[f"param/{step}/{pname}"] = full(p)
            arrays[f"grad/{step}/{pname}"] = full(p.grad)
            local = p.to_local() if hasattr(p, "to_local") else p
            arrays[f"local/{step}/{pname}"] = local.detach().numpy().copy()
    arrays["loss"] = np.asarray(losses)
    np.savez(out / f"{kind}_rank{rank}.npz", **arrays)
    (out / f"{kind}_rank{rank}.json").write_text(json.dumps(records))
    for guard in guards.values():
        if guard.run_store is not None:
            guard.run_store.close()
    return model, opt


def rollback(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int, out: Path) -> None:
    """ShardedBackend: in-memory and on-disk snapshots, a restore, an emergency checkpoint."""
    results: dict[str, Any] = {}
    for where in ("memory", "disk"):
        backend = ShardedBackend(
            model, opt, snapshot_dir=out / "snapshots" if where == "disk" else None
        )
        snap = backend.capture(step=100)
        saved = {n: full(p) for n, p in model.named_parameters()}
        saved_local = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        saved_momentum = {
            n: full(opt.state[p]["momentum_buffer"]) for n, p in model.named_parameters()
        }
        for step in range(3):  # train on; the parameters move away from the snapshot
            x, y = batch(rank, 50 + step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        moved = max(float(np.abs(full(p) - saved[n]).max()) for n, p in model.named_parameters())
        backend.scale_lr(0.5)  # an LR cut after the snapshot must survive the rollback
        ids = [id(p) for p in model.parameters()]
        backend.restore(snap)
        results[where] = {
            "moved": moved,
            "max_diff_full": max(
                float(np.abs(full(p) - saved[n]).max()) for n, p in model.named_parameters()
            ),
            "max_diff_local": max(
                float((p.to_local().detach() - saved_local[n]).abs().max())
                for n, p in model.named_parameters()
            ),
            "max_diff_momentum": max(
                float(np.abs(full(opt.state[p]["momentum_buffer"]) - saved_momentum[n]).max())
                for n, p in model.named_parameters()
            ),
            "same_objects": ids == [id(p) for p in model.parameters()],
            "lr": opt.param_groups[0]["lr"],
            "snapshot_path": str(snap.params) if where == "disk" else None,
        }
        backend.scale_lr(2.0)
    # The gradient norm the recovery veto reads: one all-reduce over weighted local shards.
    x, y = batch(rank, 99)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    results["grad_norm"] = backend.grad_norm()
    results["grads"] = {n: full(p.grad).tolist() for n, p in model.named_parameters()}
    results["clip_before"] = backend.clip_grad_norm(results["grad_norm"] / 2)
    results["clip_after"] = backend.grad_norm()
    paths = backend.save_checkpoint(out / "emergency", "emergency-step00000007", {"step": 7})
    results["checkpoint_params"] = {n: full(p).tolist() for n, p in model.named_parameters()}
    results["checkpoint"] = paths
    (out / f"rollback_rank{rank}.json").write_text(json.dumps(results))


def recover(rank: int, out: Path) -> None:
    """The guard's own ladder under FSDP: rank 1 alone reports a NaN loss; both ranks must
    roll back to the same verified snapshot and cut the LR, through ShardedBackend."""
    model = build_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    guard = ZetaGuard(
        warmup_steps=4, mode="exact", snapshot_interval=2, checkpoint_dir=out / "recover_ckpt"
    )
    guard.attach(model=model, optimizer=opt)
    after: list[dict[str, list[Any]]] = []
    statuses = []
    for step in range(RECOVER_STEPS):
        x, y = batch(rank, 200 + step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        reported = math.nan if (rank == 1 and step == RECOVER_NAN_STEP) else loss.item()
        statuses.append(guard.monitor(model, loss=reported).status)
        after.append({n: full(p).tolist() for n, p in model.named_parameters()})
    reports = [
        {
            "step": r.step,
            "actions": list(r.actions),
            "restored_step": r.restored_step,
            "lr_after": r.lr_after,
            "checkpoint_path": r.checkpoint_path,
        }
        for r in guard.recovery_reports
    ]
    (out / f"recover_rank{rank}.json").write_text(
        json.dumps(
            {
                "statuses": statuses,
                "after": after,
                "reports": reports,
                "backend": type(guard.recovery.backend).__name__,
            }
        )
    )


def veto(rank: int, out: Path) -> None:
    """guarded_step() under DDP: rank 1 alone sees a NaN loss; every rank must skip the step,
    or the replicas drift apart."""
    model = DistributedDataParallel(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = ZetaGuard(warmup_steps=4, mode="exact").attach(model=model, optimizer=opt)
    landed = []
    for step in range(VETO_STEPS):
        x, y = batch(rank, 300 + step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        reported = math.nan if (rank == 1 and step == VETO_NAN_STEP) else loss.item()
        landed.append(guard.guarded_step(opt, loss=reported))
        guard.monitor(model, loss=loss.item())
    params = {n: full(p).tolist() for n, p in model.named_parameters()}
    (out / f"veto_rank{rank}.json").write_text(json.dumps({"landed": landed, "params": params}))


def mismatch(rank: int, out: Path) -> None:
    """Ranks that monitor different tensors: every rank raises, none hangs."""
    guard = ZetaGuard(mode="exact")
    params = {f"w{rank}": np.ones(4, dtype=np.float32)}
    try:
        guard.monitor(params)
        msg = None
    except distributed.RankFailureError as e:
        msg = str(e)
    (out / f"mismatch_rank{rank}.json").write_text(json.dumps({"error": msg}))


def failure(rank: int, out: Path) -> None:
    """Rank 1 stops calling monitor() and then dies; rank 0 must get an error, not hang."""
    guard = distributed.configure(ZetaGuard(mode="exact"), timeout_s=2.0)
    params = {"w": np.ones(4, dtype=np.float32)}
    guard.monitor(params)  # one healthy step together
    if rank == 1:
        time.sleep(6.0)
        os._exit(0)  # gone without a word, as a crashed rank is
    errors = []
    for _ in range(2):  # first while rank 1 hangs, then after it died
        t0 = time.monotonic()
        try:
            guard.monitor(params)
            errors.append({"error": None, "seconds": time.monotonic() - t0})
        except distributed.RankFailureError as e:
            errors.append({"error": str(e), "seconds": time.monotonic() - t0})
        time.sleep(6.0)
    (out / "failure_rank0.json").write_text(json.dumps(errors))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.out / 'rendezvous'}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=120),
    )
    train("ddp", args.rank, args.out, run_dir=args.out / "runs")
    model, opt = train("fsdp", args.rank, args.out)
    rollback(model, opt, args.rank, args.out)
    recover(args.rank, args.out)
    veto(args.rank, args.out)
    mismatch(args.rank, args.out)
    failure(args.rank, args.out)
    os._exit(0)  # the group is broken on purpose; skip its teardown


if __name__ == "__main__":
    main()
