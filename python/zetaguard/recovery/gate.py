"""The pre-step gate: the veto (``should_skip_step``), ``guarded_step`` and the clip advice.

:class:`zetaguard.ZetaGuard` keeps these public methods, with their documentation, as thin
delegations to a :class:`StepGate`. The gate works over the guard's
:class:`~zetaguard.recovery.manager.RecoveryManager` and explicit values; it never sees the guard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from zetaguard._validate import as_float
from zetaguard.recovery.manager import RecoveryManager


class SkipAgreement(Protocol):
    """What the gate needs under torch.distributed (``DistributedContext`` is one)."""

    def agree_on_skip(self, reason: str | None) -> str | None: ...


class StepGate:
    """Decides, before ``optimizer.step()``, whether the update lands and how it is clipped.

    Args:
        recovery: the guard's recovery manager (the loss and gradient-norm histories, the
            ladder's veto ratios, the backend that reads and clips gradients).
        lock: the guard's lock; the veto runs under it, as ``monitor()`` does.
        distributed: the context to agree on a veto with this step, or None on one process.
    """

    def __init__(
        self,
        recovery: RecoveryManager,
        lock: AbstractContextManager[Any],
        distributed: Callable[[], SkipAgreement | None],
    ) -> None:
        self._recovery = recovery
        self._lock = lock
        self._distributed = distributed

    def should_skip(
        self, loss: Any = None, grad_norm: float | None = None, batch_index: int | None = None
    ) -> bool:
        with self._lock:
            loss_value = as_float(loss, "loss")
            reason = self._recovery.skip_reason(loss_value, as_float(grad_norm, "grad_norm"))
            dist = self._distributed()
            if dist is not None:  # one rank's veto is every rank's (distributed.py)
                reason = dist.agree_on_skip(reason)
            if reason is None:
                self._recovery.record_step_taken()
                return False
            self._recovery.record_skip(reason, batch_index)
            return True

    def guarded_step(
        self,
        opt: Any,
        *,
        loss: Any = None,
        grad_norm: float | None = None,
        clip: bool = True,
        batch_index: int | None = None,
    ) -> bool:
        if opt is None:
            raise ValueError(
                "guarded_step() needs an optimizer: pass it, or guard.attach(optimizer=...)"
            )
        if self._recovery.stopped:
            return False
        backend = self._recovery.backend
        if grad_norm is None and backend is not None:
            grad_norm = backend.grad_norm()
        if self.should_skip(loss=loss, grad_norm=grad_norm, batch_index=batch_index):
            opt.zero_grad()
            return False
        limit = self.clip_value()
        clip_grad = getattr(backend, "clip_grad_norm", None)
        if clip and limit is not None and grad_norm is not None and grad_norm > limit and clip_grad:
            clip_grad(limit)
        opt.step()
        return True

    def should_clip(self, grad_norm: float | None) -> bool:
        """True when ``grad_norm`` (None: not known, so False) is above :meth:`clip_value`."""
        limit = self.clip_value()
        if grad_norm is None or limit is None:
            return False
        return not math.isfinite(grad_norm) or grad_norm > limit

    def clip_value(self) -> float | None:
        return self._recovery.clip_value()
