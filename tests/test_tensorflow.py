"""TensorFlow custom loops, ``tf.Module``, variables and ``tf.distribute`` with zetaguard."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.keras_runner import run_in_subprocess

tf = pytest.importorskip("tensorflow")

import zetaguard  # noqa: E402
from zetaguard import ZetaGuard  # noqa: E402
from zetaguard.adapters import snapshot  # noqa: E402

JAR_EPS = 1e-12


def reference_jar(traj: list[np.ndarray]) -> float:
    x3, x2, x1, x0 = traj[-4:]
    a1 = (x1 - x2) - (x2 - x3)
    a0 = (x0 - x1) - (x1 - x2)
    return float(np.linalg.norm(a0 - a1) / (np.linalg.norm(a0) + JAR_EPS))


def buffer_address(v: Any) -> int:
    view = np.from_dlpack(v.value())  # dropped at once: a held view would pin the buffer
    return int(view.ctypes.data)


def test_import_zetaguard_imports_no_framework() -> None:
    code = (
        "import sys, zetaguard; zetaguard.ZetaGuard; "
        "print([m for m in ('tensorflow', 'keras', 'jax', 'torch', 'tf_keras') "
        "if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_zeta_keras_resolves_lazily() -> None:
    from zetaguard.integrations.keras import ZetaKeras

    assert zetaguard.ZetaKeras is ZetaKeras


class Regressor(tf.Module):  # a user-defined tf.Module: routed by its framework base class
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.w = tf.Variable(rng.normal(size=(8, 4)).astype("float32"), name="w")
        self.b = tf.Variable(np.zeros(4, "float32"), name="b")

    def __call__(self, x: Any) -> Any:
        return x @ self.w + self.b


def test_custom_loop_with_tf_function_matches_numpy_reference() -> None:
    model = Regressor()
    opt = tf.keras.optimizers.SGD(0.05, momentum=0.9)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(256, 8)).astype("float32"))
    y = tf.constant(rng.normal(size=(256, 4)).astype("float32"))

    @tf.function
    def train_step(xb: Any, yb: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(xb) - yb) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    guard = ZetaGuard(warmup_steps=5, group_by="tensor")
    traj = []
    for i in range(12):
        loss = train_step(x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16])
        result = guard.monitor(model, loss=loss)  # eagerly, between steps
        traj.append(
            np.concatenate(
                [v.numpy().astype(np.float64).ravel() for v in model.trainable_variables]
            )
        )
        if len(traj) >= 4:
            assert result.raw_jar == pytest.approx(reference_jar(traj), rel=1e-9)
    assert sorted(result.groups) == ["b", "w"]
    assert result.status != "CRITICAL"
    # The same variables given as a list read the same (monitor(model.trainable_variables)).
    assert snapshot(list(model.trainable_variables)).names == snapshot(model).names


def test_monitoring_reads_in_place_and_never_pins_the_buffer() -> None:
    v = tf.Variable(tf.random.normal([512, 256]))
    guard = ZetaGuard(warmup_steps=3)
    start = buffer_address(v)
    snap = snapshot([v])
    assert int(np.from_dlpack(snap.tensors[0]).ctypes.data) == start  # zero-copy read
    del snap
    for _ in range(6):
        guard.monitor([v])
        v.assign_add(tf.fill(v.shape, 1e-3))
        assert buffer_address(v) == start  # no view was left behind to force a move
    # The hazard the adapter avoids: a live view makes the next assign move the variable.
    held = np.from_dlpack(v.value())
    v.assign_add(tf.fill(v.shape, 1e-3))
    assert buffer_address(v) != held.ctypes.data


def test_monitor_inside_tf_function_says_to_run_eagerly() -> None:
    v = tf.Variable(tf.ones([4]))
    guard = ZetaGuard()

    @tf.function(autograph=False)  # autograph would convert the whole guard first: slow
    def step() -> None:
        v.assign_add(tf.ones([4]))
        guard.monitor([v])

    with pytest.raises(RuntimeError, match="eagerly between training steps"):
        step()


def test_integer_variable_is_rejected_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"counter has dtype int32.*Leave integer"):
        ZetaGuard().monitor({"counter": tf.Variable(3)})


def test_untrained_module_without_variables_is_rejected() -> None:
    with pytest.raises(ValueError, match="no trainable variables"):
        snapshot(tf.Module())


def test_same_named_variables_get_distinct_names() -> None:
    names = snapshot([tf.Variable(tf.ones([2])) for _ in range(3)]).names
    assert len(set(names)) == 3


_DTYPES = {"float32": 1e-6, "float64": 1e-12, "float16": 1e-3, "bfloat16": 1e-2}


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(_DTYPES)),
            st.lists(st.integers(1, 33), min_size=1, max_size=3),
            st.integers(0, 2**31 - 1),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_parameter_norms_match_numpy(spec: list[tuple[str, list[int], int]]) -> None:
    variables = {}
    for i, (dtype, shape, seed) in enumerate(spec):
        data = np.random.default_rng(seed).normal(size=shape) * 3.0
        variables[f"v{i}"] = tf.Variable(tf.cast(tf.constant(data), dtype))
    # mode="exact": every element read (the tiered default estimates norms from a sample)
    result = ZetaGuard(group_by="tensor", mode="exact").monitor(variables)
    for name, v in variables.items():
        expected = np.linalg.norm(tf.cast(v, tf.float64).numpy().ravel())
        tol = _DTYPES[v.dtype.name]
        assert result.groups[name].param_norm == pytest.approx(expected, rel=tol)


@pytest.fixture(scope="module")
def tf_keras() -> Any:
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("in-process Keras tests need KERAS_BACKEND=tensorflow")
    return keras


def test_subclassed_keras_model_groups_by_layer(tf_keras: Any) -> None:
    keras = tf_keras

    class Net(keras.Model):  # defined here, not in keras: routed by its base class
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(8, name="hidden")
            self.out = keras.layers.Dense(2, name="out")

        def call(self, x: Any) -> Any:
            return self.out(self.hidden(x))

    net = Net()
    net(np.zeros((1, 4), "float32"))
    snap = snapshot(net)
    assert snap.framework == "tensorflow"
    assert len(snap.names) == 4
    result = ZetaGuard().monitor(net)
    assert sorted(result.groups) == sorted({n.rpartition(".")[0] for n in snap.names})
    hidden = next(g for name, g in result.groups.items() if name.endswith("hidden"))
    expected = np.sqrt(
        sum(float(np.sum(w.numpy().astype(np.float64) ** 2)) for w in net.hidden.trainable_weights)
    )
    assert hidden.param_norm == pytest.approx(expected, rel=1e-6)


def test_zeta_keras_arguments_are_checked(tf_keras: Any) -> None:
    from zetaguard import ZetaKeras

    with pytest.raises(TypeError, match="either a guard or ZetaGuard arguments"):
        ZetaKeras(ZetaGuard(), warmup_steps=3)
    with pytest.raises(ValueError, match="every_n_batches"):
        ZetaKeras(every_n_batches=0)


def test_every_n_batches_scores_every_nth_batch(tf_keras: Any) -> None:
    keras = tf_keras
    from zetaguard import ZetaKeras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    cb = ZetaKeras(every_n_batches=2, warmup_steps=3)
    x = np.random.default_rng(0).normal(size=(80, 4)).astype("float32")
    model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0, callbacks=[cb])
    assert cb.guard.get_statistics()["steps"] == 5  # 10 batches, every second one


def test_lr_cut_persists_through_a_schedule(tf_keras: Any) -> None:
    keras = tf_keras
    from zetaguard.recovery.backend import make_backend
    from zetaguard.recovery.keras_backend import KerasBackend, ScaledSchedule

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0)
    backend = make_backend(model, model.optimizer)
    assert isinstance(backend, KerasBackend)
    (before,) = backend.get_lrs()
    backend.scale_lr(0.1)
    (after,) = backend.get_lrs()
    assert after == pytest.approx(before * 0.1, rel=1e-6)
    model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0)  # the rebuilt step runs
    steps = int(model.optimizer.iterations.numpy())
    assert backend.get_lrs()[0] == pytest.approx(0.1 * float(schedule(steps)), rel=1e-6)
    # Serialisable, so ModelCheckpoint can save the whole model after a cut.
    config = keras.optimizers.schedules.serialize(model.optimizer._learning_rate)
    again = keras.optimizers.schedules.deserialize(config)
    assert isinstance(again, ScaledSchedule)
    assert float(again(steps)) == pytest.approx(backend.get_lrs()[0], rel=1e-6)


def test_snapshot_holds_every_variable_and_the_rate_it_was_taken_at(tf_keras: Any) -> None:
    """A capture reads the weights, the optimizer's variables and the learning rate in one
    batched read; slots the optimizer builds after a capture are in the next one, and every
    copy equals the variable at capture time, not later."""
    keras = tf_keras
    from zetaguard.recovery.backend import make_backend

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam(0.02)
    model.compile(optimizer=optimizer, loss="mse")
    backend = make_backend(model, optimizer)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    before = backend.capture(step=0)  # may precede the optimizer's slots
    model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0)
    snap = backend.capture(step=8)
    assert snap.lrs == [pytest.approx(0.02)]
    expected_params = {v.path: v.numpy() for v in model.weights}
    lr = optimizer._learning_rate
    expected_opt = {v.path: v.numpy() for v in optimizer.variables if v is not lr}
    assert set(snap.params) == set(expected_params)
    assert set(snap.optimizer_state) == set(expected_opt)
    assert len(expected_opt) >= 2 * len(model.trainable_weights)  # Adam's moments are there
    for saved, expected in ((snap.params, expected_params), (snap.optimizer_state, expected_opt)):
        for path, value in expected.items():
            np.testing.assert_array_equal(saved[path], value)
    optimizer.learning_rate.assign(0.5)
    model.fit(x, x[:, :2], batch_size=8, epochs=1, verbose=0)
    for path, value in expected_params.items():  # the copies did not follow the variables
        np.testing.assert_array_equal(snap.params[path], value)
    assert backend.capture(step=16).lrs == [pytest.approx(0.5)]
    assert before.lrs == [pytest.approx(0.02)]


@pytest.mark.slow
def test_mirrored_strategy_counts_variables_once_and_agrees_per_replica() -> None:
    out = run_in_subprocess("mirrored", "tensorflow")
    assert out["replicas"] == 2
    assert len(out["names"]) == out["n_vars"] == 4  # not 8: mirrored copies count once
    mirrored, replica0, replica1 = out["zetas"]
    assert len(mirrored) == 32  # 2 epochs x 16 batches of 64
    assert mirrored == replica0  # the mirrored variable is read from its first component
    # Replicas apply the same all-reduced update; their copies agree to rounding.
    assert replica1 == pytest.approx(replica0, rel=1e-9, abs=1e-12)
    assert out["statuses"][0] == out["statuses"][1] == out["statuses"][2]
    assert out["fit_status_counts"]["CRITICAL"] == 0
    assert len(out["fit_history_zeta"]) == 2
    assert out["two_device_reads"] == out["two_device_expected"]


def test_a_new_variable_set_is_read_not_the_cached_one() -> None:
    first = [tf.Variable(tf.fill([3], 1.0), name="a"), tf.Variable(tf.fill([2], 2.0), name="b")]
    second = [tf.Variable(tf.fill([3], 5.0), name="c"), tf.Variable(tf.fill([2], 7.0), name="d")]
    for _ in range(2):  # the second read of each set comes from the cached layout
        for variables, names in ((first, ["a", "b"]), (second, ["c", "d"])):
            snap = snapshot(variables)
            assert snap.names == names
            for t, v in zip(snap.tensors, variables, strict=True):
                np.testing.assert_array_equal(np.from_dlpack(t), v.numpy())
    named = snapshot({"x": first[0], "y": first[1]})  # same variables, the user's names
    assert named.names == ["x", "y"]


def test_many_variables_are_read_in_one_call_in_place() -> None:
    """One batched op reads all the variables: the values are the variables' current ones,
    and the tensors it returns share the variables' buffers."""
    from zetaguard import _core
    from zetaguard.adapters.tensorflow import VariableReader, _cached_layout

    rng = np.random.default_rng(7)
    variables = [
        tf.Variable(rng.normal(size=(64, 32)).astype("float32"), name=f"v{i}") for i in range(10)
    ]
    guard = ZetaGuard(warmup_steps=3, group_by="tensor")
    for step in range(6):
        result = guard.monitor(variables)
        for i, v in enumerate(variables):
            expected = float(np.linalg.norm(v.numpy().astype(np.float64)))
            assert result.groups[f"v{i}"].param_norm == pytest.approx(expected, rel=1e-6)
        for v in variables:
            v.assign_add(tf.fill(v.shape, 1e-3 * (step + 1)))
    layout = _cached_layout(variables, None)
    assert layout is not None
    assert layout.read_all.batched  # the batched read is what the steps above used
    reads = layout.read_all()
    assert [_core._resolve_address(t)[0] for t in reads] == [buffer_address(v) for v in variables]
    del reads
    again = VariableReader(variables)()  # a reader of its own, as recovery snapshots keep
    assert [_core._resolve_address(t)[0] for t in again] == [buffer_address(v) for v in variables]
