"""Reading a state file as hostile input: bounded, checksummed, every field checked.

A state file may come from another machine, a full disk or someone who edits it. Before the
guard uses one:

* **sizes are bounded before anything is decompressed or allocated**: ``save_state`` writes
  every member uncompressed (``np.savez``), so a compressed member, a member whose declared size
  disagrees with its stored size, members that together claim more bytes than the file holds,
  or an array header whose shape disagrees with its member's size are refused from the zip
  directory and the ``.npy`` header alone; nothing larger than the file is ever allocated, and
  the JSON header is at most ``MAX_META_BYTES``;
* **the checksum covers the metadata** (format version 2): a SHA-256 over a canonical form of
  the JSON header (thresholds, counters, detector state) and every array. It detects damage;
  it is not a signature (whoever can write the file can recompute it);
* **every field is checked for type and range** (:func:`validate`), so a refusal is a clear
  message, never a ``KeyError``, ``OverflowError`` (``warmup_steps: 1e400``) or
  ``RecursionError`` (deeply nested JSON) from deep inside;
* **the name pattern cannot hang the guard**: :func:`zetaguard._pattern_safety.check_pattern`
  refuses regular expressions that can backtrack catastrophically.

Every check raises :class:`Refusal`; :mod:`zetaguard.state` turns it into ``StateFileError``
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from zetaguard._pattern_safety import UnsafePattern, check_pattern

MAX_META_BYTES = 64 << 20  # the JSON header; a model with a million named tensors needs ~50 MB
MAX_DEPTH = 6  # the header's deepest legitimate nesting is 4 (recovery.losses.logs[i])
# Array members and the dtype each may have (uint8 meta and exact rings, float64 sketch rings,
# float32 sketch signs).
_DTYPES = {"|u1": np.uint8, "<f8": np.float64, "<f4": np.float32}
_STATUSES = ("STABLE", "DRIFT", "CRITICAL")
_ENGINE_DTYPES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
_INT64 = 2**63 - 1


class Refusal(ValueError):
    """A state file that must not be used; the message names the problem."""


# ---- the archive ---------------------------------------------------------------------------


def read_archive(where: str) -> dict[str, npt.NDArray[Any]]:
    """The arrays of an uncompressed ``.npz`` at ``where``, read with every size checked first."""
    size = os.path.getsize(where)
    with open(where, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        stored = 0
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise Refusal(
                    f"member {info.filename!r} is compressed (zip method {info.compress_type}); "
                    "save_state writes members uncompressed, so this file was not written by it"
                )
            if info.file_size != info.compress_size:
                raise Refusal(
                    f"member {info.filename!r} declares {info.file_size} bytes but stores "
                    f"{info.compress_size}"
                )
            if info.flag_bits & 0x1:
                raise Refusal(f"member {info.filename!r} is encrypted")
            if not info.filename.endswith(".npy"):
                raise Refusal(f"member {info.filename!r} is not a NumPy array")
            stored += info.compress_size
            if stored > size:
                raise Refusal(
                    f"its members declare more bytes than the file's {size}; it is truncated or "
                    "forged"
                )
        arrays: dict[str, npt.NDArray[Any]] = {}
        for info in infos:
            name = info.filename[: -len(".npy")]
            if name in arrays:
                raise Refusal(f"member {info.filename!r} appears twice")
            arrays[name] = _read_member(zf, info)
    return arrays


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> npt.NDArray[Any]:
    fmt = np.lib.format
    with zf.open(info) as m:
        version = fmt.read_magic(m)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(m)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(m)
        else:
            raise Refusal(f"member {info.filename!r} has .npy format version {version}")
        kind = _DTYPES.get(dtype.str)
        if kind is None or len(shape) != 1:
            raise Refusal(
                f"member {info.filename!r} holds a {dtype} array of shape {shape}; state files "
                "hold 1-D uint8, float32 and float64 arrays only"
            )
        nbytes = int(shape[0]) * dtype.itemsize
        if nbytes != info.file_size - m.tell():
            raise Refusal(
                f"member {info.filename!r} declares {shape[0]} elements ({nbytes} bytes) in "
                f"{info.file_size - m.tell()} bytes of data"
            )
        if info.filename == "meta.npy" and nbytes > MAX_META_BYTES:
            raise Refusal(f"its header is {nbytes} bytes, over the {MAX_META_BYTES} allowed")
        data = m.read(nbytes)
        if len(data) != nbytes:
            raise Refusal(f"member {info.filename!r} ends early")
    return np.frombuffer(bytearray(data), dtype=kind)  # writable, as np.load gave


def parse_meta(raw: npt.NDArray[Any] | None) -> Any:
    if raw is None:
        raise Refusal("it has no header: it is not a zetaguard state file")
    try:
        return json.loads(raw.tobytes().decode())
    except RecursionError as e:
        raise Refusal("its header nests too deeply to be a guard state") from e
    except (TypeError, ValueError) as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise Refusal(f"it has a corrupt header: {e}") from e


# ---- the checksum --------------------------------------------------------------------------


def digest(meta: Mapping[str, Any] | None, arrays: Mapping[str, npt.NDArray[Any]]) -> str:
    """SHA-256 over every array and, when given (format version 2), a canonical form of the
    metadata without its ``sha256`` field: the same values give the same bytes whatever the
    key order or spacing a writer used."""
    h = hashlib.sha256()
    if meta is not None:
        body = {k: v for k, v in meta.items() if k != "sha256"}
        try:
            canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
        except (RecursionError, TypeError, ValueError) as e:
            raise Refusal(f"its header cannot be checksummed ({type(e).__name__})") from e
        h.update(b"meta\0")
        h.update(canonical.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---- the fields ----------------------------------------------------------------------------


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise Refusal(f"{what} must be an integer, got {value!r}"[:300])
    if not lo <= value <= hi:
        raise Refusal(f"{what} must be in {lo}..{hi}, got {value}")
    return value


def _num(value: Any, what: str, *, finite: bool = True, nan: bool = False) -> float:
    if type(value) not in (int, float):
        raise Refusal(f"{what} must be a number, got {value!r}"[:300])
    out = float(value)
    if math.isnan(out) and not nan:
        raise Refusal(f"{what} must be a number, got NaN")
    if finite and math.isinf(out):
        raise Refusal(f"{what} must be finite, got {out}")
    return out


def _opt_num(value: Any, what: str) -> None:
    if value is not None:
        _num(value, what, finite=False, nan=True)


def _choice(value: Any, what: str, options: tuple[Any, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise Refusal(f"{what} must be one of {options}, got {value!r}"[:300])


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Refusal(f"{what} must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, what: str, most: int) -> list[Any]:
    if not isinstance(value, list):
        raise Refusal(f"{what} must be a list, got {type(value).__name__}")
    if len(value) > most:
        raise Refusal(f"{what} has {len(value)} entries, more than {most}")
    return value


def _numbers(value: Any, what: str, most: int) -> None:
    for i, v in enumerate(_list(value, what, most)):
        _num(v, f"{what}[{i}]", finite=False, nan=True)


def _plain(value: Any, what: str, depth: int = 0) -> None:
    """JSON values of bounded depth: what the detector and recovery sections may hold."""
    if depth > MAX_DEPTH:
        raise Refusal(f"{what} nests deeper than a guard state does")
    if isinstance(value, dict):
        for k, v in value.items():
            _plain(v, f"{what}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _plain(v, f"{what}[{i}]", depth + 1)
    elif type(value) is int and abs(value) > _INT64:
        raise Refusal(f"{what} is an integer out of range: {value}"[:300])


def _need(meta: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in meta:
        raise Refusal(f"{where} has no {key!r} field")
    return meta[key]


def validate(meta: dict[str, Any], arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Check every field :meth:`ZetaGuard.load_state` reads; raises :class:`Refusal`."""
    cfg = _dict(_need(meta, "config", "the header"), "config")

    def c(key: str) -> Any:
        return _need(cfg, key, "config")

    drift = _num(c("drift_threshold"), "config.drift_threshold")
    snap = _num(c("snap_threshold"), "config.snap_threshold")
    if not 0 < drift <= snap:
        raise Refusal(f"config thresholds must satisfy 0 < drift <= snap, got {drift}, {snap}")
    alpha = _num(c("alpha"), "config.alpha")
    if not 0 < alpha <= 1:
        raise Refusal(f"config.alpha must be in (0, 1], got {alpha}")
    _int(c("warmup_steps"), "config.warmup_steps", 0, 2**31 - 1)
    if type(cfg.get("auto_recover", False)) is not bool:
        raise Refusal(f"config.auto_recover must be true or false, got {cfg['auto_recover']!r}")
    _choice(
        cfg.get("recovery_mode", "balanced"),
        "config.recovery_mode",
        ("conservative", "balanced", "aggressive"),
    )
    _choice(c("calibration"), "config.calibration", ("auto", "none"))
    _choice(cfg.get("mode", "auto"), "config.mode", ("auto", "exact", "sketch"))
    # Tiered settings (files from before tiered monitoring have none: the defaults apply).
    fraction = _num(cfg.get("sample_fraction", 1.0), "config.sample_fraction")
    if not 0.0 < fraction <= 1.0:
        raise Refusal(f"config.sample_fraction must be in (0, 1], got {fraction}")
    _int(cfg.get("full_pass_interval", 1), "config.full_pass_interval", 1, 2**31 - 1)
    if cfg.get("max_sampled") is not None:
        _int(cfg["max_sampled"], "config.max_sampled", 1, _INT64)
    _int(c("sketch_buckets"), "config.sketch_buckets", 1, 2**31 - 1)
    _int(cfg.get("exact_memory_budget", 0), "config.exact_memory_budget", 0, _INT64)
    _choice(c("group_by"), "config.group_by", ("layer", "tensor", "none"))
    _int(cfg.get("threads", 1), "config.threads", 1, 4096)
    _int(c("seed"), "config.seed", 0, 2**64 - 1)

    engine_mode = _need(meta, "engine_mode", "the header")
    if engine_mode is not None:
        _choice(engine_mode, "engine_mode", ("exact", "sketch"))
    names = _list(_need(meta, "names", "the header"), "names", 10**7)
    for i, n in enumerate(names):
        if not isinstance(n, str) or len(n) > 4096:
            raise Refusal(f"names[{i}] must be a string of at most 4096 characters")
    pattern = _need(meta, "pattern", "the header")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise Refusal(f"pattern must be a string or null, got {type(pattern).__name__}")
        try:
            check_pattern(pattern)
        except UnsafePattern as e:
            raise Refusal(str(e)) from e
    _int(_need(meta, "step", "the header"), "step", 0, 2**62)

    detector = _dict(_need(meta, "detector", "the header"), "detector")
    _plain(detector, "detector")
    _int(_need(detector, "steps", "detector"), "detector.steps", 0, 2**62)
    for key in ("smoothed_jar", "first_param_norm", "first_loss", "last_log_norm", "growth_base"):
        _opt_num(detector.get(key), f"detector.{key}")
    for name, track in _dict(_need(detector, "tracks", "detector"), "detector.tracks").items():
        _numbers(track, f"detector.tracks.{name}", 3)
        if len(track) != 3 or not 0 <= track[2] <= 2**62 or track[2] != int(track[2]):
            raise Refusal(f"detector.tracks.{name} must be [mean, deviation, count >= 0]")

    counts = _dict(_need(meta, "status_counts", "the header"), "status_counts")
    for k, v in counts.items():
        if k not in _STATUSES:
            raise Refusal(f"status_counts has an unknown status {k!r}"[:300])
        _int(v, f"status_counts.{k}", 0, 2**62)
    _num(_need(meta, "zeta_sum", "the header"), "zeta_sum")
    _num(_need(meta, "zeta_max", "the header"), "zeta_max", finite=False)
    for i, g in enumerate(_list(_need(meta, "grad_norms", "the header"), "grad_norms", 1000)):
        if _num(g, f"grad_norms[{i}]") < 0:
            raise Refusal(f"grad_norms[{i}] is negative: {g}")
    recovery = meta.get("recovery")
    if recovery is not None:
        _plain(_dict(recovery, "recovery"), "recovery")
        for key in ("episode", "total", "calm", "skips", "consecutive_skips"):
            _int(_need(recovery, key, "recovery"), f"recovery.{key}", 0, 2**62)
        if (
            _num(_need(recovery, "since_action", "recovery"), "recovery.since_action", finite=False)
            < 0
        ):
            raise Refusal("recovery.since_action is negative")

    expected = _validate_engine(
        _dict(_need(meta, "engine", "the header"), "engine"), arrays, len(names), engine_mode
    )
    sampler = meta.get("sampler")  # mode="auto": the sampled ring (files before it: none)
    if sampler is not None:
        if cfg.get("mode", "auto") != "auto":
            raise Refusal(f"it holds a sampled ring but config.mode is {cfg.get('mode')!r}")
        expected |= _validate_sampler(_dict(sampler, "sampler"), arrays, len(names))
    extra = sorted(set(arrays) - expected)
    if extra:
        raise Refusal(f"it holds arrays no guard state has: {extra[:5]}")


