"""Hugging Face: ``Trainer(..., callbacks=[ZetaGuardCallback()])``.

* ``on_train_begin``: the guard is attached to the model, the optimizer and the LR scheduler
  the Trainer built, so an LR cut scales the scheduler's ``base_lrs`` too and lasts (the
  scheduler rewrites ``param_groups[i]["lr"]`` every step);
* ``on_pre_optimizer_step``: the gradient norm is read (after the Trainer's own clipping at
  ``max_grad_norm``); a vetoed update (``guard.should_skip_step``) has its gradients dropped, so
  the optimizer leaves weights and moments untouched;
* ``on_step_end``: one ``guard.monitor`` per optimizer step; ``control.should_training_stop``
  when the guard's recovery ladder says stop;
* ``on_log``: the guard's metrics join the Trainer's logs and ``state.log_history``. The
  Trainer calls its ``report_to`` reporters before callbacks passed in ``callbacks=``; to have
  them (TensorBoard, W&B, ...) record the guard's metrics too, add the callback with
  ``ZetaGuardCallback().install(trainer)``, which puts it first.

The Trainer does not hand callbacks the training loss, so the loss channels stay empty here;
parameters and gradients carry the signal.
"""

from __future__ import annotations

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
        self._grad_norm = grad_norm(model)
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
        created (TensorBoard, W&B, ...) see the guard's metrics in every log."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self
