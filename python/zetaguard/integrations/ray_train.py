"""Ray Train: the guard inside each worker's training function of a ``TorchTrainer``.

Ray Train starts ``torch.distributed`` in every worker (gloo on CPUs, NCCL on GPUs) before the
training function runs, so a guard made there finds the group by itself: one collective per
step, the same status and the same recovery action on every worker (``docs/scaling.md``).

>>> def train_loop(config):
...     model = ray.train.torch.prepare_model(Net())
...     opt = torch.optim.Adam(model.parameters(), lr=1e-3)
...     guard = ZetaGuard(mode="exact").attach(model=model, optimizer=opt)
...     for step, (x, y) in enumerate(loader):
...         ...  # forward, backward, opt.step()
...         guard.monitor(model, loss=loss.item(), batch_index=step)
...         if guard.should_stop or step % 10 == 0:
...             report(guard, {"loss": loss.item()})
...         if guard.should_stop:  # the same step on every worker
...             return metrics(guard)  # Result.return_value says why

Returning (instead of raising) ends every worker cleanly, so ``FailureConfig(max_failures=N)``
does not start the run again: restarts are for failures, and a stop the guard chose on purpose
is not one. A rank that hangs or dies makes the others raise ``RankFailureError`` within the
guard's deadline (:func:`zetaguard.distributed.configure`), a failure Ray then handles as any
other (a restart while ``max_failures`` allows).

Imports Ray only inside :func:`report`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from zetaguard.guard import ZetaGuard

STATE_FILE = "zetaguard_state.npz"


def stop_reason(guard: ZetaGuard) -> str | None:
    """Why the guard stopped the run (its last stopping report's message), or None."""
    if not guard.should_stop:
        return None
    stopping = [r for r in guard.recovery_reports if r.stopped]
    return stopping[-1].message if stopping else "the guard's ladder said stop"


def metrics(guard: ZetaGuard) -> dict[str, Any]:
    """The guard's latest step as ``ray.train.report`` metrics: ``zeta_value``,
    ``zeta_status`` ("STABLE" / "DRIFT" / "CRITICAL"), ``zeta_raw_jar`` (when defined),
    ``zeta_step``, ``zeta_should_stop`` and, once the guard stops the run, ``zeta_stop_reason``."""
    r = guard.last_result
    if r is None:
        raise ValueError("the guard has monitored no step yet; call guard.monitor() first")
    out: dict[str, Any] = {
        "zeta_value": float(r.zeta_value),
        "zeta_status": r.status,
        "zeta_step": int(r.step),
        "zeta_should_stop": bool(guard.should_stop),
    }
    if r.raw_jar is not None:
        out["zeta_raw_jar"] = float(r.raw_jar)
    reason = stop_reason(guard)
    if reason is not None:
        out["zeta_stop_reason"] = reason
    return out


def report(
    guard: ZetaGuard, extra: dict[str, Any] | None = None, checkpoint: Any = None
) -> dict[str, Any]:
    """``ray.train.report`` this step's metrics with the guard's (:func:`metrics`); returns them.

    When the guard stops the run and no ``checkpoint`` is given, worker 0 reports a checkpoint
    holding the guard's state file (``zetaguard_state.npz``): Ray Train keeps the metrics of
    the latest checkpoint as ``Result.metrics``, so the run's result then carries the stop and
    its reason. Every worker must call this at the same steps (Ray's rule for ``report``); the
    guard stops every worker at the same step. Each call waits for Ray's controller (it polls
    every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default), so report every N steps.
    """
    import ray.train

    out = {**(extra or {}), **metrics(guard)}
    if checkpoint is not None or not guard.should_stop or ray.train.get_context().get_world_rank():
        ray.train.report(out, checkpoint=checkpoint)
        return out
    with tempfile.TemporaryDirectory(prefix="zetaguard-stop-") as tmp:
        guard.save_state(Path(tmp) / STATE_FILE)
        # The upload is synchronous by default: the directory may go once report() returns.
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    return out
