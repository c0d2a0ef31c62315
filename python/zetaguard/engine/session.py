"""The engine session: one guard's tracker, and the path of one step through it.

:class:`EngineSession` chooses the tracker (the host engine ``zetaguard._core.Tracker``, or the
device path's :class:`zetaguard.engine.device.DeviceTracker` for torch tensors that live on
their device), picks exact or sketch mode from the model's size, moves the trajectory between
the two engines when the tensors move, and turns one step's snapshot into per-group rows
(:meth:`EngineSession.step`), reduced over torch.distributed when a context is given. It
receives explicit values and a narrow settings Protocol; it never sees the guard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from zetaguard import _core
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot
from zetaguard.tiered import SavedTiers, TieredPipeline, TieredStep
from zetaguard.tiered_worker import thread_refused, unsafe_for_worker

if TYPE_CHECKING:
    from zetaguard.detector import Detector
    from zetaguard.distributed import DistributedContext
    from zetaguard.engine.device import DeviceTracker
    from zetaguard.results import Observation

_DTYPE_SIZES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


class EngineSettings(Protocol):
    """The engine choices a session reads when it creates a tracker (``ZetaGuard`` has them)."""

    @property
    def mode(self) -> str: ...
    @property
    def sketch_buckets(self) -> int: ...
    @property
    def exact_memory_budget(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def seed(self) -> int: ...


@dataclass
class EngineStep:
    """One step's numbers out of the engine: per-group rows (``||v||^2, ||a||^2, ||j||^2,
    ||x||^2, non-finite``), how many differences the ring holds, and the loss and gradient
    norm (global ones under torch.distributed)."""

    group_rows: npt.NDArray[np.float64]
    history: int
    loss: float | None
    grad_norm: float | None


@dataclass
class ScoredStep:
    """One step scored: the detector's observation, the per-group rows it was scored on, the
    ring's history, and the loss and gradient norm the detector saw."""

    obs: Observation
    group_rows: npt.NDArray[np.float64]
    history: int
    loss: float | None
    grad_norm: float | None


