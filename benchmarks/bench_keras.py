"""ZetaKeras costs, as ratios measured in the same run.

1. Weight reading: what the guard does each step to reach the weights (``snapshot(model)``:
   zero-copy reads) against ``[w.numpy() for w in model.trainable_weights]`` (a copy of every
   weight), for the digits MLP and a larger MLP. Also the full step (read + engine pass).
   Timings are the minimum over repeats (the least-disturbed run on a shared machine).
2. Per-batch overhead of ``model.fit`` on sklearn's digits with ``ZetaKeras()`` (defaults:
   monitoring, recovery snapshots) against the same fit without it. Three more arms split the
   cost: a no-op callback (Keras dispatches callbacks synchronously once one overrides a batch
   hook), a callback that only reads the weights the way the guard does (the floor of any
   per-batch watcher), one that also runs the engine pass and the detector on them (the floor
   of a per-batch JAR watcher: zetaguard's C++ parts without the guard's Python), and
   ``ZetaKeras(auto_recover=False)`` (monitoring without snapshots).
   Each round fits every arm once, in a new order; "vs none" is the median over rounds of an
   arm's time over the same round's plain fit, and the in-run share is the time inside the
   added callback over the rest of the same fit (the steadier figure on a shared machine).

    python benchmarks/bench_keras.py                      # the backend KERAS_BACKEND names
    python benchmarks/bench_keras.py --backends tensorflow,torch,jax
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


class Arm:
    """One way to run ``fit``: the callbacks it adds, and for each round its wall time, its CPU
    time and the time spent inside the added callbacks' hooks."""

    def __init__(self, name: str, make: Any) -> None:
        self.name, self.make = name, make
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.inside: list[float] = []


def timed_callback(keras: Any, cls: Any, **kwargs: Any) -> Any:
    """An instance of ``cls`` whose hooks add their own run time to ``.inside``."""

    class Timed(cls):  # type: ignore[misc,valid-type]
        inside = 0.0

        def _timed(self, hook: str, *args: Any, **kw: Any) -> None:
            start = time.perf_counter()
            getattr(super(), hook)(*args, **kw)
            self.inside += time.perf_counter() - start

        def on_train_begin(self, logs: Any = None) -> None:
            self._timed("on_train_begin", logs)

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._timed("on_epoch_begin", epoch, logs)

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self._timed("on_train_batch_begin", batch, logs)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self._timed("on_train_batch_end", batch, logs)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self._timed("on_epoch_end", epoch, logs)

    return Timed(**kwargs)


def bench_fit(keras: Any, epochs: int, rounds: int) -> tuple[list[Arm], int]:
    from sklearn.datasets import load_digits
    from zetaguard import ZetaGuard, ZetaKeras, _core
    from zetaguard.adapters import snapshot
    from zetaguard.detector import Detector
    from zetaguard.integrations.keras import weights_to_watch

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")

    class NoOp(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            return None

    class ReadOnly(keras.callbacks.Callback):  # type: ignore[misc]
        """The floor of any per-batch watcher: reach the weights the way ZetaKeras does (the
        guard's zero-copy read) and do nothing with them."""

        def on_train_begin(self, logs: Any = None) -> None:
            self.watched = weights_to_watch(self.model)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            snapshot(self.watched)

    class EngineOnly(ReadOnly):
        """The least a synchronous per-batch JAR watcher costs: the read, the engine pass and
        the detector (zetaguard's C++ parts), without the guard's Python around them."""

        def on_train_begin(self, logs: Any = None) -> None:
            super().on_train_begin(logs)
            defaults = ZetaGuard()
            self.tracker = _core.Tracker(mode="exact")
            self.detector = Detector(
                drift_threshold=defaults.drift_threshold,
                snap_threshold=defaults.snap_threshold,
                alpha=defaults.alpha,
                warmup_steps=defaults.warmup_steps,
            )

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            snap = snapshot(self.watched)
            update = self.tracker.update_raw if snap.raw else self.tracker.update
            rows = update(snap.tensors)
            loss = (logs or {}).get("loss")
            self.detector.observe_tuple(rows, self.tracker.history, loss, None)

    model = mlp(keras, [64, 128, 10])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # build and compile the step
    arms = [
        Arm("none", lambda: []),
        Arm("no-op callback", lambda: [timed_callback(keras, NoOp)]),
        Arm("read weights only", lambda: [timed_callback(keras, ReadOnly)]),
        Arm("read + engine + detector", lambda: [timed_callback(keras, EngineOnly)]),
        Arm(
            "ZetaKeras(auto_recover=False)",
            lambda: [timed_callback(keras, ZetaKeras, auto_recover=False)],
        ),
        Arm("ZetaKeras()", lambda: [timed_callback(keras, ZetaKeras)]),
        Arm(
            "ZetaKeras(every_n_batches=10)",
            lambda: [timed_callback(keras, ZetaKeras, every_n_batches=10)],
        ),
    ]
    order = np.random.default_rng(0)
    for _ in range(rounds):  # every arm once per round, in a new order each round
        for arm in order.permutation(np.array(arms, dtype=object)):
            callbacks = arm.make()
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
            arm.wall.append(time.perf_counter() - start)
            arm.cpu.append(time.process_time() - start_cpu)
            arm.inside.append(sum(c.inside for c in callbacks))
    return arms, epochs * int(np.ceil(len(x) / 32))


def run_backend(epochs: int, rounds: int) -> None:
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
    arms, batches = bench_fit(keras, epochs, rounds)
    base = arms[0]
    print(f"\nmodel.fit on digits (1797 samples, batch 32, {epochs} epochs a fit, {rounds} rounds)")
    print(
        f"{'callbacks':<31}{'wall/batch':>12}{'vs none':>9}{'IQR':>15}{'CPU vs none':>13}"
        f"{'in-run share':>14}"
    )
    for arm in arms:
        wall = np.array(arm.wall) / np.array(base.wall) - 1  # each round against its own none
        cpu = np.array(arm.cpu) / np.array(base.cpu) - 1
        q1, q3 = np.percentile(wall, [25, 75]) * 100
        inside = np.array(arm.inside)
        share = np.median(inside / (np.array(arm.wall) - inside)) * 100
        print(
            f"{arm.name:<31}{np.median(arm.wall) / batches * 1e6:>10.1f}us"
            f"{np.median(wall) * 100:>+8.1f}%{f'[{q1:+.1f}, {q3:+.1f}]':>15}"
            f"{np.median(cpu) * 100:>+12.1f}%" + (f"{share:>13.1f}%" if arm.name != "none" else "")
        )
    print(
        "vs none: median over rounds of the arm's fit time over the same round's fit without "
        "callbacks (IQR: the middle half of those rounds); in-run share: time inside the added "
        "callback over the rest of the same fit"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", help="comma-separated Keras backends, each in a subprocess")
    parser.add_argument("--epochs", type=int, default=2, help="epochs in each fit")
    parser.add_argument("--rounds", type=int, default=20, help="fits of each arm")
    args = parser.parse_args()
    if not args.backends:
        run_backend(args.epochs, args.rounds)
        return
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend)
        cmd = [
            sys.executable,
            __file__,
            "--epochs",
            str(args.epochs),
            "--rounds",
            str(args.rounds),
        ]
        subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
