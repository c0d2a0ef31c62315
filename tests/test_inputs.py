"""What the bindings accept: DLPack capsules of both kinds and the buffer protocol, zero-copy,
with clear errors for everything they refuse."""

from __future__ import annotations

import array

import numpy as np
import pytest
from zetaguard import _core

torch = pytest.importorskip("torch")


def test_numpy_buffer_is_read_in_place() -> None:
    a = np.arange(12, dtype=np.float32)
    address, numel, dtype = _core._resolve_address(a)
    assert (address, numel, dtype) == (a.ctypes.data, 12, "float32")


def test_numpy_slice_with_offset_is_read_in_place() -> None:
    a = np.arange(20, dtype=np.float64)[5:]
    address, numel, _ = _core._resolve_address(a)
    assert address == a.ctypes.data
    assert numel == 15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_tensor_is_read_in_place_through_versioned_dlpack(dtype: object) -> None:
    t = torch.arange(10).to(dtype)
    address, numel, name = _core._resolve_address(t)
    assert address == t.data_ptr()
    assert numel == 10
    assert name == str(dtype).removeprefix("torch.")


def test_torch_storage_offset_is_honoured() -> None:
    base = torch.arange(16, dtype=torch.float32)
    view = base[4:]
    address, numel, _ = _core._resolve_address(view)
    assert address == view.data_ptr() == base.data_ptr() + 16
    assert numel == 12


def test_legacy_dltensor_capsule_is_accepted_once() -> None:
    t = torch.arange(6, dtype=torch.float32)
    capsule = torch.utils.dlpack.to_dlpack(t)
    address, _, _ = _core._resolve_address(capsule)
    assert address == t.data_ptr()
    with pytest.raises(ValueError, match="consumed only once"):
        _core._resolve_address(capsule)


def test_buffer_protocol_objects_are_accepted() -> None:
    buf = array.array("f", [1.0, 2.0, 3.0])
    _, numel, dtype = _core._resolve_address(buf)
    assert (numel, dtype) == (3, "float32")
    rows = _core.Tracker().norms([buf])
    assert rows[0, 0] == 14.0


def test_read_only_arrays_are_fine() -> None:
    a = np.ones(8, dtype=np.float32)
    a.setflags(write=False)
    assert _core.Tracker().norms([a])[0, 0] == 8.0


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (np.zeros((4, 4), np.float32)[:, 1], r"not (C-)?contiguous.*np\.ascontiguousarray"),
        (torch.zeros(4, 4).t(), r"not contiguous.*\.contiguous\(\)"),
        (np.zeros(3, np.int64), r"int64.*astype\(np\.float32\)"),
        (torch.zeros(3, dtype=torch.int64), r"dtype int64.*\.float\(\)"),
        (torch.zeros(3, dtype=torch.bool), r"dtype bool"),
        (torch.zeros(3, dtype=torch.complex64), r"dtype complex64"),
        (torch.zeros(3, requires_grad=True), r"require.*grad.*detach\(\)"),
        ([1.0, 2.0], r"neither DLPack nor the buffer protocol"),
        ("weights", r"neither DLPack nor the buffer protocol|format"),
    ],
)
def test_refusals_name_the_problem_and_the_fix(obj: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        _core.Tracker().update([obj])


def test_errors_leave_the_tracker_usable() -> None:
    tracker = _core.Tracker()
    good = np.ones(4, np.float32)
    tracker.update([good])
    with pytest.raises(TypeError):
        tracker.update([np.zeros(4, np.int32)])
    assert tracker.history == 1
    tracker.update([good])
    assert tracker.history == 2
