"""Hugging Face: ``Trainer(..., callbacks=[ZetaGuardCallback()])``.

* ``on_train_begin``: the guard is attached to the model, the optimizer and the LR scheduler
  the Trainer built, so an LR cut scales the scheduler's ``base_lrs`` too and lasts (the
  scheduler rewrites ``param_groups[i]["lr"]`` every step); the weights as they are before the
  first optimizer step become the guard's reference (``guard.take_reference``), so a run
  unstable from its first update is measured against where it started; and two hooks go on the
  model (removed at ``on_train_end``):

  - a forward hook that reads the loss of every training forward pass (``outputs.loss``, what
    the Trainer's ``compute_loss`` takes for a model given labels), averaged over the
    micro-batches of an optimizer step: the guard's loss channels and the loss veto;
  - a post-accumulate-gradient hook per parameter that takes each gradient's norm once the
    step's last micro-batch has accumulated it: the gradient norm *before* the Trainer clips
    (``max_grad_norm``, 1.0 by default, clips before ``on_pre_optimizer_step``; a clipped norm
    is capped and hides spikes), unscaled when the optimizer has a ``GradScaler``.
* ``on_pre_optimizer_step``: a vetoed update (``guard.should_skip_step`` on that loss and
  norm) has its gradients dropped, so the optimizer leaves weights and moments untouched;
* ``on_step_end``: one ``guard.monitor`` per optimizer step; ``control.should_training_stop``
  when the guard's recovery ladder says stop;
* ``on_log``: the guard's metrics join the Trainer's logs and ``state.log_history``. The
  Trainer calls its ``report_to`` reporters before callbacks passed in ``callbacks=``; to have
  them (TensorBoard, W&B, ...) record the guard's metrics too, add the callback with
  ``ZetaGuardCallback().install(trainer)``, which puts it first and records the Trainer's own
  pre-clip norm instead of the gradient hooks.

A model whose output carries no ``loss`` (a custom ``compute_loss``) leaves the loss channels
empty; parameters and gradients still carry the signal. Under gradient accumulation with
DDP the hooks see each rank's local gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
        self._loss: float | None = None
        self._pre_clip_norm: Any = None  # recorded by install(): the Trainer's own, pre-clip
        self._installed = False
        self._hooks: list[Any] = []
        self._losses: list[Any] = []  # this step's micro-batch losses (0-d tensors)
        self._grad_sq: dict[int, Any] = {}  # parameter index -> squared gradient norm
        self._scaler: Any = None
        self._sync_state: Any = None

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
        if model is None:
            return
        self.guard.take_reference(model)
        self._scaler = getattr(optimizer, "scaler", None)
        self._sync_state = _gradient_state()
        self._remove_hooks()
        self._hooks.append(model.register_forward_hook(self._record_loss))
        if not self._installed:
            for i, p in enumerate(q for q in model.parameters() if q.requires_grad):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._losses = []
        self._grad_sq = {}

    def _record_loss(self, module: Any, args: Any, output: Any) -> None:
        import torch

        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, or a forward pass outside training
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach())

    def _grad_hook(self, index: int) -> Any:
        import torch

        def hook(p: Any) -> None:
            sync = self._sync_state
            if p.grad is None or (sync is not None and not sync.sync_gradients):
                return  # a micro-batch before the step's last: its gradient is not final
            self._grad_sq[index] = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)

        return hook

    def _step_loss(self) -> float | None:
        losses = self._losses
        if len(losses) == 1:  # no accumulation: the one value, without stacking (same number)
            return float(losses[0])
        if not losses:
            return None
        import torch

        return float(torch.stack(losses).float().mean())

    def _hooked_grad_norm(self) -> float | None:
        if not self._grad_sq:
            return None
        import torch

        norm = float(torch.linalg.vector_norm(torch.stack(list(self._grad_sq.values()))))
        scale = self._scaler.get_scale() if self._scaler is not None else 1.0
        return _finite_or_inf(norm / scale) if scale else math.inf

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        pre_clip, self._pre_clip_norm = self._pre_clip_norm, None
        hooked = self._hooked_grad_norm()
        self._grad_sq = {}
        self._loss = self._step_loss()
        self._losses = []
        if pre_clip is not None:
            self._grad_norm = _finite_or_inf(pre_clip)
        else:
            self._grad_norm = hooked if hooked is not None else grad_norm(model)
        if self.skip_bad_steps and self.guard.should_skip_step(
            loss=self._loss, grad_norm=self._grad_norm
        ):
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
        loss, self._loss = self._loss, None
        self.last_result = self.guard.monitor(
            model, loss=loss, grad_norm=self._grad_norm, step=state.global_step
        )
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
        self._installed = True
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


def _gradient_state() -> Any:
    """accelerate's shared gradient state (the Trainer sets its ``sync_gradients`` before each
    micro-batch: True on the one that ends an optimizer step), or None where it is absent."""
    try:
        from accelerate.state import GradientState  # type: ignore[import-untyped]
    except ImportError:
        return None
    return GradientState()


def _finite_or_inf(norm: Any) -> float:
    """A recorded norm (a float or a 0-d tensor) as the guard's gradient norms read: non-finite
    (NaN from a NaN gradient) as ``inf``."""
    value = float(norm)
    return value if math.isfinite(value) else math.inf
