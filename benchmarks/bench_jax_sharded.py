"""Reading JAX weights laid out over several devices, as ratios measured in the same run.

Two host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set here before JAX
starts). For the weights of an MLP replicated on both devices (as ``keras.distribution
.DataParallel`` keeps them) and the same weights split by columns over both (``ModelParallel``),
one step of the guard's read (``zetaguard.adapters.jax_local.host_arrays``) against what a user
would write without it, ``[np.asarray(a) for a in arrays]`` (NumPy gathers a copy), and against
the same arrays on one device (nothing to do). Also one full ``guard.monitor()`` step (read +
engine pass + detector) on each layout against the same step on single-device arrays. Every
call gets new arrays of the same layout (JAX caches an array's NumPy copy on it).
Timings are minima over repeats (the least-disturbed run on a shared machine).

    python benchmarks/bench_jax_sharded.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import time
from typing import Any

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()

import numpy as np


def best_fresh(fn: Any, make: Any, number: int, repeat: int) -> float:
    """Seconds per call of ``fn`` on a new set of arrays each call (JAX caches an array's
    NumPy copy on the array, so timing one set again and again would time the cache): the
    minimum over ``repeat`` runs of ``number`` calls."""
    jax: Any = importlib.import_module("jax")  # partly untyped in its stubs
    times = []
    for _ in range(repeat):
        sets = [make(i) for i in range(number)]
        jax.block_until_ready(sets)
        t0 = time.perf_counter()
        for arrays in sets:
            fn(arrays)
        times.append((time.perf_counter() - t0) / number)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one size, fewer repeats")
    a = p.parse_args(argv)
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from zetaguard import ZetaGuard
    from zetaguard.adapters.jax_local import host_arrays

    spec: Any = PartitionSpec  # untyped in jax's stubs
    mesh = Mesh(np.array(jax.devices()), ("d",))
    widths = [512] if a.quick else [256, 1024]
    number, repeat = (20, 5) if a.quick else (50, 7)
    print(f"devices: {len(jax.devices())}; JAX {jax.__version__}; shared 2-core machine")
    print(f"{'MLP':>14} {'layout':>10} {'host_arrays':>12} {'np.asarray':>11} {'ratio':>6}")
    for width in widths:
        rng = np.random.default_rng(0)
        shapes = [(width, width), (width,), (width, width), (width,), (width, 16), (16,)]
        host = [rng.normal(size=s).astype(np.float32) for s in shapes]
        names = [str(i) for i in range(len(host))]
        params = sum(h.size for h in host)
        layouts = {
            "single": [jax.devices()[0]] * len(host),
            "replicated": [NamedSharding(mesh, spec())] * len(host),
            # Split by columns (the biases stay replicated).
            "sharded": [
                NamedSharding(mesh, spec(None, "d") if h.ndim == 2 else spec()) for h in host
            ],
        }
        bases = {
            k: [jax.device_put(h, d) for h, d in zip(host, v, strict=True)]
            for k, v in layouts.items()
        }
        for label, base in bases.items():

            def make(i: int, base: list[Any] = base) -> list[Any]:
                return [b + i for b in base]  # new arrays, same layout

            ours = best_fresh(
                lambda arrays, names=names: host_arrays(names, arrays), make, number, repeat
            )
            copy = best_fresh(lambda arrays: [np.asarray(x) for x in arrays], make, number, repeat)
            print(
                f"{params / 1e6:>10.2f}M p {label:>10} {ours * 1e6:>9.1f} us "
                f"{copy * 1e6:>8.1f} us {copy / ours:>6.1f}x"
            )
        steps = {}
        # The timed trajectory is a straight line (CRITICAL after warm-up): same for every
        # layout, so the ratios are fair; its log lines are not the point here.
        logging.getLogger("zetaguard").setLevel(logging.ERROR)
        for label in ("single", "replicated", "sharded"):
            guard = ZetaGuard(mode="exact", warmup_steps=5, auto_recover=False)
            base = bases[label]
            steps[label] = best_fresh(
                guard.monitor, lambda i, base=base: [b + i for b in base], number, repeat
            )
        print(
            f"{'':>14} monitor() step: single-device {steps['single'] * 1e6:.0f} us, "
            f"replicated {steps['replicated'] * 1e6:.0f} us "
            f"({steps['replicated'] / steps['single']:.2f}x), sharded "
            f"{steps['sharded'] * 1e6:.0f} us ({steps['sharded'] / steps['single']:.2f}x)"
        )


if __name__ == "__main__":
    main()
