"""The escalation ladders behind ``recovery_mode``.

A CRITICAL step outside the cooldown climbs one rung; trouble that comes back before
``calm_steps`` STABLE steps have passed climbs the next one; once ``max_recoveries`` rungs of one
episode have run and trouble returns again, the guard stops training (``guard.should_stop``).
``MAX_TOTAL_RECOVERIES`` caps the whole run, so recovery can never loop forever.

Before the step (``guard.should_skip_step`` / ``guard.guarded_step``) each ladder also sets the
veto thresholds: a step is skipped when its loss or gradient norm is non-finite, or above
``skip_*_ratio`` times the median of the recent healthy ones (``None``: that check is off).

The judgements a rung's actions depend on sit here too: how deep an LR cut goes
(:func:`lr_factor`) and whether the weights took damage, so "roll back if needed" rolls back
(:func:`damaged`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zetaguard.results import StabilityResult

# Actions a rung can take, in the order they run.
ROLLBACK = "rollback"  # restore the latest verified-stable snapshot (older ones as depth grows)
ROLLBACK_IF_NEEDED = "rollback_if_needed"  # roll back only if the current state is damaged
LR_CUT = "lr_cut"  # multiply every learning rate (and the scheduler's base LRs) by lr_factor
CHECKPOINT = "checkpoint"  # write an emergency checkpoint to checkpoint_dir (if set)

# Hard cap on recoveries over a whole run, whatever the ladder.
MAX_TOTAL_RECOVERIES = 20


@dataclass(frozen=True)
class Rung:
    actions: tuple[str, ...]
    lr_factor: float = 1.0
    depth: int = 0  # 0: the newest verified snapshot; 1: the one before it; ...


@dataclass(frozen=True)
class Ladder:
    name: str
    rungs: tuple[Rung, ...]
    cooldown: int  # steps after an action during which CRITICAL is not acted on again
    calm_steps: int  # STABLE steps after which an episode is over and the ladder restarts
    skip_grad_ratio: float | None
    skip_loss_ratio: float | None

    @property
    def max_recoveries(self) -> int:
        return len(self.rungs)

    def rung(self, index: int) -> Rung:
        return self.rungs[min(index, len(self.rungs) - 1)]


LADDERS: dict[str, Ladder] = {
    # Do the least: a gentle LR cut first, rolling back only a damaged (non-finite or blown-up)
    # state; a second incident rolls back; a third stops.
    "conservative": Ladder(
        name="conservative",
        rungs=(
            Rung((CHECKPOINT, ROLLBACK_IF_NEEDED, LR_CUT), lr_factor=0.5),
            Rung((CHECKPOINT, ROLLBACK, LR_CUT), lr_factor=0.5),
        ),
        cooldown=20,
        calm_steps=200,
        skip_grad_ratio=None,
        skip_loss_ratio=None,
    ),
    # The specification's: save a checkpoint, LR x0.1, roll back to the last stable state if needed,
    # log the incident. Returning trouble rolls back with another x0.1, then to the snapshot
    # before, then stops.
    "balanced": Ladder(
        name="balanced",
        rungs=(
            Rung((CHECKPOINT, ROLLBACK_IF_NEEDED, LR_CUT), lr_factor=0.1),
            Rung((CHECKPOINT, ROLLBACK, LR_CUT), lr_factor=0.1),
            Rung((CHECKPOINT, ROLLBACK, LR_CUT), lr_factor=0.1, depth=1),
        ),
        cooldown=10,
        calm_steps=100,
        skip_grad_ratio=10.0,
        skip_loss_ratio=4.0,
    ),
    # Act at once and hard: always roll back, deeper as trouble returns, more retries.
    "aggressive": Ladder(
        name="aggressive",
        rungs=(
            Rung((CHECKPOINT, ROLLBACK, LR_CUT), lr_factor=0.1),
            Rung((ROLLBACK, LR_CUT), lr_factor=0.1),
            Rung((ROLLBACK, LR_CUT), lr_factor=0.1, depth=1),
            Rung((ROLLBACK, LR_CUT), lr_factor=0.5, depth=2),
            Rung((CHECKPOINT, ROLLBACK, LR_CUT), lr_factor=0.5, depth=3),
        ),
        cooldown=3,
        calm_steps=50,
        skip_grad_ratio=5.0,
        skip_loss_ratio=2.5,
    ),
}


# Channels that can be critical while the weights themselves are fine (a gradient spike, an
# oscillation): an LR cut alone can calm them. Any other critical channel means damage.
NON_DAMAGE_SCORES = frozenset({"score_grad", "score_jar"})
# Channels that describe the step's batch (its loss, its gradients), not the weights: when that
# step was vetoed, they never reached the weights.
BATCH_SCORES = NON_DAMAGE_SCORES | {"score_loss", "score_loss_start", "score_nonfinite"}
# The deepest single LR cut (see lr_factor).
MIN_LR_FACTOR = 1e-3


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


def damaged(result: StabilityResult | None) -> bool:
    """Whether the weights themselves took damage (so an LR cut alone cannot undo it): non-finite
    values, or a critical channel other than the gradient norm and the JAR (an unknown cause
    counts as damage)."""
    if result is None or not math.isfinite(result.zeta_value):
        return True
    return critical_beyond(result, NON_DAMAGE_SCORES)


def critical_beyond(result: StabilityResult, allowed: frozenset[str]) -> bool:
    """Whether the parameters are non-finite or a channel outside ``allowed`` is critical (an
    unexplained CRITICAL counts too)."""
    if result.nonfinite > 0:
        return True
    critical = {k for k, v in result.channels.items() if k.startswith("score_") and not v < 1.0}
    return not critical or bool(critical - allowed)
