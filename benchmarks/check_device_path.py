"""Check the torch device path (zetaguard.engine.device) against the host engine, and time it.

On a CUDA machine (the default ``--device cuda``): for exact and sketch mode and every float
dtype, the per-tensor norms of a ~25M-parameter model's trajectory computed on the GPU must
equal the host engine's (relative 1e-5); then the device path's ``update`` is timed against an
Adam step of the same model on the same GPU, with the transfers counted (one per step).
``--device cpu`` runs the same checks through the same torch code on the CPU.

Usage: python benchmarks/check_device_path.py [--device cuda|cpu] [--params 25e6]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from zetaguard import _core
from zetaguard.engine.device import DeviceTracker

NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def _model(params: int, device: str) -> torch.nn.Module:
    width = int((params / 4) ** 0.5)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check(device: str, params: int) -> bool:
    ok = True
    print(f"{'mode':8}{'dtype':10}{'max rel. error':>16}  result")
    for mode in ("exact", "sketch"):
        for dtype in NAMES:
            gen = torch.Generator().manual_seed(0)
            host_ts = [
                torch.randn(n, generator=gen).to(dtype)
                for n in (params // 8, params // 64, 1000, 7)
            ]
            host = _core.Tracker(mode=mode, sketch_buckets=16384, seed=3)
            dev = DeviceTracker(mode=mode, sketch_buckets=16384, seed=3)
            worst = 0.0
            for _ in range(5):
                for t in host_ts:
                    t.add_((torch.randn(t.shape, generator=gen) * 0.01).to(dtype))
                want = host.update_raw([(t.data_ptr(), t.numel(), NAMES[dtype]) for t in host_ts])
                got = dev.update([t.to(device) for t in host_ts])
                err = np.abs(got - want) / np.maximum(np.abs(want), 1e-300)
                worst = max(worst, float(err[want != 0].max(initial=0.0)))
            good = worst <= 1e-5
            ok &= good
            print(f"{mode:8}{NAMES[dtype]:10}{worst:16.2e}  {'ok' if good else 'MISMATCH'}")
    return ok


def timing(device: str, params: int) -> None:
    torch.manual_seed(0)
    model = _model(params, device)
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(64, model[0].in_features, device=device)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    def timed(fn: object, reps: int = 20) -> float:
        for _ in range(3):
            fn()  # type: ignore[operator]
        _sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()  # type: ignore[operator]
        _sync(device)
        return (time.perf_counter() - t) / reps

    base = timed(step)
    print(f"\n{n:,} parameters on {device}; Adam step {base * 1e3:.2f} ms")
    print(f"{'mode':8}{'update (ms)':>12}{'vs step':>10}{'GB/s':>8}{'state MiB':>11}")
    params_list = list(model.parameters())
    for mode in ("exact", "sketch"):
        dev = DeviceTracker(mode=mode)
        t = timed(lambda d=dev: d.update_with_grads(params_list, None))  # type: ignore[misc]
        print(
            f"{mode:8}{t * 1e3:12.2f}{t / base * 100:9.1f}%{n * 4 / t / 1e9:8.1f}"
            f"{dev.state_bytes / 2**20:11.1f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--params", type=float, default=25e6)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (use --device cpu for the CPU run)")
        return 0
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}")
    ok = check(args.device, int(args.params))
    timing(args.device, int(args.params))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
