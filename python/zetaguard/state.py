"""The guard's on-disk state: a NumPy ``.npz`` archive, never a pickle.

Layout (format version 1):

* ``meta``: UTF-8 JSON as a uint8 array: format version, guard configuration, detector state,
  engine history and ring head, per-tensor ring layout, and a SHA-256 over every array;
* ``t{i}_s{j}``: ring slot ``j`` of tensor ``i`` (uint8 bytes of the tensor's own dtype in exact
  mode, float64 buckets in sketch mode); ``t{i}_tau``: the sketch signs (float32);
* ``mode="auto"`` (tiered) also: ``r{i}_s{j}``, slot ``j`` of tensor ``i``'s sampled ring (uint8
  bytes of the sampled elements), with its history, head, layout and the full-pass schedule's
  counters under ``sampler`` in the metadata. Files without it still load (the ring is rebuilt).

Files are written atomically and read as hostile input (:mod:`zetaguard._state_checks`):
sizes bounded before anything is read, no pickles, a checksum over the metadata and the arrays
(format version 2; version 1 files, whose checksum covers the arrays only, still load), every
field checked for type and range. A truncated, bit-flipped or forged file is refused with a
:class:`StateFileError` naming the problem, and the previous good file is never replaced
half-written.

:func:`save_guard` and :func:`load_guard` are the guard's side: what it saves (configuration,
engine, names, pattern, detector, run statistics, recovery counters) and how a file becomes a
complete :class:`GuardState` before the guard changes.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard import _core, tiered
from zetaguard import _state_checks as checks
from zetaguard._atomic import atomic_write
from zetaguard.detector import Detector
from zetaguard.stats import RunStatistics

FORMAT = "zetaguard-state"
VERSION = 2  # 2: the checksum covers the metadata too
READS = (1, 2)


class StateFileError(ValueError):
    """A state file that cannot be used: missing, truncated, corrupt, or of another format."""


def pack(
    meta: dict[str, Any], engine_state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
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


def save(
    path: str | os.PathLike[str], meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]
) -> None:
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


# ---- the guard's state ---------------------------------------------------------------------


@dataclass
class GuardState:
    """A state file, parsed and checked completely: what ``ZetaGuard.load_state`` swaps in."""

    config: dict[str, Any]
    detector: Detector
    pattern: re.Pattern[str] | None
    tracker: _core.Tracker | None
    names: list[str]
    stats: RunStatistics
    recovery: Any  # the parsed recovery counters, or None (files from before they were saved)
    tiers: tiered.SavedTiers | None = None  # mode="auto": the sampled ring, if the file has it


def save_guard(
    path: str | os.PathLike[str],
    *,
    config: dict[str, Any],
    engine_mode: str | None,
    engine_state: dict[str, Any],
    names: tuple[str, ...],
    pattern: re.Pattern[str] | None,
    detector: Detector,
    stats: RunStatistics,
    recovery: dict[str, Any],
    sampler: dict[str, Any] | None = None,
) -> None:
    """Write a guard's state to ``path`` atomically. ``sampler``: the tiered pipeline's
    :meth:`~zetaguard.tiered.TieredPipeline.get_state` in ``mode="auto"``."""
    meta = {
        "config": config,
        "engine_mode": engine_mode,
        "names": list(names),
        "pattern": pattern.pattern if pattern else None,
        "detector": detector.state_dict(),
        **stats.to_meta(),  # step, status counts, zeta sum and max, recent gradient norms
        "recovery": recovery,
    }
    meta, arrays = pack(meta, engine_state)
    if sampler is not None:
        layout = []
        for i, t in enumerate(sampler["tensors"]):
            layout.append({"numel": t["numel"], "dtype": t["dtype"]})
            for j, slot in enumerate(t["slots"]):
                arrays[f"r{i}_s{j}"] = np.asarray(slot, dtype=np.uint8)
        meta["sampler"] = {**sampler, "tensors": layout}
    save(path, meta, arrays)


def load_guard(
    path: str | os.PathLike[str],
    *,
    threads: int,
    parse_recovery: Callable[[Any], Any],
) -> GuardState:
    """Read and check a guard's state file; :class:`StateFileError` for anything unusable.
    ``threads`` are the engine threads of the restored tracker (not a property of the file);
    ``parse_recovery`` checks the recovery counters (``RecoveryManager.parse_counters``)."""
    meta, arrays = load(path)
    where = os.fspath(path)
    try:
        cfg = meta["config"]
        detector = Detector(
            drift_threshold=float(cfg["drift_threshold"]),
            snap_threshold=float(cfg["snap_threshold"]),
            alpha=float(cfg["alpha"]),
            warmup_steps=int(cfg["warmup_steps"]),
            calibration=cfg["calibration"],
        )
        detector.load_state_dict(meta["detector"])
        pattern = re.compile(meta["pattern"]) if meta["pattern"] else None
        tracker: _core.Tracker | None = None
        if meta["engine_mode"] is not None:
            tracker = _core.Tracker(
                mode=meta["engine_mode"],
                sketch_buckets=int(cfg["sketch_buckets"]),
                threads=threads,
                seed=int(cfg["seed"]),
            )
            tracker.set_state(unpack(meta, arrays))
        names = [str(n) for n in meta["names"]]
        if tracker is not None and tracker.tensor_count not in (0, len(names)):
            raise ValueError(
                f"{tracker.tensor_count} tensors in the engine state but {len(names)} names"
            )
        tiers = None
        if meta.get("sampler") is not None:  # checked by _state_checks; sizes by the engine
            saved = dict(meta["sampler"])
            saved["tensors"] = [
                {**t, "slots": [arrays[f"r{i}_s{j}"] for j in range(3)]}
                for i, t in enumerate(saved["tensors"])
            ]
            tiers = tiered.restore_tiers(
                float(cfg.get("sample_fraction", tiered.DEFAULT_SAMPLE_FRACTION)),
                int(cfg["seed"]),
                cfg.get("max_sampled"),  # absent: a file from before the cap, sampled uncapped
                saved,
            )
        stats = RunStatistics.from_meta(meta)
        # Files written before recovery counters were saved leave the ladder as it is.
        saved_recovery = meta.get("recovery")
        recovery = parse_recovery(saved_recovery) if saved_recovery is not None else None
    except (
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        RuntimeError,
        re.error,
    ) as e:
        # RuntimeError: pybind11's cast errors for a field of the wrong type.
        raise StateFileError(
            f"{where!r} holds an inconsistent guard state ({type(e).__name__}: {e}); "
            "restore an earlier copy or start a fresh guard"
        ) from e
    return GuardState(cfg, detector, pattern, tracker, names, stats, recovery, tiers)


def to_bytes(save_to: Callable[[str], None]) -> dict[str, Any]:
    """What ``save_to(path)`` writes, in memory (``ZetaGuard.state_dict``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "guard.npz")
        save_to(path)
        with open(path, "rb") as f:
            return {"format": FORMAT, "npz": f.read()}


def from_bytes(state_dict: Any, load_from: Callable[[str], None]) -> None:
    """Hand the bytes :func:`to_bytes` returned to ``load_from(path)``."""
    blob = state_dict.get("npz") if isinstance(state_dict, dict) else None
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise StateFileError(
            "load_state_dict() needs the dict guard.state_dict() returned (with its 'npz' bytes)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "guard.npz")
        with open(path, "wb") as f:
            f.write(bytes(blob))
        load_from(path)
