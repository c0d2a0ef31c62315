"""Tiered monitoring, the default (``ZetaGuard(mode="auto")``): read a little every step, all
of it when it matters. docs/always-on.md states what each tier sees, the bias and variance of
the estimates, and how late a non-finite value outside the sample can be caught.

* **Cheap tier, every step**: the loss when given; the gradient norm the framework already
  computed when passed as ``grad_norm=`` (else estimated from the gradients' sampled blocks;
  with it given, a step without a full pass does not read the gradients at all:
  ``Snapshot.read_grads``);
  and the sampled block sketch (``_core.Sampler``): a fixed, seeded set of contiguous,
  cache-line-aligned blocks per tensor, ``sample_fraction`` of the blocks (at least one per
  tensor), whose finite differences give Horvitz-Thompson estimates of ``||x||^2``, ``||v||^2``,
  ``||a||^2``, ``||j||^2``.
* **Full pass**: every parameter and gradient read once (the engine's exact norms pass):
  non-finite values anywhere. It runs every ``full_pass_interval`` steps and, in the same
  ``monitor()`` call, whenever the cheap tier's observation reaches DRIFT: the detector's state
  is put back and the step is scored again with the full pass's non-finite counts. Once
  escalated, the full pass runs every step until ``CALM_STEPS`` consecutive steps are STABLE.

So every DRIFT and CRITICAL status, and every recovery action that follows one, comes from an
observation made in a call that read every element. The magnitude channels (parameter,
update, acceleration and jerk norms, the gradient norm when the framework did not pass one)
stay the sample's estimates on every step, full or not: a fixed sample's estimate differs from
the exact value by a steady factor, and switching between the two would read as a jump.

With ``full_pass="thread"`` the *scheduled* full pass of a step whose cheap tier is STABLE runs
on a worker thread (:mod:`zetaguard.tiered_worker`) and its finding is taken at the next step:
a non-finite value it found escalates that step to an inline full pass, scored with the late
counts folded in. Full passes that a decision rests on (DRIFT, escalation) stay inline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from zetaguard import _core
from zetaguard.tiered_worker import FullPassWorker, LatePass, check_full_pass, scan

if TYPE_CHECKING:
    from zetaguard.adapters import Snapshot
    from zetaguard.detector import Detector, Observation

DEFAULT_SAMPLE_FRACTION = 1.0 / 64.0
DEFAULT_FULL_PASS_INTERVAL = 50
# The cheap tier reads at most about this many elements a step (256 KiB of float32, a ring of
# 768 KiB): past 4M parameters the sample stops growing, so its cost per step does not either
# (a sampled element costs ~2 ns cold, its ring three times its bytes).
DEFAULT_MAX_SAMPLED = 1 << 16
# STABLE steps in a row, each with a full pass, that end an escalation.
CALM_STEPS = 4
BLOCK_BYTES = 1024  # sixteen 64-byte cache lines: fewer scattered starts, each prefetched


def check_settings(sample_fraction: Any, full_pass_interval: Any, max_sampled: Any) -> None:
    """Refuse bad tiered settings with a message naming the fix."""
    if max_sampled is not None:
        if isinstance(max_sampled, bool) or not isinstance(max_sampled, int):
            raise TypeError(
                f"max_sampled must be an integer >= 1 (elements the cheap tier reads a step at "
                f"most) or None (no cap: sample_fraction of every tensor), got "
                f"{type(max_sampled).__name__} {max_sampled!r}"
            )
        if not 1 <= max_sampled < 2**63:
            raise ValueError(
                f"max_sampled must be an integer >= 1 (elements the cheap tier reads a step at "
                f"most, below 2**63) or None (no cap: sample_fraction of every tensor), got "
                f"{max_sampled}"
            )
    if isinstance(sample_fraction, bool) or not isinstance(sample_fraction, (int, float)):
        raise TypeError(
            f"sample_fraction must be a number in (0, 1], got {type(sample_fraction).__name__}"
        )
    if not (0.0 < float(sample_fraction) <= 1.0) or math.isnan(float(sample_fraction)):
        raise ValueError(
            f"sample_fraction must be in (0, 1] (for example 1/64; 1 reads every element), "
            f"got {sample_fraction!r}"
        )
    if isinstance(full_pass_interval, bool) or not isinstance(full_pass_interval, int):
        raise TypeError(
            f"full_pass_interval must be an integer >= 1, got {type(full_pass_interval).__name__}"
        )
    if full_pass_interval < 1:
        raise ValueError(
            f"full_pass_interval must be >= 1 (1 runs the full pass every step), got "
            f"{full_pass_interval}"
        )


# What a state file keeps of the pipeline besides the sampled ring.
COUNTERS = ("steps", "escalated", "calm", "full_passes", "escalations", "late_passes")


@dataclass(slots=True)
class SavedTiers:
    """A state file's sampled ring, already taken back by a sampler (so a refused ring is
    refused before the guard changes), and the pipeline's counters."""

    sampler: _core.Sampler
    counters: dict[str, Any]


