"""The guard's on-disk state: a NumPy ``.npz`` archive, never a pickle.

Layout (format version 1):

* ``meta``: UTF-8 JSON as a uint8 array: format version, guard configuration, detector state,
  engine history and ring head, per-tensor ring layout, and a SHA-256 over every array;
* ``t{i}_s{j}``: ring slot ``j`` of tensor ``i`` (uint8 bytes of the tensor's own dtype in exact
  mode, float64 buckets in sketch mode); ``t{i}_tau``: the sketch signs (float32).

Files are written atomically and read as hostile input (:mod:`zetaguard._state_checks`):
sizes bounded before anything is read, no pickles, a checksum over the metadata and the arrays
(format version 2; version 1 files, whose checksum covers the arrays only, still load), every
field checked for type and range. A truncated, bit-flipped or forged file is refused with a
:class:`StateFileError` naming the problem, and the previous good file is never replaced
half-written.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard import _state_checks as checks
from zetaguard._atomic import atomic_write

FORMAT = "zetaguard-state"
VERSION = 2  # 2: the checksum covers the metadata too
READS = (1, 2)


class StateFileError(ValueError):
    """A state file that cannot be used: missing, truncated, corrupt, or of another format."""


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
    meta = {"format": FORMAT, "version": VERSION, **meta}
    meta["sha256"] = checks.digest(meta, arrays)
    blob = json.dumps(meta, allow_nan=True).encode()
    payload = {"meta": np.frombuffer(blob, dtype=np.uint8), **arrays}
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **payload)
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The checked metadata and arrays of a state file; :class:`StateFileError` for anything
    a guard must not use."""
    where = os.fspath(path)
    if not os.path.exists(where):
        raise StateFileError(f"no guard state at {where!r}; save one with guard.save_state(path)")
    try:
        arrays = checks.read_archive(where)
    except checks.Refusal as e:
        raise StateFileError(
            f"{where!r} is not a readable zetaguard state file (truncated or corrupt: {e}); "
            "restore an earlier copy or start a fresh guard"
        ) from e
    except Exception as e:
        # A damaged archive fails in many ways inside zipfile and NumPy (BadZipFile, EOFError,
        # NotImplementedError for flag bits it reads as encryption, a header NumPy cannot
        # parse, ...): each one means the same thing here.
        raise StateFileError(
            f"{where!r} is not a readable zetaguard state file (truncated or corrupt: {e}); "
            "restore an earlier copy or start a fresh guard"
        ) from e
    try:
        meta = checks.parse_meta(arrays.pop("meta", None))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise checks.Refusal("it is not a zetaguard state file")
        version = meta.get("version")
        if version not in READS or type(version) is not int:
            raise checks.Refusal(
                f"it has state format version {version!r}; this zetaguard reads versions "
                f"{', '.join(map(str, READS))}"
            )
        if meta.get("sha256") != checks.digest(meta if version >= 2 else None, arrays):
            raise checks.Refusal("it failed its checksum: the file is corrupt")
        checks.validate(meta, arrays)
    except checks.Refusal as e:
        raise StateFileError(
            f"{where!r} holds an inconsistent guard state: {e}; restore an earlier copy or "
            "start a fresh guard"
        ) from e
    return meta, arrays
