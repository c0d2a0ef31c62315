"""PyTorch parameters: ``nn.Module``, ``parameters()``, ``named_parameters()``, tensors.

CPU tensors reach the engine as raw addresses after one validation pass per parameter set
(cached by identity), which is what keeps the per-tensor cost near a microsecond; DLPack would
cost a capsule per tensor per step.
"""

from __future__ import annotations

from typing import Any

import torch

from zetaguard.adapters import Snapshot

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
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; pass dense parameters (t.to_dense())")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device and holds no data; materialise the model first")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous in memory; pass t.contiguous()")
    return dtype


class _Layout:
    """Validated facts about one parameter set, reused while the same tensors come back."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.ids = tuple(id(t) for _, t in named)
        self.names = [n for n, _ in named]
        self.dtypes = [check_tensor(n, t) for n, t in named]
        self.numels = [t.numel() for _, t in named]
        self.devices = {t.device.type for _, t in named}


_cache: dict[int, _Layout] = {}


def _layout(named: list[tuple[str, torch.Tensor]]) -> _Layout:
    key = hash(tuple(id(t) for _, t in named))
    layout = _cache.get(key)
    if (
        layout is None
        or layout.ids != tuple(id(t) for _, t in named)
        or any(t.numel() != n for (_, t), n in zip(named, layout.numels, strict=True))
    ):
        layout = _Layout(named)
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = layout
    return layout


def _dense_grad(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return g.coalesce().values().contiguous()  # same norm as the dense gradient
    return g if g.is_contiguous() else g.contiguous()


def snapshot(obj: Any) -> Snapshot:
    named = named_tensors(obj)
    layout = _layout(named)
    tensors = [t for _, t in named]
    if layout.devices - {"cpu"}:
        device = sorted(layout.devices - {"cpu"})[0]
        raise ValueError(
            f"parameters on {device}: the host engine reads CPU memory. Use the device path "
            "(ZetaGuard(device='cuda')) or pass CPU tensors"
        )
    raw = []
    for t, n, d in zip(tensors, layout.numels, layout.dtypes, strict=True):
        if not t.is_contiguous():  # `.data` can be swapped behind an unchanged Parameter
            raise ValueError("a parameter became non-contiguous; pass t.contiguous()")
        raw.append((t.data_ptr(), n, d))
    grads = [_dense_grad(t.grad) for t in tensors if t.grad is not None]
    return Snapshot(
        names=layout.names,
        tensors=raw,
        raw=True,
        grads=[(g.data_ptr(), g.numel(), check_tensor("gradient", g)) for g in grads] or None,
        grads_raw=True,
        keepalive=[tensors, grads],
        framework="torch",
    )
