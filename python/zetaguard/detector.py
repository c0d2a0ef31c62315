"""From engine sums to a calibrated score: ``raw_jar``, ``smoothed_jar`` and ``zeta_value``.

JAR as specified (``||j|| / (||a|| + eps)``) is computed exactly and reported (``raw_jar``,
``smoothed_jar``), but it is not the decision rule: healthy noisy training already sits near
JAR 1.3-1.7 and a diverging run can sit below 1 (JAR is scale-invariant). On the scenario
suite (``benchmarks/detection``) a JAR-excess channel was the source of nearly every false
alarm and caught nothing another channel had not caught first, so it is not part of zeta.

The status is decided on ``zeta_value = sqrt(2) * max(channel scores)``: a score of 0.5 puts
zeta at the default drift threshold (0.707), a score of 1.0 at the default snap threshold
(1.414). Non-finite parameters, loss or gradient norm give ``inf``. The channels:

* ``loss`` and ``grad`` (when given): ``(log(value) - m) / (log(R) + NOISE_SIGMAS * d)``,
  where ``m`` is a tracked baseline of ``log(value)`` and ``d`` the channel's own noise (mean
  absolute deviation of the log). Both are learned as plain means over warm-up, then followed
  at rate ``TRACK_RATE`` while every score is below 0.5 (a tenth of it below 1.0, not at all
  above), so an excursion is never learned as normal. Score 1: the value is R times its
  baseline plus a noise margin. The loss baseline is floored at ``LOSS_FLOOR`` x the first
  loss, so jitter on a loss that is already near zero is not danger.
* ``update`` and ``accel``: ``||v||`` and ``||a||`` scored the same way but *gated*: growth of
  the update size alone is not danger (an LR warm-up grows it by orders of magnitude while the
  loss falls). The gate is 0 while the loss is clearly falling (its short average is below the
  long one by more than ``2 * GATE_MARGIN`` in log units), 1 while it falls by less than
  ``GATE_MARGIN``, linear in between; without a loss the gradient norm's trend gates; with neither the gate is open.
* ``growth``: how fast the parameter norm grows, ``g`` = the exponential average (rate
  ``GROWTH_RATE``) of the per-step change of ``log||x||``, against its mean size over warm-up
  (at least ``GROWTH_FLOOR``): ``log(g / base) / log(GROWTH_RATIO)``. Runaway learning rates
  and exploding gradients inflate the weights at an accelerating rate tens of steps before
  the loss turns; healthy runs (warm-up schedules included) grow them at a steady or slowing
  rate.
* ``loss_start`` and ``param``: loss against the first loss, parameter norm against its first
  value (fixed references: they catch a run unstable from its first step, which would teach any
  warm-up calibration that the blow-up is normal).

Calibration never looks at the user's thresholds, so the zeta sequence is the same whatever
they are: raising ``snap_threshold`` can only remove CRITICALs, lowering ``drift_threshold``
can only add DRIFTs.

The rule runs in C++ (``cpp/src/detector.cpp``, bound as ``zetaguard._core.Detector``): per step
it is a handful of scalar operations per group, independent of model size, and costs a few
microseconds where NumPy on arrays of a few elements cost tens. ``tests/support/reference_detector.py``
states the same rule in NumPy and the tests hold the two together.

``calibration="none"`` gives the literal rule of the specification instead: ``zeta_value = smoothed_jar``
compared with the same fixed thresholds.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from zetaguard import _core

# Observation lives with the result types (the StabilityResult holds it); named here too.
from zetaguard.results import Observation as Observation

Calibration = Literal["auto", "none"]

_CONSTANTS: dict[str, Any] = _core.detector_constants()
# Critical ratio R of each channel against its baseline: at R x baseline (plus the noise margin)
# a channel scores 1.0 (zeta 1.414); at sqrt(R) x, 0.5 (zeta 0.707).
CRITICAL_RATIO: dict[str, float] = dict(_CONSTANTS["critical_ratio"])
NOISE_SIGMAS: float = _CONSTANTS["noise_sigmas"]
TRACK_RATE: float = _CONSTANTS["track_rate"]
LOSS_FLOOR: float = _CONSTANTS["loss_floor"]
GATE_FAST: float = _CONSTANTS["gate_fast"]
GATE_SLOW: float = _CONSTANTS["gate_slow"]
GATE_MARGIN: float = _CONSTANTS["gate_margin"]
GROWTH_RATE: float = _CONSTANTS["growth_rate"]
GROWTH_FLOOR: float = _CONSTANTS["growth_floor"]
GROWTH_RATIO: float = _CONSTANTS["growth_ratio"]
MIN_CALIBRATION_SAMPLES: int = _CONSTANTS["min_calibration_samples"]
SQRT2 = math.sqrt(2.0)


class Detector:
    """Turns per-group engine sums into a status. Knows no framework.

    :meth:`observe` returns one :class:`Observation`, which the guard's
    :class:`zetaguard.StabilityResult` wraps (``observe_tuple`` is the same result as a plain
    tuple, for benchmarks that time the bare rule).
    """

    def __init__(
        self,
        *,
        drift_threshold: float,
        snap_threshold: float,
        alpha: float,
        warmup_steps: int,
        calibration: Calibration = "auto",
    ) -> None:
        self._core = _core.Detector(
            float(drift_threshold),
            float(snap_threshold),
            float(alpha),
            int(warmup_steps),
            calibration,
        )
        self.observe_tuple = self._core.observe

    @property
    def drift_threshold(self) -> float:
        return float(self._core.drift_threshold)

    @property
    def snap_threshold(self) -> float:
        return float(self._core.snap_threshold)

    @property
    def alpha(self) -> float:
        return float(self._core.alpha)

    @property
    def warmup_steps(self) -> int:
        return int(self._core.warmup_steps)

    @property
    def calibration(self) -> Calibration:
        return cast(Calibration, self._core.calibration)

    @property
    def steps(self) -> int:
        return int(self._core.steps)

    @property
    def in_warmup(self) -> bool:
        return bool(self._core.in_warmup)

    def confidence(self) -> float:
        """0 before any JAR exists; rises to 0.8 across warm-up; then approaches 1."""
        return float(self._core.confidence())

    def reset(self) -> None:
        self._core.reset()

    def restart_trajectory(self) -> None:
        """After a rollback: forget the smoothed JAR and the growth average (they describe the
        blow-up just undone), keep the calibration."""
        self._core.restart_trajectory()

    def checkpoint(self) -> None:
        """Keep the state, so that :meth:`rollback` can undo the next observation (the tiered
        pipeline scores a step again on full data when the cheap tier reaches DRIFT)."""
        self._core.checkpoint()

    def rollback(self) -> None:
        """Put back the state :meth:`checkpoint` kept."""
        self._core.rollback()

    def observe(
        self,
        rows: npt.NDArray[np.float64],
        history: int,
        *,
        loss: float | None = None,
        grad_norm: float | None = None,
    ) -> Observation:
        """Score one step. ``rows`` holds one row per group: x2, v2, a2, j2, nonfinite;
        ``history`` is how many snapshots the engine held before this one. The observation's
        ``channels`` list the scores too, as ``score_<name>``."""
        return Observation(*self._core.observe(rows, history, loss, grad_norm))

    def set_reference(self, param_norm: float) -> bool:
        """Take ``param_norm`` (the weights before the first update) as the parameter norm's
        fixed reference and the growth channel's starting point, instead of the norm at the
        first observed step, when that step carried the first update already. Only before the
        first observation; returns whether it was taken."""
        if self.steps > 0 or not (math.isfinite(param_norm) and param_norm > 0):
            return False
        state = self.state_dict()
        state["first_param_norm"] = float(param_norm)
        state["last_log_norm"] = math.log(param_norm)
        self.load_state_dict(state)
        return True

    # ---- persistence (plain JSON-able values) ------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return dict(self._core.get_state())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._core.set_state(state)
