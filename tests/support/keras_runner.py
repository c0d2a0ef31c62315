"""Runs ZetaKeras scenarios on real ``model.fit`` in one process and prints a JSON summary.

The Keras backend is fixed when Keras is imported, so tests run this script in a subprocess
with ``KERAS_BACKEND`` set: ``python tests/support/keras_runner.py fit`` (every Keras backend) or
``python tests/support/keras_runner.py mirrored`` (TensorFlow with two logical CPU devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

JAR_EPS = 1e-12
MARK = "ZETA_JSON "


def run_in_subprocess(scenario: str, backend: str) -> dict[str, Any]:
    """Run this script with ``KERAS_BACKEND=backend`` and return its JSON summary."""
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, __file__, scenario],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"runner failed ({backend}, {scenario}):\n{proc.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    return out


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32")[:1024], y.astype("int32")[:1024]


def mlp(keras: Any, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def flat_weights(model: Any) -> np.ndarray:
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:  # JAX keeps live weights outside the variables during fit
        sync()
    return np.concatenate(
        [np.asarray(w.numpy(), dtype=np.float64).ravel() for w in model.trainable_weights]
    )


def reference_jar(traj: list[np.ndarray]) -> float:
    """JAR as specified, from the last four weight vectors, in NumPy."""
    x3, x2, x1, x0 = traj[-4:]
    v = [x2 - x3, x1 - x2, x0 - x1]
    a = [v[1] - v[0], v[2] - v[1]]
    j = a[1] - a[0]
    return float(np.linalg.norm(j) / (np.linalg.norm(a[1]) + JAR_EPS))


def fit_scenarios() -> dict[str, Any]:
    import keras
    from zetaguard import ZetaGuard, ZetaKeras

    x, y = digits()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out: dict[str, Any] = {"backend": keras.backend.backend()}

    class Recorder(keras.callbacks.Callback):  # runs after ZetaKeras in the same batch
        def __init__(self, zk: ZetaKeras, lr_jump: tuple[int, float] | None = None) -> None:
            super().__init__()
            self.zk, self.lr_jump = zk, lr_jump
            self.weights: dict[int, np.ndarray] = {}
            self.iterations: dict[int, int] = {}
            self.batch_logs: list[dict[str, float]] = []
            self.jar_pairs: list[tuple[float, float]] = []
            self.step = 0

        def on_train_begin(self, logs: Any = None) -> None:
            self.weights[-1] = flat_weights(self.model)

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if self.lr_jump is not None and self.step == self.lr_jump[0]:
                self.model.optimizer.learning_rate.assign(self.lr_jump[1])

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.weights[self.step] = flat_weights(self.model)
            self.iterations[self.step] = int(np.asarray(self.model.optimizer.iterations.numpy()))
            self.batch_logs.append({k: logs[k] for k in ("zeta", "zeta_status") if k in logs})
            r = self.zk.last_result
            traj = [
                self.weights[s] for s in range(self.step - 3, self.step + 1) if s in self.weights
            ]
            if r is not None and r.raw_jar is not None and len(traj) == 4 and self.step < 40:
                self.jar_pairs.append((r.raw_jar, reference_jar(traj)))
            self.step += 1

    def run(
        guard: ZetaGuard, optimizer: Any, epochs: int, lr_jump: tuple[int, float] | None, **zk: Any
    ) -> tuple[Any, ZetaKeras, Recorder, Any]:
        model = mlp(keras)
        model.compile(optimizer=optimizer, loss=loss)
        cb = ZetaKeras(guard, **zk)
        rec = Recorder(cb, lr_jump)
        hist = model.fit(
            x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=[cb, rec], shuffle=False
        )
        return model, cb, rec, hist

    # 1. healthy: Adam at 1e-3, no recovery.
    guard = ZetaGuard(warmup_steps=20, auto_recover=False)
    _, _, rec, hist = run(guard, keras.optimizers.Adam(1e-3), 3, None)
    out["healthy"] = {
        "status_counts": guard.get_statistics()["status_counts"],
        "steps": rec.step,
        "history_keys": sorted(hist.history),
        "history_zeta": hist.history.get("zeta"),
        "history_status": hist.history.get("zeta_status"),
        "batch_logs_with_zeta": sum(1 for b in rec.batch_logs if "zeta" in b),
        "jar_pairs": rec.jar_pairs,
    }

    # 2. LR blow-up (SGD-momentum 0.05 -> 20 at step 60), detection only, stop on CRITICAL.
    guard = ZetaGuard(warmup_steps=20, auto_recover=False)
    _, _, rec, _ = run(
        guard, keras.optimizers.SGD(0.05, momentum=0.9), 4, (60, 20.0), stop_on_critical=True
    )
    out["blowup"] = {
        "first_critical": min((r.step for r in guard.recovery_reports), default=None),
        "stopped": [r.stopped for r in guard.recovery_reports],
        "steps": rec.step,
        "status_counts": guard.get_statistics()["status_counts"],
    }

    # 3. the same blow-up with recovery: rollback + LR cut through the optimizer.
    guard = ZetaGuard(warmup_steps=20, recovery_mode="aggressive", snapshot_interval=10)
    model, _, rec, _ = run(guard, keras.optimizers.SGD(0.05, momentum=0.9), 4, (60, 20.0))
    reports = guard.recovery_reports
    first = next((r for r in reports if r.restored_step is not None), None)
    restore_check = None
    if first is not None:
        after = rec.weights[first.step]
        before = rec.weights[first.restored_step]
        restore_check = {
            "restored_step": first.restored_step,
            "step": first.step,
            "max_abs_diff": float(np.max(np.abs(after - before))),
            "iterations_after": rec.iterations[first.step],
            "iterations_at_snapshot": rec.iterations.get(first.restored_step, 0),
        }
    final = flat_weights(model)
    out["recovery"] = {
        "reports": [r.to_dict() for r in reports],
        "restore_check": restore_check,
        "final_finite": bool(np.all(np.isfinite(final))),
        "final_lr": float(np.asarray(model.optimizer.learning_rate.numpy())),
        "steps": rec.step,
        "stop_training": bool(model.stop_training),
    }

    # 3b. unstable from its first update (Adam at LR 3.0: the weights grow ~40x in one step),
    # detection only: the reference is taken before the first step, so it is CRITICAL at once.
    guard = ZetaGuard(warmup_steps=20, auto_recover=False)
    _, _, rec, _ = run(guard, keras.optimizers.Adam(3.0), 1, None)
    out["unstable"] = {
        "statuses": [b.get("zeta_status") for b in rec.batch_logs],
        "status_counts": guard.get_statistics()["status_counts"],
        "steps": rec.step,
    }

    # 4. beside EarlyStopping, ModelCheckpoint and TensorBoard.
    with tempfile.TemporaryDirectory() as tmp:
        model = mlp(keras)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        ckpt = Path(tmp) / "best.weights.h5"
        cbs = [
            ZetaKeras(warmup_steps=10),
            keras.callbacks.EarlyStopping(monitor="loss", patience=1),
            keras.callbacks.ModelCheckpoint(str(ckpt), monitor="loss", save_weights_only=True),
            keras.callbacks.TensorBoard(log_dir=str(Path(tmp) / "tb"), update_freq=5),
        ]
        hist = model.fit(x[:512], y[:512], batch_size=32, epochs=2, verbose=0, callbacks=cbs)
        events = b"".join(p.read_bytes() for p in (Path(tmp) / "tb").rglob("*tfevents*"))
        out["callbacks"] = {
            "epochs": len(hist.history["loss"]),
            "history_keys": sorted(hist.history),
            "checkpoint": ckpt.exists(),
            "tb_epoch_zeta": b"epoch_zeta" in events,
            "tb_epoch_loss": b"epoch_loss" in events,
            "tb_batch_zeta": b"batch_zeta" in events,
        }

    # 5. the same model fitted twice, with a different one of two same-shaped layers frozen
    # each time (and compiled again): the second callback watches what is trainable now, under
    # the right names, though the variable count and shapes are the same as before.
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(16, activation="relu") for _ in range(3)]
        + [keras.layers.Dense(10)]
    )
    watched = []
    for frozen in (1, 2):
        for i, layer in enumerate(model.layers):
            layer.trainable = i != frozen
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        cb = ZetaKeras(warmup_steps=5, auto_recover=False)
        model.fit(x[:256], y[:256], batch_size=32, epochs=1, verbose=0, callbacks=[cb])
        assert cb.last_result is not None
        watched.append(sorted(cb.last_result.groups))
    out["refit"] = {"watched": watched, "layers": [layer.name for layer in model.layers]}
    return out


def mirrored_scenario() -> dict[str, Any]:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    import keras
    from zetaguard import ZetaGuard, ZetaKeras
    from zetaguard.adapters import snapshot

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = digits()
    with strategy.scope():
        model = mlp(keras)
        optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
        optimizer.build(model.trainable_variables)  # slots must exist before the tf.function
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum_over_batch_size"
    )

    @tf.function
    def train_step(xb: Any, yb: Any) -> Any:
        def step(xr: Any, yr: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(yr, model(xr, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        per_replica = strategy.run(step, args=(xb, yb))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    n_vars = len(model.trainable_variables)
    names = snapshot(model.trainable_variables).names
    mirrored = ZetaGuard(warmup_steps=10, auto_recover=False)
    replicas = [ZetaGuard(warmup_steps=10, auto_recover=False) for _ in range(2)]
    zetas: list[list[float]] = [[], [], []]
    statuses: list[list[str]] = [[], [], []]
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(64)
    )
    for _ in range(2):
        for xb, yb in data:
            train_step(xb, yb)
            results = [mirrored.monitor(model.trainable_variables)]
            for i, g in enumerate(replicas):  # each replica's own copy, read separately
                results.append(g.monitor([v.value.values[i] for v in model.trainable_variables]))
            for k, r in enumerate(results):
                zetas[k].append(r.zeta_value)
                statuses[k].append(r.status)

    # Keras fit under the same strategy with the callback.
    with strategy.scope():
        fit_model = mlp(keras)
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss_fn)
    cb = ZetaKeras(warmup_steps=10)
    hist = fit_model.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[cb])

    # Variables on two devices: the batched read refuses them, and the reader falls back.
    from zetaguard.adapters.tensorflow import VariableReader

    placed = []
    for i, device in enumerate(["/cpu:0", "/cpu:1", "/cpu:0"]):
        with tf.device(device):
            placed.append(tf.Variable(tf.fill([3 + i], float(i + 1))))
    reads = VariableReader(placed)()
    return {
        "two_device_reads": [np.asarray(t).tolist() for t in reads],
        "two_device_expected": [v.numpy().tolist() for v in placed],
        "replicas": strategy.num_replicas_in_sync,
        "n_vars": n_vars,
        "names": names,
        "zetas": zetas,
        "statuses": statuses,
        "fit_status_counts": cb.guard.get_statistics()["status_counts"],
        "fit_history_zeta": hist.history.get("zeta"),
    }


if __name__ == "__main__":
    scenario = sys.argv[1] if len(sys.argv) > 1 else "fit"
    result = fit_scenarios() if scenario == "fit" else mirrored_scenario()
    print(MARK + json.dumps(result))
