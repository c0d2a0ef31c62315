"""PyTorch parameters: ``nn.Module``, ``parameters()``, ``named_parameters()``, tensors.

CPU tensors reach the engine as raw addresses: float16 and bfloat16 included (the engine reads
them natively), no copy, no DLPack capsule per tensor per step. What makes a raw address safe
(dtype, dense strided layout, contiguity, size) is validated once per parameter set and cached;
each step then only reads every tensor's current ``data_ptr()`` and re-validates the tensors
whose address moved (``p.data = ...`` swaps storage behind an unchanged Parameter). An
``nn.Module`` is walked once; later steps confirm each cached parameter is still the one its
owner holds (a dict lookup per tensor) instead of walking the module tree again.

Tensors on another device (CUDA) are handed to the device path (:mod:`zetaguard.device`) as
tensors, since their memory is not host-readable.
"""

from __future__ import annotations

import math
import operator
import weakref
from itertools import repeat
from typing import Any

import torch

from zetaguard import _core
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot, default_threads

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def named_tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.nn.Module):
        return list(obj.named_parameters())
    if isinstance(obj, torch.Tensor):
        return [("0", obj)]
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    items = list(obj)
    if items and all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in items):
        return [(name, t) for name, t in items]
    return [(f"param.{i}", t) for i, t in enumerate(items)]


def check_tensor(name: str, t: Any) -> str:
    """The engine dtype name for ``t``, or a clear error naming the problem and the fix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} is a {type(t).__name__}, not a torch.Tensor")
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise TypeError(
            f"{name} has dtype {t.dtype}; zetaguard monitors float32, float64, float16 and "
            "bfloat16 parameters. Leave integer, bool and complex tensors out of monitor()"
        )
    if t.is_nested:  # its layout reads as strided, but it has no single shape or buffer
        raise TypeError(
            f"{name} is a nested tensor (torch.nested); monitor its components instead, e.g. "
            "list(t.unbind())"
        )
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; pass dense parameters (t.to_dense())")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no data; materialise the model first")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous in memory; pass t.contiguous()")
    return dtype


class _Layout:
    """Validated facts about one parameter set, reused while the same tensors come back."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], owners: list[Any] | None = None) -> None:
        self.tensors = [t for _, t in named]
        self.ids = tuple(id(t) for t in self.tensors)
        self.names = [n for n, _ in named]
        self.dtypes = [check_tensor(n, t) for n, t in named]
        self.numels = [t.numel() for t in self.tensors]
        self.torch_dtypes = [t.dtype for t in self.tensors]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.devices = {t.device.type for t in self.tensors}
        self.host = self.devices == {"cpu"}
        # What the engine reads while nothing moved: (address, numel, dtype) per tensor.
        self.raw = list(zip(self.ptrs, self.numels, self.dtypes, strict=True))
        # For a module: (the owning submodule's _parameters dict, the attribute name) per tensor.
        self.owners = owners
        self.owner_dicts = [d for d, _ in owners or ()]
        self.owner_keys = [k for _, k in owners or ()]
        # For a module: (parent._modules, name, child) edges as three lists, then every
        # submodule's _modules and _parameters dicts and their sizes when the layout was made.
        self.structure: tuple[list[Any], list[str], list[Any], list[Any], list[int]] = (
            [], [], [], [], []
        )
        self.grad_ptrs: list[int] = []  # gradient addresses whose layout was last validated
        self.grad_raw: list[tuple[int, int, str]] = []

    def still_owned(self) -> bool:
        if self.owners is None:
            return True
        # C-level maps only: this runs every step for every parameter and submodule.
        held = map(dict.get, self.owner_dicts, self.owner_keys)
        if not all(map(operator.is_, held, self.tensors)):
            return False
        # Model surgery (`model[1] = nn.Linear(...)`, `append`, `del`) leaves the old
        # submodules' parameter dicts intact: without this the guard would keep watching the
        # detached old tensors. One lookup per submodule edge plus two len() per module.
        edge_dicts, edge_keys, edge_children, containers, sizes = self.structure
        return all(map(operator.is_, map(dict.get, edge_dicts, edge_keys), edge_children)) and (
            list(map(len, containers)) == sizes
        )

    def revalidate(self, ptrs: list[int]) -> None:
        """Some tensors moved to new storage: check those again (dtype, layout, device)."""
        for i, (old, new) in enumerate(zip(self.ptrs, ptrs, strict=True)):
            t = self.tensors[i]
            if old != new or t.numel() != self.numels[i] or t.dtype != self.torch_dtypes[i]:
                self.dtypes[i] = check_tensor(self.names[i], t)
                self.numels[i] = t.numel()
                self.torch_dtypes[i] = t.dtype
        self.ptrs = ptrs
        self.devices = {t.device.type for t in self.tensors}
        self.host = self.devices == {"cpu"}
        self.raw = list(zip(self.ptrs, self.numels, self.dtypes, strict=True))
        self.grad_ptrs = []  # gradients follow their parameters' dtype and size: check again


