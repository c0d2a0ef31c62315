"""Sketch mode: O(k) state whatever the model size, unbiased norm estimates with the
documented relative error (standard deviation about sqrt(2 / k) for one tensor)."""

from __future__ import annotations

import numpy as np
import pytest
from zetaguard import ZetaGuard, _core


def _trajectory(rng: np.random.Generator, n: int, steps: int) -> list[np.ndarray]:
    x = rng.standard_normal(n).astype(np.float32)
    out = [x.copy()]
    for _ in range(steps - 1):
        x = x + 0.01 * rng.standard_normal(n).astype(np.float32)
        out.append(x.copy())
    return out


def test_sketch_estimates_are_unbiased_with_documented_error() -> None:
    rng = np.random.default_rng(0)
    traj = _trajectory(rng, 50_000, 4)
    exact = _core.Tracker(mode="exact")
    for s in traj:
        want = exact.update([s])[0]
    k = 1024
    ratios = []
    for seed in range(60):
        sk = _core.Tracker(mode="sketch", sketch_buckets=k, seed=seed)
        for s in traj:
            got = sk.update([s])[0]
        assert got[0] == pytest.approx(want[0], rel=1e-9)  # ||x||^2 is always exact
        ratios.append(got[1:4] / want[1:4])
    r = np.asarray(ratios)
    # Unbiased: the mean over independent maps is within 4 standard errors of 1.
    sd = np.sqrt(2.0 / k)
    assert np.all(np.abs(r.mean(axis=0) - 1.0) < 4 * sd / np.sqrt(len(r)))
    # The spread matches the documented sqrt(2/k) within sampling slack.
    assert np.all(r.std(axis=0) < 1.5 * sd)


def test_sketch_handles_constant_and_periodic_updates() -> None:
    """Signs per position and per chunk keep structured vectors unbiased."""
    n, k = 40_960, 256
    base = np.zeros(n, dtype=np.float32)
    periodic = np.tile(np.arange(k, dtype=np.float32), n // k)
    for update in (np.ones(n, dtype=np.float32), periodic):
        est = []
        for seed in range(80):
            sk = _core.Tracker(mode="sketch", sketch_buckets=k, seed=seed)
            sk.update([base])
            est.append(sk.update([base + update])[0, 1])
        assert np.mean(est) / float(np.sum(update.astype(np.float64) ** 2)) == pytest.approx(
            1.0, abs=0.1
        )


def test_sketch_state_is_bounded_whatever_the_model_size() -> None:
    rng = np.random.default_rng(1)
    for sizes in ([1 << 22], [20_000] * 200):
        tensors = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        sk = _core.Tracker(mode="sketch", sketch_buckets=16384)
        sk.update(tensors)
        assert sk.state_bytes <= 1 << 20, sk.state_bytes


def test_small_tensors_are_kept_exact_in_sketch_mode() -> None:
    sk = _core.Tracker(mode="sketch", sketch_buckets=1000)
    sk.update([np.zeros(10, np.float32), np.zeros(100_000, np.float32)])
    assert sk.buckets[0] == 0  # smaller than its share: exact
    assert sk.buckets[1] > 0


def test_auto_mode_sketches_beyond_the_memory_budget() -> None:
    params = [np.zeros(100_000, np.float32)]
    small = ZetaGuard(exact_memory_budget=10 << 20)
    small.monitor(params)
    assert small.get_statistics()["engine"]["mode"] == "exact"
    tight = ZetaGuard(exact_memory_budget=1 << 20)
    tight.monitor(params)
    assert tight.get_statistics()["engine"]["mode"] == "sketch"


def test_sketch_constants_are_splitmix64_and_the_engine_map() -> None:
    """The one exported copy of the map's constants: splitmix64 built from them gives the
    published reference outputs (Vigna's splitmix64.c, seed 0), and per-position signs built
    from them are the ones the engine keeps in its state."""
    c = _core.sketch_constants()
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        x = (x + c["splitmix_golden"]) & mask
        x = ((x ^ (x >> 30)) * c["splitmix_mul1"]) & mask
        x = ((x ^ (x >> 27)) * c["splitmix_mul2"]) & mask
        return x ^ (x >> 31)

    # splitmix64.c with state 0: each call adds the increment first, then mixes.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(c["splitmix_golden"]) == 0x6E789E6AA1B965F4
    assert c["rotation_granule"] == 8
    assert c["min_compression"] == 8
    t = _core.Tracker(mode="sketch", sketch_buckets=64, min_buckets=64, seed=7)
    t.update([np.ones(4096, dtype=np.float32)])
    entry = t.get_state()["tensors"][0]
    k, tseed = entry["buckets"], entry["seed"]
    want = [
        -1.0 if splitmix64(tseed ^ ((p * c["tau_mul"]) & mask)) >> 63 else 1.0 for p in range(k)
    ]
    assert np.asarray(entry["tau"], dtype=np.float64).tolist() == want
    assert tseed == splitmix64((7 + c["splitmix_golden"]) & mask)
