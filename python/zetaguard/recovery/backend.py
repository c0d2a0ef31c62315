"""The recovery backend protocol: what the framework-neutral recovery core asks of a framework.

The core (:mod:`zetaguard.recovery.manager`) decides *when* to snapshot, roll back, cut the
learning rate, skip or stop. A *backend* knows *how* for one framework. It is bound, when it is
built, to the objects it acts on (a model or a list of parameters, and optionally an optimizer
and a learning-rate scheduler), and offers:

``capture(step, data_position=None) -> StateSnapshot``
    Copy everything a rollback needs into host memory: parameters (and buffers such as
    BatchNorm statistics), the optimizer state (moments, step counts), the RNG states (the
    framework's, NumPy's global one and Python's ``random``) and, when the caller knows it, the
    data position (``batch_index`` of the step). The copies must not alias live memory: later
    training steps must not change a snapshot.

``restore(snapshot) -> None``
    Write a snapshot back **in place** (parameter objects keep their identity, so optimizers,
    DDP buckets and user references stay valid) and bit for bit. The optimizer state comes back
    from the snapshot, and so does an attached scheduler's position (its step count), but the
    *learning rates stay as they are now* (the groups' and the scheduler's base LRs): an LR cut
    made after the snapshot was taken must survive the rollback. Restoring must not make live state alias the
    snapshot (the same snapshot may be restored twice).

``get_lrs() -> list[float]``
    The current learning rate of each parameter group (empty without an optimizer).

``scale_lr(factor) -> None``
    Multiply every learning rate by ``factor`` so that it *persists*: when a scheduler is attached
    it must be scaled too (PyTorch schedulers, and the Hugging Face / Lightning ones built on them,
    recompute ``param_groups[i]['lr']`` from ``scheduler.base_lrs`` every step; Keras schedules
    are wrapped). No-op without an optimizer.

``grad_norm() -> float | None``
    The global L2 norm of the current gradients, ``inf`` if any is non-finite, ``None`` where the
    backend cannot see gradients (Keras ``fit`` hides them). Used by the pre-step veto.

``zero_grad() -> None``
    Drop the current gradients (the veto of a step). No-op where gradients are not held.

``save_checkpoint(directory, stem, guard_state) -> list[str]``
    Write an emergency checkpoint of model, optimizer and ``guard_state`` (a JSON-able dict) into
    ``directory`` with file names starting with ``stem``, atomically (use the helpers in
    :mod:`zetaguard.checkpoint`); return the paths written, the main file first.

Backends are chosen by :func:`make_backend` from the root module of the model's type (the same
dispatch the monitoring adapters use), so this module imports no framework. A framework
integration can register its own with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from zetaguard.adapters import framework_root

log = logging.getLogger("zetaguard")


@dataclass
class StateSnapshot:
    """One saved training state, as captured by a backend.

    ``params`` and ``optimizer_state`` are framework-specific (the backend that captured the
    snapshot is the one that restores it); ``nbytes`` is the host memory they hold, which the
    snapshot keeper checks against its budget; ``lrs`` is filled in by the keeper when the
    backend left it empty (a backend that reads the learning rate with the state sets it).
    """

    step: int
    params: Any
    optimizer_state: Any = None
    rng: dict[str, Any] = field(default_factory=dict)
    data_position: Any = None
    nbytes: int = 0
    has_optimizer_state: bool = False
    lrs: list[float] = field(default_factory=list)  # the learning rates at capture time
    scheduler_state: Any = None  # the attached LR scheduler's state_dict(), where it has one


@runtime_checkable
class RecoveryBackend(Protocol):
    """See the module docstring for the contract of each method."""

    framework: str

    def capture(self, step: int, data_position: Any = None) -> StateSnapshot: ...

    def restore(self, snapshot: StateSnapshot) -> None: ...

    def get_lrs(self) -> list[float]: ...

    def scale_lr(self, factor: float) -> None: ...

    def grad_norm(self) -> float | None: ...

    def zero_grad(self) -> None: ...

    def save_checkpoint(
        self, directory: Path, stem: str, guard_state: dict[str, Any]
    ) -> list[str]: ...


# ---- RNG states shared by every backend ---------------------------------------------------


def capture_host_rng() -> dict[str, Any]:
    """Python's and NumPy's global RNG states (a backend adds its framework's own)."""
    # The legacy global state is what user code seeded with np.random.seed() draws from.
    return {"python": random.getstate(), "numpy": np.random.get_state()}  # noqa: NPY002


def restore_host_rng(rng: Mapping[str, Any]) -> None:
    if "python" in rng:
        random.setstate(rng["python"])
    if "numpy" in rng:
        np.random.set_state(rng["numpy"])  # noqa: NPY002


# ---- NumPy (and any writable host array) --------------------------------------------------


class NumpyBackend:
    """Parameters held as writable NumPy arrays (a list, a tuple or a dict of them).

    Rollback writes the snapshot back with ``arr[...] = saved``. There is no optimizer, so no
    learning rate to cut and no optimizer state; the guard still rolls parameters back.
    Arrays that cannot be written in place (read-only views, JAX arrays) cannot be rolled back:
    :meth:`restore` raises with the reason.
    """

    framework = "numpy"

    def __init__(self, params: Any) -> None:
        self.params: list[Any] = []
        self.set_params(params)

    def set_params(self, params: Any) -> None:
        """Point the backend at the arrays the user is training now (a NumPy loop may rebind
        its arrays between steps)."""
        if isinstance(params, Mapping):
            arrays = list(params.values())
        elif isinstance(params, (list, tuple)):
            arrays = [p[1] if _is_named_pair(p) else p for p in params]
        else:
            arrays = [params]
        self.params = arrays

    def capture(self, step: int, data_position: Any = None) -> StateSnapshot:
        saved = [np.array(p, copy=True) for p in self.params]
        return StateSnapshot(
            step=step,
            params=saved,
            rng=capture_host_rng(),
            data_position=data_position,
            nbytes=sum(a.nbytes for a in saved),
        )

    def restore(self, snapshot: StateSnapshot) -> None:
        saved: list[np.ndarray[Any, Any]] = snapshot.params
        if len(saved) != len(self.params):
            raise ValueError(
                f"the snapshot holds {len(saved)} arrays but {len(self.params)} are monitored "
                "now; roll back only with the same parameter set"
            )
        for i, (live, old) in enumerate(zip(self.params, saved, strict=True)):
            if not isinstance(live, np.ndarray) or not live.flags.writeable:
                raise TypeError(
                    f"parameter {i} ({type(live).__name__}) cannot be written in place, so it "
                    "cannot be rolled back; monitor writable NumPy arrays or torch tensors"
                )
            live[...] = old
        restore_host_rng(snapshot.rng)

    def get_lrs(self) -> list[float]:
        return []

    def scale_lr(self, factor: float) -> None:
        return None

    def grad_norm(self) -> float | None:
        return None

    def zero_grad(self) -> None:
        return None

    def save_checkpoint(self, directory: Path, stem: str, guard_state: dict[str, Any]) -> list[str]:
        from zetaguard.checkpoint import save_safetensors

        tensors = {str(i): np.ascontiguousarray(p) for i, p in enumerate(self.params)}
        path = directory / f"{stem}.safetensors"
        save_safetensors(path, tensors, guard_state)
        return [str(path)]


def _is_named_pair(p: Any) -> bool:
    return isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)


