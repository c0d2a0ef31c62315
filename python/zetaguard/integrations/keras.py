"""``ZetaKeras``: zetaguard as a Keras 3 callback (any backend: TensorFlow, torch, JAX).

>>> model.fit(x, y, callbacks=[ZetaKeras()])

Every training batch the callback reads ``model.trainable_weights`` without copying them (see
:mod:`zetaguard.adapters.tensorflow`), scores the step, and writes two entries into the batch's
``logs`` (so they show in the progress bar, ``History``, ``CSVLogger`` and ``TensorBoard``, and
``EarlyStopping``/``ModelCheckpoint`` can monitor them):

* ``zeta``: the calibrated score of the step (the epoch's largest in the epoch logs);
* ``zeta_status``: 0 = STABLE, 1 = DRIFT, 2 = CRITICAL (the epoch's worst in the epoch logs).
  Numbers, not names, because ``TensorBoard`` and ``CSVLogger`` write every log entry as a
  scalar.

Recovery is the guard's (``docs/recovery.md``): the callback attaches the model and its
optimizer, so on CRITICAL (with ``auto_recover=True``, the default) the guard's ladder rolls the
weights and optimizer variables back to a verified-stable snapshot and cuts the learning rate
through the optimizer's learning-rate variable (:mod:`zetaguard.recovery.keras_backend`); when
the ladder gives up, the callback sets ``model.stop_training``.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from zetaguard.guard import ZetaGuard
from zetaguard.integrations._common import resolve_guard
from zetaguard.results import STATUSES, RecoveryReport, StabilityResult

STATUS_LEVEL = {s: i for i, s in enumerate(STATUSES)}


def weights_to_watch(model: Any) -> Any:
    """What the callback hands ``monitor()`` each batch of a fit: the model's trainable weights,
    listed once (``model.trainable_weights`` walks every layer, ~50 us inside ``fit``, and the
    compiled step fixes the set for the whole fit). On JAX, the model itself: the adapter reads
    the live arrays from the trainer's state through it (``Callback.model`` would write that
    state back to the variables first, on every access)."""
    weights = [] if keras.backend.backend() == "jax" else list(model.trainable_weights)
    return weights or model


class ZetaKeras(keras.callbacks.Callback):  # type: ignore[misc]
    """Watch ``model.fit`` with zetaguard.

    Args:
        guard: the :class:`~zetaguard.ZetaGuard` to use; by default one is built from
            ``guard_kwargs`` (e.g. ``ZetaKeras(warmup_steps=20, recovery_mode="aggressive")``).
        every_n_batches: score every n-th batch (the trajectory then steps n batches at a time).
        stop_on_critical: with ``auto_recover=False``, stop training at the first CRITICAL.
        log_prefix: prefix of the ``logs`` entries (``zeta``, ``zeta_status``).
    """

    def __init__(
        self,
        guard: ZetaGuard | None = None,
        *,
        every_n_batches: int = 1,
        stop_on_critical: bool = False,
        log_prefix: str = "zeta",
        **guard_kwargs: Any,
    ) -> None:
        super().__init__()
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.guard = resolve_guard(guard, guard_kwargs)
        self.every_n_batches = int(every_n_batches)
        self.stop_on_critical = stop_on_critical
        self.zeta_key = log_prefix
        self.status_key = f"{log_prefix}_status"
        self.last_result: StabilityResult | None = None
        self._batches = 0
        self._epoch_zeta = -math.inf
        self._epoch_level = 0
        self._watched: Any = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # Binding captures the state before the first step as the last-resort snapshot.
        self.guard.attach(model=self.model, optimizer=getattr(self.model, "optimizer", None))
        self._batches = 0
        self._watched = weights_to_watch(self.model)
        # The weights before the first update are the reference a run unstable from its first
        # step is measured against (a no-op once this guard has monitored a step).
        self.guard.take_reference(self._watched)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_zeta = -math.inf
        self._epoch_level = 0

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras has no optimizer step hooks: the LR watch runs around the batch (it does
        # nothing before the guard's first LR cut). A callback that sets the LR each batch
        # must come before this one in `callbacks=` for the held cut to apply to its value.
        self.guard.recovery.before_optimizer_step()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.guard.recovery.after_optimizer_step()
        self._batches += 1
        if self._batches % self.every_n_batches:
            return
        reports = len(self.guard.recovery_reports)
        loss = logs.get("loss") if logs else None
        result = self.guard.monitor(self._watched, loss=loss, batch_index=batch)
        self.last_result = result
        level = STATUS_LEVEL[result.status]
        self._epoch_zeta = max(self._epoch_zeta, result.zeta_value)
        self._epoch_level = max(self._epoch_level, level)
        if logs is not None:
            logs[self.zeta_key] = result.zeta_value
            logs[self.status_key] = float(level)
        if result.status != "CRITICAL":
            return
        new = self.guard.recovery_reports[reports:]
        if any(r.restored_step is not None for r in new):
            self.model.reset_metrics()  # the running loss must not carry the blow-up on
        if self.guard.should_stop:
            self.model.stop_training = True
        elif not self.guard.auto_recover and self.stop_on_critical:
            self.model.stop_training = True
            self.guard.add_report(
                RecoveryReport(
                    step=result.step,
                    status=result.status,
                    actions=["stop"],
                    worst_group=result.worst_group,
                    zeta_value=result.zeta_value,
                    stopped=True,
                    message=f"CRITICAL at step {result.step}; stop_on_critical stopped training",
                )
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None and self._epoch_zeta > -math.inf:
            logs[self.zeta_key] = self._epoch_zeta
            logs[self.status_key] = float(self._epoch_level)