_list_cache: dict[tuple[Any, ...], _Layout] = {}
_module_cache: dict[int, tuple[weakref.ref[torch.nn.Module], _Layout]] = {}
_CACHE_LIMIT = 64


def _module_layout(module: torch.nn.Module) -> _Layout:
    hit = _module_cache.get(id(module))
    if hit is not None and hit[0]() is module and hit[1].still_owned():
        return hit[1]
    named: list[tuple[str, torch.Tensor]] = []
    owners: list[Any] = []
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        for key, p in sub._parameters.items():
            if p is None or id(p) in seen:  # shared parameters are monitored once
                continue
            seen.add(id(p))
            named.append((f"{prefix}.{key}" if prefix else key, p))
            owners.append((sub._parameters, key))
    layout = _Layout(named, owners)
    subs = [sub for _, sub in module.named_modules()]
    edges = [(sub._modules, name, child) for sub in subs for name, child in sub._modules.items()]
    containers = [c for sub in subs for c in (sub._modules, sub._parameters)]
    layout.structure = (
        [d for d, _, _ in edges],
        [k for _, k, _ in edges],
        [c for _, _, c in edges],
        containers,
        [len(c) for c in containers],
    )
    if len(_module_cache) >= _CACHE_LIMIT:
        _module_cache.clear()
    _module_cache[id(module)] = (weakref.ref(module), layout)
    return layout


_name_of = operator.itemgetter(0)
_tensor_of = operator.itemgetter(1)


def _list_layout(obj: Any) -> _Layout:
    """A tensor, a list/tuple/generator of tensors or of ``(name, tensor)`` pairs, or a dict:
    cached by the identity of its tensors (and their names, when named), so a step that hands
    the same parameters again pays a few C-level maps, not a Python loop per tensor."""
    names: list[str] | None
    if isinstance(obj, torch.Tensor):
        tensors: list[Any] = [obj]
        names = ["0"]
    elif isinstance(obj, dict):
        tensors = list(obj.values())
        names = list(map(str, obj))
    else:
        items = obj if isinstance(obj, list) else list(obj)
        if items and isinstance(items[0], tuple):  # named pairs, checked in full on a miss
            try:
                names, tensors = list(map(_name_of, items)), list(map(_tensor_of, items))
            except (TypeError, IndexError):
                names, tensors = None, items
        else:
            names, tensors = None, items
    key = (names is None, *map(id, tensors))
    layout = _list_cache.get(key)
    if layout is not None and (names is None or layout.names == names):
        return layout
    layout = _Layout(named_tensors(obj if isinstance(obj, (dict, torch.Tensor)) else items))
    if len(_list_cache) >= _CACHE_LIMIT:
        _list_cache.clear()
    _list_cache[key] = layout
    return layout


def layout_of(obj: Any) -> _Layout:
    """The cached, validated layout of ``obj`` (a module or anything :func:`named_tensors` reads)."""
    if isinstance(obj, torch.nn.Module):
        return _module_layout(obj)
    return _list_layout(obj)


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return g.coalesce().values().contiguous()  # same norm as the dense gradient
    return g if g.is_contiguous() else g.contiguous()


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_dtype_of = operator.attrgetter("dtype")
_is_contiguous = torch.Tensor.is_contiguous
_grad_of = operator.attrgetter("grad")


