"""Which kind of trouble a CRITICAL step is: a bad batch, the same bad batch again, or a bad
setting. The response depends on it (``docs/recovery.md``, "Incidents are classified").

* **transient**: an isolated one-step excursion with healthy steps before it: at least
  ``HEALTHY_BEFORE - 1`` of the last ``HEALTHY_BEFORE`` steps STABLE and none CRITICAL, the
  critical channels all ones a single batch or a single update can drive (loss, gradient norm,
  update and acceleration norms, non-finite values), no sustained growth of the weights up to
  the step before, and the learning rate
  not risen since the last stable state. Undone (rollback with no LR cut); it does not climb the
  LR ladder nor spend its stop budget.
* **recurring transient**: a transient again, with healthy training since the last one (within
  ``RECURRING_WINDOW`` steps). Undone as well, and from then on the pre-step veto is tightened
  to the size of the excursion seen, so where a veto is possible (``guarded_step``, Lightning's
  ``on_before_optimizer_step``, the HF ``on_pre_optimizer_step``) the bad batch is skipped
  before it lands.
* **persistent**: anything else: CRITICAL right after trouble, DRIFT before it, sustained
  growth of the weights, an oscillation, the parameter norm far from its start, a learning rate
  that rose, a channel that says nothing. This is what the LR ladder is for.

A CRITICAL step whose update was vetoed is normally no incident (its loss and gradients never
reached the weights), unless the updates that *did* land just before it were in trouble
(:meth:`Incidents.trouble_landed`): then the vetoes are hiding a run going bad (one unstable
from its first step vetoes its own rising losses one after another) and it is persistent.

Bounds: at most ``MAX_UNDOS`` transients are undone in a run; past it every incident is treated
as persistent (so the ladder's own cap ends a run whose data keeps breaking it). Vetoes are
bounded by the manager's consecutive-skip cap.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zetaguard.results import StabilityResult

TRANSIENT = "transient"
RECURRING = "recurring transient"
PERSISTENT = "persistent"

HEALTHY_BEFORE = 5
RECURRING_WINDOW = 1000
MAX_UNDOS = 50
# Channels one batch (its loss, its gradient) or the one update it made can drive critical.
TRANSIENT_SCORES = frozenset(
    {
        "score_loss",
        "score_loss_start",
        "score_grad",
        "score_update",
        "score_accel",
        "score_nonfinite",
    }
)
# A growth score at this level means the weights were already growing faster than in warm-up.
GROWTH_SUSTAINED = 0.5
# The LR rose by more than this factor since the last stable state: a setting, not a batch.
LR_ROSE = 1.5
# The tightened veto never goes below this multiple of the recent median.
MIN_VETO_RATIO = 1.5


@dataclass
class Incidents:
    """The classifier's memory, and the run's record of what was undone or skipped."""

    recent: deque[str] = field(default_factory=lambda: deque(maxlen=HEALTHY_BEFORE))
    # The statuses of the last steps whose update landed (vetoed steps left out).
    landed: deque[str] = field(default_factory=lambda: deque(maxlen=HEALTHY_BEFORE))
    last_transient: int | None = None
    growth_before: float = 0.0  # the growth score of the step before (before this update)
    param_before: float = 0.0  # the parameter-norm score of the step before
    transients: int = 0
    recurring: int = 0
    persistent: int = 0
    undone: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # The veto ratios a recurring transient set (None: the ladder's own).
    veto_loss_ratio: float | None = None
    veto_grad_ratio: float | None = None

    def observe(self, result: StabilityResult, vetoed: bool = False) -> None:
        """Remember one monitored step (after it was classified); ``vetoed``: its update was
        skipped before it landed."""
        self.recent.append(result.status)
        if not vetoed:
            self.landed.append(result.status)
        growth = result.channels.get("score_growth")
        self.growth_before = growth if growth is not None and math.isfinite(growth) else 0.0
        param = result.channels.get("score_param")
        self.param_before = param if param is not None and math.isfinite(param) else math.inf

    def classify(
        self, result: StabilityResult, lrs: list[float], stable_lrs: list[float]
    ) -> tuple[str, str]:
        """The class of a CRITICAL step and why, in a few words for the log line."""
        recent = list(self.recent)
        if recent and recent[-1] == "CRITICAL":
            return PERSISTENT, "CRITICAL again right after a CRITICAL step"
        if len(recent) < HEALTHY_BEFORE:
            return PERSISTENT, f"only {len(recent)} steps before it to compare with"
        if "CRITICAL" in recent or recent.count("STABLE") < HEALTHY_BEFORE - 1:
            return PERSISTENT, (
                f"trouble in the {HEALTHY_BEFORE} steps before it ({recent.count('DRIFT')} DRIFT, "
                f"{recent.count('CRITICAL')} CRITICAL)"
            )
        if lrs and stable_lrs and stable_lrs[0] > 0 and lrs[0] > LR_ROSE * stable_lrs[0]:
            return PERSISTENT, (
                f"the learning rate rose x{lrs[0] / stable_lrs[0]:.3g} since the last stable state"
            )
        # The growth average of this step carries its own update; the one before does not.
        if self.growth_before >= GROWTH_SUSTAINED:
            return PERSISTENT, (
                f"sustained growth of the weights before it (growth score {self.growth_before:.2f})"
            )
        critical = sorted(
            k for k, v in result.channels.items() if k.startswith("score_") and not v < 1.0
        )
        if not critical:
            return PERSISTENT, "no channel explains it"
        # One huge update can throw the parameter norm (and its growth average) far out by
        # itself; that is still one step when both were low the step before.
        one_step = TRANSIENT_SCORES | {"score_growth"}
        if self.param_before < GROWTH_SUSTAINED:
            one_step |= {"score_param"}
        beyond = [k for k in critical if k not in one_step]
        if beyond:
            return PERSISTENT, f"{', '.join(c[6:] for c in beyond)} critical"
        names = ", ".join(c[6:] for c in critical)
        last = self.last_transient
        if last is not None and result.step - last <= RECURRING_WINDOW:
            return RECURRING, (
                f"one-step excursion in {names} again, {result.step - last} steps after the one "
                f"at step {last}, healthy steps between"
            )
        return TRANSIENT, f"one-step excursion in {names} after {HEALTHY_BEFORE} healthy steps"

    def trouble_landed(self) -> str | None:
        """Why the updates that landed recently say the weights are going bad (two or more of
        the last ``HEALTHY_BEFORE`` not STABLE), or None. One bad batch that landed makes one
        non-STABLE step, so a single transient before a veto does not count."""
        bad = [s for s in self.landed if s != "STABLE"]
        if len(bad) < 2:
            return None
        return (
            f"{len(bad)} of the last {len(self.landed)} updates that landed were "
            f"{'/'.join(sorted(set(bad)))}"
        )

    def record(self, kind: str, step: int) -> None:
        if kind == PERSISTENT:
            self.persistent += 1
            return
        self.last_transient = step
        if kind == RECURRING:
            self.recurring += 1
        else:
            self.transients += 1

    def tighten_veto(
        self,
        loss: float | None,
        loss_median: float | None,
        grad: float | None,
        grad_median: float | None,
        loss_ratio: float | None,
        grad_ratio: float | None,
    ) -> None:
        """After a recurring transient: veto a step whose loss or gradient norm stands at the
        geometric middle between healthy (1x the median) and the excursion seen, or lower
        (never below ``MIN_VETO_RATIO``, never above the ladder's own ratio)."""
        self.veto_loss_ratio = _tighter(loss, loss_median, loss_ratio, self.veto_loss_ratio)
        self.veto_grad_ratio = _tighter(grad, grad_median, grad_ratio, self.veto_grad_ratio)

    def summary(self) -> dict[str, Any]:
        return {
            "transient": self.transients,
            "recurring_transient": self.recurring,
            "persistent": self.persistent,
            "undone": list(self.undone),
            "skipped": list(self.skipped),
            "veto_loss_ratio": self.veto_loss_ratio,
            "veto_grad_ratio": self.veto_grad_ratio,
        }


def _tighter(
    value: float | None, median: float | None, ladder: float | None, current: float | None
) -> float | None:
    if value is None or median is None or not (math.isfinite(value) and median > 0):
        return current
    excursion = value / median
    if excursion <= MIN_VETO_RATIO:
        return current
    ratio = max(MIN_VETO_RATIO, math.sqrt(excursion))
    if ladder is not None:
        ratio = min(ratio, ladder)
    return ratio if current is None else min(current, ratio)
