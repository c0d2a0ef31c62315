"""Argument checks shared by the public API: refuse, never coerce.

``float("0.5")``, ``int(2.7)`` and ``bool("no")`` all succeed in Python, so a guard built from
a mistyped config silently ran with settings nobody asked for (``auto_recover="no"`` is
truthy). These helpers accept only values of the documented type and name the argument, the
value and the fix in the error.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

# A run name names a directory under the run directory (zetaguard.store uses the same rule).
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_TEXT = (str, bytes, bytearray, memoryview)


def _kind(value: Any) -> str:
    return type(value).__name__


def real(value: Any, name: str) -> float:
    """A real number (int, float, NumPy scalar), not a string or a bool, and not NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({_kind(value)})")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must be a number, got NaN")
    return out


def integer(value: Any, name: str, minimum: int | None = None) -> int:
    """An integer (int or NumPy integer), not a float, string or bool, at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = f"; pass {int(value)}" if isinstance(value, float) and value.is_integer() else ""
        raise TypeError(f"{name} must be an integer, got {value!r} ({_kind(value)}){hint}")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def boolean(value: Any, name: str) -> bool:
    """True or False (or a NumPy bool); ``"no"`` or ``0`` are refused rather than read."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({_kind(value)})")


def check_run_name(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not RUN_NAME.match(value):
        raise ValueError(
            f"run_name {value!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (it names a directory)"
        )
    return value


def as_float(value: Any, what: str) -> float | None:
    """A loss or gradient norm handed to ``monitor()``: a number or a 0-d tensor, or None.
    Strings are refused like any other non-number (``float("nan")`` would read one)."""
    if value is None or type(value) is float:
        return value
    if isinstance(value, _TEXT):
        raise TypeError(f"{what} must be a number or a 0-d tensor, got {_kind(value)} {value!r}")
    detach = getattr(value, "detach", None)  # a loss tensor that still requires grad
    if callable(detach):
        value = detach()
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a number or a 0-d tensor, got {_kind(value)}") from e


def choice(value: Any, name: str, allowed: tuple[str, ...]) -> None:
    """``value`` must be one of ``allowed`` (``ValueError`` naming them otherwise)."""
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"{name} must be {options}, got {value!r}")


def guard_arguments(
    *,
    drift_threshold: Any,
    snap_threshold: Any,
    alpha: Any,
    warmup_steps: Any,
    auto_recover: Any,
    sketch_buckets: Any,
    exact_memory_budget: Any,
    threads: Any,
    run_name: Any,
    seed: Any,
    snapshot_interval: Any,
    snapshot_memory_budget: Any,
    device: Any,
    mode: Any,
    group_by: Any,
    recovery_mode: Any,
) -> None:
    """Check ``ZetaGuard()``'s arguments before anything is built."""
    real(drift_threshold, "drift_threshold")
    real(snap_threshold, "snap_threshold")
    real(alpha, "alpha")
    integer(warmup_steps, "warmup_steps", minimum=0)
    boolean(auto_recover, "auto_recover")
    integer(sketch_buckets, "sketch_buckets", minimum=1)
    integer(exact_memory_budget, "exact_memory_budget", minimum=0)
    if threads is not None:
        integer(threads, "threads", minimum=1)
    check_run_name(run_name)
    integer(seed, "seed", minimum=0)
    integer(snapshot_interval, "snapshot_interval", minimum=1)
    integer(snapshot_memory_budget, "snapshot_memory_budget", minimum=0)
    choice(device, "device", ("auto", "cpu", "cuda"))
    choice(mode, "mode", ("auto", "exact", "sketch"))
    choice(group_by, "group_by", ("layer", "tensor", "none"))
    choice(recovery_mode, "recovery_mode", ("conservative", "balanced", "aggressive"))
