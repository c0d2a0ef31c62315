"""The recovery core: snapshots, the ladder, the pre-step veto, incidents. Framework-neutral.

One :class:`RecoveryManager` belongs to one :class:`zetaguard.ZetaGuard` (``guard.recovery``);
the guard calls :meth:`RecoveryManager.after_step` at the end of every ``monitor()`` and
delegates ``emergency_protocol()``, ``should_skip_step()``, ``guarded_step()`` and the clip
advice here. Everything framework-specific goes through a
:class:`zetaguard.recovery.backend.RecoveryBackend`.
"""

from __future__ import annotations

import logging
import math
import operator
import shutil
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

from zetaguard.checkpoint import checkpoint_stem
from zetaguard.recovery import clip
from zetaguard.recovery.backend import RecoveryBackend, make_backend
from zetaguard.recovery.incidents import MAX_UNDOS, PERSISTENT, RECURRING, TRANSIENT, Incidents
from zetaguard.recovery.ladder import (
    CHECKPOINT,
    LADDERS,
    LR_CUT,
    MAX_TOTAL_RECOVERIES,
    ROLLBACK,
    ROLLBACK_IF_NEEDED,
    Ladder,
)
from zetaguard.recovery.lr_watch import LrWatch
from zetaguard.recovery.snapshots import SnapshotKeeper
from zetaguard.results import RecoveryReport, StabilityResult


class RecoveryHost(Protocol):
    """What the manager needs from its guard (``ZetaGuard`` is one), and nothing more."""

    @property
    def model(self) -> Any: ...
    @property
    def optimizer(self) -> Any: ...
    @property
    def recovery_mode(self) -> str: ...
    @property
    def auto_recover(self) -> bool: ...
    @property
    def recovery_protocol(self) -> Any: ...
    @property
    def checkpoint_dir(self) -> str | PathLike[str] | None: ...
    @property
    def step(self) -> int: ...
    @property
    def last_result(self) -> StabilityResult | None: ...
    @property
    def run_store(self) -> Any: ...
    @property
    def rank(self) -> int | None: ...
    def config(self) -> dict[str, Any]: ...
    def save_state(self, path: str | PathLike[str]) -> None: ...
    def reset_trajectory(self) -> None: ...
    def add_report(self, report: RecoveryReport) -> None: ...

log = logging.getLogger("zetaguard")