def _raw_grads(
    layout: _Layout, grads: list[torch.Tensor | None]
) -> tuple[list[torch.Tensor], list[tuple[int, int, str]]]:
    """Raw addresses of the gradients. Autograd gives a gradient its parameter's dtype and size
    and, for a contiguous parameter, a dense layout; the common case is therefore checked with
    C-level maps only, and anything unusual (missing, sparse, strided) takes the careful path."""
    if all(map(operator.is_not, grads, repeat(None))):
        dense: list[torch.Tensor] = grads  # type: ignore[assignment]
        try:
            gptrs = list(map(_data_ptr, dense))
            # Addresses already validated last step need no new layout check.
            if gptrs == layout.grad_ptrs:
                return dense, layout.grad_raw
            if all(map(_is_contiguous, dense)):
                layout.grad_ptrs = gptrs
                layout.grad_raw = list(zip(gptrs, layout.numels, layout.dtypes, strict=True))
                return dense, layout.grad_raw
        except RuntimeError:  # sparse gradients have no data pointer or strides
            pass
    if all(map(operator.is_, grads, repeat(None))):
        return [], []
    kept = [(_dense_grad(g), i) for i, g in enumerate(grads) if g is not None]
    return [g for g, _ in kept], [
        (g.data_ptr(), g.numel(), check_tensor(f"gradient of {layout.names[i]}", g))
        for g, i in kept
    ]


def snapshot(obj: Any) -> Snapshot:
    layout = layout_of(obj)
    tensors = layout.tensors
    ptrs = list(map(_data_ptr, tensors))
    # An unchanged address is not proof of unchanged storage: a freed buffer's address comes
    # back for the next allocation, so `p.data = p.data.half()` after a free can reuse it. A
    # stale dtype or size would make the engine read past the end of the new buffer.
    if (
        ptrs != layout.ptrs
        or list(map(_numel, tensors)) != layout.numels
        or list(map(_dtype_of, tensors)) != layout.torch_dtypes
    ):
        layout.revalidate(ptrs)
    all_grads = list(map(_grad_of, tensors))
    if not layout.host:
        if "cpu" in layout.devices:
            raise ValueError(
                f"parameters are split across devices {sorted(layout.devices)}; monitor each "
                "device's parameters with its own guard"
            )
        grads = [g for g in all_grads if g is not None]
        return Snapshot(
            names=layout.names,
            tensors=[t.detach() for t in tensors],
            grads=grads or None,
            keepalive=[tensors, grads],
            framework=DEVICE_FRAMEWORK,
        )
    grads, grad_raw = _raw_grads(layout, all_grads)
    return Snapshot(
        names=layout.names,
        tensors=layout.raw,
        raw=True,
        grads=grad_raw or None,
        grads_raw=True,
        keepalive=[tensors, grads],
        framework="torch",
    )


_norm_engine: list[_core.Tracker] = []  # one stateless engine for gradient norms, made lazily


def grad_norm(parameters: Any) -> float | None:
    """Global L2 norm of the gradients of ``parameters`` (a module or an iterable of tensors);
    ``inf`` when any gradient is non-finite, ``None`` when no parameter has a gradient.

    Host gradients are read in place by the engine (raw addresses, float64 sums; several times
    cheaper than ``torch._foreach_norm`` on a model of many small tensors); device gradients
    take one fused torch reduction and one transfer."""
    layout: _Layout | None = None
    if isinstance(parameters, (torch.nn.Module, list, tuple)):
        try:
            layout = layout_of(parameters)
        except (TypeError, ValueError, RuntimeError):  # e.g. non-contiguous: torch reads those
            layout = None
        if layout is not None and layout.host:
            _, raw = _raw_grads(layout, list(map(_grad_of, layout.tensors)))
            if not raw:
                return None
            if not _norm_engine:
                _norm_engine.append(_core.Tracker(threads=default_threads()))
            squares, nonfinite = _norm_engine[0].total_norm_raw(raw)
            return math.inf if nonfinite else math.sqrt(squares)
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    grads = [g.coalesce().values() if g.is_sparse else g
             for p in params if (g := p.grad) is not None]
    if not grads:
        return None
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    total = float(torch.linalg.vector_norm(torch.stack(norms)).item())
    return total if total == total else float("inf")  # NaN reads as the non-finite it is


def drop_grads(parameters: Any) -> None:
    """Set every gradient to ``None``: torch optimizers then leave those parameters, and their
    moments and step counts, untouched, which is how a callback vetoes an update it cannot
    cancel."""
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    for p in params:
        p.grad = None
