"""Result types returned by :class:`zetaguard.ZetaGuard`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from zetaguard import _core

Status = Literal["STABLE", "DRIFT", "CRITICAL"]
STATUSES: tuple[Status, ...] = ("STABLE", "DRIFT", "CRITICAL")

# The epsilon of JAR as specified, ||j|| / (||a|| + eps): the engine's own constant.
JAR_EPS: float = _core.detector_constants()["jar_eps"]

_Norm = TypeVar("_Norm", float, "npt.NDArray[np.float64]")


def jar(j_norm: _Norm, a_norm: _Norm) -> _Norm:
    """JAR as specified, ``||j|| / (||a|| + eps)``, from the two norms (floats or arrays)."""
    return j_norm / (a_norm + JAR_EPS)


def status_for(zeta: float, drift_threshold: float, snap_threshold: float) -> Status:
    """The status a zeta value maps to: CRITICAL at or above the snap threshold (and for NaN),
    DRIFT at or above the drift threshold, STABLE below."""
    if math.isnan(zeta) or zeta >= snap_threshold:
        return "CRITICAL"
    if zeta >= drift_threshold:
        return "DRIFT"
    return "STABLE"


@dataclass(frozen=True)
class GroupResult:
    """One monitored group (a tensor, a layer, or a user-defined set of tensors)."""

    name: str
    status: Status
    zeta_value: float
    raw_jar: float | None
    update_norm: float | None
    param_norm: float
    update_ratio: float | None
    nonfinite: int


@dataclass(slots=True)
class StabilityResult:
    """What one ``monitor()`` call saw.

    ``raw_jar`` is the specified jerk-to-acceleration ratio (JAR) ``||j|| / (||a|| + eps)`` over all
    monitored parameters (``None`` until three earlier snapshots exist); ``smoothed_jar`` its
    exponential average; ``zeta_value`` the calibrated score the status is decided on (see
    ``docs/detection.md``); ``confidence`` how much calibration stands behind the status (0..1).
    """

    status: Status
    zeta_value: float
    raw_jar: float | None
    smoothed_jar: float | None
    confidence: float
    recommendations: list[str] = field(default_factory=list)
    timestamp: float = field(default_factory=time.time)
    step: int = 0
    channels: dict[str, float] = field(default_factory=dict)
    nonfinite: int = 0
    in_warmup: bool = True
    _group_names: tuple[str, ...] = field(default=(), repr=False)
    # What the adapter knows the modules are (Snapshot.module_types), for layer labels.
    _module_types: Mapping[str, str] | None = field(default=None, repr=False)
    _group_rows: npt.NDArray[np.float64] | None = field(default=None, repr=False)
    _group_zeta: npt.NDArray[np.float64] | None = field(default=None, repr=False)
    _thresholds: tuple[float, float] = field(default=(0.707, 1.414), repr=False)
    _history: int = field(default=3, repr=False)

    @property
    def is_stable(self) -> bool:
        return self.status == "STABLE"

    # Read-only views of the per-group numbers, for the run store and for tests.

    @property
    def group_names(self) -> tuple[str, ...]:
        """The monitored groups (layers), in the order of :attr:`group_rows`."""
        return self._group_names

    @property
    def module_types(self) -> Mapping[str, str] | None:
        """What the adapter knows each module is (``"Linear 128->10"``), for layer labels."""
        return self._module_types

    @property
    def group_rows(self) -> npt.NDArray[np.float64] | None:
        """The engine's float64 sums per group: ``||x||^2, ||v||^2, ||a||^2, ||j||^2`` and the
        non-finite count (None when no group was scored)."""
        return self._group_rows

    @property
    def group_zeta(self) -> npt.NDArray[np.float64] | None:
        """Each group's zeta, in the order of :attr:`group_names`."""
        return self._group_zeta

    @property
    def history(self) -> int:
        """Earlier snapshots the differences had (0-3): ``||v||`` needs one, JAR three."""
        return self._history

    @property
    def groups(self) -> dict[str, GroupResult]:
        """Per-group results, built on first access (monitoring itself never pays for them)."""
        rows, zetas = self._group_rows, self._group_zeta
        if rows is None or zetas is None:
            return {}
        drift, snap = self._thresholds
        out: dict[str, GroupResult] = {}
        for i, name in enumerate(self._group_names):
            x2, v2, a2, j2, nf = (float(v) for v in rows[i])
            x = math.sqrt(x2) if math.isfinite(x2) else math.inf
            v = math.sqrt(v2) if self._history >= 1 else None
            g_jar = jar(math.sqrt(j2), math.sqrt(a2)) if self._history >= 3 else None
            z = float(zetas[i])
            out[name] = GroupResult(
                name=name,
                status=status_for(z, drift, snap),
                zeta_value=z,
                raw_jar=g_jar,
                update_norm=v,
                param_norm=x,
                update_ratio=(v / x) if v is not None and x > 0 else None,
                nonfinite=int(nf),
            )
        return out

    @property
    def layers(self) -> dict[str, GroupResult]:
        """Alias of :attr:`groups`."""
        return self.groups

    @property
    def worst_group(self) -> str | None:
        """The group with the highest zeta: the one most responsible for this status."""
        zetas = self._group_zeta
        if zetas is None or len(zetas) == 0:
            return None
        clean = np.where(np.isnan(zetas), np.inf, zetas)
        return self._group_names[int(np.argmax(clean))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "zeta_value": self.zeta_value,
            "raw_jar": self.raw_jar,
            "smoothed_jar": self.smoothed_jar,
            "confidence": self.confidence,
            "recommendations": list(self.recommendations),
            "timestamp": self.timestamp,
            "channels": dict(self.channels),
            "nonfinite": self.nonfinite,
            "in_warmup": self.in_warmup,
            "worst_group": self.worst_group,
        }


@dataclass
class RecoveryReport:
    """What a recovery did. Returned by ``ZetaGuard.emergency_protocol()``."""

    step: int
    status: Status
    actions: list[str] = field(default_factory=list)
    lr_before: float | None = None
    lr_after: float | None = None
    checkpoint_path: str | None = None
    restored_step: int | None = None
    worst_group: str | None = None
    zeta_value: float = 0.0
    stopped: bool = False
    message: str = ""
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "status": self.status,
            "actions": list(self.actions),
            "lr_before": self.lr_before,
            "lr_after": self.lr_after,
            "checkpoint_path": self.checkpoint_path,
            "restored_step": self.restored_step,
            "worst_group": self.worst_group,
            "zeta_value": self.zeta_value,
            "stopped": self.stopped,
            "message": self.message,
            "timestamp": self.timestamp,
        }
