"""Detectors replayed on a recorded trace: zetaguard and its peers.

Each detector returns one alarm level per step: 0 none, 1 DRIFT, 2 CRITICAL. Peers with a
single alarm report it as 2. Real packages are used where they install (ZClip, Lightning's
SpikeDetection); the other rules are implemented from their published descriptions in
``shared/anchors.md`` (sources cited in each docstring).
"""

from __future__ import annotations

import math
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scenarios import Trace
from zetaguard.detector import Detector

LEVEL = {"STABLE": 0, "DRIFT": 1, "CRITICAL": 2}


def zetaguard_levels(trace: Trace, calibration: str = "auto", **kwargs: Any) -> np.ndarray:
    """Replays zetaguard's detector on the engine sums the live guard recorded."""
    det = Detector(
        drift_threshold=kwargs.get("drift_threshold", 0.707),
        snap_threshold=kwargs.get("snap_threshold", 1.414),
        alpha=0.3,
        warmup_steps=50,
        calibration=calibration,  # type: ignore[arg-type]
    )
    out = np.zeros(trace.steps, dtype=np.int8)
    for t in range(trace.steps):
        obs = det.observe(
            trace.rows[t],
            int(trace.history[t]),
            loss=float(trace.loss[t]),
            grad_norm=float(trace.grad_norm[t]),
        )
        out[t] = LEVEL[obs.status]
    return out


def zclip_levels(trace: Trace) -> np.ndarray:
    """The real ``zclip.ZClip`` (z-score mode, alpha 0.97, z_thresh 2.5, warm-up 25). It is fed
    the recorded gradient norm through a one-element parameter whose gradient has that norm;
    an alarm is a step where it clipped."""
    from zclip import ZClip

    clip = ZClip(max_grad_norm=None)
    holder = torch.nn.Linear(1, 1, bias=False)
    out = np.zeros(trace.steps, dtype=np.int8)
    for t, g in enumerate(trace.grad_norm):
        holder.weight.grad = torch.full((1, 1), float(g))
        clip.step(holder)
        after = float(holder.weight.grad.abs().item())
        if math.isfinite(g) and after < abs(g) * (1 - 1e-6):
            out[t] = 2
    return out


class _Strategy:
    root_device = torch.device("cpu")

    def barrier(self) -> None:
        pass

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision


class _Trainer:
    """The few attributes ``SpikeDetection.on_train_batch_end`` reads from a trainer."""

    def __init__(self, root: str) -> None:
        self.default_root_dir = root
        self.strategy = _Strategy()
        self.global_rank = 0


def lightning_levels(trace: Trace) -> np.ndarray:
    """Lightning's real ``SpikeDetection`` callback (window 10, warm-up 1, rtol 2.0), driven
    with the recorded losses; each ``TrainingSpikeException`` it raises is an alarm (the run
    continues, as after a resume that skips the batch)."""
    from lightning.fabric.utilities.spike import TrainingSpikeException
    from lightning.pytorch.callbacks import SpikeDetection

    out = np.zeros(trace.steps, dtype=np.int8)
    with tempfile.TemporaryDirectory() as root:
        cb = SpikeDetection()
        trainer = _Trainer(root)
        for t, loss in enumerate(trace.loss):
            try:
                cb.on_train_batch_end(trainer, None, torch.tensor(float(loss)), None, t)  # type: ignore[arg-type]
            except TrainingSpikeException:
                out[t] = 2
    return out


def olmo_levels(trace: Trace) -> np.ndarray:
    """OLMo-core skip-step rule: a value > mean + 6 std over the last 128 values, active after
    64 values, on the loss or the gradient norm (non-finite values also skip)."""
    out = np.zeros(trace.steps, dtype=np.int8)
    for series in (trace.loss, trace.grad_norm):
        window: deque[float] = deque(maxlen=128)
        for t, v in enumerate(series):
            if not math.isfinite(v):
                out[t] = 2
                continue
            if len(window) >= 64:
                arr = np.asarray(window)
                if v > arr.mean() + 6.0 * arr.std():
                    out[t] = 2
            window.append(float(v))
    return out


def kill_loss_spike_levels(trace: Trace) -> np.ndarray:
    """llm-foundry ``KillLossSpike``: a loss >= 2x the window mean is an outlier; more than 4
    consecutive outliers fire. Window max(100, 5% of the run) -> 100 here."""
    out = np.zeros(trace.steps, dtype=np.int8)
    window: deque[float] = deque(maxlen=100)
    streak = 0
    for t, v in enumerate(trace.loss):
        outlier = not math.isfinite(v) or (len(window) > 0 and v >= 2.0 * float(np.mean(window)))
        streak = streak + 1 if outlier else 0
        if streak > 4:
            out[t] = 2
        if math.isfinite(v) and not outlier:
            window.append(float(v))
    return out


def megatron_levels(trace: Trace) -> np.ndarray:
    """Megatron-LM spiky-loss check: loss >= 10x the max of the first 100 losses; NaN/Inf."""
    out = np.zeros(trace.steps, dtype=np.int8)
    first: list[float] = []
    for t, v in enumerate(trace.loss):
        if not math.isfinite(v):
            out[t] = 2
            continue
        if len(first) >= 100 and v >= 10.0 * max(first):
            out[t] = 2
        if len(first) < 100:
            first.append(float(v))
    return out


def fixed_grad_levels(trace: Trace, threshold: float = 10.0) -> np.ndarray:
    """A fixed gradient-norm alarm (10x the usual clip_grad_norm_ max_norm of 1.0)."""
    g = trace.grad_norm
    return np.where(~np.isfinite(g) | (g > threshold), 2, 0).astype(np.int8)


def nan_levels(trace: Trace) -> np.ndarray:
    """Keras-style TerminateOnNaN: the loss is NaN or Inf."""
    return np.where(~np.isfinite(trace.loss), 2, 0).astype(np.int8)


DETECTORS: dict[str, tuple[Callable[[Trace], np.ndarray], str]] = {
    "zetaguard": (zetaguard_levels, "zetaguard default (calibration='auto')"),
    "literal-jar": (lambda t: zetaguard_levels(t, "none"), "zetaguard calibration='none'"),
    "zclip": (zclip_levels, "real zclip.ZClip"),
    "lightning-spike": (lightning_levels, "real lightning SpikeDetection"),
    "olmo-skip": (olmo_levels, "OLMo skip-step rule (reimplemented)"),
    "kill-loss-spike": (kill_loss_spike_levels, "llm-foundry KillLossSpike rule (reimplemented)"),
    "megatron-10x": (megatron_levels, "Megatron 10x-max rule (reimplemented)"),
    "grad-norm>10": (fixed_grad_levels, "fixed grad-norm threshold 10"),
    "terminate-nan": (nan_levels, "Keras TerminateOnNaN rule"),
}