def new_sampler(sample_fraction: float, seed: int, max_sampled: int | None) -> _core.Sampler:
    """The engine's sampler for these settings (``max_sampled=None``: no cap)."""
    return _core.Sampler(sample_fraction, BLOCK_BYTES, seed, max_elements=max_sampled or 0)


def restore_tiers(
    sample_fraction: float, seed: int, max_sampled: int | None, saved: dict[str, Any]
) -> SavedTiers:
    """Rebuild the sampler of a saved ring (ValueError from the engine when the ring does not
    fit the sample plan of these settings)."""
    sampler = new_sampler(sample_fraction, seed, max_sampled)
    sampler.set_state(saved)
    return SavedTiers(sampler, {k: saved[k] for k in COUNTERS})


def mark_late(obs: Observation, late: LatePass | None) -> LatePass | None:
    """Name the worker's finding in the result's channels: the step it read (tiered step
    index) and the non-finite elements it counted there."""
    if late is not None:
        obs.channels["late_full_pass_step"] = float(late.step)
        obs.channels["late_full_pass_nonfinite"] = float(late.nonfinite)
    return late


@dataclass(slots=True)
class TieredStep:
    """What one tiered step hands back to the guard."""

    obs: Observation
    group_rows: npt.NDArray[np.float64]
    history: int
    grad_norm: float | None
    full: bool  # a full pass ran in this call
    late: LatePass | None = None  # full_pass="thread": the worker's pass of an earlier step


