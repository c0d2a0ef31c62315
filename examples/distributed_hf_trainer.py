"""The HF Trainer with ZetaGuardCallback on several CPU processes (gloo), a tiny GPT-2 built from
a config (nothing downloaded). Start it with either launcher:

    torchrun --nproc_per_node 2 examples/distributed_hf_trainer.py --out runs/hf
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_hf_trainer.py --out runs/hf

``--multi_gpu`` is the name of accelerate's torchrun-style launcher; ``use_cpu=True`` below puts
the processes on the CPU with gloo. (``accelerate launch --cpu --num_processes 2`` starts several
CPU processes only through ``mpirun``; without ``--mpirun_hostfile`` it starts ONE process,
whose state then fails with "Default process group has not been initialized".)

The Trainer initialises ``torch.distributed`` from the launcher's environment; the guard sees
the process group and sums its one packet per step over the ranks, so every rank gets the same
status and takes the same recovery action. ``--blow-up-at N`` multiplies the LR by 1000 at step
N (every rank), ``--blow-up-every K`` again every K steps until the ladder says stop; ``--hang-rank R --hang-at N`` makes rank R stop calling the guard at step N, so
the other ranks raise ``RankFailureError`` after ``--timeout`` seconds. Each rank writes what its
guard saw to ``OUT/rank<R>.json``; a rank that raised exits at once with status 3 after writing
it (``os._exit``: gloo's normal teardown would wait for the broken collective), so the launcher
stops the hung rank and fails the job instead of waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from zetaguard import ZetaGuard, distributed
from zetaguard.integrations.transformers import ZetaGuardCallback

VOCAB = 96


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Generated sequences with structure (a repeating pattern) to learn."""

    def __init__(self, n: int = 512, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=gen)
        self.ids = (start + torch.arange(length) * 3) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Faults(TrainerCallback):
    """An LR blown up x1000 (scheduler base LRs too, so it sticks), or a rank that hangs."""

    def __init__(
        self, blow_up_at: int | None, every: int | None, hang_rank: int | None, hang_at: int | None
    ) -> None:
        self.blow_up_at, self.every = blow_up_at, every
        self.hang_rank, self.hang_at = hang_rank, hang_at
        self.hang_started: float | None = None  # when every rank reached the hang step

    def _blows_up(self, step: int) -> bool:
        if self.blow_up_at is None or step < self.blow_up_at:
            return False
        return step == self.blow_up_at or bool(
            self.every and (step - self.blow_up_at) % self.every == 0
        )

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):  # type: ignore[no-untyped-def]
        if self._blows_up(state.global_step):
            lr_scheduler.base_lrs = [b * 1000.0 for b in lr_scheduler.base_lrs]
            for g in optimizer.param_groups:
                g["lr"] *= 1000.0

    def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        # Runs before the guard's callback (callbacks run in order): this rank never reaches
        # the guard's collective for this step.
        if state.global_step == self.hang_at:
            self.hang_started = time.monotonic()
            if dist.get_rank() == self.hang_rank:
                time.sleep(3600)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--blow-up-at", type=int, default=None)
    p.add_argument(
        "--blow-up-every",
        type=int,
        default=None,
        help="blow up again every N steps, until the guard's ladder says stop",
    )
    p.add_argument("--hang-rank", type=int, default=None)
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="the guard's collective deadline")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=str(a.out / "trainer"),
        max_steps=a.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        ddp_backend="gloo",
    )
    # mode= explicit: "auto" chooses from each rank's local size (docs/scaling.md).
    guard = ZetaGuard(warmup_steps=10, mode="exact", recovery_mode="balanced")
    cb = ZetaGuardCallback(guard)
    faults = Faults(a.blow_up_at, a.blow_up_every, a.hang_rank, a.hang_at)
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=Tokens(), callbacks=[faults, cb]
    )
    distributed.configure(guard, timeout_s=a.timeout)  # before the first monitor()
    rank = dist.get_rank() if dist.is_initialized() else 0
    statuses: list[str] = []
    orig = guard.monitor

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = orig(*args, **kwargs)
        statuses.append(result.status)
        return result

    guard.monitor = recording  # type: ignore[method-assign]
    error = None
    try:
        trainer.train()
    except distributed.RankFailureError as e:
        error = str(e)
    waited = None if faults.hang_started is None else time.monotonic() - faults.hang_started
    ctx = distributed.current(guard)
    out = {
        "rank": rank,
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "statuses": statuses,
        "global_step": trainer.state.global_step,
        "should_stop": guard.should_stop,
        "collective_calls": ctx.calls if ctx is not None else 0,
        "recoveries": [
            {"step": r.step, "actions": [str(x) for x in r.actions]} for r in guard.recovery_reports
        ],
        "error": error,
        "waited_s": waited if error else None,  # from the hang to the guard's error
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{rank}.json").write_text(json.dumps(out))
    print(
        f"rank {rank}: {len(statuses)} steps, "
        f"{sum(s == 'CRITICAL' for s in statuses)} CRITICAL, stop={guard.should_stop}"
        + (f", error: {error}" if error else "")
    )
    return out


if __name__ == "__main__":
    if main()["error"]:
        # The group is broken: a normal exit would run gloo's teardown, which waits for the
        # collective the hung rank never joined, up to the process group's own timeout
        # (TrainingArguments.ddp_timeout, 30 min by default). Leave at once instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)
    if dist.is_initialized():
        # A clean end: left to interpreter exit, the group's threads were seen to abort
        # ("terminate called without an active exception") under accelerate launch.
        dist.destroy_process_group()
