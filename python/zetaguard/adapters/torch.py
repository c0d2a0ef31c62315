"""PyTorch parameters: ``nn.Module``, ``parameters()``, ``named_parameters()``, tensors.

One step's :class:`~zetaguard.adapters.Snapshot` from the cached, validated layout of what the
user handed us (:mod:`zetaguard.adapters.torch_layout`, which also says why every fact a raw
read depends on is read again each call), and the gradients: their raw addresses for the
engine (read, and their facts checked, only in a step that needs them: ``Snapshot.read_grads``),
the global gradient norm, and dropping them to veto an update.

Tensors on another device (CUDA) are handed to the device path (:mod:`zetaguard.engine.device`) as
tensors, since their memory is not host-readable.
"""

from __future__ import annotations

import math
import operator
from itertools import repeat
from typing import Any

import torch

from zetaguard import _core
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot, default_threads
from zetaguard.adapters.torch_layout import (
    Layout,
    check_tensor,
    checked_grad,
    layout_of,
    read_facts,
)

_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_is_cpu = operator.attrgetter("is_cpu")
_grad_of = operator.attrgetter("grad")


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return g.coalesce().values().contiguous()  # same norm as the dense gradient
    return g if g.is_contiguous() else g.contiguous()


def _raw_grads(
    layout: Layout, grads: list[torch.Tensor | None]
) -> tuple[list[torch.Tensor], list[tuple[int, int, str]]]:
    """Raw addresses of the gradients, each read with its own numel and dtype (a gradient can
    be swapped for one of another size or dtype, ``p.grad.data = ...``). The common case (all
    present, contiguous, on the CPU, the same facts as last step) is checked with C-level maps
    only; anything else takes the careful path."""
    dense: list[torch.Tensor] = grads  # type: ignore[assignment]
    try:  # a missing gradient (None) fails the first map: no separate pass looks for one
        gptrs = list(map(_data_ptr, dense))
        facts = read_facts(dense)
        plain = all(map(_is_contiguous, dense))
    except (RuntimeError, TypeError):  # sparse gradients have no data pointer or strides
        plain = False
    if plain:
        if facts != layout.grad_facts:
            layout.grad_facts = None
            layout.grad_dtypes = [
                check_tensor(f"gradient of {n}", g)
                for n, g in zip(layout.names, dense, strict=True)
            ]
            layout.grad_facts, layout.grad_ptrs = facts, []
        if gptrs != layout.grad_ptrs:
            # New addresses: a gradient on another device than its parameter is no host
            # memory (device moves change addresses, so equal ones need no look).
            if layout.host and not all(map(_is_cpu, dense)):
                _refuse_device_grads(layout, dense)
            layout.grad_ptrs = gptrs
            layout.grad_raw = list(zip(gptrs, facts[0], layout.grad_dtypes, strict=True))
        return dense, layout.grad_raw
    if all(map(operator.is_, grads, repeat(None))):
        return [], []
    kept = [
        (_dense_grad(checked_grad(f"gradient of {layout.names[i]}", g)), i)
        for i, g in enumerate(grads)
        if g is not None
    ]
    if layout.host and not all(g.is_cpu for g, _ in kept):
        _refuse_device_grads(layout, [g for g, _ in kept])
    return [g for g, _ in kept], [
        (g.data_ptr(), g.numel(), check_tensor(f"gradient of {layout.names[i]}", g))
        for g, i in kept
    ]


def _refuse_device_grads(layout: Layout, grads: list[torch.Tensor]) -> None:
    where = sorted({str(g.device) for g in grads if not g.is_cpu})
    raise ValueError(
        f"gradients on {where} belong to parameters in host memory; keep each gradient on its "
        "parameter's device"
    )


def snapshot(obj: Any) -> Snapshot:
    layout, tensors = layout_of(obj)
    # Every call, for every tensor: a raw read is safe only while these match what last passed
    # the full check (an unchanged address alone proves nothing: a freed buffer's address comes
    # back for the next allocation, and a storage can shrink in place).
    try:
        fresh = (
            list(map(_data_ptr, tensors)) == layout.ptrs
            and read_facts(tensors) == layout.facts
            and all(map(_is_contiguous, tensors))
        )
    except (RuntimeError, TypeError):  # a tensor became sparse or nested, or is no tensor
        fresh = False
    if not fresh:
        layout.revalidate(tensors)
    if not layout.host:
        if "cpu" in layout.devices:
            raise ValueError(
                f"parameters are split across devices {sorted(layout.devices)}; monitor each "
                "device's parameters with its own guard"
            )
        grads = [g for g in map(_grad_of, tensors) if g is not None]
        return Snapshot(
            names=layout.names,
            tensors=[t.detach() for t in tensors],
            grads=grads or None,
            keepalive=[tensors, grads],
            framework=DEVICE_FRAMEWORK,
            module_types=layout.module_types,
        )
    # The gradients are read when the step needs them (Snapshot.read_grads), with every fact
    # their raw read depends on checked then: a tiered step given grad_norm= whose full pass
    # is not due reads none (about 40% of this path per tensor).
    held: list[torch.Tensor] = []

    def read_grads() -> list[tuple[int, int, str]] | None:
        grads, grad_raw = _raw_grads(layout, list(map(_grad_of, tensors)))
        held[:] = grads  # the tensors the addresses point into, alive with the snapshot
        return grad_raw or None

    return Snapshot(
        names=layout.names,
        tensors=layout.raw,
        raw=True,
        grads_raw=True,
        grad_reader=read_grads,
        keepalive=[tensors, held],
        framework="torch",
        module_types=layout.module_types,
    )


_norm_engine: list[_core.Tracker] = []  # one stateless engine for gradient norms, made lazily


def grad_norm(parameters: Any) -> float | None:
    """Global L2 norm of the gradients of ``parameters`` (a module or an iterable of tensors);
    ``inf`` when any gradient is non-finite, ``None`` when no parameter has a gradient.

    Host gradients are read in place by the engine (raw addresses, float64 sums; several times
    cheaper than ``torch._foreach_norm`` on a model of many small tensors); device gradients
    take one fused torch reduction and one transfer."""
    layout: Layout | None = None
    if isinstance(parameters, (torch.nn.Module, list, tuple)):
        try:
            layout, tensors = layout_of(parameters)
            # As in snapshot(): the parameters' facts decide whether `host` still holds.
            if not (
                list(map(_data_ptr, tensors)) == layout.ptrs
                and read_facts(tensors) == layout.facts
                and all(map(_is_contiguous, tensors))
            ):
                layout.revalidate(tensors)
        except (TypeError, ValueError, RuntimeError):  # e.g. non-contiguous: torch reads those
            layout = None
        if layout is not None and layout.host:
            _, raw = _raw_grads(layout, list(map(_grad_of, tensors)))
            if not raw:
                return None
            if not _norm_engine:
                _norm_engine.append(_core.Tracker(threads=default_threads()))
            squares, nonfinite = _norm_engine[0].total_norm_raw(raw)
            return math.inf if nonfinite else math.sqrt(squares)
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    grads = [
        g.coalesce().values() if g.is_sparse else g
        for i, p in enumerate(params)
        if (g := p.grad) is not None and checked_grad(f"gradient {i}", g) is g
    ]
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
