"""Fuzz the native boundary and the state loader.

Every input is a byte string that :func:`fuzz_one` decodes into one case:

* ``buffer``: NumPy arrays of every dtype, zero-size and odd shapes, transposed, sliced,
  reversed, broadcast (zero strides), byte-swapped, read-only, and at odd byte offsets, through
  the buffer protocol / DLPack into ``Tracker.update`` and ``Tracker.norms``;
* ``torch``: torch tensors of every dtype (bfloat16, float8, complex32, unsigned, bool ...)
  with arbitrary strides and storage offsets through DLPack;
* ``capsule``: hand-built DLPack capsules (legacy and versioned) with random dtype codes, bit
  widths, lanes, devices, ndim, shapes, strides, byte offsets, names and versions; a capsule
  either describes memory it really owns or makes a claim that is impossible on its face
  (negative or overflowing sizes, offsets past the address space), never a plausible lie;
* ``state``: truncated, bit-flipped and byte-overwritten state files, and well-formed files
  whose header fields were replaced with random values (the checksum recomputed);
* ``resize``: one guard fed a group whose count, sizes and dtypes change between steps;
* ``mutate``: torch parameters and gradients changed behind the guard's cached raw addresses
  between ``monitor()`` calls: swapped (``p.data = ...``, ``p.grad.data = ...`` of another size
  or dtype), storage resized in place (``untyped_storage().resize_()``), re-strided
  (``as_strided_``), re-pointed (``set_()``), gradients dropped or made sparse.

Each case must either succeed, with results that match a NumPy reference of the same memory,
or raise ``ValueError``/``TypeError`` with a message; a DLPack deleter must run at most once,
and exactly once for a capsule the engine took. Anything else (another exception, a crash, a
sanitizer report) fails the run.

Drivers: ``--driver atheris`` (coverage-guided, needs the ``atheris`` package), ``--driver
random`` (seeded random bytes; what CI and scripts/sanitize.sh use). ``tests/test_fuzz_boundary.py``
drives the same harness with hypothesis.

    python scripts/fuzz.py --runs 100000 --driver atheris
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from zetaguard import ZetaGuard, _core, _state_checks, state
from zetaguard.state import StateFileError

# ---- decoding bytes into choices ------------------------------------------------------------


class Reader:
    """Turns the fuzzer's bytes into choices; reads zeros once the bytes run out, so every byte
    string (the empty one included) decodes to some case."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, nbytes: int) -> int:
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little")

    def below(self, n: int) -> int:
        return self.u(2) % n if n > 1 else 0

    def pick(self, seq: Any) -> Any:
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return self.u(1) & 1 == 1

    def i64(self) -> int:
        return self.u(8) - (1 << 63) if self.flag() else self.u(8) >> self.below(64)

    def floats(self, n: int) -> np.ndarray:
        """Mostly ordinary values, some NaN/inf/huge/denormal."""
        rng = np.random.default_rng(self.u(4))
        x = rng.normal(size=n)
        specials = np.array([np.nan, np.inf, -np.inf, 1e38, -1e38, 1e-40, 0.0, 6.5e4])
        mask = rng.random(n) < (0.1 if self.flag() else 0.0)
        x[mask] = rng.choice(specials, size=int(mask.sum()))
        return x


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


class Refused(Exception):
    """Not a failure: the entry point refused the input with a clear Python error."""


