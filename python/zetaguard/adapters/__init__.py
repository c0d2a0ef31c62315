"""Framework adapters: turn whatever the user passed to ``monitor()`` into engine inputs.

Each adapter lives in its own module and imports its framework lazily; the dispatcher below
recognises objects by the module their type comes from, so ``import zetaguard`` never imports
torch or TensorFlow and a framework is only touched when the user already handed us its objects.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Snapshot:
    """One step's view of the monitored tensors.

    ``tensors`` are what the engine reads: DLPack/buffer objects, or, when ``raw`` is set,
    ``(address, numel, dtype)`` tuples an adapter already validated. ``keepalive`` holds
    whatever must outlive the engine call (the tensors the addresses point into). ``grads``
    are the gradients' engine inputs in the same forms (``grads_raw``); consumers read them
    through :meth:`read_grads`, since an adapter may defer that read (``grad_reader``).
    """

    names: list[str]
    tensors: list[Any]
    raw: bool = False
    grads: list[Any] | None = None
    grads_raw: bool = False
    keepalive: list[Any] = field(default_factory=list)
    framework: str = "numpy"
    # Module path -> what the module is ("Linear 128->10"), where the adapter knows it: the
    # run store and dashboard label layers with it.
    module_types: Mapping[str, str] | None = None
    # A gradient read the adapter deferred (torch on the host), run by read_grads() the first
    # time the step needs the gradients: a tiered step given grad_norm= with no full pass
    # reads none. It returns what ``grads`` holds and keeps the tensors alive in ``keepalive``.
    grad_reader: Callable[[], list[Any] | None] | None = None

    def read_grads(self) -> list[Any] | None:
        """``grads``, read now if the adapter deferred the read (call it on the thread and in
        the ``monitor()`` call the gradients belong to: they change with the next step)."""
        reader = self.grad_reader
        if reader is not None:
            self.grads = reader()  # raises on a gradient it refuses; the reader then stays
            self.grad_reader = None
        return self.grads


Adapter = Callable[[Any], Snapshot]

# Snapshot.framework of torch tensors for the device path (zetaguard.engine.device.DeviceTracker):
# the tensors themselves, not host addresses.
DEVICE_FRAMEWORK = "torch-device"


def default_threads() -> int:
    """Engine threads when the caller does not say: the cores, at most 4 (the passes are
    memory-bound; more threads than that only contend for bandwidth)."""
    return max(1, min(4, os.cpu_count() or 1))


# Root module of an object's type -> adapter module with a `snapshot(obj) -> Snapshot`.
_ADAPTER_MODULES: dict[str, str] = {
    "torch": "zetaguard.adapters.torch",
    "tensorflow": "zetaguard.adapters.tensorflow",
    "keras": "zetaguard.adapters.tensorflow",
    "tf_keras": "zetaguard.adapters.tensorflow",
    "jax": "zetaguard.adapters.jax_local",
    "jaxlib": "zetaguard.adapters.jax_local",
}


def register_adapter(root_module: str, adapter_module: str) -> None:
    """Route objects whose type lives under ``root_module`` to ``adapter_module``."""
    _ADAPTER_MODULES[root_module] = adapter_module
    _adapter_of_type.clear()


def framework_root(obj: Any, known: Collection[str]) -> str:
    """The root module of the framework ``obj`` belongs to: the first class in its MRO whose
    root module is in ``known`` (so a user subclass such as ``class Net(keras.Model)`` defined
    in ``__main__`` routes by its framework base), else the root module of its own type."""
    for klass in type(obj).__mro__:
        root = klass.__module__.partition(".")[0]
        if root in known:
            return root
    return type(obj).__module__.partition(".")[0]


def _root(obj: Any) -> str:
    return framework_root(obj, _ADAPTER_MODULES)


# type of the object (or of its first element) -> the adapter for it; monitor() asks every
# step, and the answer never changes for a type.
_adapter_of_type: dict[type, Adapter] = {}


def _adapter_for(obj: Any) -> Adapter:
    kind = type(obj)
    adapter = _adapter_of_type.get(kind)
    if adapter is None:
        module = _ADAPTER_MODULES.get(_root(obj))
        adapter = generic_snapshot if module is None else importlib.import_module(module).snapshot
        _adapter_of_type[kind] = adapter
    return adapter


def _is_named_pair(item: Any) -> bool:
    return type(item) is tuple and len(item) == 2 and isinstance(item[0], str)


def snapshot(obj: Any) -> Snapshot:
    """Dispatch ``obj`` to the adapter of its framework (generators are materialised once)."""
    kind = type(obj)
    if kind is list or kind is tuple:
        probe: Any = obj[0] if obj else None
        if _is_named_pair(probe):
            probe = probe[1]
    elif kind is np.ndarray:
        return generic_snapshot(obj)
    elif (seen := _adapter_of_type.get(kind)) is not None and seen is not generic_snapshot:
        return seen(obj)  # a framework object of a type seen before (a module, a Keras model)
    elif isinstance(obj, Mapping):
        probe = next(iter(obj.values()), None)
    elif isinstance(obj, (bytes, bytearray)):  # iterable, but of ints
        raise TypeError(
            f"monitor() got a {kind.__name__} object, not parameters; pass NumPy arrays or "
            "tensors (a list or dict of them, or a model)"
        )
    elif (
        isinstance(obj, Iterable)
        and not hasattr(obj, "__dlpack__")
        and _root(obj) not in _ADAPTER_MODULES
    ):
        return snapshot(materialize(obj))  # model.parameters() / named_parameters() generators
    else:
        probe = None
    return _adapter_for(probe if probe is not None else obj)(obj)


def materialize(items: Iterable[Any]) -> list[Any]:
    """``list(items)``; a torch ``model.parameters()`` or ``named_parameters()`` generator is
    read from the torch adapter's cached walk of the module instead of iterated (the
    generator's own walk is the largest per-tensor cost of such a ``monitor()`` call)."""
    code = getattr(items, "gi_code", None)
    if (
        code is not None
        and code.co_name in ("parameters", "named_parameters")
        and (
            "torch"
            in sys.modules  # a torch generator means torch is imported; never import it here
        )
    ):
        from zetaguard.adapters.torch_layout import unwalked

        listed = unwalked(items)
        if listed is not None:
            return listed
    return list(items)


