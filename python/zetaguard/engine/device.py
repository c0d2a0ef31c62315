"""The device path: torch tensors reduced where they live (CUDA, or CPU for testing).

:class:`DeviceTracker` does what the host engine (``zetaguard._core.Tracker``) does, with torch
operations on the tensors' own device: a ring of the last three snapshots per tensor stays on the
device, the finite differences and their norms are fused ``torch._foreach_*`` calls over all
tensors of a batch (one multi-tensor launch per operation on CUDA, not one per tensor), and one
transfer per step brings back a ``(4, n)`` float64 table of norms: no per-tensor ``.item()``.

Results match the host engine (tests compare them with ``device="cpu"``):

* exact mode keeps each tensor's ring in its *work dtype* (float32 for float16/bfloat16/float32
  parameters, float64 for float64) and takes differences there. The first difference of two
  nearby floats is exact (Sterbenz), so a tiny update on a large weight loses nothing; higher
  differences round relative to their own size. Norms accumulate in float64.
* sketch mode applies the engine's own random linear map (same seeds, bucket offsets and signs,
  ``sketch_map.hpp``) in float64, so only ``O(sketch_buckets)`` numbers per step are kept.

Device memory: exact mode holds ``3 x numel x work-dtype size`` for the ring (12 bytes per
float32/float16/bfloat16 parameter, 24 per float64) plus transient buffers of at most
``3 x batch_elements`` work-dtype elements (default 2^25 elements: 384 MiB in float32), or of the
largest tensor when it is bigger. Sketch mode holds ``3 x 8`` bytes per bucket plus
``16 x min(numel, block)`` transient bytes per sketched tensor while it is being sketched.

Over 450 lines because it is one piece: the device tracker, its copy of the engine's sketch map
and its state conversion must change together, as the host engine's do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from zetaguard import _core
from zetaguard.adapters import DEVICE_FRAMEWORK, Snapshot
from zetaguard.adapters.torch_layout import check_storages, checked_grad

log = logging.getLogger("zetaguard")

_U64 = (1 << 64) - 1
# The engine's sketch-map constants (sketch_map.hpp), read from the engine itself.
_SKETCH = _core.sketch_constants()
_GOLDEN = _SKETCH["splitmix_golden"]
_MUL1 = _SKETCH["splitmix_mul1"]
_MUL2 = _SKETCH["splitmix_mul2"]
_TAU_MUL = _SKETCH["tau_mul"]
_CHUNK_MUL = _SKETCH["chunk_mul"]
_ROTATION_GRANULE = _SKETCH["rotation_granule"]
_SKETCH_MIN_COMPRESSION = _SKETCH["min_compression"]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}
# Integer dtype of the same width: how exact ring slots travel as raw bytes in saved state.
_BITS: dict[str, tuple[torch.dtype, Any]] = {
    "float32": (torch.int32, np.int32),
    "float64": (torch.int64, np.int64),
    "float16": (torch.int16, np.int16),
    "bfloat16": (torch.int16, np.int16),
}


def device_snapshot(snap: Snapshot) -> Snapshot:
    """Turn a torch host snapshot (raw addresses) into one the device path reads."""
    if snap.framework == DEVICE_FRAMEWORK:
        return snap
    if snap.framework != "torch":
        raise TypeError(
            f"the torch device path reads torch tensors, got {snap.framework} arrays; use "
            "ZetaGuard(device='auto') for them"
        )
    snap.read_grads()  # the host adapter's checks, and its gradients into keepalive
    tensors, grads = snap.keepalive
    return Snapshot(
        names=list(snap.names),
        tensors=[t.detach() for t in tensors],
        grads=list(grads) or None,
        keepalive=snap.keepalive,
        framework=DEVICE_FRAMEWORK,
        module_types=snap.module_types,
    )


# ---- the engine's sketch map, bit for bit (cpp/include/zetaguard/sketch_map.hpp) ----------


def _splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_MUL1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_MUL2)
        out: npt.NDArray[np.uint64] = x ^ (x >> np.uint64(31))
        return out


def _splitmix64_int(x: int) -> int:
    return int(_splitmix64(np.array([x & _U64], dtype=np.uint64))[0])


def tensor_seed(seed: int, index: int) -> int:
    """The per-tensor seed the engine derives from the tracker seed."""
    return _splitmix64_int((seed + _GOLDEN * (index + 1)) & _U64)


def sketch_signs(seed: int, k: int) -> npt.NDArray[np.float32]:
    """``tau``: the per-position signs of a k-bucket sketch."""
    p = np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.uint64(seed) ^ (p * np.uint64(_TAU_MUL)))
    return np.where((h >> np.uint64(63)) != 0, -1.0, 1.0).astype(np.float32)


def chunk_maps(
    seed: int, chunks: int, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Bucket offset and sign of each k-element chunk."""
    c = np.arange(1, chunks + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.uint64(seed) ^ (np.uint64(_CHUNK_MUL) * c))
    # Rotations in whole multiples of 8 when k allows (the engine's SIMD-friendly map).
    granule = _ROTATION_GRANULE if k % _ROTATION_GRANULE == 0 else 1
    offsets = granule * ((h >> np.uint64(1)) % np.uint64(k // granule)).astype(np.int64)
    signs = np.where((h & np.uint64(1)) != 0, -1.0, 1.0)
    return offsets, signs


def buckets_for(numel: int, total: int, sketch_buckets: int, min_buckets: int) -> int:
    """Buckets a tensor gets in sketch mode (0: tracked exactly), as the engine decides."""
    if total == 0:
        return 0
    k = max(min_buckets, sketch_buckets * numel // total)
    k = -(-k // _ROTATION_GRANULE) * _ROTATION_GRANULE  # whole SIMD vectors, as the engine
    return (
        0 if k * _SKETCH_MIN_COMPRESSION > numel else k
    )  # as the engine: sketch only when it pays


class _Sketch:
    """The fixed linear map of one sketched tensor, resident on the tensor's device."""

    # Rows of k elements sketched at once: bounds the transient buffers of a huge tensor.
    BLOCK_ELEMENTS = 1 << 24

    def __init__(self, numel: int, k: int, seed: int, device: torch.device) -> None:
        self.k = k
        self.chunks = -(-numel // k)
        self.tau_host = sketch_signs(seed, k)
        offsets, signs = chunk_maps(seed, self.chunks, k)
        self.tau = torch.from_numpy(self.tau_host.astype(np.float64)).to(device)
        self.offsets = torch.from_numpy(offsets).to(device)
        self.signs = torch.from_numpy(signs).to(device)
        self.positions = torch.arange(k, device=device, dtype=torch.int64)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Buckets ``S x`` in float64 (bucket of element p of chunk c: (p + offset_c) mod k,
        sign tau_p * sign_c)."""
        k, flat = self.k, x.reshape(-1)
        out = torch.zeros(k, dtype=torch.float64, device=x.device)
        rows = max(1, self.BLOCK_ELEMENTS // k)
        for r0 in range(0, self.chunks, rows):
            r1 = min(self.chunks, r0 + rows)
            part = flat[r0 * k : r1 * k].to(torch.float64)
            y = torch.zeros((r1 - r0) * k, dtype=torch.float64, device=x.device)
            y[: part.numel()] = part
            y = y.view(r1 - r0, k).mul_(self.tau).mul_(self.signs[r0:r1, None])
            idx = torch.remainder(self.positions[None, :] + self.offsets[r0:r1, None], k)
            out.index_add_(0, idx.reshape(-1), y.reshape(-1))
        return out


class DeviceTracker:
    """The host engine's contract (``update``, ``norms``, ``history``, state) on torch tensors.

    Args:
        mode: ``"exact"`` or ``"sketch"``.
        sketch_buckets, min_buckets, seed: as for the host engine; the same values give the
            same sketch.
        batch_elements: tensors are processed in batches of about this many elements, which
            bounds the transient device memory (see the module docstring).
    """

    def __init__(
        self,
        mode: str = "exact",
        sketch_buckets: int = 16384,
        min_buckets: int = 64,
        seed: int = 0x5EED,
        batch_elements: int = 1 << 25,
    ) -> None:
        if mode not in ("exact", "sketch"):
            raise ValueError(f"mode must be 'exact' or 'sketch', got {mode!r}")
        if sketch_buckets < 1:
            raise ValueError(f"sketch_buckets must be >= 1, got {sketch_buckets}")
        self.mode = mode
        self.sketch_buckets = int(sketch_buckets)
        self.min_buckets = max(1, int(min_buckets))
        self.seed = int(seed)
        self.batch_elements = int(batch_elements)
        self.reset()

    def reset(self) -> None:
        self._numels: list[int] = []
        self._dtypes: list[str] = []
        self._buckets: list[int] = []
        self._seeds: list[int] = []
        self._sketches: list[_Sketch | None] = []
        self._slots: list[list[torch.Tensor]] = [[], [], []]
        self._batches: list[list[int]] = []
        self._device: torch.device | None = None
        self._history = 0
        self._head = -1

    # ---- what the guard reads ---------------------------------------------------------

    @property
    def history(self) -> int:
        return self._history

    @property
    def isa(self) -> str:
        return f"torch:{self._device.type if self._device is not None else 'unset'}"

    @property
    def device(self) -> str | None:
        return None if self._device is None else str(self._device)

    @property
    def tensor_count(self) -> int:
        return len(self._numels)

    @property
    def buckets(self) -> list[int]:
        return list(self._buckets)

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self._slots for t in slot)

    # ---- setup ------------------------------------------------------------------------

    def _initialise(self, tensors: Sequence[torch.Tensor]) -> None:
        self.reset()
        device = tensors[0].device
        total = sum(t.numel() for t in tensors)
        for i, t in enumerate(tensors):
            dtype = _dtype_name(t, i)
            k = (
                buckets_for(t.numel(), total, self.sketch_buckets, self.min_buckets)
                if self.mode == "sketch"
                else 0
            )
            self._add_tensor(t.numel(), dtype, k, tensor_seed(self.seed, i), device)
        self._device = device
        self._plan_batches()

    def _add_tensor(self, numel: int, dtype: str, k: int, seed: int, device: torch.device) -> None:
        self._numels.append(numel)
        self._dtypes.append(dtype)
        self._buckets.append(k)
        self._seeds.append(seed)
        self._sketches.append(_Sketch(numel, k, seed, device) if k else None)
        work = torch.float64 if k or dtype == "float64" else torch.float32
        size = k if k else numel
        for slot in self._slots:
            slot.append(torch.zeros(size, dtype=work, device=device))

    def _plan_batches(self) -> None:
        """Group tensors by work dtype (the multi-tensor fast path needs one dtype per list),
        then split each group into batches of about ``batch_elements``."""
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, slot in enumerate(self._slots[0]):
            by_dtype.setdefault(slot.dtype, []).append(i)
        self._batches = []
        for members in by_dtype.values():
            batch: list[int] = []
            size = 0
            for i in members:
                n = self._slots[0][i].numel()
                if batch and size + n > self.batch_elements:
                    self._batches.append(batch)
                    batch, size = [], 0
                batch.append(i)
                size += n
            if batch:
                self._batches.append(batch)

    def _check_same_set(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self._numels):
            raise ValueError(
                f"the monitored set changed: the guard tracks {len(self._numels)} tensors but "
                f"this step passed {len(tensors)}; pass the same parameters every step, or call "
                "reset() after changing the model"
            )
        for i, t in enumerate(tensors):
            dtype = _DTYPE_NAMES.get(t.dtype)
            if t.numel() != self._numels[i] or dtype != self._dtypes[i]:
                raise ValueError(
                    f"tensor {i} changed from {self._numels[i]} x {self._dtypes[i]} to "
                    f"{t.numel()} x {dtype or t.dtype} between steps; call reset() after "
                    "resizing or casting the model"
                )
        if tensors and tensors[0].device != self._device:
            self._move_to(tensors[0].device)

    def _move_to(self, device: torch.device) -> None:
        """Follow the model to another device (or place a restored state on it)."""
        self._slots = [[t.to(device) for t in slot] for slot in self._slots]
        self._sketches = [
            _Sketch(n, k, s, device) if k else None
            for n, k, s in zip(self._numels, self._buckets, self._seeds, strict=True)
        ]
        self._device = device

    # ---- the step ---------------------------------------------------------------------

    def update(self, tensors: Sequence[torch.Tensor]) -> npt.NDArray[np.float64]:
        """One snapshot of every tensor; rows of ``x2, v2, a2, j2, nonfinite`` per tensor."""
        rows, _ = self.update_with_grads(tensors, None)
        return rows

    def update_with_grads(
        self, tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
        """:meth:`update`, plus the gradients' ``norms`` in the same device-to-host transfer."""
        tensors = [t.detach() for t in tensors]
        if not tensors:
            raise ValueError("update() got no tensors")
        # torch kernels trust a tensor's storage to cover it; one shrunk beneath it by
        # untyped_storage().resize_() would be read past its end (host metadata only, no sync).
        check_storages(tensors)
        if not self._numels:
            self._initialise(tensors)
        else:
            self._check_same_set(tensors)
        h = self._history
        w = h if h < 3 else (self._head + 1) % 3
        s1, s2, s3 = self._head, (self._head + 2) % 3, (self._head + 1) % 3
        n = len(tensors)
        zero = torch.zeros((), dtype=torch.float64, device=self._device)
        x_norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
        v_norms: list[torch.Tensor] = [zero] * n
        a_norms: list[torch.Tensor] = [zero] * n
        j_norms: list[torch.Tensor] = [zero] * n
        for batch in self._batches:
            cur = [
                sk.apply(tensors[i])
                if (sk := self._sketches[i]) is not None
                else tensors[i].reshape(-1)
                for i in batch
            ]
            ring = [[self._slots[s][i] for i in batch] for s in range(3)]
            d3 = torch._foreach_sub(ring[s2], ring[s3]) if h >= 3 else None
            torch._foreach_copy_(ring[w], cur)  # slot w is s3 once the ring is full
            if h >= 1:
                v = torch._foreach_sub(ring[w], ring[s1])
                _put(v_norms, batch, torch._foreach_norm(v, 2, dtype=torch.float64))
            if h >= 2:
                d2 = torch._foreach_sub(ring[s1], ring[s2])
                torch._foreach_sub_(v, d2)  # v becomes a = v - d2 (its norm is already queued)
                _put(a_norms, batch, torch._foreach_norm(v, 2, dtype=torch.float64))
                if d3 is not None:
                    torch._foreach_sub_(d3, d2)  # d3 - d2 = -(d2 - d3), rounded as the engine's
                    torch._foreach_add_(d3, v)  # a - (d2 - d3) = j
                    _put(j_norms, batch, torch._foreach_norm(d3, 2, dtype=torch.float64))
        parts = [
            torch.stack(x_norms),
            torch.stack(v_norms),
            torch.stack(a_norms),
            torch.stack(j_norms),
        ]
        grad_count = 0
        if grads:
            grads = [_dense(checked_grad(f"gradient {i}", g)) for i, g in enumerate(grads)]
            parts.append(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64)))
            grad_count = len(grads)
        host = torch.cat(parts).cpu().numpy()  # the one synchronising transfer of the step
        table = np.square(host[: 4 * n].reshape(4, n))
        rows = np.zeros((n, 5))
        rows[:, :4] = table.T
        _count_nonfinite(rows, tensors)
        self._head = w
        self._history = min(h + 1, 3)
        grad_rows = None
        if grads:
            grad_rows = np.zeros((grad_count, 5))
            grad_rows[:, 0] = np.square(host[4 * n :])
            _count_nonfinite(grad_rows, grads)
        return rows, grad_rows

    def norms(self, tensors: Sequence[torch.Tensor]) -> npt.NDArray[np.float64]:
        """Sum of squares and non-finite count per tensor, no history (gradients)."""
        tensors = [_dense(t) for t in tensors]
        rows = np.zeros((len(tensors), 5))
        if tensors:
            norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64))
            rows[:, 0] = np.square(norms.cpu().numpy())
            _count_nonfinite(rows, tensors)
        return rows

    # ---- state (the host engine's format, so either engine can load it) ---------------

    def get_state(self) -> dict[str, Any]:
        tensors = []
        for i, (numel, dtype, k, seed) in enumerate(
            zip(self._numels, self._dtypes, self._buckets, self._seeds, strict=True)
        ):
            slots: list[npt.NDArray[Any]] = []
            for s in range(3):
                t = self._slots[s][i].detach().cpu()
                if k:
                    slots.append(t.numpy().copy())
                else:
                    bits, _ = _BITS[dtype]
                    raw = t.to(_DTYPES[dtype]).view(bits).numpy()
                    slots.append(raw.view(np.uint8).copy())
            sketch = self._sketches[i]
            tau = sketch.tau_host if sketch is not None else np.zeros(0, dtype=np.float32)
            tensors.append(
                {
                    "numel": numel,
                    "dtype": dtype,
                    "buckets": k,
                    "seed": seed,
                    "slots": slots,
                    "tau": tau,
                }
            )
        return {"history": self._history, "head": self._head, "tensors": tensors}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`get_state` or the host engine. The ring lives on the CPU
        until the next update brings tensors, then moves to their device once."""
        history, head = int(state["history"]), int(state["head"])
        if not 0 <= history <= 3 or (history > 0 and not 0 <= head <= 2):
            raise ValueError(f"corrupt guard state: history {history}, ring head {head}")
        self.reset()
        cpu = torch.device("cpu")
        for e in state["tensors"]:
            numel, dtype, k = int(e["numel"]), str(e["dtype"]), int(e["buckets"])
            if dtype not in _DTYPES:
                raise ValueError(f"corrupt guard state: unknown dtype {dtype!r}")
            self._add_tensor(numel, dtype, k, int(e["seed"]), cpu)
            for s in range(3):
                raw = np.ascontiguousarray(e["slots"][s])
                if k:
                    values = torch.from_numpy(raw.astype(np.float64).copy())
                else:
                    _, np_bits = _BITS[dtype]
                    values = torch.from_numpy(raw.view(np.uint8).view(np_bits).copy())
                    values = values.view(_DTYPES[dtype]).to(self._slots[s][-1].dtype)
                if values.numel() != self._slots[s][-1].numel():
                    raise ValueError("corrupt guard state: a ring slot has the wrong size")
                self._slots[s][-1] = values
        self._device = cpu
        self._history, self._head = history, head if history else -1
        self._plan_batches()


def _put(out: list[torch.Tensor], batch: list[int], values: Sequence[torch.Tensor]) -> None:
    for i, v in zip(batch, values, strict=True):
        out[i] = v


def _dtype_name(t: torch.Tensor, index: int) -> str:
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(
            f"tensor {index} has dtype {t.dtype}; zetaguard monitors float32, float64, float16 "
            "and bfloat16 parameters"
        )
    return name


def _dense(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return g.coalesce().values()  # same norm as the dense gradient
    return g


def _count_nonfinite(rows: npt.NDArray[np.float64], tensors: Sequence[torch.Tensor]) -> None:
    """Exact non-finite counts, computed only for tensors whose norm came back non-finite:
    a healthy step pays nothing and no extra transfer."""
    for i in np.flatnonzero(~np.isfinite(rows[:, 0])):
        rows[i, 4] = float((~torch.isfinite(tensors[int(i)])).sum().item())