class EngineSession:
    """A guard's engine: the tracker, the monitored names in engine order, and their groups."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.tracker: _core.Tracker | DeviceTracker | None = None
        self.names: tuple[str, ...] = ()
        self.group_names: tuple[str, ...] = ()
        self.group_index: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        # The names list object last seen equal to ``names``: adapters hand back the same list
        # while the parameter set is unchanged, so most steps check it by identity.
        self._names_list_seen: list[str] | None = None
        # mode="auto": the sampled tier and the schedule of full passes (zetaguard.tiered).
        self.tiered: TieredPipeline | None = None

    def reset(self) -> None:
        """Forget the tracker and the names (the next step starts a new trajectory)."""
        self.tracker = None
        self.names = ()
        self.group_names = ()
        self.group_index = np.zeros(0, dtype=np.int64)
        self._names_list_seen = None
        if self.tiered is not None:
            self.tiered.reset()

    def reset_trajectory(self) -> None:
        """Forget the finite-difference history but keep the tracker and its layout."""
        if self.tracker is not None:
            self.tracker.reset()
        if self.tiered is not None:
            self.tiered.restart_trajectory()

    def uses_tiers(self, snap: Snapshot, dist: DistributedContext | None) -> bool:
        """Tiered monitoring runs on the host engine in one process; the device path and
        multi-rank runs read every element every step (one collective, one transfer).
        ``full_pass="thread"`` on such a path is refused: it would silently do nothing."""
        if self.tiered is None:
            return False
        threaded = self.tiered.full_pass == "thread"
        if dist is None and snap.framework != DEVICE_FRAMEWORK:
            if threaded and (why := unsafe_for_worker(snap)) is not None:
                raise thread_refused(why)
            return True
        if threaded:
            raise thread_refused(
                (
                    "parameters on a CUDA device go through the device path"
                    if snap.framework == DEVICE_FRAMEWORK
                    else "torch.distributed with more than one rank reduces full reads"
                )
                + ", which reads every element in every monitor() call (no separate full pass "
                "to move off the training thread)"
            )
        return False

    def close(self) -> None:
        """End the tiered mode's worker thread, if one runs."""
        if self.tiered is not None:
            self.tiered.close()

    def restore(
        self,
        tracker: _core.Tracker | None,
        names: list[str],
        group_of: Callable[[str], str],
        tiers: SavedTiers | None = None,
    ) -> None:
        """Take a tracker rebuilt from a saved state, with its tensors' names, and in tiered
        mode the saved sampled ring (files from before it was saved have none: rebuilt)."""
        self.reset()
        self.tracker = tracker
        if tracker is not None or (tiers is not None and tiers.sampler.tensor_count):
            self._set_names(names, group_of)
        if tiers is not None and self.tiered is not None:
            self.tiered.adopt(tiers)

    def tiered_state(self) -> dict[str, Any] | None:
        """The sampled ring and schedule for a state file (None outside tiered mode)."""
        return self.tiered.get_state() if self.tiered is not None else None

    # ---- one step ------------------------------------------------------------------------

    def step(
        self,
        snap: Snapshot,
        *,
        loss: float | None,
        grad_norm: float | None,
        group_of: Callable[[str], str],
        dist: DistributedContext | None = None,
    ) -> EngineStep:
        """Feed one snapshot to the tracker and return the per-group rows of this step.

        ``grad_norm`` given wins over the snapshot's gradients; ``group_of`` names the group of
        a tensor (used when the tracker is created); ``dist`` reduces over the process group."""
        tracker = self._checked_tracker(snap, group_of)
        # Every element every step: the gradients are read and checked here whether or not
        # grad_norm was given, as in every release before tiered monitoring.
        snap.read_grads()
        history = tracker.history
        grad_rows = None
        if snap.framework == DEVICE_FRAMEWORK:  # parameters and gradients: one transfer
            rows, grad_rows = cast("DeviceTracker", tracker).update_with_grads(
                snap.tensors, snap.grads if grad_norm is None else None
            )
        else:
            host = cast(_core.Tracker, tracker)
            rows = host.update_raw(snap.tensors) if snap.raw else host.update(snap.tensors)
        if grad_norm is None and snap.grads:
            if grad_rows is not None:
                sums = grad_rows.sum(axis=0)  # squared norm, ..., non-finite count
                grad_sq, grad_bad = float(sums[0]), int(sums[4])
            elif snap.grads_raw:
                grad_sq, grad_bad = host.total_norm_raw(snap.grads)
            else:
                grad_sq, grad_bad = host.total_norm(snap.grads)
            grad_norm = math.sqrt(grad_sq) if grad_bad == 0 else math.inf
        if dist is None:
            return EngineStep(self.aggregate(rows), history, loss, grad_norm)
        # One all-reduce: every rank's detector then sees the same global numbers.
        group_rows, loss, grad_norm = dist.reduce(
            self.names, self.aggregate, tracker, rows, loss, grad_norm
        )
        return EngineStep(group_rows, history, loss, grad_norm)

    def tiered_step(
        self,
        snap: Snapshot,
        detector: Detector,
        *,
        loss: float | None,
        grad_norm: float | None,
        group_of: Callable[[str], str],
    ) -> TieredStep:
        """One step of ``mode="auto"``: the sampled tier, and the full pass when it is due or a
        cheap channel reached DRIFT (the detector scores the step; see zetaguard.tiered)."""
        assert self.tiered is not None, "tiered_step() needs mode='auto' (see uses_tiers())"
        tracker = cast(_core.Tracker, self._checked_tracker(snap, group_of))
        return self.tiered.step(snap, tracker, detector, self.aggregate, loss, grad_norm)

    def score(
        self,
        snap: Snapshot,
        detector: Detector,
        *,
        loss: float | None,
        grad_norm: float | None,
        group_of: Callable[[str], str],
        dist: DistributedContext | None,
    ) -> ScoredStep:
        """One step through the engine and the detector: tiered when :meth:`uses_tiers` says so
        (``mode="auto"``, zetaguard.tiered), else every element (:meth:`step`) then scored."""
        if self.uses_tiers(snap, dist):
            tiered = self.tiered_step(
                snap, detector, loss=loss, grad_norm=grad_norm, group_of=group_of
            )
            return ScoredStep(tiered.obs, tiered.group_rows, tiered.history, loss, tiered.grad_norm)
        numbers = self.step(snap, loss=loss, grad_norm=grad_norm, group_of=group_of, dist=dist)
        obs = detector.observe(
            numbers.group_rows, numbers.history, loss=numbers.loss, grad_norm=numbers.grad_norm
        )
        return ScoredStep(obs, numbers.group_rows, numbers.history, numbers.loss, numbers.grad_norm)

    def statistics(self) -> dict[str, Any]:
        """The engine's part of ``get_statistics()``: what it does, the group count, and the
        tiered pipeline's counters in ``mode="auto"``."""
        tiered = {} if self.tiered is None else {"tiered": self.tiered.statistics()}
        return {"engine": self.describe(), "groups": len(self.group_names), **tiered}

    def take_reference(self, snap: Snapshot, group_of: Callable[[str], str]) -> float | None:
        """Give the ring its first state from the weights before the first update (not a step:
        nothing is scored). Returns their norm, or None when the ring already holds a state."""
        tracker = self._checked_tracker(snap, group_of)
        if self.uses_tiers(snap, None):
            assert self.tiered is not None
            sampler = self.tiered.sampler
            if sampler.history > 0:
                return None
            rows = sampler.update_raw(snap.tensors) if snap.raw else sampler.update(snap.tensors)
        elif tracker.history > 0:
            return None
        elif snap.framework == DEVICE_FRAMEWORK:
            rows, _ = cast("DeviceTracker", tracker).update_with_grads(snap.tensors, None)
        else:
            host = cast(_core.Tracker, tracker)
            rows = host.update_raw(snap.tensors) if snap.raw else host.update(snap.tensors)
        # Column 0 of a per-tensor row is ||x||^2 (the sampler's is its unbiased estimate).
        return math.sqrt(float(np.sum(rows[:, 0])))

    def _checked_tracker(
        self, snap: Snapshot, group_of: Callable[[str], str]
    ) -> _core.Tracker | DeviceTracker:
        tracker = self._ensure_tracker(snap, group_of)
        names = snap.names
        if names is not self._names_list_seen and tuple(names) != self.names:
            raise ValueError(
                "the monitored parameters changed names between steps "
                f"({len(self.names)} before, {len(snap.names)} now); call guard.reset() "
                "after changing the model"
            )
        self._names_list_seen = names
        return tracker

    def aggregate(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Per-tensor rows -> per-group rows (sums of squares add)."""
        groups = len(self.group_names)
        if groups == len(rows):
            return rows
        return _core.group_rows(rows, self.group_index, groups)

    # ---- the tracker ---------------------------------------------------------------------

    def _ensure_tracker(
        self, snap: Snapshot, group_of: Callable[[str], str]
    ) -> _core.Tracker | DeviceTracker:
        on_device = snap.framework == DEVICE_FRAMEWORK
        # A tracker holding no tensors saw only refused steps: start afresh, so fixing the
        # input does not read as the parameter set having changed. In tiered mode the tracker
        # only takes full passes (it holds no ring); the sample says whether steps were taken.
        started = self.tiered is not None and self.tiered.started
        if self.tracker is not None and (self.tracker.tensor_count > 0 or started):
            if is_device_tracker(self.tracker) == on_device:
                return self.tracker
            # The same trajectory on the other engine (a restored state meeting CUDA tensors,
            # or a model moved between devices): both engines share one state format.
            engine_state = self.tracker.get_state()
            self.tracker = self._new_tracker(self.tracker.mode, on_device)
            self.tracker.set_state(engine_state)
            return self.tracker
        mode = self.settings.mode
        if mode == "auto":
            fits = 3 * snapshot_nbytes(snap) <= self.settings.exact_memory_budget
            mode = "exact" if fits else "sketch"
        self.tracker = self._new_tracker(mode, on_device)
        self._set_names(snap.names, group_of)
        return self.tracker

    def _new_tracker(self, mode: str, on_device: bool) -> _core.Tracker | DeviceTracker:
        s = self.settings
        if on_device:
            from zetaguard.engine.device import DeviceTracker

            return DeviceTracker(mode=mode, sketch_buckets=s.sketch_buckets, seed=s.seed)
        return _core.Tracker(
            mode=mode, sketch_buckets=s.sketch_buckets, threads=s.threads, seed=s.seed
        )

    def _set_names(self, names: list[str], group_of: Callable[[str], str]) -> None:
        self.names = tuple(names)
        self._names_list_seen = None
        keys = [group_of(n) for n in names]
        order: dict[str, int] = {}
        for k in keys:
            order.setdefault(k, len(order))
        self.group_names = tuple(order)
        self.group_index = np.fromiter((order[k] for k in keys), dtype=np.int64, count=len(keys))

    # ---- reading back --------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """The tracker's state (an empty one before the first step)."""
        if self.tracker is None:
            return {"history": 0, "head": -1, "tensors": []}
        return self.tracker.get_state()

    def describe(self) -> dict[str, Any]:
        """What the engine is doing, for ``get_statistics()``."""
        t = self.tracker
        return {
            "mode": t.mode if t else None,
            "isa": t.isa if t else _core.best_isa(),
            "threads": self.settings.threads,
            "tensors": t.tensor_count if t else 0,
            "state_bytes": t.state_bytes if t else 0,
        }


def route_device(snap: Snapshot, device: str) -> Snapshot:
    """Send torch tensors to the device path when ``device`` (``ZetaGuard(device=...)``) asks."""
    if device == "auto":
        return snap
    if device == "cuda" and snap.framework != DEVICE_FRAMEWORK:
        raise ValueError(
            f"ZetaGuard(device='cuda') got {snap.framework} parameters in host memory; move "
            "the model to the GPU, or use device='auto'"
        )
    from zetaguard.engine.device import device_snapshot

    return device_snapshot(snap)


def is_device_tracker(tracker: Any) -> bool:
    return not isinstance(tracker, _core.Tracker)


def snapshot_nbytes(snap: Snapshot) -> int:
    """Bytes of the snapshot's tensors (what one ring slot of the exact engine holds)."""
    if snap.raw:
        return sum(n * _DTYPE_SIZES[d] for _, n, d in snap.tensors)
    total = 0
    for t in snap.tensors:
        nbytes = getattr(t, "nbytes", None)
        total += int(nbytes) if nbytes is not None else 0
    return total
