"""The guard's settings: checked once, held in one frozen :class:`GuardSettings`.

``ZetaGuard(...)`` checks its arguments here (:meth:`GuardSettings.checked`: refuse, never
coerce, each error naming the argument and the fix), ``guard.config()`` is
:meth:`GuardSettings.config` (what the run store and the state file record), and
``guard.load_state()`` takes the file's settings through :meth:`GuardSettings.restored`. The
guard's attributes of the same names (``guard.mode``, ``guard.alpha``, ...) read and assign the
fields of ``guard.settings`` through :class:`Setting`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

from zetaguard import _validate, tiered, tiered_worker
from zetaguard.adapters import default_threads
from zetaguard.detector import Calibration, Detector
from zetaguard.selection import GroupBy

EngineMode = Literal["auto", "exact", "sketch"]
RecoveryMode = Literal["conservative", "balanced", "aggressive"]
DevicePath = Literal["auto", "cpu", "cuda"]

T = TypeVar("T")


@dataclass(frozen=True)
class GuardSettings:
    """What a guard was built with (or loaded from a state file), checked and typed."""

    drift_threshold: float
    snap_threshold: float
    alpha: float
    warmup_steps: int
    auto_recover: bool
    recovery_mode: RecoveryMode
    calibration: Calibration
    mode: EngineMode
    sample_fraction: float
    max_sampled: int | None
    full_pass_interval: int
    full_pass: tiered_worker.FullPass
    sketch_buckets: int
    exact_memory_budget: int
    group_by: GroupBy
    threads: int
    seed: int
    device: DevicePath

    @classmethod
    def checked(
        cls,
        *,
        drift_threshold: Any,
        snap_threshold: Any,
        alpha: Any,
        warmup_steps: Any,
        auto_recover: Any,
        recovery_mode: Any,
        calibration: Any,
        mode: Any,
        sample_fraction: Any,
        max_sampled: Any,
        full_pass_interval: Any,
        full_pass: Any,
        sketch_buckets: Any,
        exact_memory_budget: Any,
        group_by: Any,
        threads: Any,
        seed: Any,
        device: Any,
        run_name: Any,
        snapshot_interval: Any,
        snapshot_memory_budget: Any,
    ) -> GuardSettings:
        """``ZetaGuard()``'s arguments checked before anything is built (``run_name`` and the
        snapshot settings are checked here too; the guard and its recovery manager hold them)."""
        tiered.check_settings(sample_fraction, full_pass_interval, max_sampled)
        tiered_worker.check_full_pass(full_pass)
        tiered_worker.check_thread_applies(full_pass, mode, device)
        _validate.guard_arguments(
            drift_threshold=drift_threshold,
            snap_threshold=snap_threshold,
            alpha=alpha,
            warmup_steps=warmup_steps,
            auto_recover=auto_recover,
            sketch_buckets=sketch_buckets,
            exact_memory_budget=exact_memory_budget,
            threads=threads,
            run_name=run_name,
            seed=seed,
            snapshot_interval=snapshot_interval,
            snapshot_memory_budget=snapshot_memory_budget,
            device=device,
            mode=mode,
            group_by=group_by,
            recovery_mode=recovery_mode,
        )
        return cls(
            drift_threshold=float(drift_threshold),
            snap_threshold=float(snap_threshold),
            alpha=float(alpha),
            warmup_steps=int(warmup_steps),
            auto_recover=auto_recover,
            recovery_mode=recovery_mode,
            calibration=calibration,
            mode=mode,
            sample_fraction=float(sample_fraction),
            max_sampled=max_sampled,
            full_pass_interval=int(full_pass_interval),
            full_pass=full_pass,
            sketch_buckets=int(sketch_buckets),
            exact_memory_budget=int(exact_memory_budget),
            group_by=group_by,
            threads=int(threads) if threads is not None else default_threads(),
            seed=int(seed),
            device=device,
        )

    def config(self) -> dict[str, Any]:
        """The settings a run store and a state file record (``guard.config()``)."""
        return {
            "drift_threshold": self.drift_threshold,
            "snap_threshold": self.snap_threshold,
            "alpha": self.alpha,
            "warmup_steps": self.warmup_steps,
            "auto_recover": self.auto_recover,
            "recovery_mode": self.recovery_mode,
            "calibration": self.calibration,
            "mode": self.mode,
            "sample_fraction": self.sample_fraction,
            "max_sampled": self.max_sampled,
            "full_pass_interval": self.full_pass_interval,
            "sketch_buckets": self.sketch_buckets,
            "exact_memory_budget": self.exact_memory_budget,
            "group_by": self.group_by,
            "threads": self.threads,
            "seed": self.seed,
        }

    def restored(self, cfg: dict[str, Any], detector: Detector) -> GuardSettings:
        """These settings with a loaded state file's (``cfg``, checked by :mod:`zetaguard.state`)
        in force: the detector's thresholds and smoothing, the engine's mode, buckets and seed.
        The threads, device and full-pass placement stay this process's own."""
        tiered_worker.check_thread_applies(self.full_pass, cfg.get("mode", self.mode), self.device)
        # Files from before tiered monitoring carry no fraction or interval: the defaults.
        return dataclasses.replace(
            self,
            mode=cfg.get("mode", self.mode),
            sample_fraction=float(cfg.get("sample_fraction", tiered.DEFAULT_SAMPLE_FRACTION)),
            # Files from before the cap sampled every tensor uncapped: their ring needs that.
            max_sampled=cfg.get("max_sampled"),
            full_pass_interval=int(
                cfg.get("full_pass_interval", tiered.DEFAULT_FULL_PASS_INTERVAL)
            ),
            drift_threshold=detector.drift_threshold,
            snap_threshold=detector.snap_threshold,
            alpha=detector.alpha,
            warmup_steps=detector.warmup_steps,
            calibration=cfg["calibration"],
            group_by=cfg["group_by"],
            sketch_buckets=int(cfg["sketch_buckets"]),
            seed=int(cfg["seed"]),
        )

    def detector(self) -> Detector:
        """A fresh detector with these thresholds, smoothing, warm-up and calibration."""
        return Detector(
            drift_threshold=self.drift_threshold,
            snap_threshold=self.snap_threshold,
            alpha=self.alpha,
            warmup_steps=self.warmup_steps,
            calibration=self.calibration,
        )

    def pipeline(self) -> tiered.TieredPipeline | None:
        """mode="auto" monitors in tiers (zetaguard.tiered); "exact" and "sketch" read every
        element every step."""
        if self.mode != "auto":
            return None
        return tiered.TieredPipeline(
            self.sample_fraction,
            self.full_pass_interval,
            self.seed,
            self.full_pass,
            self.max_sampled,
        )


class HasSettings(Protocol):
    settings: GuardSettings


class Setting(Generic[T]):
    """An attribute of the guard that is one field of its ``settings``. Assigning it replaces
    ``settings`` with that field changed, unchecked, as assigning the plain attribute it once
    was did."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Setting[T]: ...
    @overload
    def __get__(self, obj: HasSettings, owner: type) -> T: ...
    def __get__(self, obj: HasSettings | None, owner: type) -> Setting[T] | T:
        if obj is None:
            return self
        value: T = getattr(obj.settings, self.name)
        return value

    def __set__(self, obj: HasSettings, value: T) -> None:
        changed: dict[str, Any] = {self.name: value}
        obj.settings = dataclasses.replace(obj.settings, **changed)