def _validate_sampler(
    sampler: dict[str, Any], arrays: Mapping[str, npt.NDArray[Any]], names: int
) -> set[str]:
    """The tiered mode's ring: slots ``r{i}_s{j}`` (uint8), whose exact size the engine checks
    against the sample plan it rebuilds; here everything up to that."""
    history = _int(_need(sampler, "history", "sampler"), "sampler.history", 0, 3)
    head = _int(_need(sampler, "head", "sampler"), "sampler.head", -1, 2)
    if (history < 3 and head != history - 1) or (history == 3 and head < 0):
        raise Refusal(f"sampler.head {head} cannot follow sampler.history {history}")
    for key in ("steps", "calm", "full_passes", "escalations", "late_passes"):
        _int(_need(sampler, key, "sampler"), f"sampler.{key}", 0, 2**62)
    if type(_need(sampler, "escalated", "sampler")) is not bool:
        raise Refusal("sampler.escalated must be true or false")
    tensors = _list(_need(sampler, "tensors", "sampler"), "sampler.tensors", 10**7)
    if (tensors or history) and len(tensors) != names:
        raise Refusal(f"{len(tensors)} tensors in the sampled ring but {names} names")
    expected = set()
    for i, t in enumerate(tensors):
        what = f"sampler.tensors[{i}]"
        t = _dict(t, what)
        numel = _int(_need(t, "numel", what), f"{what}.numel", 0, 2**48)
        dtype = _need(t, "dtype", what)
        if dtype not in _ENGINE_DTYPES:
            raise Refusal(
                f"{what}.dtype must be one of {tuple(_ENGINE_DTYPES)}, got {dtype!r}"[:300]
            )
        size = _ENGINE_DTYPES[dtype]
        for j in range(3):
            slot = arrays.get(f"r{i}_s{j}")
            if (
                slot is None
                or slot.dtype != np.uint8
                or slot.size > numel * size
                or slot.size % size
            ):
                raise Refusal(f"sampled ring {i} slot {j} is missing or of the wrong type or size")
            expected.add(f"r{i}_s{j}")
    return expected


