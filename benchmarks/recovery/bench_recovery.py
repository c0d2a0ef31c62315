"""Does recovery save runs? Unstable trainings with each guard in the loop, side by side.

Every run trains a small real model on sklearn's digits (an MLP with SGD-momentum, and a tiny
transformer over the image rows with AdamW) and injects one fault half-way:

* ``lr_jump``      the learning rate jumps 100x and stays there;
* ``lr_ramp``      the learning rate ramps up 1.15x per step to 100x (a warm-up with a wrong
                   peak) and holds it;
* ``corrupt``      5 batches with inputs scaled 50x and shuffled labels;
* ``nan``          one batch holds a NaN input;
* ``grad_explode`` 3 steps whose gradients are multiplied by 1000.

Arms (each sees the same data order and the same fault):

* ``none``         plain loop;
* ``clip1.0``      ``clip_grad_norm_(max_norm=1.0)`` every step;
* ``zclip``        the real ``zclip.ZClip`` (defaults: alpha 0.97, z 2.5, warm-up 25);
* ``olmo_skip``    the OLMo-core skip-step rule, re-implemented as published: skip the update when
                   loss or gradient norm is not <= mean + 6 std of the last 128 values (active
                   after 64; non-finite values always skip);
* ``spike_stop``   the real ``lightning.fabric.utilities.spike.SpikeDetection`` (window 10, rtol 2,
                   NaN is a spike): it raises, and the run ends where it stood;
* ``zetaguard``    ``guard.guarded_step()`` before the update (veto + clip advice) and
                   ``guard.monitor()`` after it, ``recovery_mode="balanced"``, the scheduler
                   attached; the loop stops when ``guard.should_stop``.

A run is *rescued* when its final held-out loss is within 1.1x of the same seed's fault-free
reference run (no guard) and its held-out accuracy within 1 point of it.

The second table measures snapshot overhead: the time of one snapshot capture divided by the
time of ``snapshot_interval`` training steps (what it costs per step at the default interval),
and an end-to-end ratio of guarded step time with and without recovery snapshots.

Run: ``python benchmarks/recovery/bench_recovery.py [--seeds 4] [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from zetaguard import ZetaGuard

logging.getLogger("zetaguard").setLevel(logging.CRITICAL)
torch.set_num_threads(1)

SCENARIOS = ("lr_jump", "lr_ramp", "corrupt", "nan", "grad_explode")
ARMS = ("none", "clip1.0", "zclip", "olmo_skip", "spike_stop", "zetaguard")
BATCH = 64
INTERVAL = 10
TRAIN = 1200


@dataclass(frozen=True)
class Model:
    name: str
    steps: int
    fault_at: int
    build: Callable[[], nn.Module]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class RowTransformer(nn.Module):
    """The 8x8 image as 8 tokens of 8 pixels; one pre-norm self-attention block with an MLP;
    mean-pooled classifier. Written out (not nn.TransformerEncoderLayer) to keep CPU steps short."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.d = d
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(0.02 * torch.randn(8, d))
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.d), dim=-1)
        h = h + self.proj(attn @ v)
        h = h + self.ff(self.norm2(h))
        return self.head(h.mean(1))


MODELS = (
    Model(
        "mlp-sgd",
        300,
        150,
        lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    ),
    Model(
        "transformer-adamw",
        240,
        120,
        RowTransformer,
        lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.01),
    ),
)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 0.1)
    return x, torch.tensor(d.target, dtype=torch.long)


X, Y = digits()
X_TEST, Y_TEST = X[TRAIN:], Y[TRAIN:]


# ---- peers -----------------------------------------------------------------------------------


class OlmoSkip:
    """OLMo-core's skip-step rule: window 128, active after 64 values, threshold mean + 6 std."""

    def __init__(self, window: int = 128, min_values: int = 64, sigmas: float = 6.0) -> None:
        self.window, self.min_values, self.sigmas = window, min_values, sigmas
        self.losses: list[float] = []
        self.norms: list[float] = []

    def _ok(self, value: float, history: list[float]) -> bool:
        if not math.isfinite(value):
            return False
        if len(history) < self.min_values:
            return True
        t = torch.tensor(history)
        return value <= float(t.mean() + self.sigmas * t.std())

    def allow(self, loss: float, grad_norm: float) -> bool:
        ok = self._ok(loss, self.losses) and self._ok(grad_norm, self.norms)
        for value, history in ((loss, self.losses), (grad_norm, self.norms)):
            if math.isfinite(value):
                history.append(value)
                del history[: -self.window]
        return ok


