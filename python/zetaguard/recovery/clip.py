"""The gradient-clipping advice and the pre-step veto, from the recent history of healthy values.

Clip rule (``recommended_clip_value``): over the last ``CLIP_WINDOW`` finite, positive gradient
norms, on the log scale, ``exp(median + CLIP_SIGMAS * max(1.4826 * MAD, MIN_LOG_SPREAD))``,
i.e. about 3 robust standard deviations above the typical norm. Unlike ZClip's EMA mean and
variance (arXiv 2504.02507: clip at ``mean + 2.5 std``), median and MAD are not dragged up by the
spikes they are meant to catch, and the log scale suits a quantity that is positive and
multiplicative. ``None`` until ``CLIP_MIN_SAMPLES`` norms exist.

Skip rule (``skip_reason``): veto the step when the loss or gradient norm is non-finite, or above
``ratio`` times the median of the recent finite values (the ladder sets the ratios; the same
robust-baseline idea as the OLMo skip-step optimizer, which uses mean + 6 std over 128 values).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

CLIP_WINDOW = 200
CLIP_MIN_SAMPLES = 20
CLIP_SIGMAS = 3.0
MIN_LOG_SPREAD = 0.1  # a floor on the log-scale spread, so perfectly steady norms are not clipped
SKIP_MIN_SAMPLES = 10


class RobustHistory:
    """The last ``CLIP_WINDOW`` finite positive values of one signal, with its log-scale median
    and spread recomputed every ``REFRESH`` new values (the baseline moves slowly; this keeps the
    per-step cost to an append)."""

    REFRESH = 8

    def __init__(self) -> None:
        self.logs: deque[float] = deque(maxlen=CLIP_WINDOW)
        self._stale = 0
        self._median: float | None = None
        self._spread = 0.0

    def append(self, value: float | None) -> None:
        if value is None or not math.isfinite(value) or value <= 0.0:
            return
        self.logs.append(math.log(value))
        self._stale += 1

    def __len__(self) -> int:
        return len(self.logs)

    def _refresh(self) -> None:
        if self._median is None or self._stale >= self.REFRESH:
            # Sorted lists, not np.median: the same numbers (np.median of an even count is the
            # mean of the middle two), at about half the cost on a few hundred values.
            logs = sorted(self.logs)
            median = _middle(logs)
            self._median = median
            self._spread = 1.4826 * _middle(sorted([abs(x - median) for x in logs]))
            self._stale = 0

    def median(self, min_samples: int) -> float | None:
        if len(self.logs) < min_samples:
            return None
        self._refresh()
        assert self._median is not None
        return math.exp(self._median)

    def state(self) -> dict[str, Any]:
        """Everything the next decisions depend on, cached median included (JSON-able)."""
        return {
            "logs": list(self.logs),
            "stale": self._stale,
            "median": self._median,
            "spread": self._spread,
        }

    @classmethod
    def from_state(cls, saved: Mapping[str, Any]) -> RobustHistory:
        """The inverse of :meth:`state`; raises ``KeyError``/``TypeError``/``ValueError`` on a
        malformed entry."""
        history = cls()
        history.logs.extend(float(v) for v in saved["logs"])
        history._stale = int(saved["stale"])
        median = saved["median"]
        history._median = None if median is None else float(median)
        history._spread = float(saved["spread"])
        return history

    def clip_value(self) -> float | None:
        if len(self.logs) < CLIP_MIN_SAMPLES:
            return None
        self._refresh()
        assert self._median is not None
        return math.exp(self._median + CLIP_SIGMAS * max(self._spread, MIN_LOG_SPREAD))


def _middle(ordered: list[float]) -> float:
    """The median of a sorted, non-empty list."""
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def recommended_clip_value(grad_norms: Sequence[float]) -> float | None:
    """The clip rule over a sequence of gradient norms (the newest last)."""
    history = RobustHistory()
    for g in list(grad_norms)[-CLIP_WINDOW:]:
        history.append(g)
    return history.clip_value()


def skip_reason(
    loss: float | None,
    grad_norm: float | None,
    losses: RobustHistory,
    grad_norms: RobustHistory,
    *,
    loss_ratio: float | None,
    grad_ratio: float | None,
) -> str | None:
    """Why this step should be skipped, or None to let it land."""
    if loss is not None and not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    if grad_norm is not None and grad_ratio is not None:
        base = grad_norms.median(SKIP_MIN_SAMPLES)
        if base is not None and grad_norm > grad_ratio * base:
            return f"gradient norm {grad_norm:.4g} > {grad_ratio:g} x recent median {base:.4g}"
    if loss is not None and loss_ratio is not None:
        base = losses.median(SKIP_MIN_SAMPLES)
        if base is not None and loss > loss_ratio * base:
            return f"loss {loss:.4g} > {loss_ratio:g} x recent median {base:.4g}"
    return None
