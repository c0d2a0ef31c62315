"""A hand-made StabilityResult, for driving the recovery manager without an engine."""

from __future__ import annotations

import math

from zetaguard import StabilityResult


def make_result(
    step: int, status: str, zeta: float, nonfinite: int | None = None
) -> StabilityResult:
    """A result at ``step`` with ``status`` and ``zeta_value`` (non-finite zeta: one bad value,
    unless ``nonfinite`` says otherwise)."""
    return StabilityResult(
        status=status,  # type: ignore[arg-type]
        zeta_value=zeta,
        raw_jar=None,
        smoothed_jar=None,
        confidence=1.0,
        step=step,
        nonfinite=(0 if math.isfinite(zeta) else 1) if nonfinite is None else nonfinite,
    )