def _spike_detector(tmp: str) -> tuple[object, object]:
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.spike import SpikeDetection

    fabric = Fabric(accelerator="cpu", devices=1)
    return fabric, SpikeDetection(exclude_batches_path=f"{tmp}/skip_batches.json")


# ---- one run ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    loss: float
    accuracy: float
    stopped: bool
    recoveries: int
    skips: int


def _schedule(spec: Model, scenario: str) -> Callable[[int], float]:
    """The LR fault as a schedule (every arm, reference included, runs a LambdaLR): a scheduler
    rewrites param_groups each step, so this is where a wrong LR really comes from."""

    def factor(t: int) -> float:
        if scenario == "lr_jump" and t >= spec.fault_at:
            return 100.0
        if scenario == "lr_ramp" and t >= spec.fault_at:
            return min(100.0, 1.15 ** (t - spec.fault_at + 1))
        return 1.0

    return factor


def run(spec: Model, scenario: str, seed: int, arm: str) -> Outcome:
    torch.manual_seed(seed)
    model = spec.build()
    opt = spec.optimizer(list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(spec, scenario))
    gen = torch.Generator().manual_seed(1000 + seed)  # the data order: the same in every arm
    corrupt_gen = torch.Generator().manual_seed(2000 + seed)
    params = list(model.parameters())
    guard: ZetaGuard | None = None
    zc = olmo = fabric = spike = None
    tmp = tempfile.TemporaryDirectory()
    if arm == "zetaguard":
        guard = ZetaGuard(recovery_mode="balanced", snapshot_interval=INTERVAL,
                          mode=GUARD_MODE).attach(
            model, opt, sched
        )
    elif arm == "zclip":
        from zclip import ZClip

        zc = ZClip()
    elif arm == "olmo_skip":
        olmo = OlmoSkip()
    elif arm == "spike_stop":
        fabric, spike = _spike_detector(tmp.name)
    stopped = False
    skips = 0
    f = spec.fault_at
    for t in range(spec.steps):
        idx = torch.randint(0, TRAIN, (BATCH,), generator=gen)
        x, y = X[idx], Y[idx]
        if scenario == "corrupt" and f <= t < f + 5:
            x = 50.0 * x[torch.randperm(BATCH, generator=corrupt_gen)]
            y = y[torch.randperm(BATCH, generator=corrupt_gen)]
        if scenario == "nan" and t == f:
            x = x.clone()
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if scenario == "grad_explode" and f <= t < f + 3:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1000.0)
        loss_value = float(loss.detach())
        if guard is not None:
            stepped = guard.guarded_step(opt, loss=loss_value)
            skips += not stepped
            guard.monitor(model, loss=loss_value, batch_index=t)
            if guard.should_stop:
                stopped = True
                break
        else:
            if arm == "clip1.0":
                nn.utils.clip_grad_norm_(params, 1.0)
            elif zc is not None:
                zc.step(model)
            if olmo is not None:
                norm = float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                if not olmo.allow(loss_value, norm):
                    skips += 1
                    sched.step()
                    continue
            opt.step()
            if spike is not None:
                try:
                    spike.on_train_batch_end(fabric, loss.detach(), None, t)  # type: ignore[attr-defined]
                except Exception as e:  # TrainingSpikeException: the run stops here
                    if type(e).__name__ != "TrainingSpikeException":
                        raise
                    stopped = True
                    break
        sched.step()
    tmp.cleanup()
    with torch.no_grad():
        out = model(X_TEST)
        test_loss = float(nn.functional.cross_entropy(out, Y_TEST))
        accuracy = float((out.argmax(1) == Y_TEST).float().mean())
    return Outcome(
        test_loss,
        accuracy,
        stopped,
        len(guard.recovery_reports) if guard is not None else 0,
        skips,
    )


def rescued(outcome: Outcome, reference: Outcome) -> bool:
    return (
        math.isfinite(outcome.loss)
        and outcome.loss <= 1.1 * reference.loss
        and outcome.accuracy >= reference.accuracy - 0.01
    )


# ---- snapshot overhead -----------------------------------------------------------------------


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> float:
    idx = torch.randint(0, TRAIN, (BATCH,), generator=gen)
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _guarded_loop(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                  auto_recover: bool, steps: int) -> float:
    guard = ZetaGuard(auto_recover=auto_recover).attach(model, opt)
    t0 = time.perf_counter()
    for _ in range(steps):
        guard.monitor(model, loss=_train_step(model, opt, gen))
    return time.perf_counter() - t0


