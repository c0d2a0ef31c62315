"""save_state / load_state: an exact round trip, in a documented non-pickle format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from zetaguard import StateFileError, ZetaGuard


def _steps(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w = {
        "l1.weight": rng.standard_normal((40, 20)).astype(np.float32),
        "l2.bias": rng.standard_normal(7),
    }
    out = []
    for t in range(n):
        lr = 0.01 if t < 25 else 0.01 * 1.4 ** (t - 25)  # a ramp so later steps alarm
        w = {k: v - lr * rng.standard_normal(v.shape).astype(v.dtype) for k, v in w.items()}
        out.append(w)
    return out


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_resumed_guard_gives_identical_results(tmp_path: Path, mode: str) -> None:
    steps = _steps(0, 40)
    straight = ZetaGuard(warmup_steps=10, mode=mode, sketch_buckets=64, auto_recover=False)
    first = ZetaGuard(warmup_steps=10, mode=mode, sketch_buckets=64, auto_recover=False)
    for i, p in enumerate(steps[:20]):
        straight.monitor(p, loss=1.0 / (i + 1))
        first.monitor(p, loss=1.0 / (i + 1))
    path = tmp_path / "guard.npz"
    first.save_state(path)
    resumed = ZetaGuard(auto_recover=False)
    resumed.load_state(path)
    for i, p in enumerate(steps[20:], start=20):
        a = straight.monitor(p, loss=1.0 / (i + 1))
        b = resumed.monitor(p, loss=1.0 / (i + 1))
        assert a.to_dict() | {"timestamp": 0} == b.to_dict() | {"timestamp": 0}
    assert straight.get_statistics() == resumed.get_statistics()


def test_state_file_is_not_a_pickle(tmp_path: Path) -> None:
    guard = ZetaGuard()
    guard.monitor([np.ones(4, np.float32)])
    path = tmp_path / "s.npz"
    guard.save_state(path)
    with zipfile.ZipFile(path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    with np.load(path, allow_pickle=False) as z:  # loads without pickle support
        assert "meta" in z.files


def test_corrupt_and_truncated_files_are_refused(tmp_path: Path) -> None:
    guard = ZetaGuard()
    for p in _steps(1, 5):
        guard.monitor(p)
    good = tmp_path / "good.npz"
    guard.save_state(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(StateFileError, match="truncated or corrupt"):
        ZetaGuard().load_state(truncated)
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(StateFileError):
        ZetaGuard().load_state(bad)
    with pytest.raises(StateFileError, match="no guard state"):
        ZetaGuard().load_state(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(StateFileError, match="not a zetaguard state file"):
        ZetaGuard().load_state(other)


def test_failed_save_leaves_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = ZetaGuard()
    guard.monitor([np.ones(4, np.float32)])
    path = tmp_path / "s.npz"
    guard.save_state(path)
    before = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", explode)
    with pytest.raises(OSError, match="disk full"):
        guard.save_state(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp file left behind


def _rewrite_meta(path: Path, edit: object) -> None:
    """Rewrite the JSON header of a state file with a valid checksum (format version 2's
    covers the header too), as another writer would."""
    import json

    from zetaguard import _state_checks

    with np.load(path, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    meta = json.loads(bytes(arrays.pop("meta")).decode())
    edit(meta)  # type: ignore[operator]
    meta["sha256"] = _state_checks.digest(meta, arrays)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=False, meta=blob, **arrays)


def test_files_without_recovery_counters_still_load(tmp_path: Path) -> None:
    guard = ZetaGuard(warmup_steps=5, auto_recover=False)
    for p in _steps(1, 12):
        guard.monitor(p)
    guard.recovery.total = 2  # as if two recoveries had run
    path = tmp_path / "old.npz"
    guard.save_state(path)
    _rewrite_meta(path, lambda meta: meta.pop("recovery"))  # what earlier versions wrote
    resumed = ZetaGuard(auto_recover=False)
    resumed.load_state(path)
    assert resumed.step == guard.step
    assert resumed.recovery.total == 0  # nothing saved: the ladder starts afresh


def test_malformed_recovery_counters_are_refused_and_change_nothing(tmp_path: Path) -> None:
    guard = ZetaGuard(warmup_steps=5, auto_recover=False)
    for p in _steps(2, 12):
        guard.monitor(p)
    path = tmp_path / "bad.npz"
    guard.save_state(path)
    _rewrite_meta(path, lambda meta: meta["recovery"].update(episode=-1))
    target = ZetaGuard(warmup_steps=5, auto_recover=False)
    for p in _steps(3, 4):
        target.monitor(p)
    target.recovery.total = 1
    with pytest.raises(StateFileError, match="inconsistent guard state"):
        target.load_state(path)
    assert target.step == 4  # all or nothing: the refused file changed nothing
    assert target.recovery.total == 1
