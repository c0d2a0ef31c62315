"""TensorBoard: ``ZetaBoard(writer).log_stability(guard.get_metrics(), step)``.

``writer`` is any object with TensorBoard's ``add_scalar(tag, value, global_step)``:
``torch.utils.tensorboard.SummaryWriter``, ``tensorboardX.SummaryWriter``, or a log directory (``ZetaBoard("runs/x")`` opens torch's
SummaryWriter there).

Tags: ``zetaguard/<metric>`` for the global scalars (``zeta``, ``status_level`` (0 STABLE,
1 DRIFT, 2 CRITICAL), ``raw_jar``, channels and scores) and ``zetaguard/layers/<layer>/<metric>``
for the per-layer ones, so TensorBoard groups each in its own section.
"""

from __future__ import annotations

import math
import os
from typing import Any

from zetaguard.results import STATUSES


def _open_writer(logdir: str | os.PathLike[str]) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.fspath(logdir))


class ZetaBoard:
    """Write the guard's metrics as TensorBoard scalars.

    Args:
        writer: a SummaryWriter-like object, or a log directory to open one in.
        prefix: the tag prefix.
        layers: also write the per-layer metrics.
        skip_nonfinite: TensorBoard plots NaN/Inf badly; write them as the largest float
            instead, so a blow-up shows as a spike (the ``status_level`` says CRITICAL).
    """

    def __init__(
        self,
        writer: Any,
        *,
        prefix: str = "zetaguard",
        layers: bool = True,
        skip_nonfinite: bool = True,
    ) -> None:
        if isinstance(writer, (str, os.PathLike)):
            writer = _open_writer(writer)
        if not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(
                f"ZetaBoard needs a writer with add_scalar(tag, value, step) (a SummaryWriter) "
                f"or a log directory, got {type(writer).__name__}"
            )
        self.writer = writer
        self.prefix = prefix.rstrip("/")
        self.layers = layers
        self.skip_nonfinite = skip_nonfinite

    def tag(self, key: str) -> str:
        """The TensorBoard tag of a ``get_metrics()`` key."""
        if key.startswith("group/"):
            return f"{self.prefix}/layers/{key[len('group/') :]}"
        return f"{self.prefix}/{key}"

    def log_stability(self, metrics: dict[str, float], step: int) -> int:
        """Write one step of ``guard.get_metrics()``; returns how many scalars were written."""
        written = 0
        for key, value in metrics.items():
            if key == "step" or (not self.layers and key.startswith("group/")):
                continue
            v = float(value)
            if self.skip_nonfinite and not math.isfinite(v):
                v = math.copysign(3.4e38, v) if not math.isnan(v) else 3.4e38
            self.writer.add_scalar(self.tag(key), v, int(step))
            written += 1
        return written

    def log_result(self, result: Any, step: int | None = None) -> None:
        """Write a :class:`StabilityResult` as text too (status and recommendations)."""
        at = result.step if step is None else int(step)
        self.writer.add_scalar(
            f"{self.prefix}/status_level", float(STATUSES.index(result.status)), at
        )
        add_text = getattr(self.writer, "add_text", None)
        if callable(add_text) and result.status != "STABLE":
            lines = [f"**{result.status}** zeta={result.zeta_value:.3g}", *result.recommendations]
            add_text(f"{self.prefix}/events", "\n\n".join(lines), at)

    def flush(self) -> None:
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()
