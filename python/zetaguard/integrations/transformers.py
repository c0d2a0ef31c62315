"""Hugging Face: ``Trainer(..., callbacks=[ZetaGuardCallback()])``.

* ``on_train_begin``: the guard is attached to the model, the optimizer and the LR scheduler
  the Trainer built, so an LR cut scales the scheduler's ``base_lrs`` too and lasts (the
  scheduler rewrites ``param_groups[i]["lr"]`` every step);
* ``on_pre_optimizer_step``: the gradient norm is read; a vetoed update
  (``guard.should_skip_step``) has its gradients dropped, so the optimizer leaves weights and
  moments untouched. The Trainer clips the gradients (``max_grad_norm``, 1.0 by default) before
  this hook, so a norm read here is capped and hides spikes; with ``install(trainer)`` the
  callback records the norm the Trainer computes *before* clipping instead (and reads nothing);
* ``on_step_end``: one ``guard.monitor`` per optimizer step; ``control.should_training_stop``
  when the guard's recovery ladder says stop;
* ``on_log``: the guard's metrics join the Trainer's logs and ``state.log_history``. The
  Trainer calls its ``report_to`` reporters before callbacks passed in ``callbacks=``; to have
  them (TensorBoard, W&B, ...) record the guard's metrics too, add the callback with
  ``ZetaGuardCallback().install(trainer)``, which puts it first (and records the pre-clip
  gradient norm, above).

The Trainer does not hand callbacks the training loss, so the loss channels stay empty here;
parameters and gradients carry the signal.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from zetaguard.adapters.torch import drop_grads, grad_norm
from zetaguard.guard import ZetaGuard
from zetaguard.integrations._common import logged_metrics, resolve_guard
from zetaguard.results import StabilityResult


class ZetaGuardCallback(TrainerCallback):
    """Watch a Hugging Face ``Trainer`` run with a :class:`zetaguard.ZetaGuard`.

    Args:
        guard: the guard to use (default: ``ZetaGuard(**guard_kwargs)``).
        skip_bad_steps: veto updates the guard flags before ``optimizer.step()``.
        log_layers: add the per-layer metrics to the Trainer's logs.
        guard_kwargs: arguments of :class:`ZetaGuard` when ``guard`` is not given.
    """

    def __init__(
        self,
        guard: ZetaGuard | None = None,
        *,
        skip_bad_steps: bool = True,
        log_layers: bool = False,
        **guard_kwargs: Any,
    ) -> None:
        self.guard = resolve_guard(guard, guard_kwargs)
        self.skip_bad_steps = skip_bad_steps
        self.log_layers = log_layers
        self.last_result: StabilityResult | None = None
        self.skipped_steps = 0
        self._grad_norm: float | None = None
        self._pre_clip_norm: Any = None  # recorded by install(): the Trainer's own, pre-clip

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        self.guard.attach(model=model, optimizer=optimizer, scheduler=lr_scheduler)

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        pre_clip, self._pre_clip_norm = self._pre_clip_norm, None
        self._grad_norm = _finite_or_inf(pre_clip) if pre_clip is not None else grad_norm(model)
        if self.skip_bad_steps and self.guard.should_skip_step(grad_norm=self._grad_norm):
            drop_grads(model)
            self.skipped_steps += 1

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> TrainerControl:
        self.last_result = self.guard.monitor(model, grad_norm=self._grad_norm,
                                              step=state.global_step)
        if self.guard.should_stop:
            control.should_training_stop = True
        return control

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or self.last_result is None:
            return
        metrics = logged_metrics(self.guard, layers=self.log_layers)
        logs.update(metrics)  # what callbacks after this one (printers, reporters) see
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # the Trainer copied the logs before calling back

    def install(self, trainer: Any) -> ZetaGuardCallback:
        """Add this callback to ``trainer`` *first*, so the reporting callbacks ``report_to``
        created (TensorBoard, W&B, ...) see the guard's metrics in every log; and record the
        gradient norm the Trainer computes before it clips, for the veto and the guard's
        gradient channel (clipped norms are capped at ``max_grad_norm`` and hide spikes)."""
        trainer.callback_handler.callbacks.insert(0, self)
        self._record_pre_clip_norm(trainer)
        return self

    def _record_pre_clip_norm(self, trainer: Any) -> None:
        # The Trainer computes the norm in `_get_grad_norm` (transformers >= 5) and keeps it in
        # a local; wrapping that method on this instance is the one place it can be seen.
        # Without it (other versions) the callback reads the gradients itself.
        compute = getattr(trainer, "_get_grad_norm", None)
        if compute is None or getattr(compute, "zetaguard_recorder", False):
            return

        def recorded(model: Any, grad_norm: Any = None) -> Any:
            value = compute(model, grad_norm=grad_norm)
            self._pre_clip_norm = value
            return value

        recorded.zetaguard_recorder = True  # type: ignore[attr-defined]
        trainer._get_grad_norm = recorded


def _finite_or_inf(norm: Any) -> float:
    """A recorded norm (a float or a 0-d tensor) as the guard's gradient norms read: non-finite
    (NaN from a NaN gradient) as ``inf``."""
    value = float(norm)
    return value if math.isfinite(value) else math.inf
