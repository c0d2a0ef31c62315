"""Recovery under torch.distributed (FSDP2, DDP): :class:`ShardedBackend`, and the
``make_backend`` the torch models reach recovery through (:mod:`zetaguard.recovery.backend`
routes ``torch`` here): unchanged in one process, sharded snapshots and checkpoints (and
collective restores) while a process group spans more than one rank. See docs/scaling.md.
"""

from __future__ import annotations

import math
import os
import shutil
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zetaguard._atomic import atomic_write
from zetaguard.distributed import DEFAULT_TIMEOUT_S, DistributedContext, active

if TYPE_CHECKING:
    from zetaguard.recovery.backend import StateSnapshot


def _clone_tree(obj: Any) -> Any:
    """Deep copy of a (possibly sharded) state dict: each rank clones its own shards."""
    from zetaguard.recovery.torch_backend import map_tensors

    return map_tensors(obj, lambda t: t.detach().clone())


def _local_nbytes(obj: Any) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return int(local.numel() * local.element_size())
    if isinstance(obj, dict):
        return sum(_local_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_local_nbytes(v) for v in obj)
    return 0


class ShardedBackend:
    """The recovery backend (:class:`zetaguard.recovery.RecoveryBackend`) for FSDP2 and DDP.

    Snapshots go through ``torch.distributed.checkpoint``'s state-dict API, so under FSDP every
    rank copies and restores only its own shards (host memory per rank: its 1/world share of
    model and optimizer state). With ``snapshot_dir`` set, snapshots go to disk instead, as
    sharded ``torch.distributed.checkpoint`` directories written atomically (temporary
    directory, then a rename by rank 0 once every rank has written); a directory is removed when
    the snapshot keeper drops its snapshot. Emergency checkpoints are always sharded
    directories written the same way, with the guard's state in ``guard.json``.

    Every method that moves data (``capture``, ``restore``, ``grad_norm``,
    ``save_checkpoint``) is collective: all ranks call it at the same step, which the guard
    ensures by giving every rank the same status. LR changes and ``zero_grad`` are rank-local
    and delegate to the single-process torch backend.
    """

    framework = "torch"

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        snapshot_dir: str | os.PathLike[str] | None = None,
        group: Any = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        import torch.distributed as dist

        from zetaguard.recovery.torch_backend import TorchBackend

        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedBackend needs an initialised process group: call "
                "torch.distributed.init_process_group() first, or use the torch backend"
            )
        self.model = model
        self.optimizer = optimizer
        self.group = group
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        self._local = TorchBackend(model, optimizer, scheduler)
        self._ctx = DistributedContext(group=group, timeout_s=timeout_s)

    # ---- state dicts ---------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _load(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        lrs = self._local.get_lrs()
        if self.optimizer is None or "optim" not in state:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )
            # The snapshot's param_groups carry the LR of its time; an LR cut since must stay.
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr

    # ---- the protocol --------------------------------------------------------------------

    def capture(self, step: int, data_position: Any = None) -> StateSnapshot:
        import torch

        from zetaguard.recovery.backend import StateSnapshot, capture_host_rng

        rng = capture_host_rng()
        rng["torch"] = torch.get_rng_state()
        has_optim = self.optimizer is not None
        if self.snapshot_dir is None:
            state = _clone_tree(self._state())
            return StateSnapshot(
                step=step,
                params=state,
                rng=rng,
                data_position=data_position,
                nbytes=_local_nbytes(state),
                has_optimizer_state=has_optim,
            )
        path = self._save(self.snapshot_dir / f"snapshot-step{int(step):08d}", None)
        snap = StateSnapshot(
            step=step,
            params=path,
            rng=rng,
            data_position=data_position,
            has_optimizer_state=has_optim,
        )
        if self._ctx.rank == 0:  # the directory lives as long as the keeper holds the snapshot
            weakref.finalize(snap, shutil.rmtree, path, True)
        return snap

    def restore(self, snapshot: StateSnapshot) -> None:
        import torch

        from zetaguard.recovery.backend import restore_host_rng

        if isinstance(snapshot.params, Path):
            self.load_checkpoint(snapshot.params)
        else:
            self._load(_clone_tree(snapshot.params))
            self._ctx.barrier("the rollback")
        restore_host_rng(snapshot.rng)
        if "torch" in snapshot.rng:
            torch.set_rng_state(snapshot.rng["torch"])

    def get_lrs(self) -> list[float]:
        return self._local.get_lrs()

    def scale_lr(self, factor: float) -> None:
        self._local.scale_lr(factor)

    def zero_grad(self) -> None:
        self._local.zero_grad()

    def grad_norm(self) -> float | None:
        """The global gradient norm: local shards' squared norms, weighted, in one all-reduce."""
        import torch

        ctx = self._ctx
        local = 0.0
        seen = 0.0
        for p in self._local.trained_params():
            g = p.grad
            if g is None:
                continue
            t = ctx.local_tensor(g).detach()
            local += float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) * ctx.weight(p)
            seen = 1.0
        total = ctx.all_reduce(np.array([local, seen]), "the gradient norm")
        if total[1] == 0:
            return None
        return math.sqrt(total[0]) if math.isfinite(total[0]) else math.inf

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale every rank's gradients (shards) by the same factor so the global norm is at
        most ``max_norm``; returns the norm before (one all-reduce, every rank agrees)."""
        import torch

        norm = self.grad_norm()
        if norm is None or not math.isfinite(norm) or norm <= max_norm:
            return 0.0 if norm is None else norm
        scale = max_norm / (norm + 1e-6)
        with torch.no_grad():
            for p in self._local.trained_params():
                if p.grad is not None:
                    self._ctx.local_tensor(p.grad).mul_(scale)
        return norm

    def save_checkpoint(self, directory: Path, stem: str, guard_state: dict[str, Any]) -> list[str]:
        """A sharded emergency checkpoint ``directory/stem/`` (all ranks together)."""
        return [str(self._save(Path(directory) / stem, guard_state))]

    # ---- sharded directories ---------------------------------------------------------------

    def _save(self, final: Path, guard_state: dict[str, Any] | None) -> Path:
        """``torch.distributed.checkpoint`` into a temporary directory, renamed when complete."""
        import json

        from torch.distributed.checkpoint.state_dict_saver import save

        tmp = final.with_name(f".tmp-{final.name}")
        if self._ctx.rank == 0:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        self._ctx.barrier("the checkpoint start")
        save(self._state(), checkpoint_id=tmp, process_group=self.group)
        self._ctx.barrier("the checkpoint write")
        if self._ctx.rank == 0:
            if guard_state is not None:
                text = json.dumps(guard_state, sort_keys=True).encode()
                atomic_write(tmp / "guard.json", lambda f: f.write(text))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self._ctx.barrier("the checkpoint commit")
        return final

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load a sharded directory written by this backend into the live model and optimizer
        on every rank (each rank reads the shards it owns now)."""
        from torch.distributed.checkpoint.state_dict_loader import load

        source = Path(path)
        if not (source / ".metadata").is_file():
            raise FileNotFoundError(
                f"{source} is not a complete sharded checkpoint (no .metadata); pass a "
                "directory written by ShardedBackend"
            )
        state = self._state()
        load(state, checkpoint_id=source, process_group=self.group)
        self._load(state)
        self._ctx.barrier("the checkpoint restore")


def make_backend(model: Any, optimizer: Any = None, scheduler: Any = None) -> Any:
    """The recovery backend for a torch model: :class:`ShardedBackend` while a process group
    spans more than one rank, else the single-process torch backend."""
    if active():
        return ShardedBackend(model, optimizer, scheduler)
    from zetaguard.recovery.torch_backend import TorchBackend

    return TorchBackend(model, optimizer, scheduler)
