"""What every recovery benchmark shares: the data, the two models, the peers, one arm's
per-step behaviour in a plain torch loop, and how a run is judged.

Judging: a run is scored on the *final model* (where training ended: the last step, or where
the arm stopped it, as a user would) on clean held-out digits, never on its training losses.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from zetaguard import ZetaGuard

MODES = ("auto", "exact", "sketch")  # the zetaguard arm's engine modes
ARMS = ("none", "clip1.0", "zclip", "olmo_skip", "spike_stop", "zetaguard")
BATCH = 64
INTERVAL = 10
TRAIN = 1200
RESCUE_RULE = (
    "rescued = final held-out loss <= 1.1x the same seed's fault-free run, accuracy within 1 point"
)


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
        out: torch.Tensor = self.head(h.mean(1))
        return out


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


def quiet() -> None:
    """For a benchmark's main (not at import: a test importing these modules keeps its own
    logging and threads): one thread per run, recovery log lines off."""
    logging.getLogger("zetaguard").setLevel(logging.CRITICAL)
    torch.set_num_threads(1)


def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next training batch of the run's data order (``gen`` is seeded per run)."""
    idx = torch.randint(0, TRAIN, (BATCH,), generator=gen)
    return X[idx], Y[idx]


# ---- peers -----------------------------------------------------------------------------------


class OlmoSkip:
    """OLMo-core's skip-step rule: window 128, active after 64 values, threshold mean + 6 std."""

    def __init__(self, window: int = 128, min_values: int = 64, sigmas: float = 6.0) -> None:
        self.window, self.min_values, self.sigmas = window, min_values, sigmas
        self.losses: list[float] = []
        self.norms: list[float] = []

    def ok(self, value: float, history: list[float]) -> bool:
        if not math.isfinite(value):
            return False
        if len(history) < self.min_values:
            return True
        t = torch.tensor(history)
        return value <= float(t.mean() + self.sigmas * t.std())

    def allow(self, loss: float, grad_norm: float) -> bool:
        ok = self.ok(loss, self.losses) and self.ok(grad_norm, self.norms)
        for value, history in ((loss, self.losses), (grad_norm, self.norms)):
            if math.isfinite(value):
                history.append(value)
                del history[: -self.window]
        return ok


def grad_norm(params: list[nn.Parameter]) -> float:
    return float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


# ---- one arm in the loop ---------------------------------------------------------------------


class Arm:
    """One arm's behaviour around ``optimizer.step()`` in a plain loop. The loop does forward
    and backward, then calls :meth:`step`; it stops when that returns False.

    Counts: ``actions`` are interventions beyond clipping (zetaguard: vetoed steps plus
    recoveries, a stop included; OLMo: skipped steps; SpikeDetection: its stop); ``clipped`` the
    steps whose gradient was clipped (clip 1.0, ZClip, the guard's own clip advice)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        scheduler: Any = None,
        mode: str = "auto",
    ) -> None:
        if name not in ARMS:
            raise ValueError(f"unknown arm {name!r}: choose one of {', '.join(ARMS)}")
        self.name, self.model, self.opt = name, model, opt
        self.params = list(model.parameters())
        self.guard: ZetaGuard | None = None
        self.zclip: Any = None
        self.olmo: OlmoSkip | None = None
        self.spike: Any = None
        self.fabric: Any = None
        self.tmp = tempfile.TemporaryDirectory()
        self.skips = self.clipped = 0
        self.stopped = False
        if name == "zetaguard":
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
            self.guard = ZetaGuard(
                recovery_mode="balanced", snapshot_interval=INTERVAL, mode=cast(Any, mode)
            ).attach(model, opt, scheduler)
            # The weights before the first update: a run unstable from its first step is told
            # apart by its parameter norm against this reference.
            self.guard.take_reference()
        elif name == "zclip":
            from zclip import ZClip

            self.zclip = ZClip()
        elif name == "olmo_skip":
            self.olmo = OlmoSkip()
        elif name == "spike_stop":
            from lightning.fabric import Fabric
            from lightning.fabric.utilities.spike import SpikeDetection

            self.fabric = Fabric(accelerator="cpu", devices=1)
            self.spike = SpikeDetection(exclude_batches_path=f"{self.tmp.name}/skip_batches.json")

    @property
    def recoveries(self) -> int:
        return len(self.guard.recovery_reports) if self.guard is not None else 0

    @property
    def actions(self) -> int:
        if self.guard is not None:
            return self.skips + self.recoveries
        return self.skips + (self.spike is not None and self.stopped)

    def step(self, loss: torch.Tensor, t: int) -> bool:
        """Everything after ``backward()``: the update (or not). False: training ends here."""
        value = float(loss.detach())
        if self.guard is not None:
            return self._guarded(value, t)
        if self.name == "clip1.0":
            self.clipped += grad_norm(self.params) > 1.0
            nn.utils.clip_grad_norm_(self.params, 1.0)
        elif self.zclip is not None:
            before = grad_norm(self.params)
            self.zclip.step(self.model)
            self.clipped += grad_norm(self.params) < before * (1 - 1e-6)
        if self.olmo is not None and not self.olmo.allow(value, grad_norm(self.params)):
            self.skips += 1
            return True
        self.opt.step()
        if self.spike is not None:
            try:
                self.spike.on_train_batch_end(self.fabric, loss.detach(), None, t)
            except Exception as e:  # TrainingSpikeException: the run stops here
                if type(e).__name__ != "TrainingSpikeException":
                    raise
                self.stopped = True
                return False
        return True

    def _guarded(self, value: float, t: int) -> bool:
        guard = self.guard
        assert guard is not None
        limit = guard.recommended_clip_value()
        norm = grad_norm(self.params)
        stepped = guard.guarded_step(self.opt, loss=value, batch_index=t)
        self.skips += not stepped
        self.clipped += stepped and limit is not None and norm > limit
        guard.monitor(self.model, loss=value, batch_index=t)
        if guard.should_stop:
            self.stopped = True
            return False
        return True

    def close(self) -> None:
        self.tmp.cleanup()


# ---- judging ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    loss: float
    accuracy: float
    stopped: bool
    recoveries: int
    skips: int
    actions: int = 0
    clipped: int = 0
    steps: int = 0  # loop steps run before training ended
    initial_loss: float = math.nan  # held-out loss of the untrained model


def evaluate(model: nn.Module) -> tuple[float, float]:
    """Held-out loss and accuracy of the model as it is now (clean data, never trained on)."""
    with torch.no_grad():
        out = model(X_TEST)
        loss = float(nn.functional.cross_entropy(out, Y_TEST))
        accuracy = float((out.argmax(1) == Y_TEST).float().mean())
    return loss, accuracy


def outcome(arm: Arm, steps: int, initial_loss: float = math.nan) -> Outcome:
    loss, accuracy = evaluate(arm.model)
    arm.close()
    return Outcome(
        loss,
        accuracy,
        arm.stopped,
        arm.recoveries,
        arm.skips,
        arm.actions,
        arm.clipped,
        steps,
        initial_loss,
    )


def rescued(outcome: Outcome, reference: Outcome) -> bool:
    return (
        math.isfinite(outcome.loss)
        and outcome.loss <= 1.1 * reference.loss
        and outcome.accuracy >= reference.accuracy - 0.01
    )
