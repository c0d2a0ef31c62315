"""Every SIMD variant this CPU supports equals the scalar emulation lane by lane, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import _core

SIMD = [isa for isa in _core.supported_isas() if isa != "scalar"]
LANES = {"avx2": 4, "avx512": 8}


def _arrays(dtype: type, n: int, seed: int, with_nonfinite: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [(3 + rng.standard_normal(n)).astype(dtype) for _ in range(4)]
    if with_nonfinite and n:
        out[0][rng.integers(0, n, size=max(1, n // 20))] = np.nan
        out[0][rng.integers(0, n, size=max(1, n // 30))] = np.inf
    return out


@pytest.mark.skipif(not SIMD, reason="this CPU supports no SIMD variant; only the scalar path runs")
@settings(max_examples=80, deadline=None)
@given(
    isa=st.sampled_from(SIMD or ["scalar"]),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    n=st.integers(0, 200),
    seed=st.integers(0, 2**31),
    with_nonfinite=st.booleans(),
)
def test_simd_lanes_equal_scalar_lanes(
    isa: str, dtype: type, n: int, seed: int, with_nonfinite: bool
) -> None:
    arrays = _arrays(dtype, n, seed, with_nonfinite)
    lanes = LANES[isa]
    simd = _core._kernel_lanes("fused", isa, lanes, arrays)
    ref = _core._kernel_lanes("fused", "scalar", lanes, arrays)
    assert simd["lanes"] == ref["lanes"] == lanes
    for key in ("x2", "v2", "a2", "j2"):
        assert np.array_equal(np.asarray(simd[key]), np.asarray(ref[key]), equal_nan=True), key
    assert simd["nonfinite"] == ref["nonfinite"] == np.count_nonzero(~np.isfinite(arrays[0]))
    # The pass also writes the current snapshot into the ring slot, byte for byte.
    assert simd["written"] == ref["written"] == arrays[0].tobytes()
    norm_simd = _core._kernel_lanes("norm", isa, lanes, arrays[:1])
    norm_ref = _core._kernel_lanes("norm", "scalar", lanes, arrays[:1])
    assert np.array_equal(np.asarray(norm_simd["x2"]), np.asarray(norm_ref["x2"]), equal_nan=True)


@pytest.mark.skipif(not SIMD, reason="this CPU supports no SIMD variant")
@pytest.mark.parametrize("isa", SIMD)
def test_simd_bfloat16_lanes_equal_scalar(isa: str) -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    arrays = [torch.randn(203, generator=g).to(torch.bfloat16) for _ in range(4)]
    simd = _core._kernel_lanes("fused", isa, LANES[isa], arrays)
    ref = _core._kernel_lanes("fused", "scalar", LANES[isa], arrays)
    for key in ("x2", "v2", "a2", "j2"):
        assert simd[key] == ref[key]


@pytest.mark.skipif(not SIMD, reason="this CPU supports no SIMD variant")
@pytest.mark.parametrize("isa", SIMD)
def test_simd_sketch_equals_scalar_sketch(isa: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_007).astype(np.float32)
    k = 97
    tau = np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32)
    simd = _core._sketch_buckets(isa, [x], k, 42, tau.tolist())
    ref = _core._sketch_buckets("scalar", [x], k, 42, tau.tolist())
    assert np.array_equal(simd, ref)


def test_scalar_is_always_available() -> None:
    assert "scalar" in _core.supported_isas()
    assert _core.best_isa() in _core.supported_isas()
