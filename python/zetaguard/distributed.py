"""Multi-process training: one collective per step, one decision for every rank.

With ``torch.distributed`` initialised and more than one rank, :class:`ZetaGuard` reads each
rank's *local* tensors, lets the engine reduce them to per-tensor squared norms, and then sums
everything the decision needs across ranks in ONE float64 ``all_reduce`` per step. Every rank
feeds the same numbers to its detector, so every rank computes the same status and takes the
same recovery action, and no rank waits in a collective the others skipped.

What each rank contributes (the sum over ranks is the global value):

* **Replicated parameters** (DDP, or any plain tensor): every rank holds the same values, so
  each contributes its rows times ``1/world``; identical replicas are counted once.
* **Sharded parameters** (FSDP2 ``fully_shard``: ``DTensor`` with ``Shard`` placements): the
  guard reads ``p.to_local()``; squared norms of disjoint shards add, so each shard counts
  ``shards/world`` (1 for plain FSDP, ``1/replicas`` for HSDP).
* **Gradients** follow their parameter's placement; a ``grad_norm`` passed by the caller is taken
  as already global and averaged. **Loss** differs per rank (each sees its own batch): averaged.
* **Non-finite counts** are summed and rounded up, so one bad replica is never averaged away.
* Per-rank loss and non-finite counts ride along (``2 * world`` floats), so every rank knows
  which rank saw a bad batch; they appear in ``StabilityResult.channels`` as ``rank_*``.

Sketch mode: each rank sketches its own shards, and a shard's sketch uses its own hash layout
(chunk offsets restart at the shard's first element, and buckets are split among the rank's
local tensors), so shard sketch *vectors* cannot be added into the full tensor's sketch. The
guard instead adds each shard's squared-norm *estimate*: every estimate is unbiased, so their
sum is an unbiased estimate of the full tensor's squared norm, with no cross-shard term (less
variance than adding independent sketch vectors would give) and 4 floats per tensor on the wire
instead of ``k``. Exact mode and replicated tensors in sketch mode give the single-process
values; sharded tensors in sketch mode give them in expectation.

Failure: the guard's collective waits at most ``timeout_s`` (default 300 s, see
:func:`configure`); a rank that died or stopped calling ``monitor()`` makes the others raise
:class:`RankFailureError` instead of hanging. On NCCL the host cannot wait with a deadline on a
device collective, so there the process group's own timeout (``init_process_group(timeout=)``)
and its watchdog apply.

The module imports torch only when a process group is in use.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from zetaguard._atomic import atomic_write
from zetaguard.adapters import Snapshot, snapshot
from zetaguard.recovery.backend import register_backend

if TYPE_CHECKING:
    from zetaguard.recovery.backend import StateSnapshot

DEFAULT_TIMEOUT_S = 300.0

# Fixed head of the packet: rank count, call counter and its square (ranks out of step),
# loss sum and count, caller grad-norm sum and count, local grad squared-norm sum, count and
# non-finite count.
_HEAD = 10
# Fingerprints stay below 2**20 so sums of their squares stay exact in float64 up to 2**13 ranks.
_FP_MASK = (1 << 20) - 1


class RankFailureError(RuntimeError):
    """The guard's collective failed or timed out: a rank died, hung, or stopped calling
    ``monitor()``; or the ranks disagree on what they monitor."""


def active() -> bool:
    """True when ``torch.distributed`` is imported, initialised and spans more than one rank.

    Never imports torch: a process that did not import ``torch.distributed`` has no group.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:
        return False
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


class _Options:
    def __init__(self, enabled: bool, group: Any, timeout_s: float) -> None:
        self.enabled = enabled
        self.group = group
        self.timeout_s = timeout_s


# Per guard (any weak-referenceable object), without touching its attributes.
_options: weakref.WeakKeyDictionary[Any, _Options] = weakref.WeakKeyDictionary()
_contexts: weakref.WeakKeyDictionary[Any, DistributedContext] = weakref.WeakKeyDictionary()

_Guard = TypeVar("_Guard")


