"""After an LR cut: does the cut take effect? (the loop may set the learning rate itself).

A training loop that assigns ``param_groups[i]["lr"]`` every step (a hand-written warm-up or
ramp, a scheduler nobody attached) overwrites every cut the guard makes at its next step. The
watch compares the learning rate the optimizer holds at the next step with the one the guard
set (with a scheduler attached: with the one the scheduler last set, which carries the cut);
when they differ it logs one WARNING naming the cause and the fix, and, unless
``guard.recovery.hold_lr_cut`` is False, keeps the cut in force as a factor on whatever the loop
sets, until the episode ends: before each optimizer step the LR becomes ``loop's value x
factor``, and after it the loop's own value is put back, so a loop that ramps relative to the
current LR (``lr *= 1.1``) does not compound the factor.

After a rollback that rewound an attached scheduler, the cut scales the schedule from the
restored position on, so the replayed stretch up to where the trouble was would run at the cut
times the LR the state was stable at (a ramp or a jump cut by x0.015 replays at x0.015 of its
stable LR). :meth:`LrWatch.hold_floor` keeps the LR the ladder intended (the LR at the trouble
times the cut) as a floor over that stretch, never above the uncut schedule; from the trouble's
position on the cut schedule alone applies. On a decay the cut schedule stays above the floor
all along, so nothing changes there.

Where it runs: the torch backend registers optimizer step pre/post hooks (so plain loops,
``guarded_step``, Lightning and the Hugging Face Trainer are covered without any call); an
integration without such hooks (Keras) calls :meth:`LrWatch.before_step` and
:meth:`LrWatch.after_step` around the step itself. Nothing runs before the first cut.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger("zetaguard")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-15) for x, y in zip(a, b, strict=True)
    )


def scheduler_lrs(scheduler: Any) -> list[float] | None:
    """What an attached scheduler last set (it already carries the guard's cuts), or None."""
    last = getattr(scheduler, "_last_lr", None) if scheduler is not None else None
    if isinstance(last, list) and last:
        try:
            return [float(v) for v in last]
        except (TypeError, ValueError):
            return None
    return None


class LrWatch:
    """One per recovery manager. ``hold`` is the manager's ``hold_lr_cut`` setting."""

    def __init__(self) -> None:
        self.hold = True
        self.warned = False
        self.overrides = 0  # steps at which the optimizer held an LR the guard did not set
        self.end_episode()

    def end_episode(self) -> None:
        """The episode is over: the cut is no longer held (the loop's LR applies as it is)."""
        self.expected: list[float] | None = None  # what the guard set at its last cut
        self.factor = 1.0  # the product of this episode's cuts
        self.overridden = False
        self.cut_step: int | None = None
        self._loop_lrs: list[float] | None = None  # the loop's values while the factor is on
        self._floor: list[float] | None = None  # the intended LRs while the schedule replays
        self._floor_until = 0  # the schedule position the trouble was at
        self._floor_cut = 1.0  # the cut, to read the uncut schedule back
        self._sched_lrs: list[float] | None = None  # the schedule's values while floored

    @property
    def active(self) -> bool:
        return self.expected is not None

    def after_cut(self, backend: Any, factor: float, step: int) -> None:
        """The guard just multiplied the LRs by ``factor``: watch the next steps."""
        self.factor *= factor
        self.expected = backend.get_lrs()
        self.cut_step = step
        self._loop_lrs = None
        self._floor = None
        watch = getattr(backend, "watch_steps", None)
        if watch is not None:
            watch(self)

    def hold_floor(
        self, scheduler: Any, intended: list[float], position: int | None, cut: float
    ) -> list[float] | None:
        """Just after a cut by ``cut`` (``after_cut`` ran): when a rollback rewound ``scheduler``
        from ``position`` (its ``last_epoch`` before the rollback), hold ``intended`` as a floor
        until it is back there. Returns the LRs the next step will use, or None (no floor)."""
        now = schedule_position(scheduler)
        if now is None or position is None or now >= position or not 0.0 < cut < 1.0:
            return None
        self._floor, self._floor_until, self._floor_cut = list(intended), position, cut
        lrs = scheduler_lrs(scheduler)
        return None if lrs is None else self._floored(lrs)

    def _floored(self, lrs: list[float]) -> list[float]:
        assert self._floor is not None
        return [
            min(lr / self._floor_cut, max(lr, f)) for lr, f in zip(lrs, self._floor, strict=False)
        ]

    def _apply_floor(self, backend: Any, scheduler: Any) -> None:
        position = schedule_position(scheduler)
        if position is None or position >= self._floor_until or self.overridden:
            self._floor = None  # replayed up to the trouble (or the loop took over)
            return
        set_lrs = getattr(backend, "set_lrs", None)
        now = backend.get_lrs()
        if set_lrs is None or len(now) != len(self._floor or []):
            return
        floored = self._floored(now)
        if floored != now:
            self._sched_lrs = now
            set_lrs(floored)

    def _check(self, now: list[float], scheduler: Any) -> None:
        if self.overridden or self.expected is None:
            return
        expected = scheduler_lrs(scheduler) if scheduler is not None else None
        if expected is None:
            expected = self.expected
        if _close(now, expected):
            return
        self.overridden = True
        self.overrides += 1
        if self.warned:
            log.info(
                "zetaguard: the learning rate was set outside the guard again after the cut at "
                "step %s (%s, the guard set %s)",
                self.cut_step,
                _fmt(now),
                _fmt(expected),
            )
            return
        self.warned = True
        log.warning(
            "zetaguard: the learning rate the optimizer holds (%s) is not the one the guard set "
            "at its cut at step %s (%s): the training loop, or a scheduler the guard does not "
            "know, assigns the learning rate itself and overwrites every cut. Fix: attach the "
            "scheduler with guard.attach(scheduler=...) so cuts scale it. %s",
            _fmt(now),
            self.cut_step,
            _fmt(expected),
            f"Until this episode ends the cut stays in force as a factor x{self.factor:.3g} on "
            "whatever the loop sets (guard.recovery.hold_lr_cut = False turns this off)."
            if self.hold
            else "guard.recovery.hold_lr_cut is False: the loop's learning rate applies.",
        )

    def before_step(self, backend: Any, scheduler: Any = None) -> None:
        """Just before the optimizer step: notice an override; apply the held factor."""
        if self.expected is None:
            return
        now = backend.get_lrs()
        self._check(now, scheduler)
        if self._floor is not None:
            self._apply_floor(backend, scheduler)
        set_lrs = getattr(backend, "set_lrs", None)
        if not (self.overridden and self.hold) or set_lrs is None:
            return
        self._loop_lrs = now
        set_lrs([lr * self.factor for lr in now])

    def after_step(self, backend: Any, scheduler: Any = None) -> None:
        """Just after the optimizer step: give the loop its own values back (so a relative ramp
        does not compound the factor), or, where no pre-step call ran, notice an override."""
        if self.expected is None:
            return
        scheduled, self._sched_lrs = self._sched_lrs, None
        if scheduled is not None:  # the schedule's own values back (a chainable one reads them)
            set_lrs = getattr(backend, "set_lrs", None)
            if set_lrs is not None:
                set_lrs(scheduled)
        loop, self._loop_lrs = self._loop_lrs, None
        if loop is not None:
            set_lrs = getattr(backend, "set_lrs", None)
            if set_lrs is not None:
                set_lrs(loop)
            return
        if not self.overridden:
            self._check(backend.get_lrs(), scheduler)


def schedule_position(scheduler: Any) -> int | None:
    """A torch scheduler's position (``last_epoch``), or None."""
    position = getattr(scheduler, "last_epoch", None) if scheduler is not None else None
    return position if isinstance(position, int) else None


def _fmt(lrs: list[float]) -> str:
    if len(lrs) == 1:
        return f"lr {lrs[0]:.4g}"
    return "lrs [" + ", ".join(f"{v:.4g}" for v in lrs) + "]"
