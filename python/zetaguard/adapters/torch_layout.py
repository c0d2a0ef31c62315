"""What a raw read of PyTorch tensors depends on: the checks, the facts, the cached layouts.

CPU tensors reach the engine as raw addresses: float16 and bfloat16 included (the engine reads
them natively), no copy, no DLPack capsule per tensor per step. A raw read of ``numel`` elements
from ``data_ptr()`` is in bounds only while the tensor is contiguous and its storage still
covers it, so every call re-reads, for every tensor and every gradient it reads, what that
depends on: address, numel, dtype, contiguity, storage offset and the storage's size in bytes
(C-level maps: with the gradients, about 0.5 us a tensor). A full check (dtype, layout,
device, storage bound) runs for the tensors where any of them changed since it last passed:
``p.data = ...`` swaps storage behind an unchanged Parameter, ``untyped_storage().resize_()``
shrinks it beneath the tensor, ``as_strided_`` re-strides it in place, ``set_()`` points it
elsewhere. Nothing an earlier call saw is trusted: a freed buffer's address comes back for the
next allocation.

The caches hold no strong reference to the user's tensors: a list's layout keeps only the
facts above, and a module's layout is dropped when the module is garbage collected.

An ``nn.Module`` is walked once; later steps confirm each cached parameter is still the one its
owner holds (a dict lookup per tensor) instead of walking the module tree again.

:mod:`zetaguard.adapters.torch` reads the gradients and builds the snapshot from a layout.
"""

from __future__ import annotations

import inspect
import operator
import types
import weakref
from typing import Any

