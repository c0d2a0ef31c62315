"""An independent NumPy statement of the engine's math, for tests to compare against."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def channels(history: list[npt.NDArray[np.float64]]) -> dict[str, float | None]:
    """Squared norms of the newest snapshot and its finite differences.

    ``history`` lists snapshots oldest first, already widened to float64; differences that need
    more snapshots than given are None (undefined), as the engine reports them.
    """
    x = [h.astype(np.float64).ravel() for h in history[-4:]]
    out: dict[str, float | None] = {
        "x2": float(np.sum(x[-1] ** 2)),
        "v2": None,
        "a2": None,
        "j2": None,
    }
    if len(x) >= 2:
        v = x[-1] - x[-2]
        out["v2"] = float(np.sum(v**2))
    if len(x) >= 3:
        a = x[-1] - 2 * x[-2] + x[-3]
        out["a2"] = float(np.sum(a**2))
    if len(x) >= 4:
        j = x[-1] - 3 * x[-2] + 3 * x[-3] - x[-4]
        out["j2"] = float(np.sum(j**2))
    out["nonfinite"] = float(np.count_nonzero(~np.isfinite(x[-1])))
    return out


def raw_jar(history: list[npt.NDArray[np.float64]], eps: float = 1e-12) -> float | None:
    """JAR as specified, ||j|| / (||a|| + eps), over the concatenated parameters."""
    c = channels(history)
    if c["j2"] is None or c["a2"] is None:
        return None
    return float(np.sqrt(c["j2"]) / (np.sqrt(c["a2"]) + eps))
