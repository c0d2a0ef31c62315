"""The recovery core: snapshots, the ladder, the pre-step veto, incidents. Framework-neutral.

One :class:`RecoveryManager` belongs to one :class:`zetaguard.ZetaGuard` (``guard.recovery``);
the guard calls :meth:`RecoveryManager.after_step` at the end of every ``monitor()`` and
delegates ``emergency_protocol()`` here, and ``should_skip_step()``, ``guarded_step()`` and the
clip advice to :mod:`zetaguard.recovery.gate`, which works over this manager. What is written
down goes through :mod:`zetaguard.recovery.records`, emergency checkpoints through
:mod:`zetaguard.recovery.emergency`, the ladders' judgements (LR cut depth, damage) live in
:mod:`zetaguard.recovery.ladder`, and what recovery acts on (the bound model or parameters,
optimizer, scheduler) in :mod:`zetaguard.recovery.target`. Everything framework-specific goes
through a :class:`zetaguard.recovery.backend.RecoveryBackend`.

The rest is one piece (about 500 lines): the ladder's state (episode, cooldown, calm steps,
skips, the incident being answered) is read and changed by ``after_step``, ``respond``, the
rollback and the veto together, so splitting them would pass that state back and forth.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

from zetaguard.recovery import clip
from zetaguard.recovery.backend import RecoveryBackend
from zetaguard.recovery.emergency import CheckpointHost, write_checkpoint
from zetaguard.recovery.incidents import MAX_UNDOS, PERSISTENT, RECURRING, TRANSIENT, Incidents
from zetaguard.recovery.ladder import (
    BATCH_SCORES,
    CHECKPOINT,
    LADDERS,
    LR_CUT,
    MAX_TOTAL_RECOVERIES,
    ROLLBACK,
    ROLLBACK_IF_NEEDED,
    Ladder,
    critical_beyond,
    damaged,
    lr_factor,
)
from zetaguard.recovery.lr_watch import LrWatch, schedule_position
from zetaguard.recovery.records import RecordsHost, RecoveryRecords
from zetaguard.recovery.snapshots import SnapshotKeeper
from zetaguard.recovery.target import RecoveryTarget
from zetaguard.results import RecoveryReport, StabilityResult


class RecoveryHost(RecordsHost, CheckpointHost, Protocol):
    """What the manager needs from its guard (``ZetaGuard`` is one), and nothing more: what its
    records and checkpoint writer need, and these."""

    @property
    def model(self) -> Any: ...
    @property
    def optimizer(self) -> Any: ...
    @property
    def auto_recover(self) -> bool: ...
    @property
    def recovery_protocol(self) -> Any: ...
    @property
    def last_result(self) -> StabilityResult | None: ...
    def reset_trajectory(self) -> None: ...


log = logging.getLogger("zetaguard")

# Consecutive vetoed steps after which the veto is not enough and the ladder takes over.
MAX_CONSECUTIVE_SKIPS = 10


class RecoveryManager:
    """Acts for one guard. Settings (also attributes, changeable at any time):

    Args:
        snapshot_interval: STABLE steps between snapshot captures (see
            :mod:`zetaguard.recovery.snapshots` for how a snapshot becomes verified).
        snapshot_memory_budget: bytes all held snapshots may take together.
        keep_snapshots: verified snapshots kept (older ones are rollback targets on escalation).
        keep_checkpoints: emergency checkpoints kept in ``checkpoint_dir`` (older ones deleted).
        restore_rng: restore the RNG states of the snapshot on rollback (a deterministic replay
            from the stable state; the LR cut makes the trajectory differ anyway).
        hold_lr_cut: when the loop sets the learning rate itself and so overwrites a cut, keep
            the cut in force as a factor on whatever the loop sets until the episode ends
            (:mod:`zetaguard.recovery.lr_watch`); False lets the loop's LR apply as it is (the
            one warning is logged either way).
    """

    def __init__(
        self,
        guard: RecoveryHost,
        *,
        snapshot_interval: int = 10,
        snapshot_memory_budget: int = 1 << 30,
        keep_snapshots: int = 2,
        keep_checkpoints: int = 3,
        restore_rng: bool = True,
        hold_lr_cut: bool = True,
    ) -> None:
        self.guard = guard
        self.records = RecoveryRecords(guard)  # reports, incidents, the log, the run store
        self.keeper = SnapshotKeeper(snapshot_interval, keep_snapshots, snapshot_memory_budget)
        self.keep_checkpoints = keep_checkpoints
        self.restore_rng = restore_rng
        self._in_protocol = False
        self.lr_watch = LrWatch()
        self.lr_watch.hold = hold_lr_cut
        # The model (or monitor()'s parameters), optimizer and scheduler, and their backend.
        self.target = RecoveryTarget(guard, self.lr_watch)
        self.reset()

    def reset(self) -> None:
        """Forget counters and snapshots (the bound model, optimizer and scheduler stay)."""
        self.keeper.reset()
        self.episode = 0  # recoveries in the current episode (the rung to climb next)
        self.total = 0  # recoveries in the whole run
        self.since_action = math.inf
        self.calm = 0
        self.stopped = False
        self.skips = 0
        self.consecutive_skips = 0
        self._vetoed = False  # the step about to be monitored was vetoed before it landed
        self.losses = clip.RobustHistory()
        self.grad_norms = clip.RobustHistory()
        self.last_report: RecoveryReport | None = None
        self.incidents = Incidents()  # classes seen, steps undone or skipped
        self._class_note: str | None = None  # the class of the incident being answered
        self.lr_watch.warned = False
        self.lr_watch.end_episode()

    @property
    def hold_lr_cut(self) -> bool:
        """See the class docstring; changeable at any time."""
        return self.lr_watch.hold

    @hold_lr_cut.setter
    def hold_lr_cut(self, value: bool) -> None:
        self.lr_watch.hold = bool(value)

    # ---- persistence (save_state) ---------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """Where the ladder stands and how much of the run's recovery budget is used, plus the
        loss and gradient-norm histories the veto and the clip value read, for ``save_state``.
        Snapshots are not saved (a resumed run takes new ones), nor is a stop: a run the guard
        stopped can be resumed on purpose."""
        return {
            "episode": self.episode,
            "total": self.total,
            "since_action": self.since_action,
            "calm": self.calm,
            "skips": self.skips,
            "consecutive_skips": self.consecutive_skips,
            "losses": self.losses.state(),
            "grad_norms": self.grad_norms.state(),
        }

    @staticmethod
    def parse_counters(saved: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`counters` output checked and typed; raises ``KeyError``, ``TypeError`` or
        ``ValueError`` on a malformed entry (``load_state`` checks before it changes anything)."""
        parsed: dict[str, Any] = {
            key: int(saved[key])
            for key in ("episode", "total", "calm", "skips", "consecutive_skips")
        }
        parsed["since_action"] = float(saved["since_action"])
        if min(parsed.values()) < 0:
            raise ValueError(f"negative recovery counter in {dict(saved)}")
        parsed["losses"] = clip.RobustHistory.from_state(saved["losses"])
        parsed["grad_norms"] = clip.RobustHistory.from_state(saved["grad_norms"])
        return parsed

    def restore_counters(self, parsed: Mapping[str, Any]) -> None:
        """Apply what :meth:`parse_counters` returned."""
        for key, value in parsed.items():
            setattr(self, key, value)

    @property
    def ladder(self) -> Ladder:
        return LADDERS[self.guard.recovery_mode]

    # ---- what recovery acts on -----------------------------------------------------------

    def bind(self, model: Any = None, optimizer: Any = None, scheduler: Any = None) -> None:
        """Called by ``guard.attach``: rebuild the backend and keep the state as it is now as
        the last-resort snapshot."""
        self.target.rebind(scheduler)
        backend = self.backend
        if backend is not None and model is not None:
            self.keeper.reset()
            self.keeper.capture_initial(backend, self.guard.step - 1)

    def bind_params(self, params: Any) -> Any:
        """Remember the parameters handed to ``monitor()`` when no model is attached, so a
        rollback can write them back in place. Returns them (a generator made a list)."""
        return self.target.bind_params(params)

    def before_optimizer_step(self) -> None:
        """For integrations whose framework has no optimizer step hooks (Keras): call just
        before the update; applies the LR watch (torch backends hook the optimizer instead)."""
        self.target.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """The counterpart of :meth:`before_optimizer_step`, just after the update."""
        self.target.after_optimizer_step()

    @property
    def backend(self) -> RecoveryBackend | None:
        """What acts on the model, optimizer and scheduler (built at first use), or None."""
        return self.target.backend

    @property
    def scheduler(self) -> Any:
        """The LR scheduler given to ``guard.attach`` (LR cuts scale its base LRs too)."""
        return self.target.scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self.target.scheduler = scheduler

    # ---- after every monitored step ------------------------------------------------------

    def after_step(
        self, result: StabilityResult, batch_index: int | None = None
    ) -> RecoveryReport | None:
        if self.stopped:
            return None
        vetoed = self._vetoed
        try:
            return self._after_step(result, batch_index)
        finally:
            self.incidents.observe(result, vetoed)  # after classifying: the steps before it

    def _after_step(
        self, result: StabilityResult, batch_index: int | None
    ) -> RecoveryReport | None:
        vetoed, self._vetoed = self._vetoed, False
        self.losses.append(result.channels.get("loss"))
        self.grad_norms.append(result.channels.get("grad_norm"))
        self.since_action += 1
        backend = self.backend if self.guard.auto_recover else None
        if backend is not None:  # snapshots cost memory: only when recovery may use them
            if self.keeper.captures == 0 and result.status != "CRITICAL":
                self.keeper.capture_initial(backend, result.step)
            self.keeper.observe(result.status, result.step, backend, batch_index)
        if result.status == "STABLE":
            self.calm += 1
            if self.calm >= self.ladder.calm_steps:
                self.episode = 0
                if self.lr_watch.active:  # the cut is no longer held over the loop's LR
                    self.lr_watch.end_episode()
        if result.status != "CRITICAL":
            return None
        self.calm = 0
        landed_trouble = self.incidents.trouble_landed() if vetoed else None
        if vetoed and landed_trouble is None and not critical_beyond(result, BATCH_SCORES):
            # The loss or gradients that make this step CRITICAL never reached the weights.
            self.records.incident(result, batch_index, "skipped before the update")
            return None
        if not self.guard.auto_recover:
            self.records.incident(result, batch_index, "none (auto_recover=False)")
            return None
        if landed_trouble is not None:  # the vetoes hide weights going bad (incidents.py)
            kind, why = PERSISTENT, f"vetoed, but {landed_trouble}"
            self.incidents.record(kind, result.step)
        else:
            kind, why = self._classify(result)
        if kind != PERSISTENT:
            return self._undo(result, batch_index, kind, why)
        broken = result.nonfinite > 0 or not math.isfinite(result.zeta_value)
        if self.since_action <= self.ladder.cooldown and not broken:
            self.records.incident(result, batch_index, f"cooldown ({kind}: {why})")
            return None
        self._class_note = f"{kind}: {why}"
        return self.respond(result, batch_index)

    def _classify(self, result: StabilityResult) -> tuple[str, str]:
        backend = self.backend
        lrs = backend.get_lrs() if backend is not None else []
        stable = self.keeper.pick(0)
        kind, why = self.incidents.classify(result, lrs, stable.lrs if stable else [])
        if kind != PERSISTENT and len(self.incidents.undone) >= MAX_UNDOS:
            kind, why = PERSISTENT, f"{MAX_UNDOS} transients undone in this run already ({why})"
        self.incidents.record(kind, result.step)
        return kind, why

    def _undo(
        self, result: StabilityResult, batch_index: int | None, kind: str, why: str
    ) -> RecoveryReport:
        """A (recurring) transient: roll the bad update back, leave the learning rate and the
        ladder alone; after a recurring one, tighten the veto to the excursion's size."""
        report = self.records.report(result)
        backend = self.backend
        lrs = backend.get_lrs() if backend is not None else []
        report.lr_before = report.lr_after = lrs[0] if lrs else None
        self._rollback(0, report)
        if kind == RECURRING:
            self.incidents.tighten_veto(
                result.channels.get("loss"),
                self.losses.median(clip.SKIP_MIN_SAMPLES),
                result.channels.get("grad_norm"),
                self.grad_norms.median(clip.SKIP_MIN_SAMPLES),
                self.ladder.skip_loss_ratio,
                self.ladder.skip_grad_ratio,
            )
            report.actions.append(
                "veto tightened (loss > "
                f"{_ratio_text(self.incidents.veto_loss_ratio)}, grad > "
                f"{_ratio_text(self.incidents.veto_grad_ratio)} x median)"
            )
        report.message = f"{kind}: {why}; undone with no LR cut"
        self.incidents.undone.append(
            {
                "step": result.step,
                "batch": batch_index,
                "class": kind,
                "restored_step": report.restored_step,
            }
        )
        self._finish(report, result, batch_index)
        return report

    def respond(
        self, result: StabilityResult | None, batch_index: int | None = None, *, force: bool = False
    ) -> RecoveryReport:
        """Climb one rung now (or stop, past the cap) and record what was done. ``force`` (a
        manual ``emergency_protocol()``) treats the state as damaged, so "roll back if needed"
        rolls back."""
        if self.stopped:
            return self.records.report(result, stopped=True, actions=["none (already stopped)"])
        if self.episode >= self.ladder.max_recoveries or self.total >= MAX_TOTAL_RECOVERIES:
            return self._stop(result, batch_index)
        protocol = self.guard.recovery_protocol
        if protocol is not None and not self._in_protocol:
            self._in_protocol = True
            try:
                out = protocol.execute(self.guard.model, self.guard.optimizer, self.guard)
            finally:
                self._in_protocol = False
            report = (
                out
                if isinstance(out, RecoveryReport)
                else self.records.report(result, actions=[f"protocol {type(protocol).__name__}"])
            )
        else:
            report = self.run_ladder(result, force=force)
        self.episode += 1
        self.total += 1
        self.since_action = 0
        self.calm = 0  # an action (a manual one too) starts the episode
        note, self._class_note = self._class_note, None
        if note:
            report.message = f"{note}; {report.message}" if report.message else note
        self._finish(report, result, batch_index)
        return report

    def run_ladder(
        self, result: StabilityResult | None = None, *, force: bool = False
    ) -> RecoveryReport:
        """Take the actions of the current rung and return what was done (not yet recorded:
        :meth:`respond` does that). Custom protocols call this to get the built-in behaviour."""
        result = result if result is not None else self.guard.last_result
        rung = self.ladder.rung(self.episode)
        report = self.records.report(result)
        backend = self.backend
        lrs = backend.get_lrs() if backend is not None else []
        report.lr_before = lrs[0] if lrs else None
        position = schedule_position(self.scheduler)  # before a rollback rewinds it
        held = None
        if ROLLBACK in rung.actions or (
            ROLLBACK_IF_NEEDED in rung.actions and (force or damaged(result))
        ):
            self._rollback(rung.depth, report)
        if LR_CUT in rung.actions:
            if backend is not None and lrs:
                stable = self.keeper.pick(0)  # after a rollback: the state restored
                factor = lr_factor(rung.lr_factor, result, lrs, stable.lrs if stable else [])
                backend.scale_lr(factor)
                self.lr_watch.after_cut(backend, factor, report.step)
                report.actions.append(f"lr x{factor:.3g}")
                held = self.lr_watch.hold_floor(
                    self.scheduler, [lr * factor for lr in lrs], position, factor
                )
                if held:  # the rewound schedule replays: not below the intended LR (lr_watch)
                    report.actions.append(f"lr >= {held[0]:.3g} until schedule step {position}")
            else:
                report.actions.append("lr cut unavailable (no optimizer attached)")
        if CHECKPOINT in rung.actions and self.guard.checkpoint_dir is not None:
            write_checkpoint(self.backend, self.guard, report, self.keep_checkpoints)
        after = held or (backend.get_lrs() if backend is not None else [])
        report.lr_after = after[0] if after else None
        report.message = (
            f"{self.ladder.name} rung {min(self.episode, self.ladder.max_recoveries - 1) + 1}"
            f"/{self.ladder.max_recoveries}"
        )
        return report

    # ---- actions -------------------------------------------------------------------------

    def rollback(self, depth: int = 0) -> int | None:
        """Restore the verified snapshot ``depth`` back; returns its step, None if none held."""
        report = self.records.report(None)
        self._rollback(depth, report)
        return report.restored_step

    def _rollback(self, depth: int, report: RecoveryReport) -> None:
        backend = self.backend
        snap = self.keeper.pick(depth)
        if backend is None or snap is None:
            report.actions.append("rollback unavailable (no stable snapshot yet)")
            return
        rng = snap.rng
        if not self.restore_rng:
            snap.rng = {}
        try:
            backend.restore(snap)
        except (TypeError, ValueError) as e:
            log.error("zetaguard: rollback failed: %s", e)
            report.actions.append(f"rollback failed: {e}")
            return
        finally:
            snap.rng = rng
        self.keeper.after_rollback(snap)
        self.guard.reset_trajectory()
        report.restored_step = snap.step
        report.actions.append(f"rollback to step {snap.step}")

    def _stop(self, result: StabilityResult | None, batch_index: int | None) -> RecoveryReport:
        report = self.records.report(result, stopped=True)
        self._rollback(0, report)  # leave the model in its last stable state
        if self.guard.checkpoint_dir is not None:
            write_checkpoint(self.backend, self.guard, report, self.keep_checkpoints)
        report.actions.append("stop")
        report.message = (
            f"stopped: trouble returned after {self.episode} recoveries "
            f"({self.ladder.name} allows {self.ladder.max_recoveries} per episode, "
            f"{MAX_TOTAL_RECOVERIES} per run)"
        )
        self.stopped = True
        note, self._class_note = self._class_note, None
        if note:
            report.message = f"{note}; {report.message}"
        self._finish(report, result, batch_index)
        return report

    # ---- the pre-step veto and clip advice -----------------------------------------------

    def skip_reason(self, loss: float | None, grad_norm: float | None) -> str | None:
        if grad_norm is None and self.backend is not None:
            grad_norm = self.backend.grad_norm()
        return clip.skip_reason(
            loss,
            grad_norm,
            self.losses,
            self.grad_norms,
            loss_ratio=_tightest(self.incidents.veto_loss_ratio, self.ladder.skip_loss_ratio),
            grad_ratio=_tightest(self.incidents.veto_grad_ratio, self.ladder.skip_grad_ratio),
        )

    def record_skip(self, reason: str, batch_index: int | None = None) -> None:
        self.skips += 1
        self.consecutive_skips += 1
        self._vetoed = True
        step = self.guard.step
        # A veto is about one batch: a transient, or the recurring one once it has recurred.
        kind = RECURRING if self.incidents.recurring else TRANSIENT
        log.warning(
            "zetaguard: step %d skipped (%s: %s)%s",
            step,
            kind,
            reason,
            "" if batch_index is None else f" batch={batch_index}",
        )
        self.incidents.skipped.append(
            {"step": step, "batch": batch_index, "class": kind, "reason": reason}
        )
        self.records.store_incident(step, "CRITICAL", {}, None, batch_index, f"skip: {reason}")
        if self.consecutive_skips > MAX_CONSECUTIVE_SKIPS and self.guard.auto_recover:
            self.consecutive_skips = 0
            self.respond(self.guard.last_result, batch_index)

    def record_step_taken(self) -> None:
        self.consecutive_skips = 0

    def clip_value(self) -> float | None:
        return self.grad_norms.clip_value()

    def _finish(
        self, report: RecoveryReport, result: StabilityResult | None, batch_index: int | None
    ) -> None:
        self.last_report = report
        self.records.finish(report, result, batch_index)


def _tightest(*ratios: float | None) -> float | None:
    given = [r for r in ratios if r is not None]
    return min(given) if given else None


def _ratio_text(ratio: float | None) -> str:
    return "off" if ratio is None else f"{ratio:.3g}"
