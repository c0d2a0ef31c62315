"""Keras on JAX: after its first batch, ``ZetaKeras`` reads the live arrays of the fit without
walking the model's layers (issue 18 item 4: no Python walk of the model per batch)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None or importlib.util.find_spec("jax") is None,
    reason="keras with the jax backend is not installed",
)

# Runs with KERAS_BACKEND=jax (Keras fixes its backend at import). The model counts every
# access to trainable_weights (what a walk of its layers starts from).
SCRIPT = r"""
import json
import keras
import numpy as np
from sklearn.datasets import load_digits
from zetaguard import ZetaKeras

class Counting(keras.Sequential):
    walks = 0
    @property
    def trainable_weights(self):
        Counting.walks += 1
        return super().trainable_weights

class Probe(ZetaKeras):
    per_batch = []
    def on_train_batch_end(self, batch, logs=None):
        before = Counting.walks
        super().on_train_batch_end(batch, logs)
        Probe.per_batch.append(Counting.walks - before)

keras.utils.set_random_seed(0)
x, y = load_digits(return_X_y=True)
x, y = (x / 16.0).astype("float32")[:640], y[:640]
model = Counting([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                  keras.layers.Dense(10)])
model.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
probe = Probe(auto_recover=False)
model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[probe])
print(json.dumps({"backend": keras.backend.backend(), "per_batch": Probe.per_batch,
                  "steps": probe.guard.step}))
"""


def test_a_jax_fit_is_read_without_walking_the_layers_each_batch() -> None:
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    assert result["steps"] == 40  # every batch scored
    per_batch = result["per_batch"]
    assert len(per_batch) == 40
    assert sum(per_batch[1:]) == 0, per_batch  # the layout is learned once, at most