_index_names: dict[int, list[str]] = {}


def _names_for(count: int) -> list[str]:
    """``["0", "1", ...]``, shared between steps (callers never modify it)."""
    names = _index_names.get(count)
    if names is None:
        names = _index_names[count] = [str(i) for i in range(count)]
    return names


def generic_snapshot(obj: Any) -> Snapshot:
    """NumPy arrays and any DLPack- or buffer-capable CPU array, single or in a list/dict."""
    if isinstance(obj, Mapping):
        names = [str(k) for k in obj]
        tensors = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        if obj and _is_named_pair(obj[0]) and all(map(_is_named_pair, obj)):
            names = [e[0] for e in obj]
            tensors = [e[1] for e in obj]
        else:
            names = _names_for(len(obj))
            tensors = obj if isinstance(obj, list) else list(obj)
    else:
        names, tensors = ["0"], [obj]
    if any(type(t) is np.ndarray and t.dtype.name == "bfloat16" for t in tensors):
        return _bfloat16_snapshot(names, tensors)
    return Snapshot(names=names, tensors=tensors, keepalive=tensors)


_RAW_DTYPES = {"float32", "float64", "float16", "bfloat16"}


def _bfloat16_snapshot(names: list[str], tensors: list[Any]) -> Snapshot:
    """NumPy arrays of ``ml_dtypes.bfloat16``: NumPy exports them through neither DLPack nor
    the buffer protocol, so the engine gets their addresses directly (``raw``), after the same
    checks the engine makes for a buffer: a supported dtype, C-contiguous, aligned."""
    raw = []
    for i, (name, t) in enumerate(zip(names, tensors, strict=True)):
        label = f"parameter {i} ({name!r})"
        if type(t) is not np.ndarray:
            raise TypeError(
                f"{label} is a {type(t).__name__} beside NumPy bfloat16 arrays; pass NumPy "
                "arrays only, or cast the bfloat16 ones with x.astype(np.float32) (exact)"
            )
        if t.dtype.name not in _RAW_DTYPES or t.dtype.byteorder == ">":
            raise TypeError(
                f"{label} has dtype {t.dtype}; zetaguard monitors float32, float64, float16 and "
                "bfloat16 arrays. Cast with x.astype(np.float32)"
            )
        if not (t.flags.c_contiguous and t.flags.aligned):
            raise ValueError(
                f"{label} is not a C-contiguous aligned array; pass np.ascontiguousarray(x)"
            )
        raw.append((int(t.ctypes.data), int(t.size), t.dtype.name))
    return Snapshot(names=names, tensors=raw, raw=True, keepalive=list(tensors))
