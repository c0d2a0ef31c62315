"""The device path (zetaguard.engine.device): the same torch code that runs on CUDA, run on CPU tensors
(``device="cpu"``) and compared with the host engine, which it must reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard, _core
from zetaguard.engine.device import DeviceTracker, buckets_for, chunk_maps, sketch_signs

from tests.support.reference import channels
from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _raw(ts: list[torch.Tensor]) -> list[tuple[int, int, str]]:
    return [(t.data_ptr(), t.numel(), DTYPE_NAMES[t.dtype]) for t in ts]


def _compare(
    mode: str, shapes: list[int], dtype: torch.dtype, steps: int, seed: int, buckets: int = 256
) -> list[int]:
    """Runs both engines side by side; returns the buckets each tensor got (0: exact)."""
    gen = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in shapes]
    host = _core.Tracker(mode=mode, sketch_buckets=buckets, seed=seed)
    dev = DeviceTracker(mode=mode, sketch_buckets=buckets, seed=seed, batch_elements=200)
    for _ in range(steps):
        for t in ts:
            t.add_((torch.randn(t.shape, generator=gen) * 0.03).to(dtype))
        expected = host.update_raw(_raw(ts))
        got = dev.update(ts)
        assert dev.history == host.history
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-30)
    assert dev.buckets == host.buckets
    return list(host.buckets)


@pytest.mark.parametrize("mode", ["exact", "sketch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_device_path_reproduces_host_engine(mode: str, dtype: torch.dtype) -> None:
    buckets = _compare(mode, [3000, 7, 640, 129], dtype, steps=6, seed=11)
    if mode == "sketch":  # both paths of sketch mode: sketched tensors and small exact ones
        assert [k > 0 for k in buckets] == [True, False, True, False]


@settings(max_examples=20, deadline=None)
@given(
    mode=st.sampled_from(["exact", "sketch"]),
    shapes=st.lists(st.integers(1, 2000), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    buckets=st.integers(1, 300),
)
def test_device_path_reproduces_host_engine_for_any_input(
    mode: str, shapes: list[int], dtype: torch.dtype, steps: int, seed: int, buckets: int
) -> None:
    _compare(mode, shapes, dtype, steps, seed, buckets)


def test_sketch_map_matches_engine_state() -> None:
    """The per-position signs the device path derives equal those the engine stores."""
    host = _core.Tracker(mode="sketch", sketch_buckets=100, seed=5)
    host.update([np.ones(5000, np.float32), np.ones(20, np.float32)])
    st_ = host.get_state()["tensors"][0]
    np.testing.assert_array_equal(sketch_signs(st_["seed"], st_["buckets"]), st_["tau"])
    offsets, signs = chunk_maps(st_["seed"], 3, st_["buckets"])
    assert offsets.min() >= 0
    assert offsets.max() < st_["buckets"]
    assert set(signs) <= {-1.0, 1.0}
    assert buckets_for(20, 5020, 100, 64) == 0  # no bigger than its share: tracked exactly
    # Sketched only when that compresses the tensor at least 8x (else exact is cheaper).
    assert buckets_for(512, 1024, 128, 8) == 64
    assert buckets_for(511, 1022, 128, 8) == 0


def test_exact_mode_matches_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(500, generator=gen)
    dev = DeviceTracker()
    hist = []
    for _ in range(5):
        t.add_(torch.randn(500, generator=gen) * 1e-3)
        row = dev.update([t])[0]
        hist.append(t.double().numpy().copy())
    ref = channels(hist)
    np.testing.assert_allclose(row[:4], [ref["x2"], ref["v2"], ref["a2"], ref["j2"]], rtol=1e-6)


def test_nonfinite_values_are_counted_exactly() -> None:
    t = torch.ones(100)
    g = torch.ones(10)
    dev = DeviceTracker()
    dev.update([t])
    t[3] = float("nan")
    t[7] = float("inf")
    g[0] = float("-inf")
    rows, grads = dev.update_with_grads([t], [g])
    assert rows[0, 4] == 2
    assert grads is not None
    assert grads[0, 4] == 1


def test_guard_on_device_path_equals_host_guard() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    host = ZetaGuard(warmup_steps=10, auto_recover=False)
    dev = ZetaGuard(warmup_steps=10, auto_recover=False, device="cpu")
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(25):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        a = host.monitor(model, loss=loss.item())
        b = dev.monitor(model, loss=loss.item())
        assert a.status == b.status
        assert b.zeta_value == pytest.approx(a.zeta_value, rel=1e-6, abs=1e-9)
        assert b.channels["grad_norm"] == pytest.approx(a.channels["grad_norm"], rel=1e-9)
    assert a.raw_jar is not None
    assert b.raw_jar == pytest.approx(a.raw_jar, rel=1e-5)
    assert dev.get_statistics()["engine"]["isa"] == "torch:cpu"


@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_state_moves_between_engines(mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A state saved on the device path resumes on the host engine and the other way round,
    giving the results an uninterrupted run gives."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(4000, generator=gen), torch.randn(3, 5, generator=gen).half()]
    moves = [
        [(torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype) for p in params] for _ in range(8)
    ]

    def run(device: str, resume_device: str | None) -> list[float]:
        ps = [p.clone() for p in params]
        guard = ZetaGuard(
            mode=mode, sketch_buckets=512, warmup_steps=3, auto_recover=False, device=device
        )  # type: ignore[arg-type]
        zetas = []
        for i, m in enumerate(moves):
            for p, d in zip(ps, m, strict=True):
                p.add_(d)
            zetas.append(guard.monitor(ps).raw_jar or 0.0)
            if i == 3 and resume_device is not None:
                guard.save_state(tmp_path / "g.npz")
                guard = ZetaGuard(device=resume_device)  # type: ignore[arg-type]
                guard.load_state(tmp_path / "g.npz")
        return zetas

    straight = run("auto", None)
    np.testing.assert_allclose(run("cpu", "auto"), straight, rtol=1e-5)
    np.testing.assert_allclose(run("auto", "cpu"), straight, rtol=1e-5)


def test_device_option_errors() -> None:
    with pytest.raises(ValueError, match="device must be"):
        ZetaGuard(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host memory"):
        ZetaGuard(device="cuda").monitor([torch.zeros(3)])
    with pytest.raises(TypeError, match="torch tensors"):
        ZetaGuard(device="cpu").monitor([np.zeros(3, np.float32)])
    dev = DeviceTracker()
    dev.update([torch.zeros(3)])
    with pytest.raises(ValueError, match="changed"):
        dev.update([torch.zeros(4)])


def test_memory_is_the_ring_and_nothing_per_step() -> None:
    dev = DeviceTracker(mode="exact")
    dev.update([torch.zeros(1000, dtype=torch.bfloat16), torch.zeros(10, dtype=torch.float64)])
    assert dev.state_bytes == 3 * (1000 * 4 + 10 * 8)  # the work dtype: float32 for bfloat16
    sketch = DeviceTracker(mode="sketch", sketch_buckets=64)
    sketch.update([torch.zeros(100_000)])
    assert sketch.state_bytes == 3 * 64 * 8


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_cuda_matches_host_engine(mode: str) -> None:
    gen = torch.Generator().manual_seed(1)
    cpu = [torch.randn(n, generator=gen) for n in (100_000, 33, 4096)]
    host = _core.Tracker(mode=mode, sketch_buckets=1024, seed=4)
    dev = DeviceTracker(mode=mode, sketch_buckets=1024, seed=4)
    for _ in range(5):
        for t in cpu:
            t.add_(torch.randn(t.shape, generator=gen) * 0.01)
        np.testing.assert_allclose(
            dev.update([t.cuda() for t in cpu]), host.update_raw(_raw(cpu)), rtol=1e-5
        )


@needs_cuda
@pytest.mark.gpu
def test_cuda_model_goes_to_the_device_path() -> None:
    model = torch.nn.Linear(16, 4).cuda()
    guard = ZetaGuard(auto_recover=False)
    guard.monitor(model)
    assert guard.get_statistics()["engine"]["isa"] == "torch:cuda"
