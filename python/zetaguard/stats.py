"""The run statistics a guard keeps: step counter, latest result, status counts, zeta extremes
and the recent gradient norms. Plain data: no engine, detector or guard in sight."""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from zetaguard.results import STATUSES, StabilityResult, Status

GRAD_NORMS_KEPT = 1000  # the recent gradient norms a saved state carries
_LEVEL: dict[Status, int] = {s: i for i, s in enumerate(STATUSES)}


def _grad_norms() -> deque[float]:
    return deque(maxlen=GRAD_NORMS_KEPT)


@dataclass
class RunStatistics:
    step: int = 0  # the step number the next monitor() call carries
    last: StabilityResult | None = None
    status_counts: Counter[str] = field(default_factory=Counter)
    zeta_sum: float = 0.0
    zeta_max: float = 0.0
    grad_norms: deque[float] = field(default_factory=_grad_norms)
    last_grad_norm: float | None = None
    last_loss: float | None = None

    def take_step(self, step: int | None) -> int:
        """The number of this step (``step`` when the caller gives one); advances the counter."""
        current = self.step if step is None else int(step)
        self.step = current + 1
        return current

    def book(self, result: StabilityResult, grad_norm: float | None, loss: float | None) -> None:
        self.last = result
        self.status_counts[result.status] += 1
        if math.isfinite(result.zeta_value):
            self.zeta_sum += result.zeta_value
            self.zeta_max = max(self.zeta_max, result.zeta_value)
        else:
            self.zeta_max = math.inf
        self.last_grad_norm = grad_norm
        self.last_loss = loss
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)

    def summary(self) -> dict[str, Any]:
        """Steps, status counts, mean and largest zeta (the mean over finite values)."""
        steps = sum(self.status_counts.values())
        finite_steps = steps if math.isfinite(self.zeta_max) else max(steps - 1, 0)
        return {
            "steps": steps,
            "status_counts": {s: self.status_counts.get(s, 0) for s in STATUSES},
            "zeta_mean": self.zeta_sum / finite_steps if finite_steps else 0.0,
            "zeta_max": self.zeta_max,
        }

    def to_meta(self) -> dict[str, Any]:
        """The fields a state file carries (the latest result and loss are not saved)."""
        return {
            "step": self.step,
            "status_counts": dict(self.status_counts),
            "zeta_sum": self.zeta_sum,
            "zeta_max": self.zeta_max,
            "grad_norms": list(self.grad_norms),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RunStatistics:
        """The inverse of :meth:`to_meta` (``KeyError``/``TypeError``/``ValueError`` on bad
        fields; :mod:`zetaguard.state` turns them into a refused file)."""
        return cls(
            step=int(meta["step"]),
            status_counts=Counter({str(k): int(v) for k, v in meta["status_counts"].items()}),
            zeta_sum=float(meta["zeta_sum"]),
            zeta_max=float(meta["zeta_max"]),
            grad_norms=deque((float(g) for g in meta["grad_norms"]), maxlen=GRAD_NORMS_KEPT),
        )


def flat_metrics(r: StabilityResult | None) -> dict[str, float]:
    """A result as flat scalars (``ZetaGuard.get_metrics``): global values, then
    ``group/<name>/zeta``, ``group/<name>/raw_jar`` and ``group/<name>/update_ratio``."""
    if r is None:
        return {}
    m: dict[str, float] = {
        "zeta": r.zeta_value,
        "status_level": float(_LEVEL[r.status]),
        "confidence": r.confidence,
        "step": float(r.step),
    }
    if r.raw_jar is not None:
        m["raw_jar"] = r.raw_jar
    if r.smoothed_jar is not None:
        m["smoothed_jar"] = r.smoothed_jar
    m.update({k: float(v) for k, v in r.channels.items()})
    for name, g in r.groups.items():
        m[f"group/{name}/zeta"] = g.zeta_value
        if g.raw_jar is not None:
            m[f"group/{name}/raw_jar"] = g.raw_jar
        if g.update_ratio is not None:
            m[f"group/{name}/update_ratio"] = g.update_ratio
    return m
