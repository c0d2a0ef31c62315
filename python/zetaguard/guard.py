"""``ZetaGuard``: the public face of zetaguard."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import numpy.typing as npt

from zetaguard import _core, _validate, distributed, state
from zetaguard._validate import as_float as _as_float
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot, default_threads, snapshot
from zetaguard.detector import Calibration, Detector
from zetaguard.recommend import recommendations
from zetaguard.recovery.manager import RecoveryManager
from zetaguard.results import STATUSES, RecoveryReport, StabilityResult, Status

if TYPE_CHECKING:
    from zetaguard.device import DeviceTracker
    from zetaguard.diagnostics import Diagnostics
    from zetaguard.store import RunStore

log = logging.getLogger("zetaguard")

EngineMode = Literal["auto", "exact", "sketch"]
GroupBy = Literal["layer", "tensor", "none"]
RecoveryMode = Literal["conservative", "balanced", "aggressive"]
DevicePath = Literal["auto", "cpu", "cuda"]

_LEVEL: dict[Status, int] = {s: i for i, s in enumerate(STATUSES)}
_GRAD_NORMS_KEPT = 1000  # the recent gradient norms a saved state carries


def _group_key(name: str, group_by: GroupBy) -> str:
    if group_by == "tensor":
        return name
    if group_by == "none":
        return "all"
    head, dot, _ = name.rpartition(".")
    return head if dot else name


class ZetaGuard:
    """A training watchdog.

    Call :meth:`monitor` once per optimizer step with the model's parameters (an
    ``nn.Module``, ``parameters()``, ``named_parameters()``, a dict or list of arrays, or any
    DLPack-capable CPU tensors). It returns a :class:`StabilityResult` whose ``status`` is
    ``"STABLE"``, ``"DRIFT"`` or ``"CRITICAL"``.

    Args:
        drift_threshold: ``zeta_value`` at or above which the status is DRIFT.
        snap_threshold: ``zeta_value`` at or above which the status is CRITICAL.
        alpha: smoothing factor of ``smoothed_jar`` (weight of the newest raw JAR).
        warmup_steps: steps used to learn the healthy level of each channel.
        auto_recover: act on CRITICAL (snapshot rollback, LR cut, ...) when a model/optimizer
            is attached.
        recovery_mode: the escalation ladder: ``conservative``, ``balanced`` or ``aggressive``.
        recovery_protocol: an :class:`zetaguard.protocols.EmergencyProtocol` run on CRITICAL.
        model, optimizer: what recovery acts on (also settable with :meth:`attach`).
        checkpoint_dir: where emergency checkpoints go.
        calibration: ``"auto"`` (calibrated zeta, the default) or ``"none"`` (JAR as specified:
            smoothed raw JAR against the fixed thresholds).
        mode: engine state: ``"exact"`` rings of the last three snapshots, ``"sketch"``
            O(sketch_buckets) state whatever the model size, ``"auto"`` exact while three
            snapshots fit in ``exact_memory_budget`` bytes.
        group_by: per-group results by ``"layer"`` (module path), ``"tensor"`` or ``"none"``.
        threads: engine threads for large models (default: up to 4).
        run_dir: write every step to a run store (SQLite) under this directory.
        device: where torch parameters are reduced. ``"auto"``: CPU tensors in the host
            engine, CUDA tensors on their device (:mod:`zetaguard.device`: only scalars or
            the sketch come back); ``"cuda"``: insist on device tensors; ``"cpu"``: run the
            device path's torch code on CPU tensors (it gives the host engine's results).
        snapshot_interval: STABLE steps between recovery snapshots (docs/recovery.md).
        snapshot_memory_budget: bytes the recovery snapshots may hold in host memory.
    """

    def __init__(
        self,
        drift_threshold: float = 0.707,
        snap_threshold: float = 1.414,
        alpha: float = 0.3,
        warmup_steps: int = 50,
        auto_recover: bool = True,
        recovery_mode: RecoveryMode = "balanced",
        recovery_protocol: Any = None,
        model: Any = None,
        optimizer: Any = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        calibration: Calibration = "auto",
        mode: EngineMode = "auto",
        sketch_buckets: int = 16384,
        exact_memory_budget: int = 2 << 30,
        group_by: GroupBy = "layer",
        threads: int | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        run_name: str | None = None,
        seed: int = 0x5EED,
        snapshot_interval: int = 10,
        snapshot_memory_budget: int = 1 << 30,
        device: DevicePath = "auto",
    ) -> None:
        _validate.guard_arguments(
            drift_threshold=drift_threshold, snap_threshold=snap_threshold, alpha=alpha,
            warmup_steps=warmup_steps, auto_recover=auto_recover, sketch_buckets=sketch_buckets,
            exact_memory_budget=exact_memory_budget, threads=threads, run_name=run_name,
            seed=seed, snapshot_interval=snapshot_interval,
            snapshot_memory_budget=snapshot_memory_budget,
        )
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.device: DevicePath = device
        # monitor_layers(): parameter name -> layer (group) name, and what monitor() reads.
        self._layer_of: dict[str, str] | None = None
        self._layers: dict[str, Any] | None = None
        if mode not in ("auto", "exact", "sketch"):
            raise ValueError(f"mode must be 'auto', 'exact' or 'sketch', got {mode!r}")
        if group_by not in ("layer", "tensor", "none"):
            raise ValueError(f"group_by must be 'layer', 'tensor' or 'none', got {group_by!r}")
        if recovery_mode not in ("conservative", "balanced", "aggressive"):
            raise ValueError(
                "recovery_mode must be 'conservative', 'balanced' or 'aggressive', got "
                f"{recovery_mode!r}"
            )
        if sketch_buckets < 1:
            raise ValueError(f"sketch_buckets must be >= 1, got {sketch_buckets}")
        self.drift_threshold = float(drift_threshold)
        self.snap_threshold = float(snap_threshold)
        self.alpha = float(alpha)
        self.warmup_steps = int(warmup_steps)
        self.auto_recover = auto_recover
        self.recovery_mode: RecoveryMode = recovery_mode
        self.recovery_protocol = recovery_protocol
        self.checkpoint_dir = checkpoint_dir
        self.calibration: Calibration = calibration
        self.mode: EngineMode = mode
        self.sketch_buckets = int(sketch_buckets)
        self.exact_memory_budget = int(exact_memory_budget)
        self.group_by: GroupBy = group_by
        self.threads = int(threads) if threads is not None else default_threads()
        self.seed = int(seed)
        self.run_dir = run_dir
        self.run_name = run_name
        self.model: Any = model
        self.optimizer: Any = optimizer
        self._detector = Detector(
            drift_threshold=self.drift_threshold,
            snap_threshold=self.snap_threshold,
            alpha=self.alpha,
            warmup_steps=self.warmup_steps,
            calibration=calibration,
        )
        self._lock = threading.RLock()
        self._store: RunStore | None = None
        self._pattern: re.Pattern[str] | None = None
        # Recovery (zetaguard.recovery): snapshots, the ladder, the pre-step veto.
        self._recovery = RecoveryManager(
            self,
            snapshot_interval=snapshot_interval,
            snapshot_memory_budget=snapshot_memory_budget,
        )
        self._reports: list[RecoveryReport] = []
        # Set each step while torch.distributed spans more than one rank (distributed.py).
        self._dist: distributed.DistributedContext | None = None
        self._reset_tracking()

    # ---- setup -------------------------------------------------------------------------

    def attach(self, model: Any = None, optimizer: Any = None, scheduler: Any = None) -> ZetaGuard:
        """Say what recovery acts on: the model (or its parameters), the optimizer, and the
        learning-rate scheduler if one rewrites the LR each step (LR cuts then scale its base
        LRs too, so they last). The state at this moment becomes the last-resort rollback
        target. Returns the guard, so calls chain."""
        if model is not None:
            self.model = model
        if optimizer is not None:
            self.optimizer = optimizer
        if model is not None or optimizer is not None or scheduler is not None:
            self._recovery.bind(model, optimizer, scheduler)
        return self

    def monitor_pattern(self, pattern: str | re.Pattern[str] | None) -> ZetaGuard:
        """Monitor only parameters whose name matches ``pattern`` (``re.search``); ``None``
        monitors everything again. Resets the trajectory, since the monitored set changes."""
        self._pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self._reset_tracking()
        return self

    def monitor_layers(self, layers: Any) -> ZetaGuard:
        """Monitor exactly these layers, each one group: a list (or ``{name: layer}`` dict) of
        modules or of parameter lists. ``monitor()`` is then called without parameters. Names
        come from the attached model when it contains the module (``"encoder.layer.0"``), else
        ``layer{i}``. ``None`` goes back to monitoring what ``monitor()`` is given. Resets the
        trajectory, since the monitored set changes."""
        if layers is None:
            self._layers = self._layer_of = None
            self._reset_tracking()
            return self
        items = list(layers.items()) if isinstance(layers, dict) else list(enumerate(layers))
        if not items:
            raise ValueError("monitor_layers() needs at least one layer")
        known = _module_names(self.model)
        tensors: dict[str, Any] = {}
        layer_of: dict[str, str] = {}
        for key, layer in items:
            name = key if isinstance(key, str) else known.get(id(layer), f"layer{key}")
            named = _layer_tensors(layer, name)
            if not named:
                raise ValueError(f"layer {name!r} has no parameters to monitor")
            for pname, t in named:
                full = f"{name}.{pname}"
                tensors[full] = t
                layer_of[full] = name
        self._layers, self._layer_of = tensors, layer_of
        self._reset_tracking()
        return self

    def _reset_tracking(self) -> None:
        self._tracker: _core.Tracker | DeviceTracker | None = None
        self._names: tuple[str, ...] = ()
        self._names_seen: list[str] | None = None  # the last names list that matched _names
        self._group_names: tuple[str, ...] = ()
        self._group_index: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._keep: list[int] | None = None
        self._kept_names: list[str] = []
        self._names_all_seen: list[str] | None = None
        self._names_all: tuple[str, ...] = ()
        self._detector.reset()
        self._step = 0
        self._last: StabilityResult | None = None
        self._status_counts: Counter[str] = Counter()
        self._zeta_sum = 0.0
        self._zeta_max = 0.0
        self._grad_norms: deque[float] = deque(maxlen=_GRAD_NORMS_KEPT)
        self._last_grad_norm: float | None = None
        self._last_loss: float | None = None
        self._history: list[tuple[int, str, float]] = []

    def reset(self) -> None:
        """Forget the trajectory and the calibration (the attached model/optimizer stay)."""
        with self._lock:
            self._reset_tracking()
            self._reports.clear()
            self._recovery.reset()

    # ---- the step ----------------------------------------------------------------------

    def monitor(
        self,
        params: Any = None,
        *,
        loss: Any = None,
        grad_norm: float | None = None,
        step: int | None = None,
        batch_index: int | None = None,
    ) -> StabilityResult:
        """Take one snapshot of ``params`` (default: the attached model) and score it.

        ``loss`` (a float or 0-d tensor) and ``grad_norm`` add channels when given; torch
        parameters with ``.grad`` set contribute the gradient norm automatically.
        """
        if self._layers is not None and (params is None or params is self.model):
            params = self._layers  # the layers are parts of the attached model
        elif self._layers is not None:
            raise ValueError(
                "monitor_layers() chose what is monitored: call monitor() without parameters, "
                "or monitor_layers(None) to monitor what monitor() is given"
            )
        if params is None:
            if self.model is None:
                raise ValueError(
                    "monitor() needs parameters: pass model.parameters() (or a model, a dict "
                    "or list of arrays), or attach a model with guard.attach(model=...)"
                )
            params = self.model
        elif self.model is None:  # parameters alone: recovery rolls these back in place
            params = self._recovery.bind_params(params)
        dist = self._dist = distributed.current(self)
        snap = dist.snapshot(params) if dist is not None else snapshot(params)
        if self.device != "auto":
            snap = self._route_device(snap)
        with self._lock:
            return self._monitor(snap, loss, grad_norm, step, batch_index)

    def take_reference(self, params: Any = None) -> bool:
        """Record the parameters as they are *before* the first optimizer step: the engine ring
        gets its first state and the detector its fixed parameter-norm reference (which
        otherwise is the norm after the first update, when a run unstable from its first step
        is already damaged). Integrations call it at train start; it does nothing (returns
        False) once a step was monitored or under torch.distributed. Not a step: nothing is
        scored, counted or stored."""
        if params is None:
            params = self._layers if self._layers is not None else self.model
        if params is None or self._step > 0 or distributed.current(self) is not None:
            return False
        if self.model is None:
            params = self._recovery.bind_params(params)
        snap = snapshot(params)
        if self.device != "auto":
            snap = self._route_device(snap)
        with self._lock:
            if not snap.tensors or self._step > 0 or self._detector.steps > 0:
                return False
            if self._pattern is not None:
                snap = self._apply_pattern(snap, self._pattern)
            tracker = self._ensure_tracker(snap)
            if tracker.history > 0:
                return False
            if snap.framework == DEVICE_FRAMEWORK:
                rows, _ = cast("DeviceTracker", tracker).update_with_grads(snap.tensors, None)
            else:
                host = cast(_core.Tracker, tracker)
                rows = host.update_raw(snap.tensors) if snap.raw else host.update(snap.tensors)
            self._names_seen = snap.names
            return self._detector.set_reference(math.sqrt(float(np.sum(rows[:, 0]))))

    def _monitor(
        self,
        snap: Snapshot,
        loss: Any,
        grad_norm: float | None,
        step: int | None,
        batch_index: int | None,
    ) -> StabilityResult:
        if not snap.tensors:
            raise ValueError(
                "monitor() got no parameters: pass a model with trainable parameters, or a "
                "non-empty list or dict of arrays"
            )
        if self._pattern is not None:
            snap = self._apply_pattern(snap, self._pattern)
        tracker = self._ensure_tracker(snap)
        names = snap.names
        # Adapters hand back the same names list while the parameter set is unchanged.
        if names is not self._names_seen and tuple(names) != self._names:
            raise ValueError(
                "the monitored parameters changed names between steps "
                f"({len(self._names)} before, {len(snap.names)} now); call guard.reset() "
                "after changing the model"
            )
        self._names_seen = names
        history = tracker.history
        grad_rows = None
        if snap.framework == DEVICE_FRAMEWORK:  # parameters and gradients: one transfer
            rows, grad_rows = cast("DeviceTracker", tracker).update_with_grads(
                snap.tensors, snap.grads if grad_norm is None else None
            )
        else:
            host = cast(_core.Tracker, tracker)
            rows = host.update_raw(snap.tensors) if snap.raw else host.update(snap.tensors)
        if grad_norm is None and snap.grads:
            if grad_rows is not None:
                sums = grad_rows.sum(axis=0)  # squared norm, ..., non-finite count
                grad_sq, grad_bad = float(sums[0]), int(sums[4])
            elif snap.grads_raw:
                grad_sq, grad_bad = host.total_norm_raw(snap.grads)
            else:
                grad_sq, grad_bad = host.total_norm(snap.grads)
            grad_norm = math.sqrt(grad_sq) if grad_bad == 0 else math.inf
        loss_value = _as_float(loss, "loss")
        grad_value = _as_float(grad_norm, "grad_norm")
        if self._dist is None:
            group_rows = self._aggregate(rows)
        else:  # one all-reduce: every rank's detector then sees the same global numbers
            group_rows, loss_value, grad_value = self._dist.reduce(
                self._names, self._aggregate, tracker, rows, loss_value, grad_value
            )
        obs = self._detector.observe(group_rows, history, loss=loss_value, grad_norm=grad_value)
        current = self._step if step is None else int(step)
        self._step = current + 1
        result = StabilityResult(
            status=obs.status,
            zeta_value=obs.zeta_value,
            raw_jar=obs.raw_jar,
            smoothed_jar=obs.smoothed_jar,
            confidence=obs.confidence,
            timestamp=time.time(),
            step=current,
            channels=obs.channels,
            nonfinite=obs.nonfinite,
            in_warmup=obs.in_warmup,
            _group_names=self._group_names,
            _group_rows=group_rows,
            _group_zeta=obs.group_zeta,
            _thresholds=(self.drift_threshold, self.snap_threshold),
            _history=history,
        )
        if obs.status != "STABLE":  # advice, and the worst group it names, only when needed
            result.recommendations = recommendations(obs, result.worst_group)
        if self._dist is not None:
            result.channels.update(self._dist.channels)
        self._book(result, grad_value, loss_value)
        if result.status == "DRIFT":  # CRITICAL steps are logged once, by the recovery manager
            log.info(
                "step %d: DRIFT zeta=%.3f worst=%s%s",
                current,
                result.zeta_value,
                result.worst_group,
                "" if batch_index is None else f" batch={batch_index}",
            )
        self._recovery.after_step(result, batch_index)
        return result

    def _apply_pattern(self, snap: Snapshot, pattern: re.Pattern[str]) -> Snapshot:
        if self._keep is None or (
            snap.names is not self._names_all_seen and tuple(snap.names) != self._names_all
        ):
            self._names_all = tuple(snap.names)
            self._keep = [i for i, n in enumerate(snap.names) if pattern.search(n)]
            self._kept_names = [snap.names[i] for i in self._keep]
            if not self._keep:
                raise ValueError(
                    f"monitor_pattern({pattern.pattern!r}) matches none of the "
                    f"{len(snap.names)} parameter names (e.g. {snap.names[:3]})"
                )
        self._names_all_seen = snap.names
        keep = self._keep
        return Snapshot(
            names=self._kept_names,
            tensors=[snap.tensors[i] for i in keep],
            raw=snap.raw,
            grads=snap.grads,
            grads_raw=snap.grads_raw,
            keepalive=snap.keepalive,
            framework=snap.framework,
        )

    def _route_device(self, snap: Snapshot) -> Snapshot:
        """Send torch tensors to the device path when ``device`` asks for it."""
        if self.device == "auto":
            return snap
        if self.device == "cuda" and snap.framework != DEVICE_FRAMEWORK:
            raise ValueError(
                f"ZetaGuard(device='cuda') got {snap.framework} parameters in host memory; move "
                "the model to the GPU, or use device='auto'"
            )
        from zetaguard.device import device_snapshot

        return device_snapshot(snap)

    def _ensure_tracker(self, snap: Snapshot) -> _core.Tracker | DeviceTracker:
        on_device = snap.framework == DEVICE_FRAMEWORK
        # A tracker holding no tensors saw only refused steps: start afresh, so fixing the
        # input does not read as the parameter set having changed.
        if self._tracker is not None and self._tracker.tensor_count > 0:
            if _is_device_tracker(self._tracker) == on_device:
                return self._tracker
            # The same trajectory on the other engine (a restored state meeting CUDA tensors,
            # or a model moved between devices): both engines share one state format.
            engine_state = self._tracker.get_state()
            self._tracker = self._new_tracker(self._tracker.mode, on_device)
            self._tracker.set_state(engine_state)
            return self._tracker
        mode = self.mode
        if mode == "auto":
            mode = "exact" if 3 * _nbytes(snap) <= self.exact_memory_budget else "sketch"
        self._tracker = self._new_tracker(mode, on_device)
        self._set_names(snap.names)
        return self._tracker

    def _new_tracker(self, mode: str, on_device: bool) -> _core.Tracker | DeviceTracker:
        if on_device:
            from zetaguard.device import DeviceTracker

            return DeviceTracker(mode=mode, sketch_buckets=self.sketch_buckets, seed=self.seed)
        return _core.Tracker(
            mode=mode, sketch_buckets=self.sketch_buckets, threads=self.threads, seed=self.seed
        )

    def _set_names(self, names: list[str]) -> None:
        self._names = tuple(names)
        self._names_seen = None
        layer_of = self._layer_of
        keys = [
            layer_of[n] if layer_of is not None and n in layer_of else _group_key(n, self.group_by)
            for n in names
        ]
        order: dict[str, int] = {}
        for k in keys:
            order.setdefault(k, len(order))
        self._group_names = tuple(order)
        self._group_index = np.fromiter((order[k] for k in keys), dtype=np.int64, count=len(keys))

    def _aggregate(self, rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        groups = len(self._group_names)
        if groups == len(rows):
            return rows
        return _core.group_rows(rows, self._group_index, groups)

    def _book(self, result: StabilityResult, grad_norm: float | None, loss: float | None) -> None:
        self._last = result
        self._status_counts[result.status] += 1
        if math.isfinite(result.zeta_value):
            self._zeta_sum += result.zeta_value
            self._zeta_max = max(self._zeta_max, result.zeta_value)
        else:
            self._zeta_max = math.inf
        self._last_grad_norm = grad_norm
        self._last_loss = loss
        if grad_norm is not None and math.isfinite(grad_norm):
            self._grad_norms.append(grad_norm)
        # Under torch.distributed rank 0 writes the run store for every rank.
        if self._store is None and self.run_dir is not None and (
            self._dist is None or self._dist.rank == 0
        ):
            self._open_store(result.step)
        if self._store is not None:
            self._store.record_step(result)

    def _open_store(self, first_step: int | None = None) -> None:
        from zetaguard.store import RunStore

        self._store = RunStore(
            self.run_dir, run_name=self.run_name, config=self.config(), first_step=first_step
        )

    # ---- recovery (the logic lives in zetaguard.recovery; docs/recovery.md) --------------

    @property
    def recovery(self) -> RecoveryManager:
        """The recovery manager: snapshots, ladder state and settings."""
        return self._recovery

    @property
    def should_stop(self) -> bool:
        """True once the ladder ran out of retries: stop training (the model holds its last
        stable state; ``recovery_reports[-1]`` says what happened)."""
        return self._recovery.stopped

    def emergency_protocol(self) -> RecoveryReport:
        """Climb one rung of the recovery ladder now, whatever the status and cooldown (or run
        ``recovery_protocol`` if one is set) and return what was done."""
        with self._lock:
            return self._recovery.respond(self._last, force=True)

    def should_skip_step(
        self, loss: Any = None, grad_norm: float | None = None, *, batch_index: int | None = None
    ) -> bool:
        """Call after ``backward()``, before ``optimizer.step()``: True when this update should
        not land (non-finite loss or gradients, or a spike far above the recent median; see
        docs/recovery.md). The gradient norm is read from the attached torch model when not
        given. Each veto is logged as an incident (with ``batch_index`` when given) and listed in
        ``get_statistics()["incidents"]["skipped"]``."""
        with self._lock:
            loss_value = _as_float(loss, "loss")
            reason = self._recovery.skip_reason(loss_value, _as_float(grad_norm, "grad_norm"))
            dist = distributed.current(self)
            if dist is not None:  # one rank's veto is every rank's (distributed.py)
                reason = dist.agree_on_skip(reason)
            if reason is None:
                self._recovery.record_step_taken()
                return False
            self._recovery.record_skip(reason, batch_index)
            return True

    def guarded_step(
        self,
        optimizer: Any = None,
        *,
        loss: Any = None,
        grad_norm: float | None = None,
        clip: bool = True,
        batch_index: int | None = None,
    ) -> bool:
        """``optimizer.step()`` unless :meth:`should_skip_step` vetoes it (the gradients are then
        dropped), with the gradients clipped to :meth:`recommended_clip_value` first when
        ``clip`` and :meth:`should_clip_gradients` say so (torch). Returns whether the step
        landed. Does nothing once :attr:`should_stop` is set."""
        opt = optimizer if optimizer is not None else self.optimizer
        if opt is None:
            raise ValueError(
                "guarded_step() needs an optimizer: pass it, or guard.attach(optimizer=...)"
            )
        if self.should_stop:
            return False
        backend = self._recovery.backend
        if grad_norm is None and backend is not None:
            grad_norm = backend.grad_norm()
        if self.should_skip_step(loss=loss, grad_norm=grad_norm, batch_index=batch_index):
            opt.zero_grad()
            return False
        limit = self.recommended_clip_value()
        clip_grad = getattr(backend, "clip_grad_norm", None)
        if clip and limit is not None and grad_norm is not None and grad_norm > limit and clip_grad:
            clip_grad(limit)
        opt.step()
        return True

    def should_clip_gradients(self, grad_norm: float | None = None) -> bool:
        """True when ``grad_norm`` (default: the latest monitored one) is above
        :meth:`recommended_clip_value`."""
        limit = self.recommended_clip_value()
        g = self._last_grad_norm if grad_norm is None else float(grad_norm)
        if g is None or limit is None:
            return False
        return not math.isfinite(g) or g > limit

    def recommended_clip_value(self) -> float | None:
        """A max-norm for gradient clipping from the recent gradient norms (median and MAD on the
        log scale; docs/recovery.md), or None until 20 norms have been seen."""
        return self._recovery.clip_value()

    def reset_trajectory(self) -> None:
        """After a rollback: forget the finite-difference history (the engine ring must not mix
        states from before and after it) but keep the calibration."""
        if self._tracker is not None:
            self._tracker.reset()
        self._detector.restart_trajectory()

    # ---- reading back ------------------------------------------------------------------

    @property
    def last_result(self) -> StabilityResult | None:
        return self._last

    @property
    def step(self) -> int:
        """The step number the next monitor() call will carry."""
        return self._step

    @property
    def recovery_triggered(self) -> bool:
        """True once any recovery action has run."""
        return bool(self._reports)

    @property
    def recovery_reports(self) -> list[RecoveryReport]:
        return list(self._reports)

    def add_report(self, report: RecoveryReport) -> None:
        """Record a recovery (the manager's, or an integration's own stop) in
        :attr:`recovery_reports`; :attr:`recovery_triggered` becomes True."""
        self._reports.append(report)

    @property
    def run_store(self) -> RunStore | None:
        """The open run store (``run_dir``), or None: not yet opened, closed, or none asked."""
        return self._store

    @property
    def rank(self) -> int | None:
        """This process's rank while the guard reduces over torch.distributed, else None."""
        return None if self._dist is None else self._dist.rank

    @property
    def monitored_names(self) -> tuple[str, ...]:
        """The names of the monitored tensors, in engine order (empty before the first step)."""
        return self._names

    @property
    def monitored_layers(self) -> dict[str, Any] | None:
        """What :meth:`monitor_layers` chose, by full parameter name, or None."""
        return self._layers

    def config(self) -> dict[str, Any]:
        return {
            "drift_threshold": self.drift_threshold,
            "snap_threshold": self.snap_threshold,
            "alpha": self.alpha,
            "warmup_steps": self.warmup_steps,
            "auto_recover": self.auto_recover,
            "recovery_mode": self.recovery_mode,
            "calibration": self.calibration,
            "mode": self.mode,
            "sketch_buckets": self.sketch_buckets,
            "exact_memory_budget": self.exact_memory_budget,
            "group_by": self.group_by,
            "threads": self.threads,
            "seed": self.seed,
        }

    def get_metrics(self) -> dict[str, float]:
        """The latest step as flat scalars (for loggers): global values, then
        ``group/<name>/zeta``, ``group/<name>/raw_jar`` and ``group/<name>/update_ratio``."""
        r = self._last
        if r is None:
            return {}
        m: dict[str, float] = {
            "zeta": r.zeta_value,
            "status_level": float(_LEVEL[r.status]),
            "confidence": r.confidence,
            "step": float(r.step),
        }
        if r.raw_jar is not None:
            m["raw_jar"] = r.raw_jar
        if r.smoothed_jar is not None:
            m["smoothed_jar"] = r.smoothed_jar
        m.update({k: float(v) for k, v in r.channels.items()})
        for name, g in r.groups.items():
            m[f"group/{name}/zeta"] = g.zeta_value
            if g.raw_jar is not None:
                m[f"group/{name}/raw_jar"] = g.raw_jar
            if g.update_ratio is not None:
                m[f"group/{name}/update_ratio"] = g.update_ratio
        return m

    def get_statistics(self) -> dict[str, Any]:
        """Counts and extremes over the run so far, and what the engine is doing."""
        steps = sum(self._status_counts.values())
        finite_steps = steps if math.isfinite(self._zeta_max) else max(steps - 1, 0)
        t = self._tracker
        return {
            "steps": steps,
            "status_counts": {s: self._status_counts.get(s, 0) for s in STATUSES},
            "zeta_mean": self._zeta_sum / finite_steps if finite_steps else 0.0,
            "zeta_max": self._zeta_max,
            "in_warmup": self._detector.in_warmup,
            "confidence": self._detector.confidence(),
            "recoveries": len(self._reports),
            # Incident classes, and the steps (batch indices) undone or skipped.
            "incidents": self._recovery.incidents.summary(),
            "engine": {
                "mode": t.mode if t else None,
                "isa": t.isa if t else _core.best_isa(),
                "threads": self.threads,
                "tensors": t.tensor_count if t else 0,
                "state_bytes": t.state_bytes if t else 0,
            },
            "groups": len(self._group_names),
        }

    def full_diagnostics(self, model: Any = None) -> Diagnostics:
        """A per-layer table of the latest step: JAR, update/weight and gradient/weight ratios,
        non-finite counts and status (:mod:`zetaguard.diagnostics`). ``model`` (default: the
        attached one) supplies the gradients; print the table or call ``.to_dicts()``."""
        from zetaguard.diagnostics import full_diagnostics

        with self._lock:
            return full_diagnostics(self, model if model is not None else self.model)

    def group_of(self, name: str) -> str:
        """The group (layer) a monitored parameter name is counted in."""
        if self._layer_of is not None and name in self._layer_of:
            return self._layer_of[name]
        return _group_key(name, self.group_by)

    def generate_report(
        self, path: str | os.PathLike[str] | None = None, run_dir: str | os.PathLike[str] | None = None
    ) -> Path:
        """Write an HTML report with PNG plots of the run (loss, zeta, per-layer heat map,
        incidents and actions) from its run store; see :func:`zetaguard.report.generate_report`."""
        from zetaguard.report import generate_report

        return generate_report(self, path=path, run_dir=run_dir)

    def close(self) -> None:
        """Commit and close the run store, if any (also done at interpreter exit). Monitoring
        continues; later steps are no longer recorded."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            self.run_dir = None

    # ---- persistence -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The guard's state in memory, for framework checkpoints (a Lightning callback's
        ``state_dict``): the exact bytes :meth:`save_state` writes, checksum included."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "guard.npz")
            self.save_state(path)
            with open(path, "rb") as f:
                return {"format": state.FORMAT, "npz": f.read()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same checks as :meth:`load_state`)."""
        import tempfile

        blob = state_dict.get("npz") if isinstance(state_dict, dict) else None
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise state.StateFileError(
                "load_state_dict() needs the dict guard.state_dict() returned (with its 'npz' "
                "bytes)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "guard.npz")
            with open(path, "wb") as f:
                f.write(bytes(blob))
            self.load_state(path)


    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the trajectory, the calibration and the recovery ladder's counters to ``path``
        atomically (an ``.npz`` archive, no pickle). A guard that loads it gives the same next
        results, vetoes and recovery decisions as this one (snapshots are not saved)."""
        with self._lock:
            engine = (
                self._tracker.get_state()
                if self._tracker is not None
                else {"history": 0, "head": -1, "tensors": []}
            )
            meta = {
                "config": self.config(),
                "engine_mode": self._tracker.mode if self._tracker else None,
                "names": list(self._names),
                "pattern": self._pattern.pattern if self._pattern else None,
                "step": self._step,
                "detector": self._detector.state_dict(),
                "status_counts": dict(self._status_counts),
                "zeta_sum": self._zeta_sum,
                "zeta_max": self._zeta_max,
                "grad_norms": list(self._grad_norms),
                "recovery": self._recovery.counters(),
            }
            meta, arrays = state.pack(meta, engine)
            state.save(path, meta, arrays)

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_state` wrote. Thresholds and smoothing come from the file.

        All or nothing: the file is parsed and checked completely before the guard changes, so
        a refused file (:class:`zetaguard.state.StateFileError`) leaves the guard as it was."""
        meta, arrays = state.load(path)
        where = os.fspath(path)
        try:
            cfg = meta["config"]
            detector = Detector(
                drift_threshold=float(cfg["drift_threshold"]),
                snap_threshold=float(cfg["snap_threshold"]),
                alpha=float(cfg["alpha"]),
                warmup_steps=int(cfg["warmup_steps"]),
                calibration=cfg["calibration"],
            )
            detector.load_state_dict(meta["detector"])
            pattern = re.compile(meta["pattern"]) if meta["pattern"] else None
            tracker: _core.Tracker | None = None
            if meta["engine_mode"] is not None:
                tracker = _core.Tracker(
                    mode=meta["engine_mode"],
                    sketch_buckets=int(cfg["sketch_buckets"]),
                    threads=self.threads,
                    seed=int(cfg["seed"]),
                )
                tracker.set_state(state.unpack(meta, arrays))
            names = [str(n) for n in meta["names"]]
            if tracker is not None and tracker.tensor_count not in (0, len(names)):
                raise ValueError(
                    f"{tracker.tensor_count} tensors in the engine state but {len(names)} names"
                )
            counters = (
                int(meta["step"]),
                Counter({str(k): int(v) for k, v in meta["status_counts"].items()}),
                float(meta["zeta_sum"]),
                float(meta["zeta_max"]),
                deque((float(g) for g in meta["grad_norms"]), maxlen=_GRAD_NORMS_KEPT),
            )
            # Files written before recovery counters were saved leave the ladder as it is.
            saved_recovery = meta.get("recovery")
            recovery = (
                RecoveryManager.parse_counters(saved_recovery) if saved_recovery is not None else None
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError,
                re.error) as e:
            # RuntimeError: pybind11's cast errors for a field of the wrong type.
            raise state.StateFileError(
                f"{where!r} holds an inconsistent guard state ({type(e).__name__}: {e}); "
                "restore an earlier copy or start a fresh guard"
            ) from e
        with self._lock:
            self.drift_threshold = detector.drift_threshold
            self.snap_threshold = detector.snap_threshold
            self.alpha = detector.alpha
            self.warmup_steps = detector.warmup_steps
            self.calibration = cfg["calibration"]
            self.group_by = cfg["group_by"]
            self.sketch_buckets = int(cfg["sketch_buckets"])
            self.seed = int(cfg["seed"])
            self._reset_tracking()  # before the swap: it clears the detector it finds
            self._detector = detector
            self._pattern = pattern
            self._tracker = tracker
            if tracker is not None:
                self._set_names(names)
            (
                self._step,
                self._status_counts,
                self._zeta_sum,
                self._zeta_max,
                self._grad_norms,
            ) = counters
            if recovery is not None:
                self._recovery.restore_counters(recovery)

def _is_device_tracker(tracker: Any) -> bool:
    return not isinstance(tracker, _core.Tracker)


def _module_names(model: Any) -> dict[int, str]:
    """id(submodule) -> its qualified name inside ``model`` (torch), for layer names."""
    named_modules = getattr(model, "named_modules", None)
    if named_modules is None:
        return {}
    return {id(m): name for name, m in named_modules() if name}


def _layer_tensors(layer: Any, name: str) -> list[tuple[str, Any]]:
    """The named tensors of one layer: a module (``named_parameters``), a dict, or a list."""
    named_parameters = getattr(layer, "named_parameters", None)
    if callable(named_parameters):
        return list(named_parameters())
    if isinstance(layer, dict):
        return [(str(k), v) for k, v in layer.items()]
    if isinstance(layer, (list, tuple)):
        return [(str(i), t) for i, t in enumerate(layer)]
    if hasattr(layer, "__dlpack__") or hasattr(layer, "shape"):
        return [("0", layer)]
    raise TypeError(
        f"layer {name!r} is a {type(layer).__name__}; pass modules, or lists or dicts of tensors"
    )


def _nbytes(snap: Snapshot) -> int:
    if snap.raw:
        sizes = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
        return sum(n * sizes[d] for _, n, d in snap.tensors)
    total = 0
    for t in snap.tensors:
        nbytes = getattr(t, "nbytes", None)
        total += int(nbytes) if nbytes is not None else 0
    return total
