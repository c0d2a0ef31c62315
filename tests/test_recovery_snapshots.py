"""Auto-recovery, snapshots: verified after an interval of stable steps, bounded by the memory
budget and the keep count."""

from __future__ import annotations

import numpy as np
from zetaguard.recovery import NumpyBackend
from zetaguard.recovery.snapshots import SnapshotKeeper


def test_snapshot_is_verified_only_after_interval_stable_steps() -> None:
    arr = np.zeros(3)
    backend = NumpyBackend([arr])
    keeper = SnapshotKeeper(interval=3, keep=2)
    keeper.capture_initial(backend, -1)
    for step in range(3):
        arr[:] = step
        keeper.observe("STABLE", step, backend)
    assert keeper.pending is not None
    assert keeper.pending.step == 2
    assert not keeper.verified
    arr[:] = 99
    keeper.observe("CRITICAL", 3, backend)  # trouble before verification: pending discarded
    assert keeper.pending is None
    assert keeper.pick(0) is keeper.initial
    for step in range(4, 10):
        arr[:] = step
        keeper.observe("STABLE", step, backend)
    assert [s.step for s in keeper.verified] == [6]
    assert keeper.pending is not None
    assert keeper.pending.step == 9


def test_snapshot_memory_budget_bounds_what_is_held() -> None:
    arr = np.zeros(1000)  # 8000 bytes per snapshot
    backend = NumpyBackend([arr])
    keeper = SnapshotKeeper(interval=1, keep=5, memory_budget=20_000)
    keeper.capture_initial(backend, -1)
    for step in range(20):
        keeper.observe("STABLE", step, backend)
        assert keeper.nbytes <= 20_000
    tiny = SnapshotKeeper(interval=1, memory_budget=100)
    tiny.observe("STABLE", 0, backend)
    assert tiny.disabled
    assert tiny.nbytes == 0


def test_keep_bounds_the_verified_snapshots() -> None:
    backend = NumpyBackend([np.zeros(2)])
    keeper = SnapshotKeeper(interval=1, keep=2)
    for step in range(10):
        keeper.observe("STABLE", step, backend)
    assert len(keeper.verified) == 2
    assert keeper.pick(5) is keeper.verified[0]
