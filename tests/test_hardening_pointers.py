"""Cached raw addresses never outlive what they point at (issue 15, item 2).

The torch adapter hands the engine ``(address, numel, dtype)`` for host tensors. Each case
below changes a tensor or its gradient behind the guard between two ``monitor()`` calls; before
the fix they crashed (SIGSEGV) or gave a wrong figure. Now each one is read correctly (checked
against torch's own arithmetic on the tensor as it is now) or refused with a ValueError naming
the problem. The crash reproducers run in a subprocess, so a regression fails this test instead
of killing the test run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from zetaguard import ZetaGuard  # noqa: E402


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_gradient_swapped_for_a_smaller_one_is_read_with_its_own_size() -> None:
    """The issue's first reproducer: a 2^25-element parameter whose gradient becomes 4 ones.
    Read with the parameter's numel, this read 128 MiB past a 16-byte buffer."""
    done = _run("""
        import torch
        from zetaguard import ZetaGuard
        g = ZetaGuard(auto_recover=False)
        p = torch.nn.Parameter(torch.zeros(1 << 25)); p.grad = torch.zeros_like(p); g.monitor([p])
        p.grad.data = torch.ones(4)
        r = g.monitor([p])
        print("grad_norm", r.channels["grad_norm"])
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "grad_norm 2.0" in done.stdout  # ||ones(4)|| = 2


def test_storage_resized_beneath_a_parameter_is_a_clear_error() -> None:
    """The issue's second reproducer: a 64 MiB weight whose storage is shrunk to 64 bytes."""
    done = _run("""
        import torch
        from zetaguard import ZetaGuard
        g = ZetaGuard(auto_recover=False)
        m = torch.nn.Linear(4096, 4096, bias=False); g.monitor(m)
        m.weight.untyped_storage().resize_(64)
        try:
            g.monitor(m)
        except ValueError as e:
            print("refused:", e)
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: weight needs 67108864 bytes of its storage but the storage holds 64" in (
        done.stdout
    )
    assert "resize_" in done.stdout


def test_gradient_of_one_element_reads_one_not_inf() -> None:
    g = ZetaGuard(auto_recover=False)
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = torch.zeros_like(p)
    g.monitor([p])
    p.grad.data = torch.ones(1)  # before: read as 1000 floats, garbage after the first: inf
    assert g.monitor([p]).channels["grad_norm"] == 1.0


def test_float16_gradient_on_a_float32_parameter_is_read_as_float16() -> None:
    g = ZetaGuard(auto_recover=False)
    p = torch.nn.Parameter(torch.zeros(1000))
    p.grad = torch.zeros_like(p)
    g.monitor([p])
    p.grad.data = torch.full((1000,), 0.5, dtype=torch.float16)  # before: read as f32, 6.9e12
    got = g.monitor([p]).channels["grad_norm"]
    assert got == pytest.approx(float(p.grad.double().norm()), rel=1e-12)
    assert got == pytest.approx(0.5 * math.sqrt(1000), rel=1e-12)


def test_gradient_of_another_shape_on_a_new_tensor_each_step() -> None:
    """set_to_none-style fresh gradients whose size changes: read with their own numel."""
    g = ZetaGuard(auto_recover=False)
    p = torch.nn.Parameter(torch.zeros(64))
    for n in (64, 64, 8, 100, 64):
        p.grad = torch.zeros_like(p)
        p.grad.data = torch.full((n,), 2.0)
        assert g.monitor([p]).channels["grad_norm"] == pytest.approx(2.0 * math.sqrt(n))


def test_zero_stride_in_place_restride_is_refused() -> None:
    """``as_strided_((n,), (0,))`` keeps address, numel and dtype: before, the adapter read n
    distinct elements where the tensor holds n copies of one."""
    n = 1000
    g = ZetaGuard(auto_recover=False)
    p = torch.arange(1, n + 1, dtype=torch.float32)
    g.monitor([p])
    with torch.no_grad():
        p.as_strided_((n,), (0,))
    with pytest.raises(ValueError, match="not contiguous"):
        g.monitor([p])


def test_restride_on_a_module_parameter_is_refused_too() -> None:
    m = torch.nn.Linear(8, 8, bias=False)
    g = ZetaGuard(auto_recover=False)
    g.monitor(m)
    with torch.no_grad():
        m.weight.as_strided_((8, 8), (1, 8))  # a transposed view in place: same bytes, new order
    with pytest.raises(ValueError, match="weight is not contiguous"):
        g.monitor(m)


def test_set_to_another_storage_is_read_afresh() -> None:
    g = ZetaGuard(auto_recover=False, group_by="tensor")
    p = torch.nn.Parameter(torch.ones(16))
    g.monitor([p])
    with torch.no_grad():
        p.set_(torch.full((16,), 3.0))
    r = g.monitor([p])
    assert r.group_rows[0][0] == pytest.approx(16 * 9.0)
    assert r.group_rows[0][1] == pytest.approx(16 * 4.0)  # ||3 - 1||^2 per element


def test_storage_grown_in_place_is_read_from_its_new_address() -> None:
    g = ZetaGuard(auto_recover=False, group_by="tensor")
    p = torch.nn.Parameter(torch.full((256,), 2.0))
    g.monitor([p])
    before = p.data_ptr()
    p.untyped_storage().resize_(1 << 20)  # reallocates; the values are copied
    assert p.data_ptr() != before
    r = g.monitor([p])
    assert r.group_rows[0][0] == pytest.approx(256 * 4.0)


def test_shrunk_storage_that_still_covers_the_tensor_is_read() -> None:
    base = torch.full((64,), 1.5)
    view = base[:16]  # a parameter that uses only the front of its storage
    g = ZetaGuard(auto_recover=False, group_by="tensor")
    g.monitor([view])
    view.untyped_storage().resize_(16 * 4)  # exactly the bytes the view needs
    r = g.monitor([view])
    assert r.group_rows[0][0] == pytest.approx(16 * 2.25)
    view.untyped_storage().resize_(15 * 4)
    with pytest.raises(ValueError, match="needs 64 bytes of its storage but the storage holds 60"):
        g.monitor([view])


def test_offset_view_whose_storage_shrinks_is_refused() -> None:
    base = torch.full((64,), 1.0)
    view = base[48:]  # the last 16 elements: bytes 192..256
    g = ZetaGuard(auto_recover=False)
    g.monitor([view])
    view.untyped_storage().resize_(200)
    with pytest.raises(ValueError, match="needs 256 bytes"):
        g.monitor([view])


def test_shrunk_gradient_storage_is_refused_on_every_gradient_path() -> None:
    """Contiguous, strided (a copy would read past the end) and sparse gradients."""
    p = torch.nn.Parameter(torch.zeros(15, dtype=torch.bfloat16))
    for make in (
        lambda: torch.ones(15, dtype=torch.bfloat16),
        lambda: torch.ones(30, dtype=torch.bfloat16)[::2],  # what the fuzz target found
    ):
        g = ZetaGuard(auto_recover=False)
        p.grad = make()
        g.monitor([p])
        p.grad.untyped_storage().resize_(16)
        with pytest.raises(ValueError, match=r"gradient of param\.0 needs"):
            g.monitor([p])
    sparse = torch.nn.Parameter(torch.zeros(40))
    sparse.grad = torch.ones(40).to_sparse()
    g = ZetaGuard(auto_recover=False)
    assert g.monitor([sparse]).channels["grad_norm"] == pytest.approx(math.sqrt(40))
    sparse.grad._values().untyped_storage().resize_(8)
    with pytest.raises(ValueError, match=r"gradient of param.0 \(values\) needs"):
        g.monitor([sparse])


def test_grad_norm_helper_refuses_a_shrunk_gradient() -> None:
    from zetaguard.adapters.torch import grad_norm

    model = torch.nn.Linear(32, 32)
    model(torch.randn(4, 32)).sum().backward()
    want = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters()))
    assert grad_norm(model) == pytest.approx(want, rel=1e-12)
    model.weight.grad.untyped_storage().resize_(12)
    with pytest.raises(ValueError, match="needs 4096 bytes"):
        grad_norm(model)
    # A non-contiguous parameter sends gradients through torch's reduction: checked there too.
    strided = torch.nn.Parameter(torch.randn(6, 4).t())
    strided.grad = torch.ones(4, 6)
    strided.grad.untyped_storage().resize_(8)
    with pytest.raises(ValueError, match="needs 96 bytes"):
        grad_norm([strided])


def test_device_path_refuses_shrunk_storage() -> None:
    """The device path reduces with torch kernels, which trust the storage to cover the
    tensor: a shrunk one would be read past its end (garbage on CPU, a fault on CUDA)."""
    from zetaguard.engine.device import DeviceTracker

    g = ZetaGuard(auto_recover=False, device="cpu")
    m = torch.nn.Linear(256, 256, bias=False)
    g.monitor(m)
    m.weight.untyped_storage().resize_(64)
    with pytest.raises(ValueError, match="weight needs 262144 bytes"):
        g.monitor(m)
    tracker = DeviceTracker()
    x = torch.ones(1 << 16)
    tracker.update([x])
    x.untyped_storage().resize_(8)
    with pytest.raises(ValueError, match="tensor 0 needs 262144 bytes"):
        tracker.update([x])
    y = torch.ones(1 << 10)
    grad = torch.ones(1 << 10)
    tracker = DeviceTracker()
    grad.untyped_storage().resize_(8)
    with pytest.raises(ValueError, match="gradient 0 needs 4096 bytes"):
        tracker.update_with_grads([y], [grad])


def test_device_path_reads_a_zero_stride_tensor_correctly() -> None:
    """The device path reduces strided tensors as they are (torch follows the strides)."""
    from zetaguard.engine.device import DeviceTracker

    x = torch.arange(1.0, 11.0)
    tracker = DeviceTracker()
    rows = tracker.update([x])
    assert rows[0][0] == pytest.approx(float(x.double().square().sum()))
    x.as_strided_((10,), (0,))
    rows = tracker.update([x])
    assert rows[0][0] == pytest.approx(10 * 1.0)  # ten copies of x[0] = 1


def test_refused_step_leaves_no_stale_address_behind() -> None:
    """A refusal part-way through revalidation must not let a later step reuse the old raw
    entries: restoring the refused tensor makes every tensor be checked again."""
    a = torch.nn.Parameter(torch.full((8,), 1.0))
    b = torch.nn.Parameter(torch.full((8,), 2.0))
    g = ZetaGuard(auto_recover=False, group_by="tensor")
    g.monitor([a, b])
    with torch.no_grad():
        a.data = torch.full((8,), 5.0)  # a moves (and passes the check) ...
        b.as_strided_((8,), (0,))  # ... b is refused
    with pytest.raises(ValueError, match=r"param\.1 is not contiguous"):
        g.monitor([a, b])
    with torch.no_grad():
        b.as_strided_((8,), (1,))  # b back as it was
    r = g.monitor([a, b])
    assert r.group_rows[0][0] == pytest.approx(8 * 25.0)  # a's new storage, not the freed one
    assert r.group_rows[1][0] == pytest.approx(8 * 4.0)


def test_tensorflow_variable_resized_between_steps_is_a_clear_error() -> None:
    """The TensorFlow adapter reads every variable afresh each step (no cached address), so a
    variable assigned a value of another size is seen and refused by the engine."""
    tf = pytest.importorskip("tensorflow")
    v = tf.Variable(tf.ones(64), shape=tf.TensorShape(None))
    g = ZetaGuard(auto_recover=False, group_by="tensor")
    g.monitor([v])
    v.assign(tf.fill([8], 3.0))
    with pytest.raises(ValueError, match="reset"):
        g.monitor([v])
    g.reset()
    r = g.monitor([v])
    assert r.group_rows[0][0] == pytest.approx(8 * 9.0)
