"""The guard's on-disk state: a NumPy ``.npz`` archive, never a pickle.

Layout (format version 1):

* ``meta``: UTF-8 JSON as a uint8 array: format version, guard configuration, detector state,
  engine history and ring head, per-tensor ring layout, and a SHA-256 over every array;
* ``t{i}_s{j}``: ring slot ``j`` of tensor ``i`` (uint8 bytes of the tensor's own dtype in exact
  mode, float64 buckets in sketch mode); ``t{i}_tau``: the sketch signs (float32).

Files are read with ``allow_pickle=False`` and written atomically; a truncated or bit-flipped
file is refused with a clear error and the previous good file is never replaced half-written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard._atomic import atomic_write

FORMAT = "zetaguard-state"
VERSION = 1


class StateFileError(ValueError):
    """A state file that cannot be used: missing, truncated, corrupt, or of another format."""


def _digest(arrays: dict[str, npt.NDArray[Any]]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack(meta: dict[str, Any], engine_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """Split the engine state into JSON-able metadata and arrays."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    layout = []
    for i, t in enumerate(engine_state["tensors"]):
        layout.append({k: t[k] for k in ("numel", "dtype", "buckets", "seed")})
        for j, slot in enumerate(t["slots"]):
            arrays[f"t{i}_s{j}"] = np.asarray(slot)
        arrays[f"t{i}_tau"] = np.asarray(t["tau"], dtype=np.float32)
    meta = dict(meta)
    meta["engine"] = {
        "history": engine_state["history"],
        "head": engine_state["head"],
        "tensors": layout,
    }
    return meta, arrays


def unpack(meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    engine = meta["engine"]
    tensors = []
    for i, t in enumerate(engine["tensors"]):
        entry = dict(t)
        entry["slots"] = [arrays[f"t{i}_s{j}"] for j in range(3)]
        entry["tau"] = arrays[f"t{i}_tau"]
        tensors.append(entry)
    return {"history": engine["history"], "head": engine["head"], "tensors": tensors}


def save(path: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
    meta = {"format": FORMAT, "version": VERSION, **meta, "sha256": _digest(arrays)}
    blob = json.dumps(meta, allow_nan=True).encode()
    payload = {"meta": np.frombuffer(blob, dtype=np.uint8), **arrays}
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **payload)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    where = os.fspath(path)
    if not os.path.exists(where):
        raise StateFileError(f"no guard state at {where!r}; save one with guard.save_state(path)")
    try:
        with np.load(where, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except Exception as e:
        # A damaged archive fails in many ways inside zipfile and NumPy (BadZipFile, EOFError,
        # NotImplementedError for flag bits it reads as encryption, MemoryError for a size
        # field gone huge, ...): each one means the same thing here.
        raise StateFileError(
            f"{where!r} is not a readable zetaguard state file (truncated or corrupt: {e}); "
            "restore an earlier copy or start a fresh guard"
        ) from e
    raw_meta = arrays.pop("meta", None)
    try:
        meta = json.loads(bytes(raw_meta).decode()) if raw_meta is not None else None
    except (TypeError, ValueError) as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise StateFileError(f"{where!r} has a corrupt header: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFileError(f"{where!r} is not a zetaguard state file")
    if meta.get("version") != VERSION:
        raise StateFileError(
            f"{where!r} has state format version {meta.get('version')}; this zetaguard reads "
            f"version {VERSION}"
        )
    if meta.get("sha256") != _digest(arrays):
        raise StateFileError(f"{where!r} failed its checksum: the file is corrupt")
    return meta, arrays
