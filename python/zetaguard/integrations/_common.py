"""What the framework callbacks share: which metrics go to loggers, and how to name them."""

from __future__ import annotations

from typing import Any

from zetaguard.guard import ZetaGuard


def resolve_guard(guard: ZetaGuard | None, guard_kwargs: dict[str, Any]) -> ZetaGuard:
    """The guard a callback uses: the one given, or one built from ``guard_kwargs``."""
    if guard is not None and guard_kwargs:
        raise TypeError(
            f"pass either a guard or ZetaGuard arguments, not both (got {sorted(guard_kwargs)})"
        )
    return guard if guard is not None else ZetaGuard(**guard_kwargs)


def logged_metrics(
    guard: ZetaGuard, *, prefix: str = "zetaguard/", layers: bool = False
) -> dict[str, float]:
    """The guard's latest metrics for a logger: global scalars always, per-group ones when
    ``layers`` (they grow with the model). The guard's own step counter is left out: every
    logger has its own."""
    out: dict[str, float] = {}
    for key, value in guard.get_metrics().items():
        if key == "step" or (not layers and key.startswith("group/")):
            continue
        out[prefix + key] = float(value)
    return out


def loss_value(outputs: Any) -> float | None:
    """The loss in what a training step returned: a tensor, a number, or a dict with "loss"."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if outputs is None:
        return None
    detach = getattr(outputs, "detach", None)
    value = detach() if callable(detach) else outputs
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
