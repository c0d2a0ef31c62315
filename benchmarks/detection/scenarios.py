"""Scenario families: real, tiny CPU trainings whose trajectory is recorded once.

Every run is a plain PyTorch loop. After ``optimizer.step()`` the loop calls
``guard.monitor(model, loss=loss.item())`` on a live :class:`zetaguard.ZetaGuard` (gradients
are read automatically), and records what every detector needs: the loss, the gradient norm,
the engine's per-group sums and the live guard's status. Detectors are then replayed on the
identical recorded stream, so they all see the same run.

Step ``t`` of a trace holds ``loss[t]`` (the loss of the batch at the parameters before the
update), ``grad_norm[t]`` (its gradient norm) and the parameters after the update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from zetaguard import ZetaGuard

# The engine mode the live guard records with (run_suite.py --mode): "auto" is the default,
# tiered monitoring; "exact" reads every element every step.
GUARD_MODE = "auto"

logging.getLogger("zetaguard").setLevel(logging.ERROR)

STABLE_STEPS = 400
UNSTABLE_STEPS = 360
# After the loss turns non-finite the run is kept this many steps more, then stopped.
STEPS_AFTER_NONFINITE = 3


@dataclass
class Trace:
    family: str
    seed: int
    stable: bool
    event_step: int | None
    loss: np.ndarray
    grad_norm: np.ndarray
    rows: list[np.ndarray]  # per step: groups x (x2, v2, a2, j2, nonfinite)
    history: np.ndarray
    live_status: list[str]
    live_zeta: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.loss)


# ---- data ---------------------------------------------------------------------------------

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data / 16.0, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        _DIGITS = (x, torch.tensor(d.target, dtype=torch.long))
    return _DIGITS


_WORDS = [
    "the",
    "a",
    "one",
    "every",
    "some",
    "model",
    "guard",
    "step",
    "loss",
    "weight",
    "layer",
    "signal",
    "runs",
    "drifts",
    "holds",
    "learns",
    "falls",
    "rises",
    "slowly",
    "quickly",
    "under",
    "over",
    "near",
    "far",
    "small",
    "large",
    "stable",
    "noisy",
]


def char_corpus(chars: int = 40_000, seed: int = 7) -> tuple[torch.Tensor, int]:
    """Text from a tiny template grammar: deterministic, no files, no downloads."""
    rng = np.random.default_rng(seed)
    parts: list[str] = []
    size = 0
    while size < chars:
        n = int(rng.integers(4, 9))
        sentence = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), n)) + ". "
        parts.append(sentence)
        size += len(sentence)
    text = "".join(parts)[:chars]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(vocab)


def batches(n: int, size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield torch.randint(0, n, (size,), generator=gen)


# ---- models -------------------------------------------------------------------------------


def mlp(hidden: int = 64, depth: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(64, hidden), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), act()]
    layers.append(nn.Linear(hidden, 10))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.flatten(1))


class RowGRU(nn.Module):
    """Reads an 8x8 digit one row per time step."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.view(-1, 8, 8))
        return self.head(out[:, -1])


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = 32, layers: int = 2, context: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx) + self.pos[: idx.shape[1]]
        return self.out(self.blocks(h, mask=self.mask, is_causal=True))


# ---- one recorded run ---------------------------------------------------------------------

# A step function: given the step number, do forward/backward/step and return the loss.
StepFn = Callable[[int], torch.Tensor]


def record(
    family: str,
    seed: int,
    stable: bool,
    event_step: int | None,
    steps: int,
    module: nn.Module,
    step_fn: StepFn,
    meta: dict[str, Any] | None = None,
) -> Trace:
    guard = ZetaGuard(auto_recover=False, threads=1, mode=GUARD_MODE)  # type: ignore[arg-type]
    loss_log: list[float] = []
    grad_log: list[float] = []
    rows: list[np.ndarray] = []
    history: list[int] = []
    status: list[str] = []
    zeta: list[float] = []
    nonfinite_since: int | None = None
    for t in range(steps):
        loss = step_fn(t)
        value = float(loss.item())
        r = guard.monitor(module, loss=value)
        assert r.group_rows is not None
        loss_log.append(value)
        grad_log.append(r.channels.get("grad_norm", math.nan))
        rows.append(np.array(r.group_rows, dtype=np.float64))
        history.append(r.history)
        status.append(r.status)
        zeta.append(r.zeta_value)
        if not math.isfinite(value) and nonfinite_since is None:
            nonfinite_since = t
        if nonfinite_since is not None and t - nonfinite_since >= STEPS_AFTER_NONFINITE:
            break
    return Trace(
        family=family,
        seed=seed,
        stable=stable,
        event_step=event_step,
        loss=np.asarray(loss_log),
        grad_norm=np.asarray(grad_log),
        rows=rows,
        history=np.asarray(history),
        live_status=status,
        live_zeta=np.asarray(zeta),
        meta=meta or {},
    )


