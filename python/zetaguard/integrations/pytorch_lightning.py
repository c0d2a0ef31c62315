"""Lightning: ``Trainer(callbacks=[ZetaCallback()])``.

* ``on_fit_start``: the guard is attached to the LightningModule, the first optimizer in
  ``trainer.optimizers`` and its LR scheduler, so recovery (rollback, LR cuts that persist
  through the scheduler, stop) acts on what the Trainer trains, and the weights before the
  first optimizer step become the guard's reference (``guard.take_reference``);
* ``on_before_optimizer_step``: where something needs the exact gradient norm, it is read here,
  once, before Lightning clips the gradients: the veto (``skip_bad_steps``; if the guard vetoes
  the update, non-finite or spiking gradients, ``guard.should_skip_step``, the gradients are
  dropped, so the optimizer leaves the weights and its moments untouched), gradient clipping
  configured on the Trainer or in ``configure_gradient_clipping`` (Lightning 2.6 discards the
  norm its clipping computes, and the clipped gradients would hide a spike), or
  ``exact_grad_norm=True``. Otherwise nothing is read here: the guard's cheap tier estimates
  the norm from its sample of the gradients in ``monitor()`` (docs/always-on.md);
* ``on_train_batch_end``: one ``guard.monitor`` per optimizer step (gradient accumulation
  respected) with the loss from the step's outputs; metrics go through ``pl_module.log``
  (so to whatever logger the Trainer has); ``trainer.should_stop`` is set when the guard's
  recovery ladder says stop;
* ``state_dict`` / ``load_state_dict``: a Trainer resumed from a checkpoint resumes the guard
  (trajectory, calibration, counters) instead of starting a new warm-up.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl  # type: ignore[no-redef]

from zetaguard.adapters.torch import drop_grads, grad_norm
from zetaguard.guard import ZetaGuard
from zetaguard.integrations._common import logged_metrics, loss_value, resolve_guard
from zetaguard.results import StabilityResult


class ZetaCallback(pl.Callback):
    """Watch a Lightning run with a :class:`zetaguard.ZetaGuard`.

    Args:
        guard: the guard to use (default: ``ZetaGuard(**guard_kwargs)``).
        skip_bad_steps: veto updates the guard flags before ``optimizer.step()``.
        log_metrics: send the guard's metrics to the Trainer's logger every step.
        log_layers: include the per-layer metrics (one series per layer).
        prog_bar: show ``zeta`` in the progress bar.
        exact_grad_norm: read the exact gradient norm every step even where nothing else needs
            it (by default the veto and Trainer clipping read it; without them the guard
            estimates it from its sample, in ``mode="auto"``).
        guard_kwargs: arguments of :class:`ZetaGuard` when ``guard`` is not given.
    """

    def __init__(
        self,
        guard: ZetaGuard | None = None,
        *,
        skip_bad_steps: bool = True,
        log_metrics: bool = True,
        log_layers: bool = False,
        prog_bar: bool = False,
        exact_grad_norm: bool = False,
        **guard_kwargs: Any,
    ) -> None:
        self.guard = resolve_guard(guard, guard_kwargs)
        self.skip_bad_steps = skip_bad_steps
        self.log_metrics = log_metrics
        self.log_layers = log_layers
        self.prog_bar = prog_bar
        self.exact_grad_norm = exact_grad_norm
        self.last_result: StabilityResult | None = None
        self.skipped_steps = 0
        self._grad_norm: float | None = None
        self._stepped = False

    # ---- wiring -------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        scheduler = None
        for config in trainer.lr_scheduler_configs:
            if optimizer is not None and config.scheduler.optimizer is optimizer:
                scheduler = config.scheduler
                break
        self.guard.attach(model=pl_module, optimizer=optimizer, scheduler=scheduler)
        # The weights before the first update are the reference a run unstable from its first
        # step is measured against (a no-op for a guard resumed from a checkpoint).
        self.guard.take_reference(pl_module)

    # ---- the step -----------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._stepped = True
        self._grad_norm = None
        if self.skip_bad_steps or self.exact_grad_norm or _clips(trainer, pl_module):
            self._grad_norm = grad_norm(pl_module)
        if self.skip_bad_steps and self.guard.should_skip_step(grad_norm=self._grad_norm):
            drop_grads(pl_module)
            self.skipped_steps += 1

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._stepped:  # accumulating gradients: the weights did not move
            return
        self._stepped = False
        self.last_result = self.guard.monitor(
            pl_module,
            loss=loss_value(outputs),
            grad_norm=self._grad_norm,
            batch_index=batch_idx,
        )
        if self.log_metrics:
            metrics = logged_metrics(self.guard, layers=self.log_layers)
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=True, prog_bar=False)
            if self.prog_bar:
                pl_module.log(
                    "zeta",
                    self.last_result.zeta_value,
                    on_step=True,
                    on_epoch=False,
                    logger=False,
                    prog_bar=True,
                )
        if self.guard.should_stop:
            trainer.should_stop = True

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"guard": self.guard.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.guard.load_state_dict(state_dict["guard"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


def _clips(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """True when Lightning changes the gradients after ``on_before_optimizer_step``: clipping
    set on the Trainer, or the module's own ``configure_gradient_clipping``."""
    custom = (
        type(pl_module).configure_gradient_clipping
        is not pl.LightningModule.configure_gradient_clipping
    )
    return bool(trainer.gradient_clip_val) or custom