import torch

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
        raise ValueError(
            f"{name} is on the meta device and holds no data; materialise the model first"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous in memory; pass t.contiguous()")
    check_storage(name, t)
    return dtype


def check_storage(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor whose storage no longer covers it (``untyped_storage().resize_()``
    shrinks a storage beneath its tensors; torch itself then reads past the end)."""
    if t.numel() == 0:
        return
    # The last element's offset plus one; torch strides are never negative.
    end = (
        t.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    )
    need = end * t.element_size()
    have = t.untyped_storage().nbytes()
    if need > have:
        raise ValueError(
            f"{name} needs {need} bytes of its storage but the storage holds {have} (it was "
            "resized beneath the tensor, e.g. by untyped_storage().resize_()); give the tensor "
            "real storage again (p.data = torch.empty_like(...)) before monitoring it"
        )


def checked_grad(name: str, g: torch.Tensor) -> torch.Tensor:
    """``g`` after :func:`check_storage` (for a sparse gradient: its indices and values), so
    no copy or reduction torch makes of it reads past a shrunk storage."""
    if g.is_sparse:
        check_storage(f"{name} (indices)", g._indices())
        check_storage(f"{name} (values)", g._values())
    else:
        check_storage(name, g)
    return g


def check_storages(tensors: list[torch.Tensor], what: str = "tensor") -> None:
    """:func:`check_storage` for many tensors: C-level maps for the common case (the bound of
    a contiguous tensor), the exact per-tensor bound only when that one fails."""
    ends = map(
        operator.mul,
        map(operator.add, map(_storage_offset, tensors), map(_numel, tensors)),
        map(_element_size, tensors),
    )
    if not all(map(operator.le, ends, map(_storage_nbytes, map(_untyped_storage, tensors)))):
        for i, t in enumerate(tensors):
            check_storage(f"{what} {i}", t)


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_dtype_of = operator.attrgetter("dtype")
_storage_offset = torch.Tensor.storage_offset
_untyped_storage = torch.Tensor.untyped_storage
_storage_nbytes = torch.UntypedStorage.nbytes
_element_size = torch.Tensor.element_size

Facts = tuple[list[int], list[torch.dtype], list[Any], list[int]]  # offsets may be SymInts


def read_facts(tensors: list[Any]) -> Facts:
    """What the bounds of a raw read depend on, read afresh: numel, dtype, storage offset and
    storage size per tensor. Equal facts, contiguity and addresses mean the same bytes as when
    the full check last passed (``data_ptr`` is the storage's address plus the offset)."""
    return (
        list(map(_numel, tensors)),
        list(map(_dtype_of, tensors)),
        list(map(_storage_offset, tensors)),
        list(map(_storage_nbytes, map(_untyped_storage, tensors))),
    )


def _facts_of(t: torch.Tensor) -> tuple[Any, ...] | None:
    try:
        return (t.data_ptr(), t.numel(), t.dtype, t.storage_offset(), t.untyped_storage().nbytes())
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
        return None  # sparse, nested or not a tensor: check_tensor says which


class Layout:
    """Validated facts about one parameter set, reused while the same tensors come back.

    ``tensors`` is kept for a module's layout only (the module holds them anyway, and the
    cache entry goes with the module); a list's layout holds no tensor, each call brings them.
    """

    def __init__(
        self,
        named: list[tuple[str, torch.Tensor]],
        owners: list[Any] | None = None,
        keep_tensors: bool = False,
    ) -> None:
        tensors = [t for _, t in named]
        self.tensors: list[torch.Tensor] = tensors if keep_tensors else []
        self.names = [n for n, _ in named]
        self.dtypes = [check_tensor(n, t) for n, t in named]
        self.ptrs = list(map(_data_ptr, tensors))
        self.facts: Facts = read_facts(tensors)
        self.devices = {t.device.type for t in tensors}
        self.host = self.devices == {"cpu"}
        # What the engine reads while nothing moved: (address, numel, dtype) per tensor.
        self.raw = list(zip(self.ptrs, self.facts[0], self.dtypes, strict=True))
        # For a module: (the owning submodule's _parameters dict, the attribute name) per tensor.
        self.owners = owners
        self.module_types: dict[str, str] | None = None  # a module's layout: see Snapshot
        self.owner_dicts = [d for d, _ in owners or ()]
        self.owner_keys = [k for _, k in owners or ()]
        # For a module: (parent._modules, name, child) edges as three lists, then every
        # submodule's _modules and _parameters dicts and their sizes when the layout was made.
        self.structure: tuple[list[Any], list[str], list[Any], list[Any], list[int]] = (
            [],
            [],
            [],
            [],
            [],
        )
        # Gradients: the facts and engine dtypes that last passed the full check, and the
        # addresses the raw entries were built from.
        self.grad_facts: Facts | None = None
        self.grad_dtypes: list[str] = []
        self.grad_ptrs: list[int] = []
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

    def revalidate(self, tensors: list[Any]) -> None:
        """Something changed under some tensors: run the full check on each tensor whose
        address, size, dtype, storage or contiguity differs from what last passed."""
        numels, dtypes, offsets, sizes = self.facts
        try:
            for i, t in enumerate(tensors):
                fact = _facts_of(t)
                if (
                    fact is None
                    or fact != (self.ptrs[i], numels[i], dtypes[i], offsets[i], sizes[i])
                    or not t.is_contiguous()
                ):
                    self.dtypes[i] = check_tensor(self.names[i], t)  # raises if unreadable
                    (self.ptrs[i], numels[i], dtypes[i], offsets[i], sizes[i]) = _facts_of(t)  # type: ignore[misc]
        except BaseException:
            # `raw` still holds the old entries: no address may match until a check passes.
            self.ptrs = [-1] * len(self.ptrs)
            raise
        self.devices = {t.device.type for t in tensors}
        self.host = self.devices == {"cpu"}
        self.raw = list(zip(self.ptrs, numels, self.dtypes, strict=True))
        self.grad_facts = None  # gradients are checked afresh too


_list_cache: dict[tuple[Any, ...], Layout] = {}
_module_cache: dict[int, tuple[weakref.ref[torch.nn.Module], Layout]] = {}
_CACHE_LIMIT = 64


def _forget_module(key: int, ref: weakref.ref[torch.nn.Module]) -> None:
    """A cached module was garbage collected: drop its layout (and the tensors it held)."""
    hit = _module_cache.get(key)
    if hit is not None and hit[0] is ref:
        del _module_cache[key]


def _module_layout(module: torch.nn.Module) -> tuple[Layout, list[torch.Tensor]]:
    hit = _module_cache.get(id(module))
    if hit is not None and hit[0]() is module and hit[1].still_owned():
        return hit[1], hit[1].tensors
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
    layout = Layout(named, owners, keep_tensors=True)
    layout.module_types = {
        prefix: module_summary(sub) for prefix, sub in module.named_modules() if sub._parameters
    }
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
    key = id(module)
    ref = weakref.ref(module, lambda r, key=key: _forget_module(key, r))  # type: ignore[misc]
    _module_cache[key] = (ref, layout)
    return layout, layout.tensors


_name_of = operator.itemgetter(0)
_tensor_of = operator.itemgetter(1)


def module_summary(module: torch.nn.Module) -> str:
    """What a module is, as a user would name it: ``Linear 128->10``, ``Conv2d 3->64 3x3``,
    ``Embedding 50000x768``, ``LayerNorm 768``; else its type name."""
    kind = type(module).__name__
    get = module.__dict__.get  # plain attributes only: no property of user code runs here
    ins, outs = get("in_features", get("in_channels")), get("out_features", get("out_channels"))
    if isinstance(ins, int) and isinstance(outs, int):
        kernel = get("kernel_size")
        if isinstance(kernel, tuple) and kernel and all(isinstance(k, int) for k in kernel):
            return f"{kind} {ins}->{outs} {'x'.join(map(str, kernel))}"
        return f"{kind} {ins}->{outs}"
    rows, dim = get("num_embeddings"), get("embedding_dim")
    if isinstance(rows, int) and isinstance(dim, int):
        return f"{kind} {rows}x{dim}"
    width = get("num_features", get("normalized_shape"))
    if isinstance(width, tuple) and width and all(isinstance(k, int) for k in width):
        width = "x".join(map(str, width))
    if isinstance(width, (int, str)):
        return f"{kind} {width}"
    return kind


def _list_layout(obj: Any) -> tuple[Layout, list[Any]]:
    """A tensor, a list/tuple/generator of tensors or of ``(name, tensor)`` pairs, or a dict:
    cached by the identity of its tensors (and their names, when named), so a step that hands
    the same parameters again pays a few C-level maps, not a Python loop per tensor. The layout
    holds no tensor: once they die an id may come back for another one, which is harmless,
    since :func:`zetaguard.adapters.torch.snapshot` checks every fact a read depends on again."""
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
    if (
        layout is not None
        and len(layout.names) == len(tensors)
        and (names is None or layout.names == names)
    ):
        return layout, tensors
    named = named_tensors(obj if isinstance(obj, (dict, torch.Tensor)) else items)
    layout = Layout(named)
    if len(_list_cache) >= _CACHE_LIMIT:
        _list_cache.clear()
    _list_cache[key] = layout
    return layout, [t for _, t in named]


_Module = torch.nn.Module
_PARAMETERS = _Module.parameters.__code__
_NAMED_PARAMETERS = _Module.named_parameters.__code__


def unwalked(gen: Any) -> list[Any] | None:
    """What an unstarted ``model.parameters()`` or ``model.named_parameters()`` generator would
    yield, from the module's cached, ownership-checked layout (the same walk, in the same order:
    every submodule's parameters, shared ones once), and the generator closed as ``list()``
    would leave it. Iterating torch's generator costs about 0.5 us a parameter each step;
    this costs the ownership check. ``None`` where it cannot tell (another generator, one
    already started, non-default arguments, a module that overrides the walk, or a tensor the
    layout refuses: the caller iterates, and the list path names the error as before)."""
    if type(gen) is not types.GeneratorType:
        return None
    code = gen.gi_code
    if code is not _PARAMETERS and code is not _NAMED_PARAMETERS:
        return None
    if inspect.getgeneratorstate(gen) != inspect.GEN_CREATED:
        return None
    args = inspect.getgeneratorlocals(gen)
    module = args.get("self")
    if (
        not isinstance(module, _Module)
        or args.get("recurse") is not True
        or type(module).named_parameters is not _Module.named_parameters  # parameters() uses it
        or type(module)._named_members is not _Module._named_members
        or (
            code is _NAMED_PARAMETERS
            and (args.get("prefix") != "" or args.get("remove_duplicate") is not True)
        )
    ):
        return None
    try:
        layout, tensors = _module_layout(module)
    except (TypeError, ValueError):
        return None
    gen.close()
    return list(tensors) if code is _PARAMETERS else list(zip(layout.names, tensors, strict=True))


def layout_of(obj: Any) -> tuple[Layout, list[Any]]:
    """The cached, validated layout of ``obj`` (a module or anything :func:`named_tensors`
    reads) and this call's tensors."""
    if isinstance(obj, torch.nn.Module):
        return _module_layout(obj)
    return _list_layout(obj)
