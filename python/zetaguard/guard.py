"""``ZetaGuard``: the public face of zetaguard, a facade over parts that never see it.

The parts: :mod:`zetaguard.selection` (what is monitored, and each tensor's group),
:mod:`zetaguard.engine.session` (the tracker, host or device, and one step's numbers and
score), :mod:`zetaguard.detector` (status from those numbers, one ``Observation`` that the
:class:`StabilityResult` wraps), :mod:`zetaguard.stats` (run statistics),
:mod:`zetaguard.recovery` (through the narrow ``RecoveryHost`` Protocol; the veto,
``guarded_step`` and the clip advice in :mod:`zetaguard.recovery.gate`),
:mod:`zetaguard.settings` (the checked settings, one frozen object) and :mod:`zetaguard.state`
(the state file). Its logic is the wiring of one step (in :meth:`ZetaGuard.monitor`); the rest
of its length is the public methods' signatures and docstrings, which stay here where users
read them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zetaguard import distributed, state, tiered, tiered_worker
from zetaguard._validate import as_float as _as_float
from zetaguard.adapters import snapshot
from zetaguard.detector import Calibration
from zetaguard.engine.session import EngineSession, route_device
from zetaguard.recommend import recommendations
from zetaguard.recovery.gate import StepGate
from zetaguard.recovery.manager import RecoveryManager
from zetaguard.results import RecoveryReport, StabilityResult
from zetaguard.selection import GroupBy, ParameterSelection
from zetaguard.settings import DevicePath, EngineMode, GuardSettings, RecoveryMode, Setting
from zetaguard.stats import RunStatistics, flat_metrics

if TYPE_CHECKING:
    from zetaguard.diagnostics import Diagnostics
    from zetaguard.store import RunStore

log = logging.getLogger("zetaguard")

__all__ = ["DevicePath", "EngineMode", "GroupBy", "RecoveryMode", "ZetaGuard"]


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
        mode: ``"auto"`` (the default): tiered monitoring (:mod:`zetaguard.tiered`,
            docs/always-on.md): every step reads a sampled block sketch of
            ``sample_fraction`` of each tensor; a full pass reads everything every
            ``full_pass_interval`` steps and, in the same call, whenever a cheap channel
            reaches DRIFT. ``"exact"``: every element every step, rings of the last three
            snapshots; ``"sketch"``: every element every step, O(sketch_buckets) state
            whatever the model size.
        sample_fraction: share of each tensor's blocks the cheap tier reads, in (0, 1].
        max_sampled: elements the cheap tier reads a step at most (default 65,536; ``None``:
            no cap): past ``max_sampled / sample_fraction`` parameters the fraction shrinks,
            so the sample's state and time per step stop growing with the model.
        full_pass_interval: steps between scheduled full passes in ``mode="auto"``, >= 1.
        full_pass: ``"inline"`` (the default): a scheduled full pass runs in the
            ``monitor()`` call; ``"thread"``: on a worker thread overlapped with the next
            training step, its finding (non-finite values) taken one step late
            (:mod:`zetaguard.tiered_worker`, docs/always-on.md). ``mode="auto"`` on host
            memory in one process only, and not for JAX arrays (the next step may free them).
        group_by: per-group results by ``"layer"`` (module path), ``"tensor"`` or ``"none"``.
        threads: engine threads for large models (default: up to 4).
        run_dir: write every step to a run store (SQLite) under this directory.
        device: where torch parameters are reduced. ``"auto"``: CPU tensors in the host
            engine, CUDA tensors on their device (:mod:`zetaguard.engine.device`: only scalars or
            the sketch come back); ``"cuda"``: insist on device tensors; ``"cpu"``: run the
            device path's torch code on CPU tensors (it gives the host engine's results).
        snapshot_interval: STABLE steps between recovery snapshots (docs/recovery.md).
        snapshot_memory_budget: bytes the recovery snapshots may hold in host memory.
    """

    # Each one field of ``settings`` (zetaguard.settings.GuardSettings), read and assignable.
    drift_threshold = Setting[float]()
    snap_threshold = Setting[float]()
    alpha = Setting[float]()
    warmup_steps = Setting[int]()
    auto_recover = Setting[bool]()
    recovery_mode = Setting[RecoveryMode]()
    calibration = Setting[Calibration]()
    mode = Setting[EngineMode]()
    sample_fraction = Setting[float]()
    max_sampled = Setting[int | None]()
    full_pass_interval = Setting[int]()
    full_pass = Setting[tiered_worker.FullPass]()
    sketch_buckets = Setting[int]()
    exact_memory_budget = Setting[int]()
    group_by = Setting[GroupBy]()
    threads = Setting[int]()
    seed = Setting[int]()
    device = Setting[DevicePath]()

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
        sample_fraction: float = tiered.DEFAULT_SAMPLE_FRACTION,
        max_sampled: int | None = tiered.DEFAULT_MAX_SAMPLED,
        full_pass_interval: int = tiered.DEFAULT_FULL_PASS_INTERVAL,
        full_pass: tiered_worker.FullPass = "inline",
    ) -> None:
        #: The checked settings (a frozen GuardSettings; config() is its config()).
        self.settings = GuardSettings.checked(
            drift_threshold=drift_threshold,
            snap_threshold=snap_threshold,
            alpha=alpha,
            warmup_steps=warmup_steps,
            auto_recover=auto_recover,
            recovery_mode=recovery_mode,
            calibration=calibration,
            mode=mode,
            sample_fraction=sample_fraction,
            max_sampled=max_sampled,
            full_pass_interval=full_pass_interval,
            full_pass=full_pass,
            sketch_buckets=sketch_buckets,
            exact_memory_budget=exact_memory_budget,
            group_by=group_by,
            threads=threads,
            seed=seed,
            device=device,
            run_name=run_name,
            snapshot_interval=snapshot_interval,
            snapshot_memory_budget=snapshot_memory_budget,
        )
        self.recovery_protocol = recovery_protocol
        self.checkpoint_dir = checkpoint_dir
        self.run_dir = run_dir
        self.run_name = run_name
        self.model: Any = model
        self.optimizer: Any = optimizer
        self._lock = threading.RLock()
        # The parts (each knows nothing of the guard; the engine reads the settings above).
        self._selection = ParameterSelection()
        self._engine = EngineSession(self)
        self._set_tiers()
        self._detector = self.settings.detector()
        self._stats = RunStatistics()
        self._recovery = RecoveryManager(  # snapshots, the ladder, the pre-step veto
            self,
            snapshot_interval=snapshot_interval,
            snapshot_memory_budget=snapshot_memory_budget,
        )
        # The veto, guarded_step and the clip advice (zetaguard.recovery.gate).
        self._gate = StepGate(self._recovery, self._lock, lambda: distributed.current(self))
        self._reports: list[RecoveryReport] = []
        self._store: RunStore | None = None  # opened at the first recorded step (run_dir)
        # Set each step while torch.distributed spans more than one rank (distributed.py).
        self._dist: distributed.DistributedContext | None = None

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
        self._selection.set_pattern(pattern)
        self._reset_tracking()
        return self

    def monitor_layers(self, layers: Any) -> ZetaGuard:
        """Monitor exactly these layers, each one group: a list (or ``{name: layer}`` dict) of
        modules or of parameter lists. ``monitor()`` is then called without parameters. Names
        come from the attached model when it contains the module (``"encoder.layer.0"``), else
        ``layer{i}``. ``None`` goes back to monitoring what ``monitor()`` is given. Resets the
        trajectory, since the monitored set changes."""
        self._selection.set_layers(layers, self.model)
        self._reset_tracking()
        return self

    def _set_tiers(self) -> None:
        """mode="auto" monitors in tiers (zetaguard.tiered); "exact" and "sketch" read every
        element every step."""
        self._engine.close()  # a worker's pass in flight belongs to the pipeline replaced
        self._engine.tiered = self.settings.pipeline()

    def _reset_tracking(self) -> None:
        self._engine.reset()
        self._selection.forget_matches()
        self._detector.reset()
        self._stats = RunStatistics()

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
        parameters with ``.grad`` set contribute the gradient norm automatically: the norm
        this step's :meth:`guarded_step` / :meth:`should_skip_step` already read when they read
        one and the gradients are unchanged since, else from the gradients.
        """
        source = self._source(params)
        dist = self._dist = distributed.current(self)
        snap = dist.snapshot(source) if dist is not None else snapshot(source)
        snap = route_device(snap, self.device)
        if not snap.tensors:
            raise ValueError(
                "monitor() got no parameters: pass a model with trainable parameters, or a "
                "non-empty list or dict of arrays"
            )
        with self._lock:  # the step's wiring: every part gets explicit values, none the guard
            snap = self._selection.apply(snap)
            given = _as_float(grad_norm, "grad_norm")
            # Not given: the norm this step's veto read, if it still describes the gradients.
            grad = self._gate.take_grad_norm() if given is None else given
            self._gate.drop_grad_norm()
            scored = self._engine.score(
                snap,
                self._detector,
                loss=_as_float(loss, "loss"),
                grad_norm=grad,
                group_of=self.group_of,
                dist=self._dist,
            )
            result = StabilityResult.wrap(
                scored.obs,
                step=self._stats.take_step(step),
                group_names=self._engine.group_names,
                module_types=snap.module_types,
                group_rows=scored.group_rows,
                thresholds=(self.drift_threshold, self.snap_threshold),
                history=scored.history,
            )
            if result.status != "STABLE":  # advice, and the worst group it names, only if needed
                result.recommendations = recommendations(scored.obs, result.worst_group)
            if self._dist is not None:
                result.channels.update(self._dist.channels)
            self._stats.book(result, scored.grad_norm, scored.loss)
            self._record(result)
            if result.status == "DRIFT":  # CRITICAL steps are logged once, by the recovery manager
                batch = "" if batch_index is None else f" batch={batch_index}"
                log.info(
                    "step %d: DRIFT zeta=%.3f worst=%s%s",
                    result.step,
                    result.zeta_value,
                    result.worst_group,
                    batch,
                )
            self._recovery.after_step(result, batch_index)
            return result

    def take_reference(self, params: Any = None) -> bool:
        """Record the parameters as they are *before* the first optimizer step: the engine ring
        gets its first state and the detector its fixed parameter-norm reference (which
        otherwise is the norm after the first update, when a run unstable from its first step
        is already damaged). Integrations call it at train start; it does nothing (returns
        False) once a step was monitored or under torch.distributed. Not a step: nothing is
        scored, counted or stored."""
        if params is None and self.model is None and self._selection.layers is None:
            return False
        if self._stats.step > 0 or distributed.current(self) is not None:
            return False
        snap = route_device(snapshot(self._source(params)), self.device)
        with self._lock:
            if not snap.tensors or self._stats.step > 0 or self._detector.steps > 0:
                return False
            norm = self._engine.take_reference(self._selection.apply(snap), self.group_of)
            return norm is not None and self._detector.set_reference(norm)

    def _source(self, params: Any) -> Any:
        """What a step reads (zetaguard.selection); loose parameters are bound to recovery too."""
        source = self._selection.source(params, self.model)
        if params is not None and self.model is None and self._selection.layers is None:
            source = self._recovery.bind_params(source)  # recovery rolls these back in place
        return source

    def _record(self, result: StabilityResult) -> None:
        """Write the step to the run store (under torch.distributed rank 0 writes for all)."""
        if (
            self._store is None
            and self.run_dir is not None
            and (self._dist is None or self._dist.rank == 0)
        ):
            from zetaguard.store import RunStore

            self._store = RunStore(
                self.run_dir, run_name=self.run_name, config=self.config(), first_step=result.step
            )
        if self._store is not None:
            self._store.record_step(result)

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
            return self._recovery.respond(self._stats.last, force=True)

    def should_skip_step(
        self, loss: Any = None, grad_norm: float | None = None, *, batch_index: int | None = None
    ) -> bool:
        """Call after ``backward()``, before ``optimizer.step()``: True when this update should
        not land (non-finite loss or gradients, or a spike far above the recent median; see
        docs/recovery.md). The gradient norm is read from the attached torch model when not
        given, and the same step's :meth:`monitor` uses it instead of reading the gradients
        again (not after a veto: those gradients are dropped). Each veto is logged as an incident (with ``batch_index`` when given) and listed in
        ``get_statistics()["incidents"]["skipped"]``."""
        return self._gate.should_skip(loss, grad_norm, batch_index)

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
        return self._gate.guarded_step(
            optimizer if optimizer is not None else self.optimizer,
            loss=loss,
            grad_norm=grad_norm,
            clip=clip,
            batch_index=batch_index,
        )

    def should_clip_gradients(self, grad_norm: float | None = None) -> bool:
        """True when ``grad_norm`` (default: the latest monitored one) is above
        :meth:`recommended_clip_value`."""
        return self._gate.should_clip(
            self._stats.last_grad_norm if grad_norm is None else float(grad_norm)
        )

    def recommended_clip_value(self) -> float | None:
        """A max-norm for gradient clipping from the recent gradient norms (median and MAD on the
        log scale; docs/recovery.md), or None until 20 norms have been seen."""
        return self._gate.clip_value()

    def reset_trajectory(self) -> None:
        """After a rollback: forget the finite-difference history (the engine ring must not mix
        states from before and after it) but keep the calibration."""
        self._engine.reset_trajectory()
        self._detector.restart_trajectory()

    # ---- reading back ------------------------------------------------------------------

    @property
    def last_result(self) -> StabilityResult | None:
        return self._stats.last

    @property
    def step(self) -> int:
        """The step number the next monitor() call will carry."""
        return self._stats.step

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
        return self._engine.names

    @property
    def monitored_layers(self) -> dict[str, Any] | None:
        """What :meth:`monitor_layers` chose, by full parameter name, or None."""
        return self._selection.layers

    def config(self) -> dict[str, Any]:
        """The settings a run store and a state file record (:meth:`GuardSettings.config`)."""
        return self.settings.config()

    def get_metrics(self) -> dict[str, float]:
        """The latest step as flat scalars (for loggers): global values, then
        ``group/<name>/zeta``, ``group/<name>/raw_jar`` and ``group/<name>/update_ratio``."""
        return flat_metrics(self._stats.last)

    def get_statistics(self) -> dict[str, Any]:
        """Counts and extremes over the run so far, and what the engine is doing."""
        return {
            **self._stats.summary(),
            "in_warmup": self._detector.in_warmup,
            "confidence": self._detector.confidence(),
            "recoveries": len(self._reports),
            # Incident classes, and the steps (batch indices) undone or skipped.
            "incidents": self._recovery.incidents.summary(),
            **self._engine.statistics(),  # engine, groups, tiered
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
        return self._selection.group_of(name, self.group_by)

    def generate_report(
        self,
        path: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Write an HTML report with PNG plots of the run (loss, zeta, per-layer heat map,
        incidents and actions) from its run store; see :func:`zetaguard.report.generate_report`."""
        from zetaguard.report import generate_report

        return generate_report(self, path=path, run_dir=run_dir)

    def close(self) -> None:
        """Commit and close the run store, if any (also done at interpreter exit), and end the
        full-pass worker thread (``full_pass="thread"``; a later threaded pass starts a new
        one). Monitoring continues; later steps are no longer recorded."""
        with self._lock:
            self._engine.close()
            if self._store is not None:
                self._store.close()
                self._store = None
            self.run_dir = None

    # ---- persistence (the file format lives in zetaguard.state) ------------------------

    def state_dict(self) -> dict[str, Any]:
        """The guard's state in memory, for framework checkpoints (a Lightning callback's
        ``state_dict``): the exact bytes :meth:`save_state` writes, checksum included."""
        return state.to_bytes(self.save_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same checks as :meth:`load_state`)."""
        state.from_bytes(state_dict, self.load_state)

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write the trajectory, the calibration and the recovery ladder's counters to ``path``
        atomically (an ``.npz`` archive, no pickle). A guard that loads it gives the same next
        results, vetoes and recovery decisions as this one (snapshots are not saved)."""
        with self._lock:
            tracker = self._engine.tracker
            state.save_guard(
                path,
                config=self.config(),
                engine_mode=tracker.mode if tracker is not None else None,
                engine_state=self._engine.get_state(),
                names=self._engine.names,
                pattern=self._selection.pattern,
                detector=self._detector,
                stats=self._stats,
                recovery=self._recovery.counters(),
                sampler=self._engine.tiered_state(),
            )

    def load_state(self, path: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_state` wrote. Thresholds and smoothing come from the file.

        All or nothing: the file is parsed and checked completely before the guard changes, so
        a refused file (:class:`zetaguard.state.StateFileError`) leaves the guard as it was."""
        saved = state.load_guard(
            path, threads=self.threads, parse_recovery=RecoveryManager.parse_counters
        )
        settings = self.settings.restored(saved.config, saved.detector)
        with self._lock:
            self.settings = settings
            self._selection.set_pattern(saved.pattern)
            self._detector = saved.detector
            self._set_tiers()
            self._engine.restore(saved.tracker, saved.names, self.group_of, saved.tiers)
            self._stats = saved.stats
            if saved.recovery is not None:
                self._recovery.restore_counters(saved.recovery)