# ---- dispatch -------------------------------------------------------------------------------

# Root module of the model's (or first parameter's) type -> module with `make_backend(...)`.
_BACKEND_MODULES: dict[str, str] = {
    "torch": "zetaguard.recovery.sharded",  # the torch backend, or the sharded one under torch.distributed
    "keras": "zetaguard.recovery.keras_backend",
    "tensorflow": "zetaguard.recovery.keras_backend",
}


def register_backend(root_module: str, backend_module: str) -> None:
    """Route models whose type lives under ``root_module`` to ``backend_module``, a module with
    ``make_backend(model, optimizer=None, scheduler=None) -> RecoveryBackend``."""
    _BACKEND_MODULES[root_module] = backend_module


def _root(obj: Any) -> str:
    return framework_root(obj, _BACKEND_MODULES)


def _probe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return next(iter(obj.values()), obj)
    if isinstance(obj, (list, tuple)) and obj:
        return obj[0][1] if _is_named_pair(obj[0]) else obj[0]
    return obj


def make_backend(model: Any, optimizer: Any = None, scheduler: Any = None) -> RecoveryBackend:
    """The backend for ``model`` (a model object, or a list/dict of parameters)."""
    if isinstance(model, Iterator):
        raise TypeError(
            "recovery needs to reach the parameters again later; pass the model or a list of "
            "parameters, not a one-shot generator such as model.parameters()"
        )
    module = _BACKEND_MODULES.get(_root(_probe(model)))
    if module is not None:
        backend: RecoveryBackend = importlib.import_module(module).make_backend(
            model, optimizer, scheduler
        )
        return backend
    if optimizer is not None:
        log.warning(
            "zetaguard: no recovery backend knows optimizers of type %s; rolling back "
            "parameters only",
            type(optimizer).__name__,
        )
    return NumpyBackend(model)
