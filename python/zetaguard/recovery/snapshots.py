"""Verified-stable snapshots kept in host memory within a budget.

Every ``interval`` consecutive STABLE steps the keeper captures a *pending* snapshot; the next
time the run reaches a multiple of ``interval`` consecutive STABLE steps it promotes that pending
one to *verified* (so a verified snapshot was followed by at least ``interval`` STABLE steps: a
state captured while trouble was already brewing, as in a slow learning-rate ramp, never becomes
a rollback target) and captures a new pending one. A CRITICAL step discards the pending one; a
DRIFT step only restarts the count. The state at attach time (or the first monitored step) is
kept as the last resort.

Memory: at most ``keep`` verified snapshots, one pending and the initial one. When their total
would exceed ``memory_budget`` bytes the initial snapshot goes first, then the oldest verified; a
single snapshot over the budget turns snapshots off with one warning (LR cuts and the other
actions still work).
"""

from __future__ import annotations

import logging
from collections import deque

from zetaguard.recovery.backend import RecoveryBackend, StateSnapshot

log = logging.getLogger("zetaguard")


class SnapshotKeeper:
    def __init__(self, interval: int = 10, keep: int = 2, memory_budget: int = 1 << 30) -> None:
        if interval < 1:
            raise ValueError(f"snapshot_interval must be >= 1, got {interval}")
        if keep < 1:
            raise ValueError(f"keep_snapshots must be >= 1, got {keep}")
        if memory_budget < 0:
            raise ValueError(f"snapshot_memory_budget must be >= 0 bytes, got {memory_budget}")
        self.interval = interval
        self.keep = keep
        self.memory_budget = memory_budget
        self.disabled = False
        self.captures = 0
        self.reset()

    def reset(self) -> None:
        self.initial: StateSnapshot | None = None
        self.verified: deque[StateSnapshot] = deque()
        self.pending: StateSnapshot | None = None
        self.stable_run = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._held())

    def _held(self) -> list[StateSnapshot]:
        held = list(self.verified)
        if self.pending is not None:
            held.append(self.pending)
        if self.initial is not None:
            held.append(self.initial)
        return held

    def _capture(
        self, backend: RecoveryBackend, step: int, data_position: object
    ) -> StateSnapshot | None:
        if self.disabled:
            return None
        snap = backend.capture(step, data_position)
        if not snap.lrs:  # the LR the state was stable at (see lr_factor)
            snap.lrs = backend.get_lrs()
        self.captures += 1
        if snap.nbytes > self.memory_budget:
            self.disabled = True
            log.warning(
                "zetaguard: one snapshot needs %d bytes, over snapshot_memory_budget=%d; "
                "rollback is off for this run (raise the budget to turn it on)",
                snap.nbytes,
                self.memory_budget,
            )
            self.reset()
            return None
        return snap

    def capture_initial(self, backend: RecoveryBackend, step: int) -> None:
        if self.initial is None and not self.verified:
            self.initial = self._capture(backend, step, None)

    def observe(
        self, status: str, step: int, backend: RecoveryBackend, data_position: object = None
    ) -> None:
        """Advance with one monitored step's status."""
        if status == "CRITICAL":
            self.pending = None
            self.stable_run = 0
            return
        if status != "STABLE":
            self.stable_run = 0
            return
        self.stable_run += 1
        if self.stable_run % self.interval:
            return
        if self.pending is not None:
            self.verified.append(self.pending)
            self.pending = None
            while len(self.verified) > self.keep:
                self.verified.popleft()
        self.pending = self._capture(backend, step, data_position)
        self._fit_budget()

    def _fit_budget(self) -> None:
        while self.nbytes > self.memory_budget:
            if self.initial is not None and self.verified:
                self.initial = None
            elif len(self.verified) > 1:
                self.verified.popleft()
            else:
                break  # keep the newest verified one or the pending one: the budget allows one

    def pick(self, depth: int) -> StateSnapshot | None:
        """The rollback target ``depth`` snapshots back from the newest verified one (the oldest
        held when fewer exist, the initial state when none is verified)."""
        if self.verified:
            return self.verified[max(0, len(self.verified) - 1 - depth)]
        return self.initial

    def after_rollback(self, restored: StateSnapshot) -> None:
        """Forget what came after ``restored`` (it led to trouble) and count stability afresh."""
        while self.verified and self.verified[-1] is not restored:
            self.verified.pop()
        self.pending = None
        self.stable_run = 0
