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
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from zetaguard.adapters import Snapshot, snapshot

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


def unpack_step(total: npt.NDArray[np.float64], shape: tuple[int, ...], world: int) -> ReducedStep:
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
        from zetaguard.adapters.torch_layout import named_tensors

        names: list[str] = []
        local: list[tuple[str, Any]] = []
        grads: list[tuple[str, Any]] = []
        grad_weights: list[float] = []
        weights: dict[str, float] = {}
        for name, p in named_tensors(params):
            w = self.weight(p)
            weights[name] = w
            names.append(name)
            # Local shards are views; detached, the adapter does not probe their (absent) .grad.
            local.append((name, p.to_local().detach() if hasattr(p, "to_local") else p))
            g = getattr(p, "grad", None)
            if g is not None:
                grads.append((name, self.local_tensor(g)))
                grad_weights.append(w)
        snap = snapshot(local)
        # Gradients are reduced here with their own weights, not by the single-process path.
        snap.grads = snap.grad_reader = None
        self._grads = snapshot(grads) if grads else None
        self._grad_weights = np.asarray(grad_weights, dtype=np.float64)
        self._weights = weights
        return snap

    def local_tensor(self, t: Any) -> Any:
        """This rank's part of ``t``: the local shard of a DTensor, else ``t`` itself."""
        to_local = getattr(t, "to_local", None)
        return to_local() if callable(to_local) else t

    def weight(self, p: Any) -> float:
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
        total = self.all_reduce(packet, "the per-step reduction")
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
        total = self.all_reduce(np.array([1.0, fp, fp * fp, sketch]), "the layout check")
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

    def all_reduce(self, packet: npt.NDArray[np.float64], what: str) -> npt.NDArray[np.float64]:
        """Sum ``packet`` over the ranks within the guard's deadline; a failure names ``what``."""
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
        vetoes = int(
            self.all_reduce(np.array([0.0 if reason is None else 1.0]), "the step veto")[0]
        )
        if reason is None and vetoes:
            return f"vetoed on {vetoes} of {self.world} ranks"
        return reason

    def barrier(self, what: str) -> None:
        """A barrier with the guard's deadline (a tiny all-reduce: works on every backend)."""
        self.all_reduce(np.zeros(1), what)
