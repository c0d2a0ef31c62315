"""The framework workloads of ``bench_always_on.py``, every arm in the same run: the tiny GPT-2 in
the Hugging Face ``Trainer`` and Keras ``fit`` on sklearn's digits, one subprocess per Keras
backend (``KERAS_BACKEND`` set for it), plus the table every workload prints.

Guard arms use the integration's defaults (``ZetaGuardCallback()``, ``ZetaKeras()``: recovery
on, so the snapshots a user gets are counted) with only the mode or full-pass setting changed.
ZClip (the real ``zclip`` package) runs where it applies: torch models (GPT-2), called in
``on_pre_optimizer_step`` as its docs show for the Trainer; it has no Keras form. The Keras
workloads also run ``sync``, a callback that only reads each batch's loss: the floor of any
callback that acts on every batch (a fit with no such callback dispatches its batch hooks
differently; see the note the table prints), and each arm's cost over it.

    python benchmarks/always_on_workloads.py --keras-child --epochs 1 --rounds 5  # one backend
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

GUARD_ARMS: dict[str, dict[str, Any]] = {
    "tiered": {},
    "thread": {"full_pass": "thread"},
    "exact": {"mode": "exact"},
    "sketch": {"mode": "sketch"},
}


def print_table(
    times: dict[str, list[float]], shares: dict[str, list[float]], floor: str | None = None
) -> None:
    """Per arm: median time per step, overhead = median over rounds of (arm / the same round's
    unguarded time) - 1 with its [min, max], and the median in-run share. With ``floor`` (an
    arm), a last column gives each arm's median ratio to that arm's time in the same round."""
    base = statistics.median(times["none"])
    extra = f"{'vs ' + floor:>12}" if floor else ""
    print(
        f"{'arm':10}{'step (ms)':>11}{'overhead':>10}{'spread [min, max]':>22}"
        f"{'in-run share':>14}{extra}"
    )
    print(f"{'none':10}{base * 1e3:11.2f}")
    for arm, values in times.items():
        if arm == "none":
            continue
        ratios = [a / b - 1 for a, b in zip(values, times["none"], strict=True)]
        line = (
            f"{arm:10}{statistics.median(values) * 1e3:11.2f}"
            f"{statistics.median(ratios) * 100:9.2f}%"
            f"{'':5}[{min(ratios) * 100:6.2f}%, {max(ratios) * 100:6.2f}%]"
            f"{statistics.median(shares[arm]) * 100:13.2f}%"
        )
        if floor and arm != floor:
            over = [a / b - 1 for a, b in zip(values, times[floor], strict=True)]
            line += f"{statistics.median(over) * 100:11.2f}%"
        print(line)


# ---- Hugging Face Trainer, tiny GPT-2 --------------------------------------------------------


def gpt2(steps: int, rounds: int) -> None:
    from bench_support import tiny_gpt2_trainer
    from transformers import TrainerCallback
    from zclip import ZClip
    from zetaguard.integrations.transformers import ZetaGuardCallback

    print(
        f"\n== Hugging Face Trainer, tiny GPT-2 (2 layers, 32 wide), batch 16, {steps} steps "
        f"a train(), {rounds} rounds =="
    )

    class TimedGuard(ZetaGuardCallback):
        spent = 0.0

        def on_pre_optimizer_step(self, *a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            super().on_pre_optimizer_step(*a, **kw)
            self.spent += time.perf_counter() - t

        def on_step_end(self, *a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            out = super().on_step_end(*a, **kw)
            self.spent += time.perf_counter() - t
            return out

    class TimedZClip(TrainerCallback):  # type: ignore[misc]
        spent = 0.0

        def __init__(self) -> None:
            self.zclip = ZClip()

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            t = time.perf_counter()
            self.zclip.step(kw["model"])
            self.spent += time.perf_counter() - t

    def run(arm: str) -> tuple[float, float]:
        trainer = tiny_gpt2_trainer(steps, "/tmp/zg_bench_always_on_hf")
        cb: Any = None
        if arm == "zclip":
            cb = TimedZClip()
            trainer.add_callback(cb)
        elif arm != "none":
            cb = TimedGuard(warmup_steps=10, **GUARD_ARMS[arm])
            cb.install(trainer)  # the documented way: first in line, pre-clip gradient norm
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
        spent = cb.spent if cb is not None else 0.0
        if cb is not None and hasattr(cb, "guard"):
            cb.guard.close()
        return total / steps, spent / (total - spent)

    arms = ("none", "zclip", *GUARD_ARMS)
    run("none")  # warm imports and the first-call paths
    times: dict[str, list[float]] = {a: [] for a in arms}
    shares: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(rounds):
        for arm in arms:
            step, share = run(arm)
            times[arm].append(step)
            shares[arm].append(share)
    print_table(times, shares)


# ---- Keras digits, one backend per subprocess ------------------------------------------------


def keras_child(epochs: int, rounds: int) -> None:
    """Runs in a subprocess with KERAS_BACKEND set: every arm of model.fit on digits."""
    import keras
    import numpy as np
    from bench_keras import mlp, timed_callback
    from sklearn.datasets import load_digits
    from zetaguard import ZetaKeras

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    batches = epochs * int(np.ceil(len(x) / 32))
    print(
        f"\n== Keras {keras.__version__} digits MLP 64-128-10, backend "
        f"{keras.backend.backend()}, batch 32, {batches} batches a fit, {rounds} rounds =="
    )
    model = mlp(keras, [64, 128, 10])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # build and compile the step

    class SyncCallback(keras.callbacks.Callback):  # type: ignore[misc]
        """The cheapest callback that acts on every batch: it reads the batch's loss."""

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            float(logs["loss"])

    def callbacks_of(arm: str) -> list[Any]:
        if arm == "none":
            return []
        if arm == "sync":
            return [timed_callback(keras, SyncCallback)]
        return [timed_callback(keras, ZetaKeras, **GUARD_ARMS[arm])]

    # JAX donates a fit's state to the next step: no worker may read it then (refused).
    arms = tuple(
        a
        for a in ("none", "sync", *GUARD_ARMS)
        if not (a == "thread" and keras.backend.backend() == "jax")
    )
    times: dict[str, list[float]] = {a: [] for a in arms}
    shares: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(rounds):
        # Each round starts at another arm: a fit right after another can pay for its leftovers.
        for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:
            callbacks = callbacks_of(arm)
            t = time.perf_counter()
            model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks)
            total = time.perf_counter() - t
            inside = sum(c.inside for c in callbacks)
            for c in callbacks:
                if hasattr(c, "guard"):
                    c.guard.close()
            times[arm].append(total / batches)
            shares[arm].append(inside / (total - inside))
    print_table(times, shares, floor="sync")
    print(
        "(sync: a callback that reads each batch's loss. Keras runs the batch hooks of a fit "
        "whose callbacks all keep the defaults on a thread pool on the torch and JAX backends, "
        "one hand-off a batch; before a callback with its own batch hook, as the guard's, it "
        "converts the logs to floats in line, which waits for the step (the in-run shares hold "
        "no such wait) and is faster here. 'vs sync' is each arm's cost over that floor)"
    )
    if keras.backend.backend() == "jax":
        print("(no thread arm: full_pass='thread' is refused for JAX arrays)")
    sys.stdout.flush()


def keras_backend(backend: str, epochs: int, rounds: int) -> None:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [
        sys.executable,
        __file__,
        "--keras-child",
        "--epochs",
        str(epochs),
        "--rounds",
        str(rounds),
    ]
    sys.stdout.flush()
    subprocess.run(cmd, env=env, check=True, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keras-child", action="store_true", help="run the Keras arms here")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.keras_child:
        keras_child(args.epochs, args.rounds)


if __name__ == "__main__":
    main()