def _validate_engine(
    engine: dict[str, Any],
    arrays: Mapping[str, npt.NDArray[Any]],
    names: int,
    engine_mode: Any,
) -> set[str]:
    _int(_need(engine, "history", "engine"), "engine.history", 0, 3)
    _int(_need(engine, "head", "engine"), "engine.head", -1, 2)
    tensors = _list(_need(engine, "tensors", "engine"), "engine.tensors", 10**7)
    if tensors and len(tensors) != names:
        raise Refusal(f"{len(tensors)} tensors in the engine state but {names} names")
    expected = set()
    for i, t in enumerate(tensors):
        t = _dict(t, f"engine.tensors[{i}]")
        what = f"engine.tensors[{i}]"
        numel = _int(_need(t, "numel", what), f"{what}.numel", 0, 2**48)
        dtype = _need(t, "dtype", what)
        if dtype not in _ENGINE_DTYPES:
            raise Refusal(
                f"{what}.dtype must be one of {tuple(_ENGINE_DTYPES)}, got {dtype!r}"[:300]
            )
        buckets = _int(_need(t, "buckets", what), f"{what}.buckets", 0, 2**31 - 1)
        _int(_need(t, "seed", what), f"{what}.seed", 0, 2**64 - 1)
        if buckets and engine_mode != "sketch":
            raise Refusal(f"{what} has {buckets} sketch buckets in a {engine_mode} engine")
        for j in range(3):
            slot = arrays.get(f"t{i}_s{j}")
            want = (
                (np.uint8, numel * _ENGINE_DTYPES[dtype]) if buckets == 0 else (np.float64, buckets)
            )
            if slot is None or slot.dtype != want[0] or slot.size != want[1]:
                raise Refusal(f"tensor {i} ring slot {j} is missing or of the wrong type or size")
            expected.add(f"t{i}_s{j}")
        tau = arrays.get(f"t{i}_tau")
        if tau is None or tau.dtype != np.float32 or tau.size != (buckets if buckets else 0):
            raise Refusal(f"tensor {i}'s sketch signs are missing or of the wrong size")
        expected.add(f"t{i}_tau")
    return expected
