"""What recovery acts on: the guard's model (or, with none attached, the parameters handed to
``monitor()``), its optimizer and LR scheduler, and the :class:`RecoveryBackend` built over them.

:class:`RecoveryTarget` is the part of :class:`zetaguard.recovery.manager.RecoveryManager` that
binds and rebinds these; the manager decides what to do with the backend.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any, Protocol

from zetaguard.adapters import materialize
from zetaguard.recovery.backend import RecoveryBackend, make_backend
from zetaguard.recovery.lr_watch import LrWatch


class TargetHost(Protocol):
    """Where the model and optimizer are attached (``ZetaGuard`` is one)."""

    @property
    def model(self) -> Any: ...
    @property
    def optimizer(self) -> Any: ...


class RecoveryTarget:
    """The bound model or parameters, optimizer and scheduler, and their backend (built at
    first use, rebuilt after :meth:`rebind`). ``lr_watch`` is the manager's: a dropped backend
    ends its episode, and the optimizer-step calls apply it."""

    def __init__(self, host: TargetHost, lr_watch: LrWatch) -> None:
        self.host = host
        self.lr_watch = lr_watch
        self.scheduler: Any = None
        self.params: Any = None  # what monitor() was handed, when no model is attached
        self._backend: RecoveryBackend | None = None

    def rebind(self, scheduler: Any = None) -> None:
        """After ``guard.attach``: take the new scheduler (if given) and drop the backend, so
        the next use builds it over what is attached now."""
        if scheduler is not None:
            self.scheduler = scheduler
        self._drop_backend()

    def bind_params(self, params: Any) -> Any:
        """Remember the parameters handed to ``monitor()`` when no model is attached, so a
        rollback can write them back in place. Returns them (a generator made a list)."""
        if params is self.params:  # the same object as last step (the common loop)
            return params
        if isinstance(params, Iterator):
            params = materialize(params)
        if _same_items(params, self.params):  # the same tensors as last step: nothing to rebind
            self.params = params
            return params
        self.params = params
        backend = self._backend
        if backend is not None and self.host.model is None:
            set_params = getattr(backend, "set_params", None)
            if set_params is not None:
                set_params(params)
        return params

    def _drop_backend(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:  # optimizer hooks of the LR watch
            close()
        self._backend = None
        self.lr_watch.end_episode()

    def before_optimizer_step(self) -> None:
        """Apply the LR watch just before the update (frameworks without optimizer hooks)."""
        if self.lr_watch.active and self._backend is not None:
            self.lr_watch.before_step(self._backend, self.scheduler)

    def after_optimizer_step(self) -> None:
        """The counterpart of :meth:`before_optimizer_step`, just after the update."""
        if self.lr_watch.active and self._backend is not None:
            self.lr_watch.after_step(self._backend, self.scheduler)

    @property
    def backend(self) -> RecoveryBackend | None:
        if self._backend is None:
            target = self.host.model if self.host.model is not None else self.params
            if target is None:
                return None
            self._backend = make_backend(target, self.host.optimizer, self.scheduler)
        return self._backend


def _same_items(new: Any, old: Any) -> bool:
    """True when ``new`` holds the very objects ``old`` held (a fresh list of the same
    parameters, as ``model.parameters()`` gives each step), compared by identity only."""
    if new is old:
        return True
    if type(new) is not list or type(old) is not list or len(new) != len(old):
        return False
    if new and type(new[0]) is tuple:  # named pairs: the names must match, the values be the same
        return all(
            type(a) is tuple
            and type(b) is tuple
            and len(a) == len(b) == 2
            and a[0] == b[0]
            and a[1] is b[1]
            for a, b in zip(new, old, strict=True)
        )
    return all(map(operator.is_, new, old))