def configure(
    guard: _Guard,
    *,
    enabled: bool = True,
    group: Any = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> _Guard:
    """Set how ``guard`` talks to the other ranks. Returns the guard.

    Args:
        enabled: ``False`` keeps the guard rank-local (each rank decides alone; only safe when
            recovery does not run collectives, e.g. a guard used on one rank only).
        group: the process group to reduce over (default: the world group). Every rank of it
            must call ``monitor()`` once per step.
        timeout_s: how long the guard's collective waits for the other ranks before raising
            :class:`RankFailureError`.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    _options[guard] = _Options(enabled, group, float(timeout_s))
    _contexts.pop(guard, None)  # rebuilt with the new options on the next step
    return guard


def current(guard: object) -> DistributedContext | None:
    """The context ``guard`` should use this step, or None to stay single-process."""
    if not active():
        return None
    opts = _options.get(guard)
    if opts is not None and not opts.enabled:
        return None
    ctx = _contexts.get(guard)
    if ctx is None:
        opts = opts or _Options(True, None, DEFAULT_TIMEOUT_S)
        ctx = _contexts[guard] = DistributedContext(group=opts.group, timeout_s=opts.timeout_s)
    return ctx


def _is_torch(obj: Any) -> bool:
    probe = obj
    if isinstance(obj, Mapping):
        probe = next(iter(obj.values()), None)
    elif isinstance(obj, (list, tuple)) and obj:
        probe = obj[0][1] if isinstance(obj[0], tuple) and len(obj[0]) == 2 else obj[0]
    return type(probe).__module__.partition(".")[0] == "torch"


@dataclass
class ReducedStep:
    """What every rank learns from one step's all-reduce."""

    rows: npt.NDArray[np.float64]
    loss: float | None
    grad_norm: float | None
    channels: dict[str, float]
    in_step: bool


def pack_step(
    groups: npt.NDArray[np.float64],
    *,
    local_nonfinite: float,
    loss: float | None,
    grad_norm: float | None,
    grad_sq: float | None,
    grad_nonfinite: float | None,
    call: int,
    rank: int,
    world: int,
) -> npt.NDArray[np.float64]:
    """One rank's packet: summing the packets of all ranks gives the global step.

    ``groups`` are this rank's group rows already weighted (replicas by 1/world, shards by
    shards/world); ``grad_sq`` the weighted squared gradient norm from local gradients (None
    when the caller passed ``grad_norm``, which is then averaged)."""
    seq = float(call & _FP_MASK)
    loss_bad = loss is not None and not math.isfinite(loss)
    head = [
        1.0,
        seq,
        seq * seq,
        0.0 if loss is None else loss,
        0.0 if loss is None else 1.0,
        0.0 if grad_norm is None else grad_norm,
        0.0 if grad_norm is None else 1.0,
        0.0 if grad_sq is None else grad_sq,
        0.0 if grad_sq is None else 1.0,
        grad_nonfinite or 0.0,
    ]
    per_rank = np.zeros(2 * world)
    per_rank[rank] = 0.0 if loss is None else loss
    per_rank[world + rank] = local_nonfinite + (grad_nonfinite or 0.0) + float(loss_bad)
    return np.concatenate([np.asarray(head), groups.ravel(), per_rank])


def unpack_step(
    total: npt.NDArray[np.float64], shape: tuple[int, ...], world: int
) -> ReducedStep:
    """The sum of every rank's :func:`pack_step` packet, read back."""
    ranks, s1, s2 = int(total[0]), int(total[1]), int(total[2])
    # Equal sum and sum of squares across `world` ranks <=> every rank sent the same call number.
    in_step = ranks == world and s1 * s1 == world * s2
    loss_sum, loss_n, user_sum, user_n, gsq, gn, gnf = (float(v) for v in total[3:_HEAD])
    grad: float | None = None
    if user_n > 0:
        grad = user_sum / user_n
    elif gn > 0:
        grad = math.sqrt(gsq) if gnf == 0 and math.isfinite(gsq) else math.inf
    size = int(np.prod(shape))
    rows = total[_HEAD : _HEAD + size].reshape(shape).copy()
    # Replicas weighted by 1/world must not average a non-finite count below one.
    rows[:, 4] = np.ceil(rows[:, 4] - 1e-9)
    tail = total[_HEAD + size :]
    losses, nonfinite = tail[:world], tail[world:]
    bad = np.flatnonzero(nonfinite > 0)
    channels: dict[str, float] = {
        "ranks": float(world),
        "rank_nonfinite_count": float(len(bad)),
        "rank_first_nonfinite": float(bad[0]) if len(bad) else -1.0,
    }
    if loss_n > 0:
        finite = np.isfinite(losses)
        if finite.any():
            channels["rank_max_loss"] = float(np.flatnonzero(finite)[np.argmax(losses[finite])])
            channels["rank_loss_spread"] = float(np.ptp(losses[finite]))
    return ReducedStep(
        rows=rows,
        loss=loss_sum / loss_n if loss_n > 0 else None,
        grad_norm=grad,
        channels=channels,
        in_step=in_step,
    )


class DistributedContext:
    """The guard's view of the process group: local snapshots in, one all-reduce per step."""

    def __init__(self, group: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch
        import torch.distributed as dist

        self._torch = torch
        self._dist = dist
        self.group = group
        self.timeout_s = float(timeout_s)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        # NCCL only reduces device memory; every CPU-capable backend takes a host tensor.
        backend = str(dist.get_backend(group))
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        )
        self.calls = 0
        self.channels: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._grads: Snapshot | None = None
        self._grad_weights: npt.NDArray[np.float64] = np.zeros(0)
        self._row_weights: npt.NDArray[np.float64] = np.zeros(0)
        self._weights_for: tuple[str, ...] = ()
        self._checked: tuple[tuple[str, ...], str] | None = None

    # ---- inputs ------------------------------------------------------------------------

    def snapshot(self, params: Any) -> Snapshot:
        """This rank's share of ``params``: DTensors as their local shards, with the weight
        each tensor's squared norms get in the cross-rank sum."""
        if (
            not isinstance(params, (Mapping, list, tuple))
            and isinstance(params, Iterable)
            and not hasattr(params, "__dlpack__")
            and not hasattr(params, "named_parameters")  # nn.Sequential iterates its layers
        ):
            params = list(params)  # parameters() / named_parameters() generators
        if not _is_torch(params):
            snap = snapshot(params)
            self._weights = dict.fromkeys(snap.names, 1.0 / self.world)
            self._grads = None
            return snap
        from zetaguard.adapters.torch import named_tensors

        names: list[str] = []
        local: list[tuple[str, Any]] = []
        grads: list[tuple[str, Any]] = []
        grad_weights: list[float] = []
        weights: dict[str, float] = {}
        for name, p in named_tensors(params):
            w = self._weight(p)
            weights[name] = w
            names.append(name)
            # Local shards are views; detached, the adapter does not probe their (absent) .grad.
            local.append((name, p.to_local().detach() if hasattr(p, "to_local") else p))
            g = getattr(p, "grad", None)
            if g is not None:
                grads.append((name, self._local(g)))
                grad_weights.append(w)
        snap = snapshot(local)
        # Gradients are reduced here with their own weights, not by the single-process path.
        snap.grads = None
        self._grads = snapshot(grads) if grads else None
        self._grad_weights = np.asarray(grad_weights, dtype=np.float64)
        self._weights = weights
        return snap

    def _local(self, t: Any) -> Any:
        to_local = getattr(t, "to_local", None)
        return to_local() if callable(to_local) else t

    def _weight(self, p: Any) -> float:
        """Share of ``p``'s squared norm this rank's copy carries in a sum over all ranks."""
        placements = getattr(p, "placements", None)
        mesh = getattr(p, "device_mesh", None)
        if placements is None or mesh is None:
            return 1.0 / self.world  # a plain tensor: one replica per rank
        shards = 1
        for dim, placement in enumerate(placements):
            if placement.is_shard():
                shards *= mesh.size(dim)
            elif placement.is_partial():
                raise ValueError(
                    "a monitored DTensor has a Partial placement (pending reduction); pass "
                    "parameters, whose placements are Shard or Replicate"
                )
        return shards / self.world

    # ---- the collective ----------------------------------------------------------------

    def reduce(
        self,
        names: tuple[str, ...],
        aggregate: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
        tracker: Any,  # the host engine (_core.Tracker) or the device one (device.DeviceTracker)
        rows: npt.NDArray[np.float64],
        loss: float | None,
        grad_norm: float | None,
    ) -> tuple[npt.NDArray[np.float64], float | None, float | None]:
        """Per-tensor rows of this rank -> global group rows, mean loss, global grad norm.

        One all-reduce (plus one more the first time a layout is seen, to check that every
        rank monitors the same tensors in the same engine mode). ``names`` are the monitored
        tensors in row order; ``aggregate`` sums per-tensor rows into group rows."""
        if self._checked != (names, tracker.mode):
            self._check_layout(names, tracker.mode)
        if self._weights_for != names:
            unknown = [n for n in names if n not in self._weights]
            if unknown:
                raise ValueError(
                    f"zetaguard: monitored tensors {unknown[:3]} did not come from this step's "
                    "parameters, so their placement (replica or shard) is unknown; pass the "
                    "model or its named_parameters() to monitor()"
                )
            self._row_weights = np.array([self._weights[n] for n in names], dtype=np.float64)
            self._weights_for = names
        weighted = rows * self._row_weights[:, None]
        groups = aggregate(weighted)
        grad_sq = grad_nonfinite = None
        if grad_norm is None and self._grads is not None:
            g = (
                tracker.norms_raw(self._grads.tensors)
                if self._grads.raw
                else tracker.norms(self._grads.tensors)
            )
            grad_sq = float(g[:, 0] @ self._grad_weights)
            grad_nonfinite = float(g[:, 1].sum())
        self.calls += 1
        packet = pack_step(
            groups,
            local_nonfinite=float(rows[:, 4].sum()) if len(rows) else 0.0,
            loss=loss,
            grad_norm=grad_norm,
            grad_sq=grad_sq,
            grad_nonfinite=grad_nonfinite,
            call=self.calls,
            rank=self.rank,
            world=self.world,
        )
        total = self._all_reduce(packet, "the per-step reduction")
        reduced = unpack_step(total, groups.shape, self.world)
        if not reduced.in_step:
            raise RankFailureError(
                f"zetaguard: the ranks are out of step (rank {self.rank} is at its guard call "
                f"{self.calls}, the others are not): every rank of the group must call "
                "monitor() once per step"
            )
        self.channels = reduced.channels
        return reduced.rows, reduced.loss, reduced.grad_norm

    def _check_layout(self, names: tuple[str, ...], mode: str) -> None:
        fp = float(zlib.crc32("\n".join(names).encode()) & _FP_MASK)
        sketch = 1.0 if mode == "sketch" else 0.0
        total = self._all_reduce(np.array([1.0, fp, fp * fp, sketch]), "the layout check")
        ranks, s1, s2, sk = int(total[0]), int(total[1]), int(total[2]), float(total[3])
        if ranks != self.world or s1 * s1 != self.world * s2:
            raise RankFailureError(
                "zetaguard: the ranks monitor different parameters (names differ); every rank "
                "must pass the same model, with the same monitor_pattern()"
            )
        if sk not in (0.0, float(self.world)):
            raise RankFailureError(
                "zetaguard: some ranks chose the exact engine and others the sketch engine "
                "(mode='auto' decides from each rank's local size); pass mode='exact' or "
                "mode='sketch' to ZetaGuard"
            )
        self._checked = (names, mode)

    def _all_reduce(self, packet: npt.NDArray[np.float64], what: str) -> npt.NDArray[np.float64]:
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(packet, dtype=np.float64))
        if self.device is not None:
            t = t.to(self.device)
        try:
            work = self._dist.all_reduce(t, group=self.group, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as e:
            raise RankFailureError(
                f"zetaguard: {what} across {self.world} ranks failed on rank {self.rank} "
                f"(guard call {self.calls}, timeout {self.timeout_s:g} s): another rank "
                "probably died, hung, or skipped monitor(). Check the other ranks' logs. "
                f"Cause: {e}"
            ) from e
        out: npt.NDArray[np.float64] = t.cpu().numpy()
        return out

    def agree_on_skip(self, reason: str | None) -> str | None:
        """One rank's veto is every rank's: a step skipped on some ranks only would let the
        replicas (DDP) or the shards' optimizer states (FSDP) drift apart. One all-reduce."""
        vetoes = int(self._all_reduce(np.array([0.0 if reason is None else 1.0]), "the step veto")[0])
        if reason is None and vetoes:
            return f"vetoed on {vetoes} of {self.world} ranks"
        return reason

    def barrier(self, what: str) -> None:
        """A barrier with the guard's deadline (a tiny all-reduce: works on every backend)."""
        self._all_reduce(np.zeros(1), what)


# ---- recovery under FSDP: a backend for zetaguard.recovery -------------------------------


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
            step=step, params=path, rng=rng, data_position=data_position,
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
        for p in self._local._params():
            g = p.grad
            if g is None:
                continue
            t = ctx._local(g).detach()
            local += float(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2) * ctx._weight(p)
            seen = 1.0
        total = ctx._all_reduce(np.array([local, seen]), "the gradient norm")
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
            for p in self._local._params():
                if p.grad is not None:
                    self._ctx._local(p.grad).mul_(scale)
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


# Torch models reach recovery through make_backend above: unchanged in one process, sharded
# snapshots and checkpoints (and collective restores) under torch.distributed.
register_backend("torch", __name__)