# Channels that can be critical while the weights themselves are fine (a gradient spike, an
# oscillation): an LR cut alone can calm them. Any other critical channel means damage.
NON_DAMAGE_SCORES = frozenset({"score_grad", "score_jar"})
# Channels that describe the step's batch (its loss, its gradients), not the weights: when that
# step was vetoed, they never reached the weights.
BATCH_SCORES = NON_DAMAGE_SCORES | {"score_loss", "score_loss_start", "score_nonfinite"}
# The deepest single LR cut (see lr_factor).
MIN_LR_FACTOR = 1e-3
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
        self.keeper = SnapshotKeeper(snapshot_interval, keep_snapshots, snapshot_memory_budget)
        self.keep_checkpoints = keep_checkpoints
        self.restore_rng = restore_rng
        self.scheduler: Any = None
        self._backend: RecoveryBackend | None = None
        self._params: Any = None
        self._in_protocol = False
        self.lr_watch = LrWatch()
        self.lr_watch.hold = hold_lr_cut
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
            key: int(saved[key]) for key in ("episode", "total", "calm", "skips", "consecutive_skips")
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
        if scheduler is not None:
            self.scheduler = scheduler
        self._drop_backend()
        backend = self.backend
        if backend is not None and model is not None:
            self.keeper.reset()
            self.keeper.capture_initial(backend, self.guard.step - 1)

    def bind_params(self, params: Any) -> Any:
        """Remember the parameters handed to ``monitor()`` when no model is attached, so a
        rollback can write them back in place. Returns them (a generator made a list)."""
        if params is self._params:  # the same object as last step (the common loop)
            return params
        if isinstance(params, Iterator):
            params = list(params)
        if _same_items(params, self._params):  # the same tensors as last step: nothing to rebind
            self._params = params
            return params
        self._params = params
        backend = self._backend
        if backend is not None and self.guard.model is None:
            set_params = getattr(backend, "set_params", None)
            if set_params is not None:
                set_params(params)
        return params

    def _drop_backend(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:  # optimizer hooks of the LR watch
            close()
        self._backend = None
        self.lr_watch.end_episode()

    def before_optimizer_step(self) -> None:
        """For integrations whose framework has no optimizer step hooks (Keras): call just
        before the update; applies the LR watch (torch backends hook the optimizer instead)."""
        if self.lr_watch.active and self._backend is not None:
            self.lr_watch.before_step(self._backend, self.scheduler)

    def after_optimizer_step(self) -> None:
        """The counterpart of :meth:`before_optimizer_step`, just after the update."""
        if self.lr_watch.active and self._backend is not None:
            self.lr_watch.after_step(self._backend, self.scheduler)

    @property
    def backend(self) -> RecoveryBackend | None:
        if self._backend is None:
            target = self.guard.model if self.guard.model is not None else self._params
            if target is None:
                return None
            self._backend = make_backend(target, self.guard.optimizer, self.scheduler)
        return self._backend

    # ---- after every monitored step ------------------------------------------------------

    def after_step(self, result: StabilityResult, batch_index: int | None = None) -> RecoveryReport | None:
        if self.stopped:
            return None
        vetoed = self._vetoed
        try:
            return self._after_step(result, batch_index)
        finally:
            self.incidents.observe(result, vetoed)  # after classifying: the steps before it

    def _after_step(self, result: StabilityResult, batch_index: int | None) -> RecoveryReport | None:
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
        if vetoed and landed_trouble is None and not _critical_beyond(result, BATCH_SCORES):
            # The loss or gradients that make this step CRITICAL never reached the weights.
            self._incident(result, batch_index, "skipped before the update")
            return None
        if not self.guard.auto_recover:
            self._incident(result, batch_index, "none (auto_recover=False)")
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
            self._incident(result, batch_index, f"cooldown ({kind}: {why})")
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
        report = self._report(result)
        backend = self.backend
        lrs = backend.get_lrs() if backend is not None else []
        report.lr_before = report.lr_after = lrs[0] if lrs else None
        self._rollback(0, report)
        if kind == RECURRING:
            self.incidents.tighten_veto(
                result.channels.get("loss"), self.losses.median(clip.SKIP_MIN_SAMPLES),
                result.channels.get("grad_norm"), self.grad_norms.median(clip.SKIP_MIN_SAMPLES),
                self.ladder.skip_loss_ratio, self.ladder.skip_grad_ratio,
            )
            report.actions.append(
                "veto tightened (loss > "
                f"{_ratio_text(self.incidents.veto_loss_ratio)}, grad > "
                f"{_ratio_text(self.incidents.veto_grad_ratio)} x median)"
            )
        report.message = f"{kind}: {why}; undone with no LR cut"
        self.incidents.undone.append(
            {"step": result.step, "batch": batch_index, "class": kind,
             "restored_step": report.restored_step}
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
            return self._report(result, stopped=True, actions=["none (already stopped)"])
        if self.episode >= self.ladder.max_recoveries or self.total >= MAX_TOTAL_RECOVERIES:
            return self._stop(result, batch_index)
        protocol = self.guard.recovery_protocol
        if protocol is not None and not self._in_protocol:
            self._in_protocol = True
            try:
                out = protocol.execute(self.guard.model, self.guard.optimizer, self.guard)
            finally:
                self._in_protocol = False
            report = out if isinstance(out, RecoveryReport) else self._report(
                result, actions=[f"protocol {type(protocol).__name__}"]
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
        report = self._report(result)
        backend = self.backend
        lrs = backend.get_lrs() if backend is not None else []
        report.lr_before = lrs[0] if lrs else None
        if ROLLBACK in rung.actions or (
            ROLLBACK_IF_NEEDED in rung.actions and (force or _damaged(result))
        ):
            self._rollback(rung.depth, report)
        if LR_CUT in rung.actions:
            if backend is not None and lrs:
                stable = self.keeper.pick(0)  # after a rollback: the state restored
                factor = lr_factor(rung.lr_factor, result, lrs, stable.lrs if stable else [])
                backend.scale_lr(factor)
                self.lr_watch.after_cut(backend, factor, report.step)
                report.actions.append(f"lr x{factor:.3g}")
            else:
                report.actions.append("lr cut unavailable (no optimizer attached)")
        if CHECKPOINT in rung.actions and self.guard.checkpoint_dir is not None:
            self._checkpoint(report)
        after = backend.get_lrs() if backend is not None else []
        report.lr_after = after[0] if after else None
        report.message = (
            f"{self.ladder.name} rung {min(self.episode, self.ladder.max_recoveries - 1) + 1}"
            f"/{self.ladder.max_recoveries}"
        )
        return report

    # ---- actions -------------------------------------------------------------------------

    def rollback(self, depth: int = 0) -> int | None:
        """Restore the verified snapshot ``depth`` back; returns its step, None if none held."""
        report = self._report(None)
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

    def _checkpoint(self, report: RecoveryReport) -> None:
        backend = self.backend
        if backend is None or self.guard.checkpoint_dir is None:
            return
        directory = Path(self.guard.checkpoint_dir)
        stem = checkpoint_stem(report.step)
        guard_state = {
            "step": report.step,
            "status": report.status,
            "zeta_value": report.zeta_value,
            "actions": list(report.actions),
            "restored_step": report.restored_step,
            "lrs": backend.get_lrs(),
            "recovery_mode": self.guard.recovery_mode,
            "config": self.guard.config(),
        }
        try:
            paths = backend.save_checkpoint(directory, stem, guard_state)
            # Under torch.distributed every rank's engine state differs: one file per rank.
            rank = "" if self.guard.rank is None else f".rank{self.guard.rank}"
            self.guard.save_state(directory / f"{stem}.zetaguard{rank}.npz")
        except OSError as e:  # a full disk must not kill the run the guard is saving
            log.error("zetaguard: emergency checkpoint failed: %s", e)
            report.actions.append(f"checkpoint failed: {e}")
            return
        report.checkpoint_path = paths[0]
        report.actions.append("checkpoint")
        self._prune_checkpoints(directory, keep_stem=stem)

    def _prune_checkpoints(self, directory: Path, keep_stem: str) -> None:
        stems = sorted({p.name.split(".")[0] for p in directory.glob("emergency-step*")})
        for old in stems[: max(0, len(stems) - self.keep_checkpoints)]:
            if old == keep_stem:
                continue
            for p in directory.glob(f"{old}.*"):
                if p.is_dir():  # sharded (torch.distributed.checkpoint) checkpoints
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def _stop(self, result: StabilityResult | None, batch_index: int | None) -> RecoveryReport:
        report = self._report(result, stopped=True)
        self._rollback(0, report)  # leave the model in its last stable state
        if self.guard.checkpoint_dir is not None:
            self._checkpoint(report)
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
        log.warning("zetaguard: step %d skipped (%s: %s)%s", step, kind, reason,
                    "" if batch_index is None else f" batch={batch_index}")
        self.incidents.skipped.append(
            {"step": step, "batch": batch_index, "class": kind, "reason": reason}
        )
        self._store_incident(step, "CRITICAL", {}, None, batch_index, f"skip: {reason}")
        if self.consecutive_skips > MAX_CONSECUTIVE_SKIPS and self.guard.auto_recover:
            self.consecutive_skips = 0
            self.respond(self.guard.last_result, batch_index)

    def record_step_taken(self) -> None:
        self.consecutive_skips = 0

    def clip_value(self) -> float | None:
        return self.grad_norms.clip_value()

    # ---- records -------------------------------------------------------------------------

    def _report(
        self,
        result: StabilityResult | None,
        *,
        stopped: bool = False,
        actions: list[str] | None = None,
    ) -> RecoveryReport:
        return RecoveryReport(
            step=result.step if result is not None else max(self.guard.step - 1, 0),
            status=result.status if result is not None else "CRITICAL",
            actions=list(actions or []),
            worst_group=result.worst_group if result is not None else None,
            zeta_value=result.zeta_value if result is not None else 0.0,
            stopped=stopped,
        )

    def _finish(
        self, report: RecoveryReport, result: StabilityResult | None, batch_index: int | None
    ) -> None:
        self.last_report = report
        self.guard.add_report(report)
        action = ", ".join(report.actions) or "none"
        channels = dict(result.channels) if result is not None else {}
        self._store_incident(
            report.step, report.status, channels, report.worst_group, batch_index, action
        )
        log.warning(
            "zetaguard: step %d %s zeta=%.3f worst=%s%s -> %s (lr %s -> %s)%s",
            report.step,
            report.status,
            report.zeta_value,
            report.worst_group,
            "" if batch_index is None else f" batch={batch_index}",
            action,
            report.lr_before,
            report.lr_after,
            f"; {report.message}" if report.message else "",
        )
        store = self.guard.run_store
        if store is not None and hasattr(store, "record_recovery"):
            store.record_recovery(report)

    def _incident(self, result: StabilityResult, batch_index: int | None, action: str) -> None:
        log.warning(  # the one log line of a CRITICAL step that no recovery answered
            "zetaguard: step %d CRITICAL zeta=%.3f worst=%s%s -> %s",
            result.step,
            result.zeta_value,
            result.worst_group,
            "" if batch_index is None else f" batch={batch_index}",
            action,
        )
        self._store_incident(
            result.step, result.status, dict(result.channels), result.worst_group, batch_index, action
        )

    def _store_incident(
        self,
        step: int,
        status: str,
        channels: Mapping[str, float],
        worst_group: str | None,
        batch_index: int | None,
        action: str,
    ) -> None:
        store = self.guard.run_store
        if store is not None and hasattr(store, "record_incident"):
            store.record_incident(
                step=step,
                status=status,
                channels=dict(channels),
                worst_group=worst_group,
                batch_index=batch_index,
                action=action,
            )


def _tightest(*ratios: float | None) -> float | None:
    given = [r for r in ratios if r is not None]
    return min(given) if given else None


def _ratio_text(ratio: float | None) -> str:
    return "off" if ratio is None else f"{ratio:.3g}"


def lr_factor(
    rung_factor: float,
    result: StabilityResult | None,
    lrs: list[float] | None = None,
    stable_lrs: list[float] | None = None,
) -> float:
    """The LR cut: the rung's factor, or deeper when either

    * the LR rose since the last stable snapshot (a jump, a ramp, a warm-up past what the model
      takes): back to the LR that state was stable at (a 100x jump gets a 100x cut, where x0.1
      would leave it at 10x), or
    * the update norm overshot its healthy level by more than 1/factor: by 1/overshoot.

    Never below ``MIN_LR_FACTOR`` in one cut."""
    factor = rung_factor
    if lrs and stable_lrs and lrs[0] > 0 and stable_lrs[0] > 0:
        factor = min(factor, stable_lrs[0] / lrs[0])
    # How far the update norm stands above its healthy level, as the detector measured it.
    overshoot = result.channels.get("update_overshoot") if result is not None else None
    if overshoot is not None and math.isfinite(overshoot) and overshoot > 1.0:
        factor = min(factor, 1.0 / overshoot)
    return max(MIN_LR_FACTOR, factor)


def _damaged(result: StabilityResult | None) -> bool:
    """Whether the weights themselves took damage (so an LR cut alone cannot undo it): non-finite
    values, or a critical channel other than the gradient norm and the JAR (an unknown cause
    counts as damage)."""
    if result is None or not math.isfinite(result.zeta_value):
        return True
    return _critical_beyond(result, NON_DAMAGE_SCORES)


def _critical_beyond(result: StabilityResult, allowed: frozenset[str]) -> bool:
    """Whether the parameters are non-finite or a channel outside ``allowed`` is critical (an
    unexplained CRITICAL counts too)."""
    if result.nonfinite > 0:
        return True
    critical = {
        k for k, v in result.channels.items() if k.startswith("score_") and not v < 1.0
    }
    return not critical or bool(critical - allowed)


def _same_items(new: Any, old: Any) -> bool:
    """True when ``new`` holds the very objects ``old`` held (a fresh list of the same
    parameters, as ``model.parameters()`` gives each step), compared by identity only."""
    if new is old:
        return True
    if type(new) is not list or type(old) is not list or len(new) != len(old):
        return False
    if new and type(new[0]) is tuple:  # named pairs: the names must match, the values be the same
        return all(
            type(a) is tuple and type(b) is tuple and len(a) == len(b) == 2
            and a[0] == b[0] and a[1] is b[1]
            for a, b in zip(new, old, strict=True)
        )
    return all(map(operator.is_, new, old))