def snapshot_overhead(repeats: int = 100) -> list[tuple[str, int, float, float, float]]:
    """Per model: parameters, step ms, capture time / (interval x step time), and the
    end-to-end time ratio of a guarded loop with snapshots on / off."""
    rows = []
    wide = Model(
        "mlp-1M-adam",
        0,
        0,
        lambda: nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10)),
        lambda p: torch.optim.Adam(p, lr=1e-3),
    )
    for spec in (*MODELS, wide):
        torch.manual_seed(0)
        model = spec.build()
        opt = spec.optimizer(list(model.parameters()))
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            _train_step(model, opt, gen)
        guard = ZetaGuard().attach(model, opt)
        interval = guard.recovery.keeper.interval
        backend = guard.recovery.backend
        assert backend is not None
        step_times, capture_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _train_step(model, opt, gen)
            step_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            backend.capture(0)
            capture_times.append(time.perf_counter() - t0)
        amortised = statistics.median(capture_times) / (interval * statistics.median(step_times))
        # Interleaved blocks, best of three each, so load changes hit both sides alike.
        on, off = [], []
        for _ in range(3):
            off.append(_guarded_loop(model, opt, gen, False, 4 * interval))
            on.append(_guarded_loop(model, opt, gen, True, 4 * interval))
        params = sum(p.numel() for p in model.parameters())
        rows.append((spec.name, params, statistics.median(step_times) * 1e3, amortised,
                     min(on) / min(off)))
    return rows


# The zetaguard arm's engine mode (--mode): "auto" is the default, tiered monitoring.
GUARD_MODE = "auto"


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, for a smoke run")
    ap.add_argument("--mode", choices=("auto", "exact", "sketch"), default="auto",
                    help="the zetaguard arm's engine mode (default auto: tiered monitoring)")
    args = ap.parse_args(argv)
    global GUARD_MODE
    GUARD_MODE = args.mode
    print(f"zetaguard arm: ZetaGuard(mode={args.mode!r})")
    seeds = 1 if args.quick else args.seeds
    started = time.perf_counter()
    wins: dict[str, int] = dict.fromkeys(ARMS, 0)
    per_scenario: dict[tuple[str, str], int] = {}
    stops: dict[str, int] = dict.fromkeys(ARMS, 0)
    total = 0
    details: list[str] = []
    for spec in MODELS:
        for seed in range(seeds):
            ref = run(spec, "stable", seed, "none")
            for scenario in SCENARIOS:
                total += 1
                for arm in ARMS:
                    out = run(spec, scenario, seed, arm)
                    ok = rescued(out, ref)
                    wins[arm] += ok
                    stops[arm] += out.stopped
                    per_scenario[(scenario, arm)] = per_scenario.get((scenario, arm), 0) + ok
                    if arm == "zetaguard" and not ok:
                        details.append(
                            f"  not rescued: {spec.name} {scenario} seed {seed}: loss "
                            f"{out.loss:.3f} vs ref {ref.loss:.3f}, acc {out.accuracy:.3f} vs "
                            f"{ref.accuracy:.3f}, recoveries {out.recoveries}, skips {out.skips}, "
                            f"stopped {out.stopped}"
                        )
    elapsed = time.perf_counter() - started
    n_per = total // len(SCENARIOS)
    print(f"Recovery benchmark: {len(MODELS)} models x {len(SCENARIOS)} faults x {seeds} seeds "
          f"= {total} unstable runs per arm ({elapsed:.0f} s)")
    print("rescued = final held-out loss <= 1.1x the same seed's fault-free run, accuracy within 1 point\n")
    head = f"{'fault':<14}" + "".join(f"{a:>12}" for a in ARMS)
    print(head)
    print("-" * len(head))
    for scenario in SCENARIOS:
        print(f"{scenario:<14}" + "".join(
            f"{per_scenario[(scenario, a)]:>7}/{n_per:<4}" for a in ARMS))
    print("-" * len(head))
    print(f"{'rescued':<14}" + "".join(f"{100.0 * wins[a] / total:>11.0f}%" for a in ARMS))
    print(f"{'stopped':<14}" + "".join(f"{stops[a]:>12}" for a in ARMS))
    if details:
        print("\n".join(details))
    print("\nSnapshot overhead at the default interval (10 STABLE steps)")
    print(f"{'model':<20}{'params':>10}{'step ms':>10}{'capture/10 steps':>18}{'guarded on/off':>16}")
    for name, params, step_ms, amortised, ratio in snapshot_overhead():
        print(f"{name:<20}{params:>10}{step_ms:>10.2f}{100 * amortised:>17.2f}%{ratio:>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