class TieredPipeline:
    """The cheap tier, the schedule of full passes and the DRIFT-triggered escalation."""

    def __init__(
        self,
        sample_fraction: float,
        full_pass_interval: int,
        seed: int,
        full_pass: str = "inline",
        max_sampled: int | None = DEFAULT_MAX_SAMPLED,
    ) -> None:
        check_settings(sample_fraction, full_pass_interval, max_sampled)
        check_full_pass(full_pass)
        self.sample_fraction = float(sample_fraction)
        self.max_sampled = max_sampled
        self.full_pass_interval = int(full_pass_interval)
        self.seed = int(seed)
        self.full_pass = full_pass
        self._worker: FullPassWorker | None = None  # started at the first threaded pass
        self.reset()

    def reset(self) -> None:
        if self._worker is not None:
            self._worker.discard()
        self.sampler = new_sampler(self.sample_fraction, self.seed, self.max_sampled)
        self._count = 0  # tiered steps seen
        self._escalated = False
        self._calm = 0
        self.full_passes = 0
        self.escalations = 0
        self.late_passes = 0  # full passes run on the worker

    def restart_trajectory(self) -> None:
        """After a rollback: the sample ring must not mix states from before and after it, and
        a full pass in flight describes the undone stretch."""
        if self._worker is not None:
            self._worker.discard()
        self.sampler.reset()

    def get_state(self) -> dict[str, Any]:
        """The sampled ring and the schedule's counters, for a state file (a full pass still in
        flight on the worker is not saved: what it finds reaches this guard only)."""
        return {
            **self.sampler.get_state(),
            "steps": self._count,
            "escalated": self._escalated,
            "calm": self._calm,
            "full_passes": self.full_passes,
            "escalations": self.escalations,
            "late_passes": self.late_passes,
        }

    def adopt(self, saved: SavedTiers) -> None:
        """Continue from a saved ring and schedule (a resumed guard)."""
        self.reset()
        self.sampler = saved.sampler
        c = saved.counters
        self._count, self._escalated, self._calm = (
            int(c["steps"]),
            bool(c["escalated"]),
            int(c["calm"]),
        )
        self.full_passes, self.escalations = int(c["full_passes"]), int(c["escalations"])
        self.late_passes = int(c["late_passes"])

    def close(self) -> None:
        """End the worker thread (a pass in flight is waited for and dropped)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def statistics(self) -> dict[str, Any]:
        """What the tiers did so far (``get_statistics()["tiered"]``)."""
        return {
            "sample_fraction": self.sample_fraction,
            "max_sampled": self.max_sampled,
            # The fraction read: sample_fraction, or less once max_sampled caps it.
            "effective_fraction": self.sampler.effective_fraction,
            "full_pass_interval": self.full_pass_interval,
            "sampled_elements": self.sampler.sampled_elements,
            "sample_state_bytes": self.sampler.state_bytes,
            "full_pass": self.full_pass,
            "full_passes": self.full_passes,
            "late_full_passes": self.late_passes,
            "escalations": self.escalations,
            "escalated": self._escalated,
        }

    @property
    def started(self) -> bool:
        """True once the sample holds tensors (the full engine may still hold none)."""
        return self.sampler.tensor_count > 0

    @property
    def escalated(self) -> bool:
        return self._escalated

    def step(
        self,
        snap: Snapshot,
        tracker: _core.Tracker,
        detector: Detector,
        aggregate: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
        loss: float | None,
        grad_norm: float | None,
    ) -> TieredStep:
        t = self._count
        # The worker's pass of an earlier step first: its error surfaces here, and what it
        # found is part of this step's decision.
        late = self._worker.take() if self._worker is not None else None
        scheduled = (t + 1) % self.full_pass_interval == 0
        threaded = scheduled and self.full_pass == "thread"
        found_late = late is not None and late.found
        # The gradients are read only in a step that uses them: for the estimate when the
        # caller gave no grad_norm, and by a full pass. Those known now are read before the
        # sample moves, so a gradient the adapter refuses leaves the ring and the schedule as
        # they were (as does an error from the worker, raised by take()).
        if grad_norm is None or scheduled or self._escalated or found_late:
            snap.read_grads()
        self._count += 1  # tiered steps seen
        sampler = self.sampler
        history = sampler.history
        rows = sampler.update_raw(snap.tensors) if snap.raw else sampler.update(snap.tensors)
        grad_est = grad_norm
        if grad_est is None and snap.grads:
            g2, bad = (
                sampler.total_norm_raw(snap.grads)
                if snap.grads_raw
                else sampler.total_norm(snap.grads)
            )
            grad_est = math.sqrt(g2) if bad == 0 else math.inf
        if (threaded or not scheduled) and not self._escalated and not found_late:
            group_rows = aggregate(rows)
            detector.checkpoint()
            obs = detector.observe(group_rows, history, loss=loss, grad_norm=grad_est)
            if obs.status == "STABLE":
                if threaded:  # the full pass overlaps the next training step
                    if self._worker is None:
                        self._worker = FullPassWorker()
                    self._worker.submit(t, tracker, snap)
                    self.late_passes += 1
                return TieredStep(obs, group_rows, history, grad_est, False, mark_late(obs, late))
            # A cheap channel reached DRIFT: score this step again on full data (its
            # gradients too, read now if grad_norm= spared them so far; a gradient refused
            # here raises with the detector put back and the sample one step on).
            detector.rollback()
            snap.read_grads()
        if not self._escalated and (found_late or not scheduled):
            # DRIFT on a cheap channel, or the worker found a non-finite value one step ago.
            self._escalated = True
            self._calm = 0
            self.escalations += 1
        return self._full_step(
            snap, tracker, detector, aggregate, rows, history, loss, grad_est, late
        )

    def _full_step(
        self,
        snap: Snapshot,
        tracker: _core.Tracker,
        detector: Detector,
        aggregate: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]],
        rows: npt.NDArray[np.float64],
        history: int,
        loss: float | None,
        grad_est: float | None,
        late: LatePass | None,
    ) -> TieredStep:
        self.full_passes += 1
        # Every element read once: parameters and gradients. The detector keeps seeing the
        # sample's estimates (one consistent series per channel: the fixed sample's estimate
        # differs from the exact value by a steady factor, and switching between the two would
        # read as a jump); the full pass adds what only it can see, non-finite values anywhere.
        now = scan(self._count - 1, tracker, snap)  # what the worker runs, here inline
        combined = rows.copy()
        combined[:, 4] = now.param_nonfinite
        grad_value = math.inf if now.grads_bad else grad_est
        if late is not None and late.found:
            # What the worker saw one step ago counts too (this step may no longer show it).
            if len(late.param_nonfinite) == len(combined):
                combined[:, 4] = np.maximum(combined[:, 4], late.param_nonfinite)
            if late.grads_bad:
                grad_value = math.inf
        group_rows = aggregate(combined)
        obs = detector.observe(group_rows, history, loss=loss, grad_norm=grad_value)
        if self._escalated:
            self._calm = self._calm + 1 if obs.status == "STABLE" else 0
            if self._calm >= CALM_STEPS:
                self._escalated = False
        return TieredStep(obs, group_rows, history, grad_value, True, mark_late(obs, late))
