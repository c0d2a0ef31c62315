"""Plain-language advice for a result: what the channels say and what to do about it."""

from __future__ import annotations

from zetaguard.detector import CRITICAL_RATIO, GROWTH_RATIO, Observation


def recommendations(obs: Observation, worst_group: str | None) -> list[str]:
    if obs.status == "STABLE":
        return []
    tips: list[str] = []
    where = f" (worst: {worst_group})" if worst_group else ""
    if obs.nonfinite or obs.scores.get("nonfinite"):
        tips.append(
            f"Non-finite values in the monitored tensors{where}: roll back to the last stable "
            "state and lower the learning rate; check the loss for log(0) or division by zero."
        )
        return tips
    top = sorted(obs.scores.items(), key=lambda kv: kv[1], reverse=True)
    for name, score in top[:2]:
        if score <= 0.0:
            continue
        factor = _times(CRITICAL_RATIO.get(name, 1.0) ** min(score, 50.0))
        if name in ("update", "accel"):
            tips.append(
                f"Updates are {factor} their calibrated size{where}: lower the learning "
                "rate (x0.1 on CRITICAL, x0.5 on DRIFT) or check the LR schedule."
            )
        elif name == "grad":
            tips.append(
                f"Gradient norm is {factor} its calibrated level: clip gradients "
                "(guard.recommended_clip_value()) or skip the offending batch."
            )
        elif name in ("loss", "loss_start"):
            tips.append(
                f"Loss is {factor} its reference level: inspect the current batch and "
                "lower the learning rate."
            )
        elif name == "param":
            tips.append(
                f"Parameter norm grew {factor} since the first step{where}: the run is "
                "diverging; lower the learning rate and add weight decay or clipping."
            )
        elif name == "growth":
            tips.append(
                f"The parameter norm grows {_times(GROWTH_RATIO ** min(score, 50.0))} faster "
                "than during warm-up: a runaway learning rate or exploding gradients; lower the "
                "learning rate or clip gradients before the loss turns."
            )
    if obs.status == "CRITICAL" and not tips:
        tips.append("Training is unstable: roll back to the last stable state and lower the LR.")
    return tips


def _times(factor: float) -> str:
    """'3.2x' for readable factors, '1e+12x' once a channel has exploded."""
    return f"{factor:.1f}x" if factor < 1e4 else f"{factor:.0e}x"