def _classifier_run(
    family: str,
    seed: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    *,
    stable: bool,
    event_step: int | None = None,
    lr_at: Callable[[int], float] | None = None,
    corrupt: Callable[[int], bool] | None = None,
    inject: Callable[[int, nn.Module], None] | None = None,
    batch: int = 32,
    meta: dict[str, Any] | None = None,
) -> Trace:
    x, y = digits()
    gen = torch.Generator().manual_seed(1000 + seed)
    draw = batches(len(x), batch, gen)
    loss_fn = nn.CrossEntropyLoss()
    base_lrs = [g["lr"] for g in opt.param_groups]

    def step(t: int) -> torch.Tensor:
        if lr_at is not None:
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * lr_at(t)
        idx = next(draw)
        xb, yb = x[idx], y[idx]
        if corrupt is not None and corrupt(t):
            xb = xb * 300.0
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if inject is not None:
            inject(t, model)
        opt.step()
        return loss.detach()

    return record(family, seed, stable, event_step, steps, model, step, meta)


def _event(seed: int, lo: int = 120, hi: int = 240) -> int:
    return int(np.random.default_rng(seed + 99).integers(lo, hi))


# ---- stable families ----------------------------------------------------------------------


def mlp_adam(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    return _classifier_run(
        "mlp-adam",
        seed,
        model,
        torch.optim.Adam(model.parameters(), 1e-3),
        STABLE_STEPS,
        stable=True,
    )


def mlp_sgd(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    return _classifier_run("mlp-sgd", seed, model, opt, STABLE_STEPS, stable=True)


def cnn_adam(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    return _classifier_run("cnn-adam", seed, model, opt, STABLE_STEPS, stable=True)


def gru_adam(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = RowGRU()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    return _classifier_run("gru-adam", seed, model, opt, STABLE_STEPS, stable=True)


def _transformer_run(
    family: str,
    seed: int,
    steps: int,
    *,
    stable: bool,
    lr: float,
    warmup: int,
    eps: float = 1e-8,
    event_step: int | None = None,
    lr_jump: float = 1.0,
    meta: dict[str, Any] | None = None,
) -> Trace:
    torch.manual_seed(seed)
    data, vocab = char_corpus()
    context, batch = 24, 8
    model = CharTransformer(vocab, context=context)
    opt = torch.optim.AdamW(model.parameters(), lr, eps=eps, weight_decay=0.01)
    gen = torch.Generator().manual_seed(2000 + seed)
    loss_fn = nn.CrossEntropyLoss()

    def step(t: int) -> torch.Tensor:
        # linear warm-up, then cosine decay to 10% (the usual LM schedule)
        if t < warmup:
            scale = (t + 1) / warmup
        else:
            scale = 0.1 + 0.45 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))
        if event_step is not None and t >= event_step:
            scale *= lr_jump
        for g in opt.param_groups:
            g["lr"] = lr * scale
        start = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        idx = torch.stack([data[s : s + context + 1] for s in start.tolist()])
        opt.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        loss = loss_fn(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return record(family, seed, stable, event_step, steps, model, step, meta)


def transformer_adamw(seed: int) -> Trace:
    return _transformer_run(
        "transformer-adamw", seed, STABLE_STEPS, stable=True, lr=3e-3, warmup=100
    )


# ---- unstable families --------------------------------------------------------------------


def lr_jump(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    event = _event(seed)
    factor = float(10 ** np.random.default_rng(seed).uniform(1.0, 2.0))
    return _classifier_run(
        "lr-jump",
        seed,
        model,
        opt,
        UNSTABLE_STEPS,
        stable=False,
        event_step=event,
        lr_at=lambda t: factor if t >= event else 1.0,
        meta={"factor": factor},
    )


def lr_ramp(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    event = _event(seed, 80, 160)
    rate = float(np.random.default_rng(seed).uniform(1.04, 1.08))
    return _classifier_run(
        "lr-ramp",
        seed,
        model,
        opt,
        UNSTABLE_STEPS + 60,
        stable=False,
        event_step=event,
        lr_at=lambda t: rate ** max(0, t - event),
        meta={"rate": rate},
    )


def corrupt_once(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    event = _event(seed)
    return _classifier_run(
        "corrupt-once",
        seed,
        model,
        opt,
        UNSTABLE_STEPS,
        stable=False,
        event_step=event,
        corrupt=lambda t: t == event,
    )


def corrupt_repeated(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    event = _event(seed)
    return _classifier_run(
        "corrupt-repeated",
        seed,
        model,
        opt,
        UNSTABLE_STEPS,
        stable=False,
        event_step=event,
        corrupt=lambda t: t >= event and (t - event) % 5 == 0,
    )


def exploding_tanh(seed: int) -> Trace:
    """A deep tanh net, plain SGD, no clipping; from the event step a mis-set schedule raises
    the learning rate linearly until gradients explode through the depth."""
    torch.manual_seed(seed)
    model = mlp(hidden=32, depth=10, act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), 0.05, momentum=0.5)
    event = _event(seed, 120, 200)
    slope = float(np.random.default_rng(seed).uniform(0.3, 0.6))
    return _classifier_run(
        "exploding-tanh",
        seed,
        model,
        opt,
        UNSTABLE_STEPS + 60,
        stable=False,
        event_step=event,
        lr_at=lambda t: 1.0 + slope * max(0, t - event),
        meta={"slope": slope},
    )


def adam_spikes(seed: int) -> Trace:
    """The tiny transformer without warm-up and with a tiny Adam eps; from the event step the
    learning rate is far too high."""
    event = _event(seed)
    jump = float(10 ** np.random.default_rng(seed).uniform(2.0, 2.5))
    return _transformer_run(
        "adam-spikes",
        seed,
        UNSTABLE_STEPS,
        stable=False,
        lr=1e-3,
        warmup=1,
        eps=1e-12,
        event_step=event,
        lr_jump=jump,
        meta={"jump": jump},
    )


def nan_inject(seed: int) -> Trace:
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    event = _event(seed)
    rng = np.random.default_rng(seed)
    bad = float("nan") if rng.random() < 0.5 else float("inf")

    def inject(t: int, m: nn.Module) -> None:
        if t == event:
            p = list(m.parameters())[int(rng.integers(0, 4))]
            assert p.grad is not None
            p.grad.view(-1)[0] = bad

    return _classifier_run(
        "nan-inject",
        seed,
        model,
        opt,
        UNSTABLE_STEPS,
        stable=False,
        event_step=event,
        inject=inject,
        meta={"value": str(bad)},
    )


def gan_2d(seed: int) -> Trace:
    """A 2-D GAN on a ring of 8 Gaussians; from the event step both learning rates are far too
    high and the game oscillates, then diverges."""
    torch.manual_seed(seed)
    gen_net = nn.Sequential(
        nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    disc = nn.Sequential(
        nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
    )
    both = nn.ModuleDict({"G": gen_net, "D": disc})
    opt_g = torch.optim.SGD(gen_net.parameters(), 1e-2, momentum=0.9)
    opt_d = torch.optim.SGD(disc.parameters(), 1e-2, momentum=0.9)
    event = _event(seed)
    jump = float(10 ** np.random.default_rng(seed).uniform(1.3, 2.0))
    gen = torch.Generator().manual_seed(3000 + seed)
    angles = torch.arange(8) * (2 * math.pi / 8)
    centres = torch.stack([angles.cos(), angles.sin()], 1) * 2.0
    bce = nn.BCEWithLogitsLoss()

    def step(t: int) -> torch.Tensor:
        for o in (opt_g, opt_d):
            for g in o.param_groups:
                g["lr"] = 1e-2 * (jump if t >= event else 1.0)
        real = centres[torch.randint(0, 8, (64,), generator=gen)]
        real = real + 0.05 * torch.randn(64, 2, generator=gen)
        z = torch.randn(64, 2, generator=gen)
        opt_d.zero_grad(set_to_none=True)
        fake = gen_net(z)
        d_loss = bce(disc(real), torch.ones(64, 1)) + bce(disc(fake.detach()), torch.zeros(64, 1))
        d_loss.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        g_loss = bce(disc(gen_net(z)), torch.ones(64, 1))
        g_loss.backward()
        opt_g.step()
        return (d_loss + g_loss).detach()

    return record("gan-2d", seed, False, event, UNSTABLE_STEPS, both, step, {"jump": jump})


STABLE_FAMILIES: dict[str, Callable[[int], Trace]] = {
    "mlp-adam": mlp_adam,
    "mlp-sgd": mlp_sgd,
    "cnn-adam": cnn_adam,
    "transformer-adamw": transformer_adamw,
    "gru-adam": gru_adam,
}
UNSTABLE_FAMILIES: dict[str, Callable[[int], Trace]] = {
    "lr-jump": lr_jump,
    "lr-ramp": lr_ramp,
    "corrupt-once": corrupt_once,
    "corrupt-repeated": corrupt_repeated,
    "exploding-tanh": exploding_tanh,
    "adam-spikes": adam_spikes,
    "nan-inject": nan_inject,
    "gan-2d": gan_2d,
}
# Families whose collapse builds up over many steps (lead time matters most there).
GRADUAL = ("lr-ramp", "exploding-tanh", "adam-spikes")
