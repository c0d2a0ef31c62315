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
from collections.abc import Sequence

import numpy as np

CLIP_WINDOW = 200
CLIP_MIN_SAMPLES = 20
CLIP_SIGMAS = 3.0
MIN_LOG_SPREAD = 0.1  # a floor on the log-scale spread, so perfectly steady norms are not clipped
SKIP_MIN_SAMPLES = 10


def _recent_logs(values: Sequence[float], window: int) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
    arr = np.asarray(values, dtype=np.float64)[-window:]
    arr = arr[np.isfinite(arr) & (arr > 0)]
    return np.log(arr)


def recommended_clip_value(grad_norms: Sequence[float]) -> float | None:
    logs = _recent_logs(grad_norms, CLIP_WINDOW)
    if len(logs) < CLIP_MIN_SAMPLES:
        return None
    med = float(np.median(logs))
    spread = 1.4826 * float(np.median(np.abs(logs - med)))
    return math.exp(med + CLIP_SIGMAS * max(spread, MIN_LOG_SPREAD))


def _median(values: Sequence[float]) -> float | None:
    logs = _recent_logs(values, CLIP_WINDOW)
    if len(logs) < SKIP_MIN_SAMPLES:
        return None
    return math.exp(float(np.median(logs)))


def skip_reason(
    loss: float | None,
    grad_norm: float | None,
    losses: Sequence[float],
    grad_norms: Sequence[float],
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
        base = _median(grad_norms)
        if base is not None and grad_norm > grad_ratio * base:
            return f"gradient norm {grad_norm:.4g} > {grad_ratio:g} x recent median {base:.4g}"
    if loss is not None and loss_ratio is not None:
        base = _median(losses)
        if base is not None and loss > loss_ratio * base:
            return f"loss {loss:.4g} > {loss_ratio:g} x recent median {base:.4g}"
    return None
