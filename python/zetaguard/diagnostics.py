"""``guard.full_diagnostics(model)``: a per-layer table of the latest monitored step.

Each row is one monitored group (a layer, a tensor, or a ``monitor_layers`` layer):

* ``jar``: the group's own jerk-to-acceleration ratio ``||j|| / (||a|| + eps)``;
* ``update_ratio``: ``||x[t] - x[t-1]|| / ||x[t]||``, the relative size of the last update;
* ``grad_ratio``: ``||grad|| / ||x[t]||`` from the model's current gradients (torch ``.grad``;
  the norm of the finite entries, the others are counted in ``nonfinite_grads``);
* ``nonfinite_params`` / ``nonfinite_grads``: NaN and Inf counts;
* ``status`` and ``zeta``: the group's calibrated score (see ``StabilityResult.groups``).

The table prints as aligned text and converts to plain dicts (``to_dicts()``) for JSON, pandas
or a logger. Nothing here imports a framework: gradients are read through the tensor methods
every torch tensor has.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from zetaguard.results import StabilityResult, Status


class DiagnosticsSource(Protocol):
    """What the table reads from a guard (``ZetaGuard`` is one)."""

    @property
    def last_result(self) -> StabilityResult | None: ...
    @property
    def monitored_names(self) -> tuple[str, ...]: ...
    @property
    def monitored_layers(self) -> dict[str, Any] | None: ...
    def group_of(self, name: str) -> str: ...


@dataclass(frozen=True)
class LayerDiagnostics:
    """One row of :class:`Diagnostics`."""

    name: str
    status: Status
    zeta: float
    jar: float | None
    update_ratio: float | None
    grad_ratio: float | None
    param_norm: float
    update_norm: float | None
    grad_norm: float | None
    nonfinite_params: int
    nonfinite_grads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS: tuple[tuple[str, str], ...] = (
    ("layer", "name"),
    ("status", "status"),
    ("zeta", "zeta"),
    ("JAR", "jar"),
    ("update/weight", "update_ratio"),
    ("grad/weight", "grad_ratio"),
    ("nonfinite p/g", ""),
)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}"


@dataclass
class Diagnostics:
    """The per-layer table returned by ``ZetaGuard.full_diagnostics``."""

    step: int
    status: Status
    zeta: float
    layers: list[LayerDiagnostics] = field(default_factory=list)

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per layer (JSON-able: str, float, int, None)."""
        return [row.to_dict() for row in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "zeta": self.zeta,
            "layers": self.to_dicts(),
        }

    def worst(self, n: int = 5) -> list[LayerDiagnostics]:
        """The ``n`` layers with the highest zeta (NaN first)."""
        return sorted(self.layers, key=lambda r: -math.inf if math.isnan(r.zeta) else -r.zeta)[:n]

    def __getitem__(self, name: str) -> LayerDiagnostics:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer named {name!r}; layers: {[r.name for r in self.layers][:8]}")

    def __len__(self) -> int:
        return len(self.layers)

    def __str__(self) -> str:
        cells = [
            [
                row.name,
                row.status,
                _fmt(row.zeta),
                _fmt(row.jar),
                _fmt(row.update_ratio),
                _fmt(row.grad_ratio),
                f"{row.nonfinite_params}/{row.nonfinite_grads}",
            ]
            for row in self.layers
        ]
        header = [title for title, _ in _COLUMNS]
        widths = [
            max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
            for i, h in enumerate(header)
        ]

        def line(values: list[str]) -> str:
            first = values[0].ljust(widths[0])
            rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        title = f"step {self.step}: {self.status} (zeta {_fmt(self.zeta)}), {len(cells)} layers"
        rule = "-" * len(line(header))
        return "\n".join([title, line(header), rule, *(line(c) for c in cells)])

    def __repr__(self) -> str:
        return f"Diagnostics(step={self.step}, status={self.status!r}, layers={len(self.layers)})"


def _grad_stats(guard: DiagnosticsSource, model: Any) -> tuple[dict[str, float], dict[str, int]]:
    """Per-group squared gradient norms and non-finite counts from a torch-like model."""
    sq: dict[str, float] = {}
    bad: dict[str, int] = {}
    if model is None:
        return sq, bad
    named_parameters = getattr(model, "named_parameters", None)
    if not callable(named_parameters):
        return sq, bad
    monitored = set(guard.monitored_names)
    # monitor_layers names parameters "<layer>.<name>": find them by identity instead.
    by_id = {id(t): n for n, t in (guard.monitored_layers or {}).items()}
    for name, p in named_parameters():
        key = by_id.get(id(p), name)
        grad = getattr(p, "grad", None)
        if key not in monitored or grad is None:
            continue
        group = guard.group_of(key)
        g = grad.detach()
        if getattr(g, "is_sparse", False):
            g = g.coalesce().values()
        g = g.double()
        finite = g.isfinite()
        sq[group] = sq.get(group, 0.0) + float(g[finite].square().sum())
        bad[group] = bad.get(group, 0) + int((~finite).sum())
    return sq, bad


def full_diagnostics(guard: DiagnosticsSource, model: Any = None) -> Diagnostics:
    """Build the per-layer table of ``guard``'s latest step (see the module docstring)."""
    result = guard.last_result
    if result is None:
        raise ValueError(
            "full_diagnostics() describes the latest monitored step: call guard.monitor(...) "
            "at least once first"
        )
    grad_sq, grad_bad = _grad_stats(guard, model)
    rows = []
    for name, g in result.groups.items():
        gsq = grad_sq.get(name)
        grad_norm = math.sqrt(gsq) if gsq is not None else None
        grad_ratio = None
        if grad_norm is not None and g.param_norm > 0 and math.isfinite(g.param_norm):
            grad_ratio = grad_norm / g.param_norm
        rows.append(
            LayerDiagnostics(
                name=name,
                status=g.status,
                zeta=g.zeta_value,
                jar=g.raw_jar,
                update_ratio=g.update_ratio,
                grad_ratio=grad_ratio,
                param_norm=g.param_norm,
                update_norm=g.update_norm,
                grad_norm=grad_norm,
                nonfinite_params=g.nonfinite,
                nonfinite_grads=grad_bad.get(name, 0),
            )
        )
    return Diagnostics(step=result.step, status=result.status, zeta=result.zeta_value, layers=rows)
