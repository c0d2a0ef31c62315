"""Which parameters the guard monitors, and which group (layer) each one is counted in.

:class:`ParameterSelection` holds what ``monitor_pattern()`` and ``monitor_layers()`` chose and
applies it to each step's :class:`~zetaguard.adapters.Snapshot`; :meth:`ParameterSelection.group_of`
names the group each monitored tensor's rows are summed into. It knows nothing of the engine,
the detector or the guard.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from zetaguard.adapters import Snapshot

GroupBy = Literal["layer", "tensor", "none"]


def group_key(name: str, group_by: GroupBy) -> str:
    """The group of a parameter name under ``group_by`` (``layer``: its module path)."""
    if group_by == "tensor":
        return name
    if group_by == "none":
        return "all"
    head, dot, _ = name.rpartition(".")
    return head if dot else name


class ParameterSelection:
    """What is monitored: every parameter, those matching a pattern, or chosen layers."""

    def __init__(self) -> None:
        self.pattern: re.Pattern[str] | None = None
        # monitor_layers(): full parameter name -> tensor (what monitor() reads), and -> layer.
        self.layers: dict[str, Any] | None = None
        self.layer_of: dict[str, str] | None = None
        # The pattern's cache: the full name list it was last matched against (the list object
        # itself, so the common case is one identity check, and its contents), and the result.
        self._full_list_seen: list[str] | None = None
        self._full_names: tuple[str, ...] = ()
        self._matching_index: list[int] | None = None
        self._matching_names: list[str] = []

    def set_pattern(self, pattern: str | re.Pattern[str] | None) -> None:
        self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        self.forget_matches()

    def set_layers(self, layers: Any, model: Any) -> None:
        """Choose ``layers`` (a list or ``{name: layer}`` dict of modules or tensor lists), named
        after their place in ``model`` where it contains them; ``None`` chooses nothing."""
        if layers is None:
            self.layers = self.layer_of = None
            return
        items = list(layers.items()) if isinstance(layers, dict) else list(enumerate(layers))
        if not items:
            raise ValueError("monitor_layers() needs at least one layer")
        known = _module_names(model)
        tensors: dict[str, Any] = {}
        layer_of: dict[str, str] = {}
        for key, layer in items:
            name = key if isinstance(key, str) else known.get(id(layer), f"layer{key}")
            named = _layer_tensors(layer, name)
            if not named:
                raise ValueError(f"layer {name!r} has no parameters to monitor")
            for pname, t in named:
                full = f"{name}.{pname}"
                tensors[full] = t
                layer_of[full] = name
        self.layers, self.layer_of = tensors, layer_of

    def forget_matches(self) -> None:
        self._full_list_seen = None
        self._full_names = ()
        self._matching_index = None
        self._matching_names = []

    def source(self, params: Any, model: Any) -> Any:
        """What ``monitor(params)`` reads: the chosen layers, ``params``, or the model."""
        if self.layers is not None and (params is None or params is model):
            return self.layers  # the layers are parts of the attached model
        if self.layers is not None:
            raise ValueError(
                "monitor_layers() chose what is monitored: call monitor() without parameters, "
                "or monitor_layers(None) to monitor what monitor() is given"
            )
        if params is None and model is None:
            raise ValueError(
                "monitor() needs parameters: pass model.parameters() (or a model, a dict "
                "or list of arrays), or attach a model with guard.attach(model=...)"
            )
        return model if params is None else params

    def apply(self, snap: Snapshot) -> Snapshot:
        """``snap`` restricted to the names the pattern matches (``snap`` itself without one)."""
        pattern = self.pattern
        if pattern is None:
            return snap
        if self._matching_index is None or (
            snap.names is not self._full_list_seen and tuple(snap.names) != self._full_names
        ):
            self._full_names = tuple(snap.names)
            self._matching_index = [i for i, n in enumerate(snap.names) if pattern.search(n)]
            self._matching_names = [snap.names[i] for i in self._matching_index]
            if not self._matching_index:
                raise ValueError(
                    f"monitor_pattern({pattern.pattern!r}) matches none of the "
                    f"{len(snap.names)} parameter names (e.g. {snap.names[:3]})"
                )
        self._full_list_seen = snap.names
        keep = self._matching_index
        return Snapshot(
            names=self._matching_names,
            tensors=[snap.tensors[i] for i in keep],
            raw=snap.raw,
            grads=snap.grads,
            grads_raw=snap.grads_raw,
            grad_reader=snap.grad_reader,
            keepalive=snap.keepalive,
            framework=snap.framework,
            module_types=snap.module_types,
        )

    def group_of(self, name: str, group_by: GroupBy) -> str:
        """The group a monitored parameter name is counted in."""
        if self.layer_of is not None and name in self.layer_of:
            return self.layer_of[name]
        return group_key(name, group_by)


def _module_names(model: Any) -> dict[int, str]:
    """id(submodule) -> its qualified name inside ``model`` (torch), for layer names."""
    named_modules = getattr(model, "named_modules", None)
    if named_modules is None:
        return {}
    return {id(m): name for name, m in named_modules() if name}


def _layer_tensors(layer: Any, name: str) -> list[tuple[str, Any]]:
    """The named tensors of one layer: a module (``named_parameters``), a dict, or a list."""
    named_parameters = getattr(layer, "named_parameters", None)
    if callable(named_parameters):
        return list(named_parameters())
    if isinstance(layer, dict):
        return [(str(k), v) for k, v in layer.items()]
    if isinstance(layer, (list, tuple)):
        return [(str(i), t) for i, t in enumerate(layer)]
    if hasattr(layer, "__dlpack__") or hasattr(layer, "shape"):
        return [("0", layer)]
    raise TypeError(
        f"layer {name!r} is a {type(layer).__name__}; pass modules, or lists or dicts of tensors"
    )
