"""Result types returned by :class:`zetaguard.ZetaGuard`."""

from __future__ import annotations

import dataclasses
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


def _same(x: Any, y: Any) -> bool:
    """Equality of two result fields; arrays by shape and values (NaN unequal, as floats are):
    the generated ``__eq__`` would ask an array of comparisons for one truth value."""
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == y.shape
            and bool(np.array_equal(x, y))
        )
    return bool(x == y)


def _fields_equal(a: Any, b: Any) -> bool:
    return type(a) is type(b) and all(
        _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
    )


@dataclass(eq=False)
class Observation:
    """One step as the detector scored it (:meth:`zetaguard.detector.Detector.observe`): the
    detector's one result object, which :class:`StabilityResult` holds as it is. ``scores`` are
    the channel scores behind ``zeta_value``; ``group_zeta`` each group's zeta."""

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

    def __eq__(self, other: object) -> bool:
        return _fields_equal(self, other)

    __hash__ = None  # type: ignore[assignment]  # mutable, as the generated __eq__ made it


_NO_GROUPS: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)
# "Not given" for StabilityResult(): None is a value some of its fields hold (raw_jar).
_UNSET: Any = object()


@dataclass(slots=True, init=False, repr=False, eq=False)
class StabilityResult:
    """What one ``monitor()`` call saw: the detector's :class:`Observation` (``observation``),
    held as it is, with what the guard adds (step, time, advice, the per-group sums).

    ``raw_jar`` is the specified jerk-to-acceleration ratio (JAR) ``||j|| / (||a|| + eps)`` over all
    monitored parameters (``None`` until three earlier snapshots exist); ``smoothed_jar`` its
    exponential average; ``zeta_value`` the calibrated score the status is decided on (see
    ``docs/detection.md``); ``confidence`` how much calibration stands behind the status (0..1).
    These, ``status``, ``channels``, ``nonfinite`` and ``in_warmup`` are read-only views of the
    observation. The constructor takes them as values (for results made by hand); the guard
    wraps the detector's observation with :meth:`wrap`, copying nothing.
    """

    observation: Observation
    recommendations: list[str]
    timestamp: float
    step: int
    _group_names: tuple[str, ...]
    # What the adapter knows the modules are (Snapshot.module_types), for layer labels.
    _module_types: Mapping[str, str] | None
    _group_rows: npt.NDArray[np.float64] | None
    _thresholds: tuple[float, float]
    _history: int

    def __init__(
        self,
        status: Status = _UNSET,
        zeta_value: float = _UNSET,
        raw_jar: float | None = _UNSET,
        smoothed_jar: float | None = _UNSET,
        confidence: float = _UNSET,
        recommendations: list[str] | None = None,
        timestamp: float | None = None,
        step: int = 0,
        channels: dict[str, float] | None = _UNSET,
        nonfinite: int = _UNSET,
        in_warmup: bool = _UNSET,
        _group_names: tuple[str, ...] = (),
        _module_types: Mapping[str, str] | None = None,
        _group_rows: npt.NDArray[np.float64] | None = None,
        _group_zeta: npt.NDArray[np.float64] | None = _UNSET,
        _thresholds: tuple[float, float] = (0.707, 1.414),
        _history: int = 3,
        observation: Observation | None = None,
    ) -> None:
        given: dict[str, Any] = {
            name: value
            for name, value in (
                ("status", status),
                ("zeta_value", zeta_value),
                ("raw_jar", raw_jar),
                ("smoothed_jar", smoothed_jar),
                ("confidence", confidence),
                ("channels", channels),
                ("group_zeta", _group_zeta),
                ("nonfinite", nonfinite),
                ("in_warmup", in_warmup),
            )
            if value is not _UNSET
        }
        if observation is not None:
            # dataclasses.replace(result, ...) lands here: it passes the held observation, and
            # the numbers it changes replace the observation's own in a copy of it.
            if given:
                observation = dataclasses.replace(observation, **given)
        else:
            missing = [
                n
                for n in ("status", "zeta_value", "raw_jar", "smoothed_jar", "confidence")
                if n not in given
            ]
            if missing:
                raise TypeError(
                    f"StabilityResult() missing {', '.join(missing)} (or pass observation=, "
                    "the detector's Observation)"
                )
            if given.get("channels") is None:
                given["channels"] = {}
            if given.get("group_zeta") is None:
                given["group_zeta"] = _NO_GROUPS
            given.setdefault("nonfinite", 0)
            given.setdefault("in_warmup", True)
            observation = Observation(scores={}, **given)
        self._hold(
            observation,
            [] if recommendations is None else recommendations,
            time.time() if timestamp is None else timestamp,
            step,
            _group_names,
            _module_types,
            _group_rows,
            _thresholds,
            _history,
        )

    @classmethod
    def wrap(
        cls,
        observation: Observation,
        *,
        step: int,
        group_names: tuple[str, ...],
        module_types: Mapping[str, str] | None,
        group_rows: npt.NDArray[np.float64] | None,
        thresholds: tuple[float, float],
        history: int,
    ) -> StabilityResult:
        """The result of one step: ``observation`` held as it is (not copied), stamped now."""
        result = cls.__new__(cls)
        result._hold(
            observation,
            [],
            time.time(),
            step,
            group_names,
            module_types,
            group_rows,
            thresholds,
            history,
        )
        return result

    def _hold(
        self,
        observation: Observation,
        recommendations: list[str],
        timestamp: float,
        step: int,
        group_names: tuple[str, ...],
        module_types: Mapping[str, str] | None,
        group_rows: npt.NDArray[np.float64] | None,
        thresholds: tuple[float, float],
        history: int,
    ) -> None:
        self.observation = observation
        self.recommendations = recommendations
        self.timestamp = timestamp
        self.step = step
        self._group_names = group_names
        self._module_types = module_types
        self._group_rows = group_rows
        self._thresholds = thresholds
        self._history = history

    def __eq__(self, other: object) -> bool:
        return _fields_equal(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = (
            "status",
            "zeta_value",
            "raw_jar",
            "smoothed_jar",
            "confidence",
            "recommendations",
            "timestamp",
            "step",
            "channels",
            "nonfinite",
            "in_warmup",
        )
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"StabilityResult({body})"

    # Read-only views of the observation: the detector's numbers, never copied.

    @property
    def status(self) -> Status:
        return self.observation.status

    @property
    def zeta_value(self) -> float:
        return self.observation.zeta_value

    @property
    def raw_jar(self) -> float | None:
        return self.observation.raw_jar

    @property
    def smoothed_jar(self) -> float | None:
        return self.observation.smoothed_jar

    @property
    def confidence(self) -> float:
        return self.observation.confidence

    @property
    def channels(self) -> dict[str, float]:
        """The channel values and scores (``score_<name>``); under torch.distributed also the
        ``rank_*`` channels."""
        return self.observation.channels

    @property
    def nonfinite(self) -> int:
        return self.observation.nonfinite

    @property
    def in_warmup(self) -> bool:
        return self.observation.in_warmup

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
        """Each group's zeta, in the order of :attr:`group_names` (None when no group was
        scored)."""
        zetas = self.observation.group_zeta
        return zetas if len(zetas) else None

    @property
    def history(self) -> int:
        """Earlier snapshots the differences had (0-3): ``||v||`` needs one, JAR three."""
        return self._history

    @property
    def groups(self) -> dict[str, GroupResult]:
        """Per-group results, built on first access (monitoring itself never pays for them)."""
        rows, zetas = self._group_rows, self.group_zeta
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
        zetas = self.group_zeta
        if zetas is None:
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
