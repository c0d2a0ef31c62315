"""Framework adapters: turn whatever the user passed to ``monitor()`` into engine inputs.

Each adapter lives in its own module and imports its framework lazily; the dispatcher below
recognises objects by the module their type comes from, so ``import zetaguard`` never imports
torch or TensorFlow and a framework is only touched when the user already handed us its objects.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Snapshot:
    """One step's view of the monitored tensors.

    ``tensors`` are what the engine reads: DLPack/buffer objects, or, when ``raw`` is set,
    ``(address, numel, dtype)`` tuples an adapter already validated. ``keepalive`` holds
    whatever must outlive the engine call (the tensors the addresses point into).
    """

    names: list[str]
    tensors: list[Any]
    raw: bool = False
    grads: list[Any] | None = None
    grads_raw: bool = False
    keepalive: list[Any] = field(default_factory=list)
    framework: str = "numpy"


Adapter = Callable[[Any], Snapshot]

# Root module of an object's type -> adapter module with a `snapshot(obj) -> Snapshot`.
_ADAPTER_MODULES: dict[str, str] = {
    "torch": "zetaguard.adapters.torch",
    "tensorflow": "zetaguard.adapters.tensorflow",
    "keras": "zetaguard.adapters.tensorflow",
    "tf_keras": "zetaguard.adapters.tensorflow",
}


def register_adapter(root_module: str, adapter_module: str) -> None:
    """Route objects whose type lives under ``root_module`` to ``adapter_module``."""
    _ADAPTER_MODULES[root_module] = adapter_module


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


def _first_item(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return next(iter(obj.values()), None)
    if isinstance(obj, (list, tuple)):
        first = obj[0] if obj else None
        if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], str):
            return first[1]  # named pairs
        return first
    return None


def snapshot(obj: Any) -> Snapshot:
    """Dispatch ``obj`` to the adapter of its framework (generators are materialised once)."""
    if not isinstance(obj, (Mapping, list, tuple, np.ndarray)) and isinstance(obj, Iterable) and (
        not hasattr(obj, "__dlpack__") and _root(obj) not in _ADAPTER_MODULES
    ):
        obj = list(obj)  # model.parameters() / named_parameters() generators
    probe = _first_item(obj)
    root = _root(probe if probe is not None else obj)
    module = _ADAPTER_MODULES.get(root)
    if module is not None:
        adapter: Adapter = importlib.import_module(module).snapshot
        return adapter(obj)
    return generic_snapshot(obj)


def generic_snapshot(obj: Any) -> Snapshot:
    """NumPy arrays and any DLPack- or buffer-capable CPU array, single or in a list/dict."""
    if isinstance(obj, Mapping):
        names = [str(k) for k in obj]
        tensors = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        if obj and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in obj):
            names = [e[0] for e in obj]
            tensors = [e[1] for e in obj]
        else:
            names = [str(i) for i in range(len(obj))]
            tensors = list(obj)
    else:
        names, tensors = ["0"], [obj]
    return Snapshot(names=names, tensors=tensors, keepalive=tensors)
