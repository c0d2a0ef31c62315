"""The detector's rule in plain Python and NumPy: an independent statement of the calibrated
score that ``zetaguard._core.Detector`` (C++) must reproduce. This is the implementation the
detection benchmark was tuned with; tests replay random trajectories through both and compare
every field (``tests/test_detector_reference.py``). Constants are restated here on purpose,
not imported, so a changed constant in the engine shows up as a test failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Status = Literal["STABLE", "DRIFT", "CRITICAL"]
JAR_EPS = 1e-12


def status_for(zeta: float, drift_threshold: float, snap_threshold: float) -> Status:
    if math.isnan(zeta) or zeta >= snap_threshold:
        return "CRITICAL"
    if zeta >= drift_threshold:
        return "DRIFT"
    return "STABLE"


Calibration = Literal["auto", "none"]
SQRT2 = math.sqrt(2.0)

# Critical ratio R of each channel against its baseline: at R x baseline (plus the noise margin)
# a channel scores 1.0 (zeta 1.414); at sqrt(R) x, 0.5 (zeta 0.707).
CRITICAL_RATIO: dict[str, float] = {
    "update": 10.0,  # ||v|| against its tracked level (gated)
    "accel": 10.0,  # ||a|| against its tracked level (gated)
    "grad": 10.0,  # gradient norm against its tracked level
    "loss": 3.0,  # loss against its tracked level
    "loss_start": 4.0,  # loss against the first loss
    "param": 10.0,  # ||x|| against its first value
}
TRACKED = ("update", "accel", "grad", "loss")
# The noise margin: this many mean absolute log deviations are added to log(R).
NOISE_SIGMAS = 3.0
# After warm-up, baselines follow the trajectory at this rate per step while every score is
# below 0.5, at a tenth of it below 1.0, and not at all above.
TRACK_RATE = 0.02
# The loss baseline never drops below this fraction of the first loss.
LOSS_FLOOR = 0.1
# Loss trend for the gate: short and long exponential averages of log(loss).
GATE_FAST, GATE_SLOW = 0.3, 0.03
GATE_MARGIN = 0.05
# Parameter-norm growth: the per-step change of log||x||, averaged at this rate, against its
# mean size over warm-up (never below GROWTH_FLOOR per step); critical at GROWTH_RATIO x.
GROWTH_RATE = 0.1
GROWTH_FLOOR = 5e-4
GROWTH_RATIO = 16.0
# Samples a tracked channel needs before it scores at all.
MIN_CALIBRATION_SAMPLES = 5


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


class _Track:
    """Exponential mean and mean absolute deviation of log(value)."""

    __slots__ = ("dev", "mean", "n")

    def __init__(self, mean: float = 0.0, dev: float = 0.0, n: int = 0) -> None:
        self.mean, self.dev, self.n = mean, dev, n

    def add(self, log_value: float, rate: float | None) -> None:
        self.n += 1
        r = 1.0 / self.n if rate is None else rate  # plain mean while learning
        err = log_value - self.mean if self.n > 1 else 0.0
        self.mean += r * err if self.n > 1 else log_value
        self.dev += r * (abs(err) - self.dev) if self.n > 1 else 0.0

    def score(self, log_value: float, ratio: float, floor: float = -math.inf) -> float:
        if self.n < MIN_CALIBRATION_SAMPLES:
            return 0.0
        base = max(self.mean, floor)
        return max(0.0, (log_value - base) / (math.log(ratio) + NOISE_SIGMAS * self.dev))

    def to_list(self) -> list[float]:
        return [self.mean, self.dev, float(self.n)]


class ReferenceDetector:
    """Per-group engine sums to a status, in NumPy."""

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
        self.tracks: dict[str, _Track] = {name: _Track() for name in TRACKED}
        self.trend: dict[str, list[float]] = {}  # channel -> [fast, slow] log averages
        self.last_log_norm: float | None = None
        self.growth = 0.0  # exponential average of the per-step change of log||x||
        self.growth_base: float | None = None
        self.growth_samples: list[float] = []
        self.group_first_norm: npt.NDArray[np.float64] | None = None
        self.group_log_update: npt.NDArray[np.float64] | None = None
        self.group_samples: list[npt.NDArray[np.float64]] = []

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
            return self._result(
                math.inf, raw_jar, channels, {"nonfinite": math.inf}, group_zeta, nonfinite
            )

        if self.calibration == "none":
            zeta = self.smoothed_jar if self.smoothed_jar is not None else 0.0
            group_zeta = self._group_raw_jar(rows, history)
            return self._result(zeta, raw_jar, channels, {"jar": zeta}, group_zeta, 0)

        if self.first_param_norm is None and x > 0:
            self.first_param_norm = x
        if self.first_loss is None and loss is not None and loss > 0:
            self.first_loss = loss
        logs = {
            name: math.log(value)
            for name, value in (("update", v), ("accel", a), ("grad", grad_norm), ("loss", loss))
            if value is not None and value > 0
        }
        gate = self._gate(logs)
        self._track_growth(x, history)
        scores = self._scores(x, logs, gate)
        upd = self.tracks["update"]
        if "update" in logs and upd.n >= MIN_CALIBRATION_SAMPLES:
            # how many times its tracked level the update is (what an LR cut must undo)
            channels["update_overshoot"] = math.exp(logs["update"] - upd.mean)
        zeta = SQRT2 * max(scores.values(), default=0.0)
        group_zeta = self._group_scores(rows, history, gate)
        self._learn(logs, max(scores.values(), default=0.0))
        channels["update_gate"] = gate
        return self._result(zeta, raw_jar, channels, scores, group_zeta, 0)

    # ---- scoring -----------------------------------------------------------------------

    def _gate(self, logs: dict[str, float]) -> float:
        """1 unless the loss (else the gradient norm) is clearly falling; updates the trend."""
        name = "loss" if "loss" in logs else "grad" if "grad" in logs else None
        if name is None:
            return 1.0
        value = logs[name]
        trend = self.trend.get(name)
        if trend is None:
            self.trend[name] = [value, value]
            return 1.0
        trend[0] += GATE_FAST * (value - trend[0])
        trend[1] += GATE_SLOW * (value - trend[1])
        falling = trend[1] - trend[0]  # > 0 while the loss falls
        return min(1.0, max(0.0, 1.0 - (falling - GATE_MARGIN) / GATE_MARGIN))

    def _scores(self, x: float, logs: dict[str, float], gate: float) -> dict[str, float]:
        scores: dict[str, float] = {}
        if self.first_param_norm is not None and x > 0:
            scores["param"] = max(
                0.0, math.log(x / self.first_param_norm) / math.log(CRITICAL_RATIO["param"])
            )
        if self.first_loss is not None and "loss" in logs:
            scores["loss_start"] = max(
                0.0,
                (logs["loss"] - math.log(self.first_loss)) / math.log(CRITICAL_RATIO["loss_start"]),
            )
        loss_floor = (
            math.log(LOSS_FLOOR * self.first_loss) if self.first_loss is not None else -math.inf
        )
        for name, value in logs.items():
            floor = loss_floor if name == "loss" else -math.inf
            score = self.tracks[name].score(value, CRITICAL_RATIO[name], floor)
            scores[name] = score * gate if name in ("update", "accel") else score
        if self.growth_base is not None and self.growth > self.growth_base:
            scores["growth"] = math.log(self.growth / self.growth_base) / math.log(GROWTH_RATIO)
        return scores

    def _track_growth(self, x: float, history: int) -> None:
        if x <= 0 or not math.isfinite(x):
            return
        log_norm = math.log(x)
        # history 0 after the first step means the trajectory restarted (a rollback): the
        # norm change across it is no growth.
        if self.last_log_norm is not None and history > 0:
            self.growth += GROWTH_RATE * (log_norm - self.last_log_norm - self.growth)
            if self.in_warmup:
                self.growth_samples.append(abs(self.growth))
            elif self.growth_base is None:
                mean = float(np.mean(self.growth_samples)) if self.growth_samples else 0.0
                self.growth_base = max(mean, GROWTH_FLOOR)
                self.growth_samples = []
        self.last_log_norm = log_norm

    def _learn(self, logs: dict[str, float], top_score: float) -> None:
        # Learning depends on the score, never on the user's thresholds: the zeta sequence is
        # the same whatever the thresholds, so raising snap_threshold cannot add a CRITICAL.
        if self.in_warmup:
            rate: float | None = None
        elif top_score < 0.5:
            rate = TRACK_RATE
        elif top_score < 1.0:
            rate = TRACK_RATE / 10.0
        else:
            return
        for name, value in logs.items():
            self.tracks[name].add(value, rate if self.tracks[name].n >= self.warmup_steps else None)

    def _group_raw_jar(
        self, rows: npt.NDArray[np.float64], history: int
    ) -> npt.NDArray[np.float64]:
        if history < 3 or len(rows) == 0:
            return np.zeros(len(rows))
        return np.sqrt(rows[:, 3]) / (np.sqrt(rows[:, 2]) + JAR_EPS)

    def _group_scores(
        self, rows: npt.NDArray[np.float64], history: int, gate: float
    ) -> npt.NDArray[np.float64]:
        """Per-group zeta from the group's own parameter norm and (gated) update norm."""
        if len(rows) == 0:
            return np.zeros(0)
        norms = np.sqrt(rows[:, 0])
        if self.group_first_norm is None or len(self.group_first_norm) != len(rows):
            self.group_first_norm = np.where(norms > 0, norms, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            param = np.log(norms / self.group_first_norm) / math.log(CRITICAL_RATIO["param"])
            score = np.fmax(param, 0.0)  # NaN (a zero first norm) scores 0; inf stays inf
            if history >= 1:
                log_update = np.log(np.sqrt(rows[:, 1]))
                if self.in_warmup:
                    self.group_samples.append(log_update)
                elif self.group_log_update is None and self.group_samples:
                    self.group_log_update = np.median(np.vstack(self.group_samples), axis=0)
                    self.group_samples = []
                if self.group_log_update is not None:
                    upd = (log_update - self.group_log_update) / math.log(CRITICAL_RATIO["update"])
                    if gate > 0.0:
                        score = np.fmax(score, gate * np.fmax(upd, 0.0))
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

    # ---- persistence (plain JSON-able values) ------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "smoothed_jar": self.smoothed_jar,
            "first_param_norm": self.first_param_norm,
            "first_loss": self.first_loss,
            "tracks": {name: t.to_list() for name, t in self.tracks.items()},
            "trend": {name: list(v) for name, v in self.trend.items()},
            "last_log_norm": self.last_log_norm,
            "growth": self.growth,
            "growth_base": self.growth_base,
            "growth_samples": list(self.growth_samples),
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
        self.tracks = {
            name: _Track(float(m), float(d), int(n)) for name, (m, d, n) in state["tracks"].items()
        }
        self.trend = {name: [float(f), float(s)] for name, (f, s) in state["trend"].items()}
        self.last_log_norm = state["last_log_norm"]
        self.growth = float(state["growth"])
        self.growth_base = state["growth_base"]
        self.growth_samples = [float(v) for v in state["growth_samples"]]
        gfn, glu = state["group_first_norm"], state["group_log_update"]
        self.group_first_norm = None if gfn is None else np.asarray(gfn, dtype=np.float64)
        self.group_log_update = None if glu is None else np.asarray(glu, dtype=np.float64)
        self.group_samples = [np.asarray(s, dtype=np.float64) for s in state["group_samples"]]
