"""From engine sums to a calibrated score: ``raw_jar``, ``smoothed_jar`` and ``zeta_value``.

The seed's JAR (``||j|| / (||a|| + eps)``) is computed exactly and reported, but it is not the
decision rule: healthy noisy training already sits near JAR 1.3-1.7 and a diverging run can sit
below 1 (JAR is scale-invariant). The status is decided on ``zeta_value``, a calibrated score:

* each *channel* is a quantity whose healthy level the guard learns during warm-up (update
  norm ``||v||``, acceleration norm ``||a||``, gradient norm, loss) or knows from the first step
  (parameter norm ``||x||``, first loss), plus the smoothed JAR against its warm-up spread;
* a channel's *score* is 1.0 at its critical level and 0.5 at its drift level. For magnitude
  channels the score is ``log(value / baseline) / log(R)``: a channel at R times its baseline
  scores 1, at sqrt(R) times 0.5;
* ``zeta_value = sqrt(2) * max(score)``, so the seed's thresholds keep a meaning:
  ``zeta >= 1.414`` (snap) means some channel reached its critical level, ``zeta >= 0.707``
  (drift) that one reached half of it on the log scale. Non-finite values give ``inf``.

``calibration="none"`` gives the seed-literal rule instead: ``zeta_value = smoothed_jar``
compared with the same fixed thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from zetaguard.results import JAR_EPS, Status, status_for

Calibration = Literal["auto", "none"]
SQRT2 = math.sqrt(2.0)

# Critical ratio R of each magnitude channel against its baseline: a channel at R x baseline
# scores 1.0 (zeta 1.414), at sqrt(R) x baseline 0.5 (zeta 0.707).
CRITICAL_RATIO: dict[str, float] = {
    "update": 10.0,  # ||v|| against its warm-up level
    "accel": 10.0,  # ||a|| against its warm-up level
    "grad": 10.0,  # gradient norm against its warm-up level
    "loss": 4.0,  # loss against its warm-up level
    "loss_start": 4.0,  # loss against the first loss seen (catches runs unstable from step 0)
    "param": 4.0,  # ||x|| against its value at the first step
}
# Smoothed JAR: score 1.0 this many warm-up standard deviations above the warm-up mean.
JAR_CRITICAL_SIGMAS = 8.0
JAR_MIN_SIGMA = 0.05
# After warm-up, baselines follow the trajectory on the log scale at this rate per STABLE step,
# so slow healthy change (decaying LR, growing weights) does not read as drift.
BASELINE_RATE = 0.01
# Warm-up samples needed before a magnitude channel scores at all.
MIN_CALIBRATION_SAMPLES = 5


def _log_score(value: float | None, baseline: float | None, ratio: float) -> float:
    if value is None or baseline is None or baseline <= 0.0 or value <= 0.0:
        return 0.0
    return max(0.0, math.log(value / baseline) / math.log(ratio))


@dataclass
class Observation:
    status: Status
    zeta_value: float
    raw_jar: float | None
    smoothed_jar: float | None
    confidence: float
    channels: dict[str, float]
    scores: dict[str, float]
    group_zeta: npt.NDArray[np.float64]
    nonfinite: int
    in_warmup: bool


@dataclass
class _Baselines:
    """Log-scale baselines of the magnitude channels (None until learned)."""

    log: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    jar: list[float] = field(default_factory=list)
    jar_mean: float | None = None
    jar_sigma: float | None = None


class Detector:
    """Turns per-group engine sums into a status. Pure NumPy; knows no framework."""

    def __init__(
        self,
        *,
        drift_threshold: float,
        snap_threshold: float,
        alpha: float,
        warmup_steps: int,
        calibration: Calibration = "auto",
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 < drift_threshold <= snap_threshold:
            raise ValueError(
                "thresholds must satisfy 0 < drift_threshold <= snap_threshold, got "
                f"drift={drift_threshold}, snap={snap_threshold}"
            )
        if calibration not in ("auto", "none"):
            raise ValueError(f"calibration must be 'auto' or 'none', got {calibration!r}")
        self.drift_threshold = drift_threshold
        self.snap_threshold = snap_threshold
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.calibration: Calibration = calibration
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.smoothed_jar: float | None = None
        self.first_param_norm: float | None = None
        self.first_loss: float | None = None
        self.group_first_norm: npt.NDArray[np.float64] | None = None
        self.group_log_update: npt.NDArray[np.float64] | None = None
        self.group_samples: list[npt.NDArray[np.float64]] = []
        self.base = _Baselines()

    @property
    def in_warmup(self) -> bool:
        return self.steps < self.warmup_steps

    def confidence(self) -> float:
        """0 before any JAR exists; rises to 0.8 across warm-up; then approaches 1."""
        if self.calibration == "none":
            return 1.0 if self.steps >= 4 else 0.0
        if self.warmup_steps == 0:
            return 1.0
        done = min(1.0, self.steps / self.warmup_steps)
        after = max(0, self.steps - self.warmup_steps)
        return 0.8 * done + 0.2 * (1.0 - math.exp(-after / self.warmup_steps))

    # ---- the step ----------------------------------------------------------------------

    def observe(
        self,
        rows: npt.NDArray[np.float64],
        history: int,
        *,
        loss: float | None = None,
        grad_norm: float | None = None,
    ) -> Observation:
        """Score one step. ``rows`` holds one row per group: x2, v2, a2, j2, nonfinite;
        ``history`` is how many snapshots the engine held before this one."""
        self.steps += 1
        totals = rows.sum(axis=0) if len(rows) else np.zeros(5)
        x2, v2, a2, j2, nf = (float(t) for t in totals)
        nonfinite = int(nf)
        bad = (
            nonfinite > 0
            or not math.isfinite(x2)
            or (loss is not None and not math.isfinite(loss))
            or (grad_norm is not None and not math.isfinite(grad_norm))
        )
        x = math.sqrt(x2) if math.isfinite(x2) else math.inf
        v = math.sqrt(v2) if history >= 1 and math.isfinite(v2) else None
        a = math.sqrt(a2) if history >= 2 and math.isfinite(a2) else None
        raw_jar: float | None = None
        if history >= 3:
            raw_jar = math.sqrt(j2) / (math.sqrt(a2) + JAR_EPS) if not bad else math.nan
        if raw_jar is not None and math.isfinite(raw_jar):
            self.smoothed_jar = (
                raw_jar
                if self.smoothed_jar is None
                else self.alpha * raw_jar + (1.0 - self.alpha) * self.smoothed_jar
            )
        channels = {"param_norm": x}
        if v is not None:
            channels["update_norm"] = v
        if a is not None:
            channels["accel_norm"] = a
        if grad_norm is not None:
            channels["grad_norm"] = grad_norm
        if loss is not None:
            channels["loss"] = loss

        if bad:
            group_zeta = np.full(len(rows), 0.0)
            if len(rows):
                group_zeta[~np.isfinite(rows).all(axis=1) | (rows[:, 4] > 0)] = math.inf
            return self._result(math.inf, raw_jar, channels, {"nonfinite": math.inf},
                                group_zeta, nonfinite)

        if self.calibration == "none":
            zeta = self.smoothed_jar if self.smoothed_jar is not None else 0.0
            group_zeta = self._group_raw_jar(rows, history)
            return self._result(zeta, raw_jar, channels, {"jar": zeta}, group_zeta, 0)

        if self.first_param_norm is None and x > 0:
            self.first_param_norm = x
        if self.first_loss is None and loss is not None and loss > 0:
            self.first_loss = loss
        values = {"update": v, "accel": a, "grad": grad_norm, "loss": loss}
        scores = self._scores(x, values, loss)
        zeta = SQRT2 * max(scores.values(), default=0.0)
        group_zeta = self._group_scores(rows, history)
        status = status_for(zeta, self.drift_threshold, self.snap_threshold)
        self._learn(values, status)
        return self._result(zeta, raw_jar, channels, scores, group_zeta, 0)

    # ---- scoring -----------------------------------------------------------------------

    def _scores(self, x: float, values: dict[str, float | None], loss: float | None) -> dict[str, float]:
        scores = {
            "param": _log_score(x, self.first_param_norm, CRITICAL_RATIO["param"]),
            "loss_start": _log_score(loss, self.first_loss, CRITICAL_RATIO["loss_start"]),
        }
        for name, value in values.items():
            base = self._baseline(name)
            if base is not None:
                scores[name] = _log_score(value, base, CRITICAL_RATIO[name])
        if (
            not self.in_warmup
            and self.smoothed_jar is not None
            and self.base.jar_mean is not None
            and self.base.jar_sigma is not None
        ):
            excess = (self.smoothed_jar - self.base.jar_mean) / (
                JAR_CRITICAL_SIGMAS * self.base.jar_sigma
            )
            scores["jar"] = max(0.0, excess)
        return scores

    def _baseline(self, name: str) -> float | None:
        if name in self.base.log:
            return math.exp(self.base.log[name])
        samples = self.base.samples.get(name, [])
        if len(samples) >= MIN_CALIBRATION_SAMPLES:
            return math.exp(float(np.median(samples)))  # provisional, during warm-up
        return None

    def _learn(self, values: dict[str, float | None], status: Status) -> None:
        if self.in_warmup or not self.base.log:
            for name, value in values.items():
                if value is not None and value > 0:
                    self.base.samples.setdefault(name, []).append(math.log(value))
            if self.smoothed_jar is not None:
                self.base.jar.append(self.smoothed_jar)
            if not self.in_warmup:
                self._freeze_warmup()
            return
        if status != "STABLE":
            return
        for name, value in values.items():
            if value is not None and value > 0 and name in self.base.log:
                self.base.log[name] += BASELINE_RATE * (math.log(value) - self.base.log[name])

    def _freeze_warmup(self) -> None:
        for name, samples in self.base.samples.items():
            if samples:
                self.base.log[name] = float(np.median(samples))
        if len(self.base.jar) >= 2:
            jar = np.asarray(self.base.jar)
            self.base.jar_mean = float(np.median(jar))
            mad = float(np.median(np.abs(jar - self.base.jar_mean))) * 1.4826
            self.base.jar_sigma = max(mad, JAR_MIN_SIGMA)
        if not self.base.log:
            self.base.log["_frozen"] = 0.0  # warm-up saw no defined channel; mark it done

    def _group_raw_jar(self, rows: npt.NDArray[np.float64], history: int) -> npt.NDArray[np.float64]:
        if history < 3 or len(rows) == 0:
            return np.zeros(len(rows))
        return np.sqrt(rows[:, 3]) / (np.sqrt(rows[:, 2]) + JAR_EPS)

    def _group_scores(self, rows: npt.NDArray[np.float64], history: int) -> npt.NDArray[np.float64]:
        """Per-group zeta from the group's own parameter and update norms."""
        if len(rows) == 0:
            return np.zeros(0)
        norms = np.sqrt(rows[:, 0])
        if self.group_first_norm is None or len(self.group_first_norm) != len(rows):
            self.group_first_norm = np.where(norms > 0, norms, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            param = np.log(norms / self.group_first_norm) / math.log(CRITICAL_RATIO["param"])
            score = np.nan_to_num(np.maximum(param, 0.0), nan=0.0)
            if history >= 1:
                log_update = np.log(np.sqrt(rows[:, 1]))
                if self.in_warmup:
                    self.group_samples.append(log_update)
                elif self.group_log_update is None and self.group_samples:
                    self.group_log_update = np.median(np.vstack(self.group_samples), axis=0)
                    self.group_samples = []
                if self.group_log_update is not None:
                    upd = (log_update - self.group_log_update) / math.log(CRITICAL_RATIO["update"])
                    score = np.maximum(score, np.nan_to_num(upd, nan=0.0, neginf=0.0))
        return np.asarray(SQRT2 * score, dtype=np.float64)

    def _result(
        self,
        zeta: float,
        raw_jar: float | None,
        channels: dict[str, float],
        scores: dict[str, float],
        group_zeta: npt.NDArray[np.float64],
        nonfinite: int,
    ) -> Observation:
        return Observation(
            status=status_for(zeta, self.drift_threshold, self.snap_threshold),
            zeta_value=zeta,
            raw_jar=raw_jar,
            smoothed_jar=self.smoothed_jar,
            confidence=self.confidence(),
            channels=channels,
            scores=scores,
            group_zeta=group_zeta,
            nonfinite=nonfinite,
            in_warmup=self.in_warmup,
        )

    # ---- persistence (plain JSON-able values; arrays go beside them) --------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "smoothed_jar": self.smoothed_jar,
            "first_param_norm": self.first_param_norm,
            "first_loss": self.first_loss,
            "base_log": dict(self.base.log),
            "base_samples": {k: list(v) for k, v in self.base.samples.items()},
            "base_jar": list(self.base.jar),
            "jar_mean": self.base.jar_mean,
            "jar_sigma": self.base.jar_sigma,
            "group_first_norm": None
            if self.group_first_norm is None
            else [float(v) for v in self.group_first_norm],
            "group_log_update": None
            if self.group_log_update is None
            else [float(v) for v in self.group_log_update],
            "group_samples": [[float(v) for v in s] for s in self.group_samples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.smoothed_jar = state["smoothed_jar"]
        self.first_param_norm = state["first_param_norm"]
        self.first_loss = state["first_loss"]
        self.base = _Baselines(
            log=dict(state["base_log"]),
            samples={k: list(v) for k, v in state["base_samples"].items()},
            jar=list(state["base_jar"]),
            jar_mean=state["jar_mean"],
            jar_sigma=state["jar_sigma"],
        )
        gfn, glu = state["group_first_norm"], state["group_log_update"]
        self.group_first_norm = None if gfn is None else np.asarray(gfn, dtype=np.float64)
        self.group_log_update = None if glu is None else np.asarray(glu, dtype=np.float64)
        self.group_samples = [np.asarray(s, dtype=np.float64) for s in state["group_samples"]]
