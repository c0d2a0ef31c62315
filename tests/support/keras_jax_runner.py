"""Keras 3 on JAX over two host devices, run for real in one process; prints a JSON summary.

JAX fixes its device count when it starts, so tests run this module in a subprocess
(:func:`run_in_subprocess`), which sets ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
and ``KERAS_BACKEND=jax`` before anything imports JAX.

Scenarios: ``keras.distribution.DataParallel`` (weights replicated on both devices) and
``ModelParallel`` (the first kernel split over them), each a ``model.fit`` of the digits MLP
with ZetaKeras, every batch's weights copied to NumPy beside it; and plain JAX arrays of both
layouts handed to ``monitor()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

MARK = "ZETA_JSON "
ROOT = Path(__file__).resolve().parents[2]


def run_in_subprocess(timeout: float = 300) -> dict[str, Any]:
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.keras_jax_runner"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"keras_jax_runner failed:\n{proc.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(lines[-1][len(MARK) :])
    return out


def layouts(arrays: list[Any]) -> list[str]:
    """How each array lies over the devices: 'replicated', 'sharded' or 'single'."""
    return [
        "single"
        if len(a.sharding.device_set) == 1
        else "replicated"
        if a.is_fully_replicated
        else "sharded"
        for a in arrays
    ]


def flat(model: Any) -> np.ndarray:
    """A float64 copy of the weights: NumPy gathers each (replicated or sharded) array."""
    model.jax_state_sync()  # the trainer's live arrays into the variables
    return np.concatenate(
        [np.asarray(w.numpy(), np.float64).ravel() for w in model.trainable_weights]
    )


def fit_scenario(distribution: Any, blow_up_at: int | None = None) -> dict[str, Any]:
    """A fit under ``distribution``: Adam at 1e-3 (healthy), or SGD-momentum whose LR jumps
    to 20 at step ``blow_up_at`` (ZetaKeras stops at the first CRITICAL)."""
    import keras
    from zetaguard import ZetaGuard, ZetaKeras

    from tests.support.keras_runner import digits, mlp
    from tests.support.reference import channels, raw_jar

    keras.distribution.set_distribution(distribution)
    try:
        x, y = digits()
        model = mlp(keras)
        opt = (
            keras.optimizers.Adam(1e-3)
            if blow_up_at is None
            else keras.optimizers.SGD(0.05, momentum=0.9)
        )
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        # Exact mode: every step a full pass, so the norms compare to NumPy's exactly.
        guard = ZetaGuard(warmup_steps=10, mode="exact", auto_recover=False)
        zk = ZetaKeras(guard, stop_on_critical=blow_up_at is not None)
        calls = [0]
        monitor = guard.monitor

        def counting(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return monitor(*args, **kwargs)

        guard.monitor = counting  # type: ignore[method-assign]
        traj: list[np.ndarray] = []
        rows: list[dict[str, Any]] = []
        seen: dict[str, Any] = {}

        class Recorder(keras.callbacks.Callback):  # type: ignore[misc]  # after ZetaKeras
            step = 0

            def on_train_begin(self, logs: Any = None) -> None:
                traj.append(flat(self.model))  # the guard's reference is taken here too

            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                if self.step == blow_up_at:
                    self.model.optimizer.learning_rate.assign(20.0)

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if not seen:
                    seen["layouts"] = layouts([v.value for v in self.model.trainable_weights])
                traj.append(flat(self.model))
                r = zk.last_result
                assert r is not None
                ref = channels(traj)
                rows.append(
                    {
                        "status": r.status,
                        "param_norm": r.channels["param_norm"],
                        "update_norm": r.channels.get("update_norm"),
                        "accel_norm": r.channels.get("accel_norm"),
                        "raw_jar": r.raw_jar,
                        "ref_param_norm": float(np.sqrt(ref["x2"] or 0.0)),
                        "ref_update_norm": None if ref["v2"] is None else float(np.sqrt(ref["v2"])),
                        "ref_accel_norm": None if ref["a2"] is None else float(np.sqrt(ref["a2"])),
                        "ref_raw_jar": raw_jar(traj),
                    }
                )
                self.step += 1

        model.fit(
            x[:512],
            y[:512],
            batch_size=32,
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[zk, Recorder()],
        )
        return {
            "layouts": seen["layouts"],
            "trainable_weights": len(model.trainable_weights),
            "monitored": list(guard.monitored_names),
            "monitor_calls": calls[0],
            "steps": guard.step,
            "rows": rows,
            "status_counts": guard.get_statistics()["status_counts"],
            "stopped": bool(model.stop_training),
        }
    finally:
        keras.distribution.set_distribution(None)


def plain_arrays() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from zetaguard import ZetaGuard

    mesh = Mesh(np.array(jax.devices()), ("d",))
    spec: Any = PartitionSpec  # untyped in jax's stubs
    rng = np.random.default_rng(0)
    host = [rng.normal(size=(8, 6)).astype(np.float32) for _ in range(3)]
    guard = ZetaGuard(warmup_steps=3, mode="exact", auto_recover=False)
    norms = []
    for step in range(6):
        now = [h * (1 + 0.01 * step) for h in host]
        arrays = {
            "replicated": jax.device_put(jnp.asarray(now[0]), NamedSharding(mesh, spec())),
            "sharded": jax.device_put(jnp.asarray(now[1]), NamedSharding(mesh, spec("d"))),
            # bfloat16 is assembled by JAX on one device (NumPy's has no buffer)
            "sharded_bf16": jax.device_put(
                jnp.asarray(now[2], dtype=jnp.bfloat16), NamedSharding(mesh, spec(None, "d"))
            ),
        }
        r = guard.monitor(arrays)
        exact = [np.asarray(a).astype(np.float64) for a in arrays.values()]  # bf16 as rounded
        ref = float(np.sqrt(sum(np.sum(e**2) for e in exact)))
        norms.append((r.channels["param_norm"], ref))
    # The replicated array is read in place: the engine's view is the first shard's memory.
    from zetaguard.adapters.jax_local import host_array

    rep = arrays["replicated"]
    zero_copy = (
        np.from_dlpack(host_array("r", rep)).ctypes.data
        == np.from_dlpack(rep.addressable_shards[0].data).ctypes.data
    )
    return {
        "layouts": layouts(list(arrays.values())),
        "norms": norms,
        "monitored": list(guard.monitored_names),
        "zero_copy": bool(zero_copy),
    }


def main() -> dict[str, Any]:
    import jax
    import keras

    devices = jax.devices()
    out: dict[str, Any] = {"devices": len(devices)}
    out["data_parallel"] = fit_scenario(keras.distribution.DataParallel(devices=devices))
    out["blow_up"] = fit_scenario(keras.distribution.DataParallel(devices=devices), blow_up_at=20)
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = (None, "model")  # both kernels split by their columns
    out["model_parallel"] = fit_scenario(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    out["plain"] = plain_arrays()
    out["example"] = run_example()
    return out


def run_example() -> dict[str, Any]:
    """``examples/distributed_keras_jax.py`` in this process (its XLA flag is already set)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "example_distributed_keras_jax", ROOT / "examples" / "distributed_keras_jax.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        result: dict[str, Any] = module.main([])
    finally:
        import keras

        keras.distribution.set_distribution(None)
    return result


if __name__ == "__main__":
    print(MARK + json.dumps(main()))
