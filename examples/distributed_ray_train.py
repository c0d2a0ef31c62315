"""Ray Train's ``TorchTrainer`` with the guard in each worker's loop, 2 CPU workers (gloo).
Start it with:

    python examples/distributed_ray_train.py --out runs/ray

It starts a local Ray (``ray.init(num_cpus=2)``; to use a running cluster, drop that call) and
fits a small MLP under DDP (``ray.train.torch.prepare_model``). Ray Train starts the process
group before the loop runs, so the guard finds it: one collective per step, the same status and
the same recovery action on both workers. Every step, ``zetaguard.integrations.ray_train.report``
puts ``zeta_value`` and ``zeta_status`` into ``ray.train.report``; when the ladder says stop,
every worker returns at the same step, worker 0's last report carries a checkpoint with the
guard's state and the reason (``Result.metrics``), and the loop's return value says it again
(``Result.return_value``). ``FailureConfig(max_failures=--max-failures)`` does not restart a run
the guard stopped: the loop ended normally.

``--blow-up-at N`` multiplies the LR by 1000 at step N on every worker, ``--blow-up-every K``
again every K steps, until the ladder says stop. ``--hang-rank R --hang-at N`` makes worker R
stop before its guard call at step N, so the other raises ``RankFailureError`` after
``--timeout`` seconds and Ray fails the run (or restarts it, while ``--max-failures`` allows).
Each worker writes what its guard saw to ``OUT/rank<R>.json``, the driver ``OUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer, prepare_model
from zetaguard import ZetaGuard, distributed
from zetaguard.integrations.ray_train import metrics, report


def fit(
    config: dict[str, Any], rank: int, steps: int, blow_at: int | None, hang: bool
) -> dict[str, Any]:
    """One fit of a fresh model and guard in this worker; what its guard saw."""
    torch.manual_seed(0)  # the same initial weights on every worker (DDP broadcasts them too)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    model = prepare_model(net)  # DDP over Ray's process group
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    # mode= explicit: "auto" chooses from each rank's local size (docs/scaling.md).
    guard = ZetaGuard(warmup_steps=15, mode="exact", recovery_mode="balanced")
    guard.attach(model=model, optimizer=opt)
    distributed.configure(guard, timeout_s=config["timeout"])
    gen = torch.Generator().manual_seed(1 + rank)  # each worker its own batches
    w_true = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    every = config["blow_up_every"]
    statuses: list[str] = []
    error = None
    hang_started = None
    try:
        for step in range(steps):
            if blow_at is not None and (
                step == blow_at or (every and step > blow_at and (step - blow_at) % every == 0)
            ):
                for g in opt.param_groups:
                    g["lr"] *= 1000.0
            x = torch.randn(32, 32, generator=gen)
            y = (x @ w_true).squeeze(1).gt(0).long()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if hang and step == config["hang_at"]:
                hang_started = time.monotonic()
                if rank == config["hang_rank"] and config["fault"] == "exit":
                    os._exit(1)  # the worker process dies
                if rank == config["hang_rank"]:
                    time.sleep(3600)  # never reaches this step's guard call
            r = guard.monitor(model, loss=loss.item(), batch_index=step)
            statuses.append(r.status)
            # Every worker reports at the same steps (Ray's rule); the stop step is one of them.
            if guard.should_stop or step % config["report_every"] == 0 or step == steps - 1:
                report(guard, {"loss": loss.item(), "step": step})
            if guard.should_stop:
                break  # every worker: the decision came from the same numbers
    except distributed.RankFailureError as e:
        error = str(e)
    ctx = distributed.current(guard)
    return {
        "statuses": statuses,
        "should_stop": guard.should_stop,
        "collective_calls": ctx.calls if ctx is not None else 0,
        "recoveries": [
            {
                "step": r.step,
                "actions": [str(a) for a in r.actions],
                "restored_step": r.restored_step,
            }
            for r in guard.recovery_reports
        ],
        # Replicas stay identical when both workers took the same rollbacks.
        "param_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
        "error": error,
        "waited_s": None
        if error is None or hang_started is None
        else time.monotonic() - hang_started,
        "result": metrics(guard) if statuses else None,
    }


def train_loop(config: dict[str, Any]) -> Any:
    """Runs in each Ray worker, with ``torch.distributed`` already initialised: a healthy fit,
    then (unless a rank hung) one whose LR is blown up."""
    began = time.monotonic()
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])
    with open(out / f"attempts-rank{rank}.txt", "a") as f:  # one line per (re)start
        f.write(f"{time.time()}\n")
    runs = {"healthy": fit(config, rank, config["healthy_steps"], None, hang=True)}
    if runs["healthy"]["error"] is None:
        runs["blow_up"] = fit(config, rank, config["steps"], config["blow_up_at"], hang=False)
    summary = {
        "rank": rank,
        "world": ray.train.get_context().get_world_size(),
        **runs,
        "loop_s": time.monotonic() - began,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    if runs["healthy"]["error"] is not None:  # a failure: Ray's FailureConfig applies
        raise distributed.RankFailureError(runs["healthy"]["error"])
    last = runs.get("blow_up", runs["healthy"])
    return {"stopped_by_guard": last["should_stop"], **(last["result"] or {})}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--healthy-steps", type=int, default=40)
    p.add_argument("--steps", type=int, default=80, help="steps of the blown-up fit")
    p.add_argument("--blow-up-at", type=int, default=30, help="in the second fit")
    p.add_argument("--blow-up-every", type=int, default=10)
    p.add_argument(
        "--report-every",
        type=int,
        default=10,
        help="ray.train.report every N steps (each waits for Ray's controller)",
    )
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument(
        "--fault",
        choices=["hang", "exit"],
        default="hang",
        help="what --hang-rank does at --hang-at: sleep, or end its process",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="the guard's collective deadline")
    p.add_argument("--max-failures", type=int, default=1, help="Ray's FailureConfig")
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    config = {
        "out": str(a.out),
        "healthy_steps": a.healthy_steps,
        "steps": a.steps,
        "blow_up_at": a.blow_up_at,
        "report_every": a.report_every,
        "blow_up_every": a.blow_up_every,
        "hang_rank": a.hang_rank,
        "hang_at": a.hang_at,
        "fault": a.fault,
        "timeout": a.timeout,
    }
    # A fresh local Ray ("local": never a cluster found through RAY_ADDRESS or /tmp/ray).
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(
            name="zetaguard",
            storage_path=str(a.out / "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=a.max_failures),
        ),
    )
    started = time.monotonic()
    summary: dict[str, Any] = {"error": None}
    try:
        result = trainer.fit()
    except Exception as e:  # Ray Train raises when the run failed (e.g. a hung worker)
        summary["error"] = f"{type(e).__name__}: {e}"
    else:
        summary["metrics"] = result.metrics
        summary["return_value"] = getattr(result, "return_value", None)  # Ray Train v2
        # Worker 0's last checkpoint: the guard's state file when the guard stopped the run.
        summary["checkpoint"] = result.checkpoint.path if result.checkpoint else None
    summary["fit_s"] = time.monotonic() - started
    ray.shutdown()
    summary["attempts"] = [
        len((a.out / f"attempts-rank{r}.txt").read_text().splitlines()) for r in range(2)
    ]
    (a.out / "result.json").write_text(json.dumps(summary))
    print(json.dumps({k: summary.get(k) for k in ("error", "attempts", "fit_s", "return_value")}))
    return summary


if __name__ == "__main__":
    main()
