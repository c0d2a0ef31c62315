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
        # The gradient norm the veto read itself, and the backend's mark of the gradients it
        # was read from: the same step's monitor() takes it instead of reading them again.
        self._handover: tuple[float, Any] | None = None

    def _read_grad_norm(self) -> float | None:
        """Read the gradient norm from the attached model, once, for the veto and for the
        next monitor() of this step (the handover needs a backend that can mark gradients)."""
        self._handover = None
        backend = self._recovery.backend
        if backend is None:
            return None
        norm = backend.grad_norm()
        if norm is not None and hasattr(backend, "grad_mark"):
            self._handover = (norm, self._handover_mark())
        return norm

    def _handover_mark(self) -> Any:
        mark = getattr(self._recovery.backend, "grad_mark", None)
        return mark() if mark is not None else None

    def take_grad_norm(self) -> float | None:
        """The gradient norm the veto of this step read, for ``monitor()``; None when the veto
        read none, vetoed the step, or the gradients changed since (a later step's, zeroed, or
        clipped in place). Taking it clears it: one monitor() call, one step."""
        handover, self._handover = self._handover, None
        if handover is None:
            return None
        norm, mark = handover
        backend = self._recovery.backend
        same = getattr(backend, "same_grads", None)
        return norm if same is not None and same(mark) else None

    def drop_grad_norm(self) -> None:
        """Forget the handed-over norm (``monitor()`` was given its own ``grad_norm=``)."""
        self._handover = None

    def should_skip(
        self, loss: Any = None, grad_norm: float | None = None, batch_index: int | None = None
    ) -> bool:
        with self._lock:
            loss_value = as_float(loss, "loss")
            if grad_norm is None:
                grad_norm = self._read_grad_norm()
            else:  # the caller's value; monitor() is to be given it too
                self._handover = None
            return self._decide(loss_value, as_float(grad_norm, "grad_norm"), batch_index)

    def _decide(self, loss: float | None, grad_norm: float | None, batch_index: int | None) -> bool:
        """The veto itself (the caller holds the lock)."""
        reason = self._recovery.skip_reason(loss, grad_norm)
        dist = self._distributed()
        if dist is not None:  # one rank's veto is every rank's (distributed.py)
            reason = dist.agree_on_skip(reason)
        if reason is None:
            self._recovery.record_step_taken()
            return False
        # A vetoed step's gradients are dropped: its monitor() reports no gradient norm, as
        # before the handover (the veto's incident names the reason).
        self._handover = None
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
        with self._lock:
            if grad_norm is None:
                grad_norm = self._read_grad_norm()
            else:
                self._handover = None
            grad_norm = as_float(grad_norm, "grad_norm")
            skip = self._decide(as_float(loss, "loss"), grad_norm, batch_index)
        if skip:
            opt.zero_grad()
            return False
        limit = self.clip_value()
        clip_grad = getattr(backend, "clip_grad_norm", None)
        if clip and limit is not None and grad_norm is not None and grad_norm > limit and clip_grad:
            clip_grad(limit)
            if self._handover is not None:  # the step applies the clipped gradients: their norm
                self._handover = (limit, self._handover_mark())
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
