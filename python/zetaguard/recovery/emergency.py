"""Emergency checkpoints: the model, the optimizer and the guard's state, written on a rung that
says so (or at a stop), the oldest pruned beyond ``keep``. The files themselves are written
atomically by the backend and by :mod:`zetaguard.state` (:mod:`zetaguard.checkpoint`)."""

from __future__ import annotations

import logging
import shutil
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

from zetaguard.checkpoint import checkpoint_stem
from zetaguard.recovery.backend import RecoveryBackend
from zetaguard.results import RecoveryReport

log = logging.getLogger("zetaguard")


class CheckpointHost(Protocol):
    """What the writer needs from the guard (``ZetaGuard`` is one)."""

    @property
    def checkpoint_dir(self) -> str | PathLike[str] | None: ...
    @property
    def recovery_mode(self) -> str: ...
    @property
    def rank(self) -> int | None: ...
    def config(self) -> dict[str, Any]: ...
    def save_state(self, path: str | PathLike[str]) -> None: ...


def write_checkpoint(
    backend: RecoveryBackend | None, guard: CheckpointHost, report: RecoveryReport, keep: int
) -> None:
    """Write one emergency checkpoint for ``report`` into ``guard.checkpoint_dir`` and note it
    in the report (its path and a "checkpoint" action, or why it failed); keep the newest
    ``keep`` checkpoints."""
    if backend is None or guard.checkpoint_dir is None:
        return
    directory = Path(guard.checkpoint_dir)
    stem = checkpoint_stem(report.step)
    guard_state = {
        "step": report.step,
        "status": report.status,
        "zeta_value": report.zeta_value,
        "actions": list(report.actions),
        "restored_step": report.restored_step,
        "lrs": backend.get_lrs(),
        "recovery_mode": guard.recovery_mode,
        "config": guard.config(),
    }
    try:
        paths = backend.save_checkpoint(directory, stem, guard_state)
        # Under torch.distributed every rank's engine state differs: one file per rank.
        rank = "" if guard.rank is None else f".rank{guard.rank}"
        guard.save_state(directory / f"{stem}.zetaguard{rank}.npz")
    except OSError as e:  # a full disk must not kill the run the guard is saving
        log.error("zetaguard: emergency checkpoint failed: %s", e)
        report.actions.append(f"checkpoint failed: {e}")
        return
    report.checkpoint_path = paths[0]
    report.actions.append("checkpoint")
    prune_checkpoints(directory, keep_stem=stem, keep=keep)


def prune_checkpoints(directory: Path, keep_stem: str, keep: int) -> None:
    stems = sorted({p.name.split(".")[0] for p in directory.glob("emergency-step*")})
    for old in stems[: max(0, len(stems) - keep)]:
        if old == keep_stem:
            continue
        # <stem>.* files, and the <stem>/ directory of a sharded (torch.distributed.checkpoint)
        # checkpoint, which the glob alone misses.
        for p in [*directory.glob(f"{old}.*"), directory / old]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
