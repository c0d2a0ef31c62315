"""ZetaKeras costs, as ratios measured in the same run.

1. Weight reading: what the guard does each step to reach the weights (``snapshot(model)``:
   zero-copy reads) against ``[w.numpy() for w in model.trainable_weights]`` (a copy of every
   weight), for the digits MLP and a larger MLP. Also the full step (read + engine pass).
2. Per-batch overhead of ``model.fit`` on sklearn's digits with ``ZetaKeras()`` (defaults:
   monitoring, recovery snapshots) against the same fit without it. Three more arms split the
   cost: a no-op callback (Keras dispatches callbacks synchronously once one overrides a batch
   hook), a callback that only reads the weights the way the guard does (the floor of any
   per-batch watcher), and ``ZetaKeras(auto_recover=False)`` (monitoring without snapshots).

    python benchmarks/bench_keras.py                      # the backend KERAS_BACKEND names
    python benchmarks/bench_keras.py --backends tensorflow,torch,jax

Timings are the minimum over repeats (the least-disturbed run on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import timeit
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def best(fn: Any, number: int, repeat: int, timer: Any = time.perf_counter) -> float:
    """Seconds per call: the minimum over ``repeat`` runs of ``number`` calls."""
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=timer)) / number


def mlp(keras: Any, widths: list[int]) -> Any:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((widths[0],))]
    layers += [keras.layers.Dense(w, activation="relu") for w in widths[1:-1]]
    layers.append(keras.layers.Dense(widths[-1]))
    return keras.Sequential(layers)


def bench_reading(keras: Any, timer: Any) -> list[tuple[str, int, float, float, float]]:
    from zetaguard import ZetaGuard
    from zetaguard.adapters import snapshot

    rows = []
    for label, widths in (
        ("digits MLP 64-128-10", [64, 128, 10]),
        ("MLP 1024-1024-1024-10", [1024, 1024, 1024, 10]),
    ):
        model = mlp(keras, widths)
        weights = model.trainable_weights
        nbytes = sum(int(np.prod(w.shape)) * 4 for w in weights)
        number = 200 if nbytes < 1 << 20 else 20
        copy = best(lambda weights=weights: [w.numpy() for w in weights], number, 7, timer)
        read = best(lambda model=model: snapshot(model), number, 7, timer)
        guard = ZetaGuard(auto_recover=False)
        full = best(lambda model=model, guard=guard: guard.monitor(model), number, 7, timer)
        rows.append((label, nbytes, copy, read, full))
    return rows


def bench_fit(keras: Any, epochs: int, repeats: int) -> dict[str, tuple[float, float]]:
    from sklearn.datasets import load_digits
    from zetaguard import ZetaKeras

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")

    from zetaguard.adapters import snapshot

    class NoOp(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            return None

    class ReadOnly(keras.callbacks.Callback):  # type: ignore[misc]
        """The floor of any per-batch watcher: reach the weights (the guard's zero-copy read)
        and do nothing with them."""

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            snapshot(self.model)

    model = mlp(keras, [64, 128, 10])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # build and compile the step
    arms: dict[str, Any] = {
        "none": lambda: [],
        "no-op callback": lambda: [NoOp()],
        "read weights only": lambda: [ReadOnly()],
        "ZetaKeras(auto_recover=False)": lambda: [ZetaKeras(auto_recover=False)],
        "ZetaKeras()": lambda: [ZetaKeras()],
        "ZetaKeras(every_n_batches=10)": lambda: [ZetaKeras(every_n_batches=10)],
    }
    wall: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):  # interleaved, so drifting machine load hits every arm alike
        for name, make in arms.items():
            callbacks = make()
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    batches = epochs * int(np.ceil(len(x) / 32))
    return {name: (min(wall[name]) / batches, min(cpu[name]) / batches) for name in arms}


def run_backend(epochs: int, repeats: int) -> None:
    import keras

    backend = keras.backend.backend()
    print(f"\n== Keras {keras.__version__}, backend {backend} ==")
    for clock, timer in (("wall", time.perf_counter), ("process CPU", time.process_time)):
        print(f"\nweight reading per step, all trainable weights ({clock} time)")
        print(
            f"{'model':<24}{'bytes':>11}{'w.numpy()':>12}{'zero-copy':>12}{'speedup':>9}"
            f"{'monitor()':>12}"
        )
        for label, nbytes, copy, read, full in bench_reading(keras, timer):
            print(
                f"{label:<24}{nbytes:>11,}{copy * 1e6:>10.1f}us{read * 1e6:>10.1f}us"
                f"{copy / read:>8.1f}x{full * 1e6:>10.1f}us"
            )
    per_batch = bench_fit(keras, epochs, repeats)
    base_wall, base_cpu = per_batch["none"]
    print(f"\nmodel.fit on digits (1797 samples, batch 32, {epochs} epochs, best of {repeats})")
    print(f"{'callbacks':<31}{'wall/batch':>12}{'vs none':>9}{'CPU/batch':>12}{'vs none':>9}")
    for name, (w, c) in per_batch.items():
        print(
            f"{name:<31}{w * 1e6:>10.1f}us{(w / base_wall - 1) * 100:>+8.1f}%"
            f"{c * 1e6:>10.1f}us{(c / base_cpu - 1) * 100:>+8.1f}%"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", help="comma-separated Keras backends, each in a subprocess")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not args.backends:
        run_backend(args.epochs, args.repeats)
        return
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend)
        cmd = [
            sys.executable,
            __file__,
            "--epochs",
            str(args.epochs),
            "--repeats",
            str(args.repeats),
        ]
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
