"""Keras 3 on JAX with ``keras.distribution.DataParallel`` over 2 host devices, watched by
``ZetaKeras``. Start it with:

    python examples/distributed_keras_jax.py

The script sets ``KERAS_BACKEND=jax`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=2``
before JAX is imported (JAX fixes its devices when it starts); on a machine with accelerators,
leave the flag out and ``DataParallel`` uses them all. Each batch is split over the devices and
every weight is replicated on both; the callback reads each weight once, from the first
device's copy in place, so the guard makes one decision per batch.

The fit's SGD learning rate jumps to 20 at ``--blow-up-at``: the guard catches it, rolls the
weights and optimizer back to a verified-stable snapshot and cuts the learning rate; the
weights stay replicated and finite.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import jax
import keras
import numpy as np
from zetaguard import ZetaGuard, ZetaKeras


class BlowUp(keras.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.step = at, 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.step == self.at:
            self.model.optimizer.learning_rate.assign(20.0)
        self.step += 1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--blow-up-at", type=int, default=40)
    a = p.parse_args(argv)
    devices = jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 32)).astype("float32")
    y = (x @ rng.normal(size=(32,)) > 0).astype("int32")
    model = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(2)]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    guard = ZetaGuard(warmup_steps=15, recovery_mode="aggressive", snapshot_interval=5)
    zk = ZetaKeras(guard)
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=a.epochs,
        verbose=0,
        shuffle=False,
        callbacks=[BlowUp(a.blow_up_at), zk],
    )
    weights = [w.value for w in model.trainable_weights]
    out = {
        "devices": len(devices),
        "replicated": all(
            len(w.sharding.device_set) == len(devices) and w.is_fully_replicated for w in weights
        ),
        "finite": all(bool(np.isfinite(np.asarray(w)).all()) for w in weights),
        "steps": guard.step,
        "status_counts": guard.get_statistics()["status_counts"],
        "recoveries": [
            {
                "step": r.step,
                "actions": [str(s) for s in r.actions],
                "restored_step": r.restored_step,
            }
            for r in guard.recovery_reports
        ],
        "lr": float(np.asarray(model.optimizer.learning_rate.value)),
    }
    print(
        f"{out['devices']} devices, {out['steps']} steps, {out['status_counts']}, "
        f"recoveries: {[r['actions'] for r in out['recoveries']]}, lr now {out['lr']:.3g}"
    )
    return out


if __name__ == "__main__":
    main()