def expect_clear_error(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a ValueError/TypeError with a real message is a clean refusal."""
    try:
        return fn()
    except (ValueError, TypeError) as e:
        message = str(e)
        if len(message) < 15:
            raise AssertionError(f"unclear error {type(e).__name__}: {message!r}") from e
        raise Refused(message) from e


# ---- references -----------------------------------------------------------------------------

_FLOAT_KINDS = {np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)}


def reference_rows(values: np.ndarray) -> tuple[float, int]:
    """(sum of squares in float64, non-finite count) of a float array, as the engine defines
    them: squares of finite and non-finite values alike, non-finite counted separately."""
    x = values.astype(np.float64).ravel()
    return float(np.sum(x * x)), int(np.count_nonzero(~np.isfinite(x)))


def check_norms(rows: np.ndarray, arrays: list[np.ndarray]) -> None:
    assert rows.shape == (len(arrays), 5), rows.shape
    for row, a in zip(rows, arrays, strict=True):
        x2, nonfinite = reference_rows(a)
        assert int(row[4]) == nonfinite, (row, nonfinite)
        if nonfinite == 0 and np.isfinite(x2):
            assert np.isclose(row[0], x2, rtol=1e-9, atol=0.0), (row[0], x2)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- case: NumPy arrays through the buffer protocol / DLPack -----------------------------------

NUMPY_DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.longdouble,
    np.complex64,
    np.complex128,
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.dtype("datetime64[s]"),
    np.dtype("S4"),
    np.dtype("U2"),
    np.dtype("V4"),
    np.dtype([("a", np.float32), ("b", np.int16)]),
    np.dtype(">f4"),
    np.dtype(">f8"),
    object,
]


def random_array(r: Reader) -> np.ndarray:
    # Half the arrays get an accepted dtype, so the accepted paths see as many layouts.
    dtype = np.dtype(r.pick(NUMPY_DTYPES[:3] if r.flag() else NUMPY_DTYPES))
    ndim = r.below(4)
    shape = tuple(r.pick([0, 1, 2, 3, 5, 8, 17]) for _ in range(ndim))
    n = int(np.prod(shape)) if shape else 1
    values = r.floats(n)
    if dtype.kind in "fc":
        with np.errstate(over="ignore", invalid="ignore"):
            a = values.astype(dtype).reshape(shape)
    elif dtype.kind == "O":
        a = np.array(values, dtype=object).reshape(shape)
    else:
        a = np.zeros(shape, dtype=dtype)
    op = r.below(10)
    if op == 1 and a.ndim >= 2:
        a = a.T
    elif op == 2 and a.ndim >= 1:
        a = a[::2]
    elif op == 3 and a.ndim >= 1:
        a = a[::-1]
    elif op == 4 and a.ndim >= 1:
        a = a[1:]  # contiguous, at a byte offset
    elif op == 5:
        a = np.broadcast_to(a, (3, *a.shape))
    elif op == 6 and a.ndim >= 1 and dtype.kind != "O":
        raw = np.zeros(a.nbytes + 8, np.uint8)
        off = r.below(8)
        a = np.frombuffer(raw.data, dtype=dtype, count=a.size, offset=off).reshape(a.shape)
    elif op == 7 and a.ndim >= 2:
        a = np.asfortranarray(a)
    if r.flag():
        a.flags.writeable = False
    return a


def case_buffer(r: Reader) -> None:
    arrays = [random_array(r) for _ in range(1 + r.below(3))]
    tracker = _core.Tracker(
        mode=r.pick(["exact", "sketch"]),
        sketch_buckets=1 + r.below(64),
        min_buckets=1 + r.below(8),
        threads=1 + r.below(2),
    )
    use_norms = r.flag()
    rows = expect_clear_error(
        lambda: tracker.norms(arrays) if use_norms else tracker.update(arrays)
    )
    # Accepted: the memory was read as what it is.
    for a in arrays:
        check(a.dtype in _FLOAT_KINDS, f"accepted dtype {a.dtype}")
        check(a.flags.c_contiguous, "accepted a non-contiguous array")
    check_norms(rows, arrays)


# ---- case: torch tensors through DLPack ---------------------------------------------------------


def torch_dtypes() -> list[Any]:
    import torch

    names = [
        "float32",
        "float64",
        "float16",
        "bfloat16",
        "complex32",
        "complex64",
        "complex128",
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float8_e4m3fn",
        "float8_e5m2",
        "quint8",
        "qint8",
    ]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def case_torch(r: Reader) -> None:
    import torch

    dtype = r.pick(torch_dtypes())
    storage_n = r.below(64)
    base = torch.from_numpy(r.floats(storage_n).astype(np.float32))
    try:
        base = base.to(dtype)
    except (RuntimeError, TypeError):
        base = torch.zeros(storage_n).to(torch.float32)
    ndim = r.below(4)
    shape = [r.below(6) for _ in range(ndim)]
    strides = [r.below(7) - 1 for _ in range(ndim)]  # -1 (refused by torch), 0, 1, ... 5
    offset = r.below(8)
    # Keep the view inside the storage: torch checks this itself, the harness must not lie.
    try:
        t = base.as_strided(shape, strides, offset)
    except RuntimeError:
        t = base
    if r.flag() and t.ndim == 2:
        t = t.t()
    tracker = _core.Tracker()
    rows = expect_clear_error(lambda: tracker.norms([t]))
    assert t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16), t.dtype
    ref = t.detach().to(torch.float64).contiguous().numpy()
    check_norms(rows, [ref])


# ---- case: hand-made DLPack capsules ---------------------------------------------------------------


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

# (code, bits) -> NumPy dtype of the element, for the types the engine accepts.
_ENGINE_TYPES = {(2, 32): np.float32, (2, 64): np.float64, (2, 16): np.float16, (4, 16): np.uint16}
_IMPOSSIBLE = 1 << 56  # the engine's bound on any claimed extent


class CapsuleCase:
    """One capsule plus everything it points at, kept alive for the call."""

    def __init__(self, r: Reader) -> None:
        self.deleted = 0
        self.versioned = r.flag()
        # Half the capsules are well-typed CPU tensors, so shapes, strides and offsets get
        # exercised on the accepted path too; the rest vary every field.
        clean = r.flag()
        code_bits = r.pick(
            [(2, 32), (2, 64), (2, 16), (4, 16)]
            if clean
            else [
                (2, 32),
                (2, 64),
                (2, 16),
                (4, 16),
                (0, 32),
                (1, 8),
                (5, 64),
                (6, 8),
                (3, 64),
                (2, 8),
                (4, 32),
                (r.u(1), r.u(1)),
            ]
        )
        self.lanes = 1 if clean else r.pick([1, 1, 1, 2, 4, 0])
        self.dtype = _ENGINE_TYPES.get(code_bits)
        elem = max(1, code_bits[1] // 8)
        self.buffer = np.zeros(256 + 64, dtype=np.uint8)
        self.buffer[:] = np.frombuffer(r.floats(40).astype(np.float64).tobytes(), np.uint8)
        honest = clean or r.below(4) != 0
        ndim = r.below(5)
        if honest:
            # A shape and offset that fit inside the buffer.
            budget = 256 // elem
            shape = []
            for _ in range(ndim):
                d = r.below(6)
                shape.append(d)
            while int(np.prod(shape)) > budget:
                shape[r.below(len(shape))] //= 2
            offset = elem * r.below(64 // elem + 1) if clean or r.flag() else r.below(64)
            if r.u(1) == 0 and not clean:
                offset = r.below(8)  # odd offsets test the alignment check
        else:
            kind = r.below(5)
            shape = [r.below(6) for _ in range(max(ndim, 1))]
            offset = r.below(64)
            if kind == 0:
                shape[r.below(len(shape))] = -1 - r.below(1000)
            elif kind == 1:
                shape[r.below(len(shape))] = _IMPOSSIBLE + r.u(4)
                shape = [d if d != 0 else 1 for d in shape]
            elif kind == 2:
                shape = [1 << 20] * 4  # 2^80 elements: the product overflows
            elif kind == 3:
                offset = (1 << 63) + r.u(6)
            else:
                ndim = r.pick([-1, -(1 << 31), 65, 1 << 30])
        self.shape_arr = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.strides_arr = None
        if r.flag() and shape:
            strides = []
            acc = 1
            for d in reversed(shape):
                strides.append(acc)
                acc *= max(d, 1)
            strides.reverse()
            if r.flag():
                strides[r.below(len(strides))] = r.below(9) - 4  # odd strides
            self.strides_arr = (ctypes.c_int64 * len(strides))(*strides)
        self.shape = shape
        self.offset = offset
        self.honest = honest
        self.ndim = len(shape) if honest or ndim in (0, 1, 2, 3, 4) else ndim
        tensor = DLTensor()
        null_data = not clean and r.below(16) == 0
        tensor.data = None if null_data else self.buffer.ctypes.data
        self.null_data = null_data
        tensor.device = DLDevice(1 if clean else r.pick([1, 1, 3, 2, 13, 8, 0, 99]), r.below(3))
        tensor.ndim = self.ndim
        tensor.dtype = DLDataType(code_bits[0], code_bits[1], self.lanes)
        null_shape = not clean and r.below(16) == 0
        tensor.shape = (
            ctypes.cast(None, ctypes.POINTER(ctypes.c_int64))
            if null_shape
            else ctypes.cast(self.shape_arr, ctypes.POINTER(ctypes.c_int64))
        )
        tensor.strides = (
            ctypes.cast(self.strides_arr, ctypes.POINTER(ctypes.c_int64))
            if self.strides_arr is not None
            else ctypes.cast(None, ctypes.POINTER(ctypes.c_int64))
        )
        tensor.byte_offset = offset
        self.deleter = DELETER(self._delete)
        if self.versioned:
            self.managed: Any = DLManagedTensorVersioned()
            self.major = 1 if clean else r.pick([1, 1, 0, 2, 255])
            self.managed.version = DLPackVersion(self.major, r.below(5))
            self.managed.flags = r.u(1)
        else:
            self.managed = DLManagedTensor()
            self.major = 1
        self.managed.dl_tensor = tensor
        self.managed.deleter = self.deleter
        # A name of the other kind would describe a struct of another layout: a producer bug
        # no consumer can see, so the harness never makes that lie.
        good_name = b"dltensor_versioned" if self.versioned else b"dltensor"
        self.name = (
            good_name if clean else r.pick([good_name] * 3 + [b"used_" + good_name, b"", b"junk"])
        )
        self.capsule = _capsule_new(ctypes.addressof(self.managed), self.name, None)

    def _delete(self, _ptr: int) -> None:
        self.deleted += 1

    @property
    def takeable(self) -> bool:
        """The engine takes ownership of a capsule of the right kind and a readable version."""
        if self.versioned:
            return self.name == b"dltensor_versioned" and self.major <= 1
        return self.name == b"dltensor"

    def reference(self) -> np.ndarray:
        numel = int(np.prod(self.shape)) if self.shape else 1
        assert self.dtype is not None
        view = np.frombuffer(self.buffer.data, dtype=self.dtype, count=numel, offset=self.offset)
        return bf16_to_f32(view) if self.dtype is np.uint16 else view


def case_capsule(r: Reader) -> None:
    cases = [CapsuleCase(r) for _ in range(1 + r.below(2))]
    items: list[Any] = [c.capsule for c in cases]
    if r.below(8) == 0:
        items.append(items[0])  # the same capsule twice: the second one is already used
    tracker = _core.Tracker()
    try:
        rows = expect_clear_error(lambda: tracker.norms(items))
    finally:
        for c in cases:
            # Never twice, whether the call succeeded or was refused part-way through the list.
            assert c.deleted <= 1, f"deleter ran {c.deleted} times"
            if not c.takeable:
                assert c.deleted == 0, "the deleter of a capsule the engine refused to take ran"
    for c in cases:
        check(c.honest and c.takeable, f"accepted an impossible capsule {vars(c)}")
        check(c.dtype is not None and c.lanes == 1, f"accepted dtype/lanes {vars(c)}")
        assert c.deleted == 1, "a consumed capsule's deleter never ran"
    check_norms(rows, [c.reference() for c in cases])


# ---- case: state files ---------------------------------------------------------------------------

_GOOD_STATES: list[tuple[bytes, list[dict[str, np.ndarray]]]] = []


def _params(step: int, sizes: tuple[int, ...] = (40, 300, 7)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    dtypes = (np.float32, np.float64, np.float16)
    return {f"l{i}.w": rng.normal(size=n).astype(dtypes[i % 3]) for i, n in enumerate(sizes)}


def good_states() -> list[tuple[bytes, list[dict[str, np.ndarray]]]]:
    """State files of an exact and a sketch guard mid-run, and the parameters to continue."""
    if not _GOOD_STATES:
        with tempfile.TemporaryDirectory() as tmp:
            for mode in ("exact", "sketch"):
                guard = ZetaGuard(warmup_steps=3, mode=mode, sketch_buckets=32, auto_recover=False)
                for step in range(5):
                    guard.monitor(_params(step), loss=1.0 / (step + 1))
                path = os.path.join(tmp, f"{mode}.zg")
                guard.save_state(path)
                with open(path, "rb") as f:
                    _GOOD_STATES.append((f.read(), [_params(5), _params(6)]))
    return _GOOD_STATES


def _random_json_value(r: Reader) -> Any:
    return r.pick(
        [
            0,
            1,
            2,
            3,
            -1,
            7,
            1 << 40,
            -(1 << 62),
            1 << 70,
            0.5,
            float("nan"),
            "x",
            "float32",
            "bfloat16",
            "exact",
            "sketch",
            None,
            [],
            {},
            [1, 2],
            True,
        ]
    )


def _mutate_meta(r: Reader, meta: Any) -> Any:
    """Replace one value somewhere inside the header with a random one."""
    node = meta
    for _ in range(1 + r.below(4)):
        if isinstance(node, dict) and node:
            key = r.pick(sorted(node))
            if r.below(3) == 0 or not isinstance(node[key], (dict, list)) or not node[key]:
                node[key] = _random_json_value(r)
                return meta
            node = node[key]
        elif isinstance(node, list) and node:
            i = r.below(len(node))
            if r.below(3) == 0 or not isinstance(node[i], (dict, list)) or not node[i]:
                node[i] = _random_json_value(r)
                return meta
            node = node[i]
    return meta


def case_state(r: Reader) -> None:
    blob, continuation = r.pick(good_states())
    data = bytearray(blob)
    how = r.below(4)
    if how == 0:
        data = data[: r.below(len(data))]
    elif how == 1:
        for _ in range(1 + r.below(4)):
            data[r.below(len(data))] ^= 1 << r.below(8)
    elif how == 2:
        start = r.below(len(data))
        for i in range(start, min(len(data), start + 1 + r.below(32))):
            data[i] = r.u(1)
    else:
        # Well-formed archive, checksum recomputed, one header value or one array replaced.
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays.pop("meta")).decode())
        for k in ("format", "version", "sha256"):
            meta.pop(k)
        if r.flag():
            meta = _mutate_meta(r, meta)
        else:
            name = r.pick(sorted(arrays))
            arrays[name] = r.pick(
                [
                    arrays[name][:-1],
                    arrays[name][:0],
                    np.zeros(3, np.int64),
                    arrays[name].astype(np.float32),
                    np.full(arrays[name].shape, np.nan),
                ]
            )
        out = io.BytesIO()
        payload = {"format": state.FORMAT, "version": state.VERSION, **meta}
        try:
            payload["sha256"] = _state_checks.digest(payload, arrays)
        except _state_checks.Refusal as e:  # a header no writer could checksum
            raise Refused(str(e)) from e
        np.savez(out, meta=np.frombuffer(json.dumps(payload).encode(), np.uint8), **arrays)
        data = bytearray(out.getvalue())
    with tempfile.NamedTemporaryFile(suffix=".zg", delete=False) as f:
        f.write(bytes(data))
        path = f.name
    try:
        guard = ZetaGuard(auto_recover=False)
        try:
            guard.load_state(path)
        except StateFileError as e:
            check(path in str(e), f"the error does not name the file: {e}")
            raise Refused(str(e)) from e
        # Loaded: the next steps either work or are refused clearly; never a crash.
        for params in continuation:
            expect_clear_error(lambda p=params: guard.monitor(p))  # type: ignore[misc]
    finally:
        os.unlink(path)


# ---- case: a group whose size changes between steps --------------------------------------------------


def case_resize(r: Reader) -> None:
    guard = ZetaGuard(
        warmup_steps=2,
        mode=r.pick(["exact", "sketch", "auto"]),
        sketch_buckets=1 + r.below(50),
        auto_recover=False,
    )
    layout = [
        (r.pick([0, 1, 5, 64, 300]), r.pick([np.float32, np.float64, np.float16]))
        for _ in range(1 + r.below(3))
    ]
    refusals = []
    for _ in range(2 + r.below(5)):
        change = r.below(12)  # mostly the same group; sometimes one parameter more, fewer,
        if change == 0:  # resized or recast
            layout.append((r.pick([1, 5, 64]), np.float32))
        elif change == 1 and len(layout) > 1:
            layout.pop(r.below(len(layout)))
        elif change == 2:
            i = r.below(len(layout))
            layout[i] = (layout[i][0] + 1, layout[i][1])
        elif change == 3:
            i = r.below(len(layout))
            layout[i] = (layout[i][0], r.pick([np.float32, np.float64, np.float16]))
        params = {f"p{i}": r.floats(n).astype(dt) for i, (n, dt) in enumerate(layout)}
        try:
            result = expect_clear_error(lambda p=params: guard.monitor(p))  # type: ignore[misc]
        except Refused as e:
            check(any(w in str(e) for w in ("reset", "dtype", "no parameters")), str(e))
            refusals.append(str(e))
            if r.flag():
                guard.reset()
            continue
        nonfinite = sum(reference_rows(a)[1] for a in params.values())
        assert result.nonfinite == nonfinite, (result.nonfinite, nonfinite)
        if nonfinite:
            assert result.status == "CRITICAL", result
    if refusals:
        raise Refused(refusals[0])  # counted as refused: at least one step was


# ---- case: torch tensors changed between monitor() calls ----------------------------------------------

_TORCH_FLOATS = ("float32", "float64", "float16", "bfloat16")


def _covered(t: Any) -> bool:
    """The harness's own bound (not the adapter's): the storage holds every element."""
    if t.numel() == 0:
        return True
    end = (
        t.storage_offset()
        + 1
        + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    )
    return end * t.element_size() <= t.untyped_storage().nbytes()


def _mutate(r: Reader, params: list[Any]) -> None:
    import torch

    p = r.pick(params)
    dtype = getattr(torch, r.pick(_TORCH_FLOATS))
    n = r.pick([0, 1, 3, 8, 33, 64])
    op = r.below(11)
    if op in (1, 10) and not _covered(p):
        op = 0  # torch itself would read past a shrunk storage: the harness must not
    with contextlib.suppress(RuntimeError):  # torch refused the change (a grad of another shape)
        _apply(op, p, r, dtype, n)


def _apply(op: int, p: Any, r: Reader, dtype: Any, n: int) -> None:
    import torch

    with torch.no_grad():
        if op == 0:
            p.data = torch.from_numpy(r.floats(n)).to(dtype)
        elif op == 1:
            p.data = p.data.to(dtype)
        elif op == 2 and p.grad is not None:
            p.grad.data = torch.from_numpy(r.floats(n)).to(dtype)
        elif op == 3:
            p.grad = torch.from_numpy(r.floats(p.numel())).to(p.dtype).reshape(p.shape)
        elif op == 4:
            p.grad = None
        elif op == 5:
            target = p if r.flag() or p.grad is None else p.grad
            # Whole elements only: a ragged storage corrupts torch's own heap handling
            # (seen in a plain build with no zetaguard call at all), which is not ours to test.
            size = r.below(target.numel() + 4) * target.element_size()
            target.untyped_storage().resize_(size)
        elif op == 6 and p.numel() > 0:
            size = r.below(p.numel() + 1)
            stride = r.below(3)
            offset = r.below(2)
            if (
                offset + max(size - 1, 0) * stride
                < p.untyped_storage().nbytes() // p.element_size()
            ):
                p.as_strided_((size,), (stride,), offset)
        elif op == 7:
            other = torch.from_numpy(r.floats(n)).to(dtype)
            p.set_(other) if r.flag() else p.data.set_(other.untyped_storage(), 0, (n,), (1,))
        elif op == 8 and p.ndim == 1 and p.numel() >= 2:
            p.grad = torch.from_numpy(r.floats(p.numel())).to(p.dtype).to_sparse()
        elif op == 9:
            p.grad = torch.from_numpy(r.floats(p.numel() * 2)).to(p.dtype)[::2]  # strided
        elif _covered(p):
            # An ordinary in-place step (op 10, or an op whose condition above did not hold):
            # on a storage shrunk under the tensor, torch's own add_ writes past it.
            p.add_(0.01)


def case_mutate(r: Reader) -> None:
    import torch

    params = []
    for _ in range(1 + r.below(3)):
        t = torch.from_numpy(r.floats(r.pick([1, 4, 17, 64]))).to(
            getattr(torch, r.pick(_TORCH_FLOATS))
        )
        p = torch.nn.Parameter(t)
        if r.flag():
            p.grad = torch.from_numpy(r.floats(p.numel())).to(p.dtype)
        params.append(p)
    guard = ZetaGuard(
        warmup_steps=2,
        auto_recover=False,
        group_by="tensor",
        mode=r.pick(["exact", "sketch"]),
        sketch_buckets=8,
    )
    refused = []
    for _ in range(2 + r.below(5)):
        _mutate(r, params)
        given = params if r.flag() else list(reversed(params))
        try:
            result = expect_clear_error(lambda g=given: guard.monitor(g))  # type: ignore[misc]
        except Refused as e:
            refused.append(str(e))
            if r.flag():
                guard.reset()
            continue
        # Accepted: every tensor was in bounds and read as what it is now.
        for i, t in enumerate(given):
            check(_covered(t) and t.is_contiguous(), f"accepted tensor {i} out of its storage")
            x2, bad = reference_rows(t.detach().to(torch.float64).numpy())
            row = result._group_rows[i]
            if bad == 0 and np.isfinite(x2):
                assert np.isclose(row[0], x2, rtol=1e-9, atol=0.0), (i, row[0], x2)
        grads = [t.grad for t in given if t.grad is not None]
        if grads:
            dense = [g.to_dense() if g.is_sparse else g for g in grads]
            for g in dense:
                check(_covered(g), "accepted a gradient out of its storage")
            sq = [reference_rows(g.detach().to(torch.float64).contiguous().numpy()) for g in dense]
            want = float(np.sqrt(sum(x for x, _ in sq)))
            got = result.channels.get("grad_norm")
            assert got is not None, "gradients present, no grad_norm channel"
            if sum(b for _, b in sq) or not np.isfinite(want):
                assert got == float("inf"), (got, want)
            else:
                assert np.isclose(got, want, rtol=1e-9, atol=1e-300), (got, want)
        else:
            assert "grad_norm" not in result.channels, result.channels
    if refused:
        raise Refused(refused[0])


# ---- the harness ------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Reader], None]] = {
    "buffer": case_buffer,
    "torch": case_torch,
    "capsule": case_capsule,
    "state": case_state,
    "resize": case_resize,
    "mutate": case_mutate,
}
_ORDER = list(CASES)
tally: Counter[str] = Counter()


def fuzz_one(data: bytes, only: str | None = None) -> None:
    """Decode ``data`` into one case and run it; raises on anything but success or a clean
    refusal."""
    r = Reader(data)
    name = only or _ORDER[r.below(len(_ORDER))]
    tally[name] += 1
    try:
        CASES[name](r)
        tally[f"{name}:accepted"] += 1
    except Refused:
        tally[f"{name}:refused"] += 1


def summary(elapsed: float) -> str:
    total = sum(tally[n] for n in CASES)
    lines = [f"fuzz: {total} inputs tried in {elapsed:.1f} s, none crashed"]
    for n in CASES:
        lines.append(
            f"  {n:8s} {tally[n]:7d} tried  {tally[f'{n}:accepted']:7d} accepted  "
            f"{tally[f'{n}:refused']:7d} refused with a clear error"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20000)
    parser.add_argument("--driver", choices=["atheris", "random"], default="random")
    parser.add_argument("--case", choices=list(CASES), default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import logging
    import warnings

    logging.getLogger("zetaguard").setLevel(logging.ERROR)  # CRITICAL steps are expected here
    warnings.simplefilter("ignore")  # NumPy cast and torch dtype warnings on odd inputs
    start = time.perf_counter()
    if args.driver == "random":
        rng = np.random.default_rng(args.seed)
        for _ in range(args.runs):
            fuzz_one(rng.bytes(int(rng.integers(0, 300))), args.case)
        print(summary(time.perf_counter() - start))
        return

    import atheris

    def one_input(data: bytes) -> None:
        fuzz_one(data, args.case)
        if sum(tally[n] for n in CASES) >= args.runs:
            print(summary(time.perf_counter() - start), flush=True)
            os._exit(0)

    atheris.instrument_all()  # coverage feedback from the Python layer (adapters, state, guard)
    # -len_control=0: long inputs from the start (short ones decode mostly to zeros);
    # artifacts (crashing or slow inputs) go to the temporary directory, not the working tree.
    artifacts = os.path.join(tempfile.gettempdir(), "zetaguard-fuzz") + os.sep
    os.makedirs(artifacts, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            "-max_len=512",
            "-len_control=0",
            f"-artifact_prefix={artifacts}",
            f"-runs={args.runs + 10}",
        ],
        one_input,
    )
    atheris.Fuzz()


if __name__ == "__main__":
    main()
