"""The engine against an independent NumPy reference, for every dtype and random shapes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import _core

from tests.support.reference import channels

DTYPES = [np.float32, np.float64, np.float16]


def _close(got: float, want: float, rel: float = 1e-9) -> bool:
    if np.isnan(want):
        return bool(np.isnan(got))
    if np.isinf(want):
        return got == want
    return abs(got - want) <= rel * abs(want) + 1e-300


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    steps=st.integers(1, 7),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31),
    threads=st.sampled_from([1, 2]),
)
def test_exact_mode_matches_numpy_reference(
    dtype: type, sizes: list[int], steps: int, scale: float, seed: int, threads: int
) -> None:
    rng = np.random.default_rng(seed)
    tracker = _core.Tracker(mode="exact", threads=threads)
    trajectory: list[list[np.ndarray]] = []
    for step in range(steps):
        arrays = [(scale * (1 + 0.1 * rng.standard_normal(n))).astype(dtype) for n in sizes]
        trajectory.append(arrays)
        assert tracker.history == min(step, 3)
        rows = tracker.update(arrays)
        assert rows.shape == (len(sizes), 5)
        for t in range(len(sizes)):
            ref = channels([s[t].astype(np.float64) for s in trajectory])
            for col, key in enumerate(["x2", "v2", "a2", "j2"]):
                want = ref[key]
                if want is None:  # undefined before enough history: the engine reports 0
                    assert rows[t, col] == 0.0
                else:
                    assert _close(rows[t, col], want), (key, rows[t, col], want)
            assert rows[t, 4] == ref["nonfinite"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_values_are_counted_not_fatal(dtype: type) -> None:
    tracker = _core.Tracker()
    base = np.ones(64, dtype=dtype)
    for _ in range(3):
        tracker.update([base])
    bad = base.copy()
    bad[[3, 10, 40]] = [np.nan, np.inf, -np.inf]
    rows = tracker.update([bad])
    assert rows[0, 4] == 3
    assert np.isnan(rows[0, 0]) or np.isinf(rows[0, 0])


def test_tiny_updates_on_large_weights_survive() -> None:
    """Differences are taken in double: an update of one float32 ulp on weights near 1e4 is
    seen exactly, where float32 arithmetic on the differences would lose the second order."""
    x0 = np.full(1000, 1e4, dtype=np.float32)
    ulp = np.spacing(np.float32(1e4))
    steps = [x0 + k * ulp for k in (0, 1, 3, 6)]  # v = 1,2,3 ulp -> a = 1,1 -> j = 0
    tracker = _core.Tracker()
    for s in steps:
        rows = tracker.update([s.astype(np.float32)])
    assert rows[0, 1] == pytest.approx(1000 * (3 * ulp) ** 2, rel=1e-12)
    assert rows[0, 2] == pytest.approx(1000 * float(ulp) ** 2, rel=1e-12)
    assert rows[0, 3] == 0.0


def test_bfloat16_through_dlpack_matches_reference() -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    tracker = _core.Tracker()
    history: list[np.ndarray] = []
    for _ in range(5):
        t = torch.randn(257, generator=g).to(torch.bfloat16)
        history.append(t.float().numpy().astype(np.float64))
        rows = tracker.update([t])
    ref = channels(history)
    assert rows[0, 3] == pytest.approx(ref["j2"], rel=1e-12)
    assert rows[0, 1] == pytest.approx(ref["v2"], rel=1e-12)


def test_float16_exact_conversion_for_every_bit_pattern() -> None:
    """All 65536 half values: the engine's sum of squares equals NumPy's float64 widening."""
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    rows = _core.Tracker().norms([finite])
    assert rows[0, 0] == pytest.approx(float(np.sum(finite.astype(np.float64) ** 2)), rel=1e-12)
    rows = _core.Tracker().norms([halves])
    assert rows[0, 4] == np.count_nonzero(~np.isfinite(halves))


def test_results_do_not_depend_on_thread_count() -> None:
    rng = np.random.default_rng(1)
    steps = [rng.standard_normal(1 << 20).astype(np.float32) for _ in range(5)]
    results = []
    for threads in (1, 2, 4):
        tracker = _core.Tracker(threads=threads)
        for s in steps:
            rows = tracker.update([s])
        results.append(rows.copy())
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_changed_set_of_tensors_is_a_clear_error() -> None:
    tracker = _core.Tracker()
    tracker.update([np.zeros(4, np.float32), np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match=r"changed from 4 x float32 to 5 x float32.*reset\(\)"):
        tracker.update([np.zeros(5, np.float32), np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match=r"tracks 2 tensors but this step passed 1"):
        tracker.update([np.zeros(4, np.float32)])
    with pytest.raises(ValueError, match="float64"):
        tracker.update([np.zeros(4, np.float64), np.zeros(2, np.float32)])


def test_total_norm_is_the_sum_of_the_per_tensor_norms() -> None:
    rng = np.random.default_rng(9)
    arrays = [rng.normal(size=n).astype(np.float32) for n in (1, 7, 300, 70_000)]
    tracker = _core.Tracker(threads=2)
    rows = tracker.norms(arrays)
    squares, nonfinite = tracker.total_norm(arrays)
    assert squares == pytest.approx(
        sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays), rel=1e-12
    )
    assert squares == pytest.approx(float(rows[:, 0].sum()), rel=1e-15)
    assert nonfinite == 0
    arrays[2][[5, 9]] = [np.nan, np.inf]
    raw = [(a.ctypes.data, a.size, "float32") for a in arrays]
    assert tracker.total_norm_raw(raw)[1] == 2


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 5000),
    bad=st.lists(
        st.tuples(st.integers(0, 4999), st.sampled_from([np.nan, np.inf, -np.inf])), max_size=6
    ),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    huge=st.booleans(),
)
def test_nonfinite_counts_in_norm_and_sketch_passes(
    size: int, bad: list[tuple[int, float]], dtype: type, huge: bool
) -> None:
    """The norm and sketch kernels count non-finite values only when a lane's sum of squares is
    non-finite; the count must still be exact, and finite values whose squares overflow
    (float64 near 1e200) must count as zero."""
    x = np.random.default_rng(size).normal(size=size).astype(dtype)
    if huge and dtype == np.float64:
        x[size // 2] = 1e200  # its square overflows to inf; it is still finite
    for pos, value in bad:
        x[pos % size] = value
    want = int(np.count_nonzero(~np.isfinite(x)))
    assert int(_core.Tracker(threads=1).norms([x])[0, 4]) == want
    assert _core.Tracker(threads=1).total_norm([x])[1] == want
    sketch = _core.Tracker(mode="sketch", sketch_buckets=8, min_buckets=8, threads=1)
    assert int(sketch.update([x])[0, 4]) == want


def test_nonfinite_counts_across_work_items() -> None:
    """A large tensor is split into work items; each counts its own range."""
    x = np.ones(3_000_001, dtype=np.float32)
    x[[0, 1_500_000, 2_999_999, 3_000_000]] = [np.nan, np.inf, -np.inf, np.nan]
    for mode in ("exact", "sketch"):
        assert int(_core.Tracker(mode=mode, threads=2).update([x])[0, 4]) == 4
    assert _core.Tracker(threads=2).total_norm([x])[1] == 4
