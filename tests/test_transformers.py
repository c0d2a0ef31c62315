"""ZetaGuardCallback in a real Hugging Face Trainer on a tiny GPT-2 built from a config (nothing
downloaded): a healthy run raises no CRITICAL; a learning rate blown up x1000 mid-run is caught,
cut in a way the scheduler keeps, and the metrics reach the Trainer's logs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from zetaguard.integrations.transformers import ZetaGuardCallback  # noqa: E402

VOCAB = 96


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Generated sequences with structure (a repeating pattern plus noise) to learn."""

    def __init__(self, n: int = 256, length: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=gen)
        self.ids = (start + torch.arange(length) * 3) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _BlowUp(TrainerCallback):  # type: ignore[misc]
    """Multiplies the LR (and the scheduler's base LRs, so it sticks) by 1000 at one step."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.lr_blown: float | None = None

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == self.at:
            lr_scheduler.base_lrs = [b * 1000.0 for b in lr_scheduler.base_lrs]
            for g in optimizer.param_groups:
                g["lr"] *= 1000.0
            self.lr_blown = optimizer.param_groups[0]["lr"]


def _train(tmp: Path, steps: int, callbacks: list, seed: int = 0,  # type: ignore[type-arg]
           installed: ZetaGuardCallback | None = None, max_grad_norm: float = 1.0) -> Trainer:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    args = TrainingArguments(
        output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0, max_grad_norm=max_grad_norm,
    )
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=_Tokens(),
                      callbacks=callbacks)
    if installed is not None:
        installed.install(trainer)
    trainer.train()
    return trainer


def test_healthy_run_raises_no_critical_and_logs(tmp_path: Path) -> None:
    cb = ZetaGuardCallback(warmup_steps=15)
    trainer = _train(tmp_path, 45, [cb])
    stats = cb.guard.get_statistics()
    assert stats["steps"] == 45
    assert stats["status_counts"]["CRITICAL"] == 0
    assert cb.guard.optimizer is trainer.optimizer
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 9
    assert all("zetaguard/zeta" in h for h in logged)  # every log carries the guard's metrics
    assert all(h["zetaguard/grad_norm"] > 0 for h in logged)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_lr_blow_up_is_caught_and_the_cut_persists(tmp_path: Path) -> None:
    blow = _BlowUp(at=30)
    cb = ZetaGuardCallback(warmup_steps=15)
    trainer = _train(tmp_path, 50, [blow, cb])
    counts = cb.guard.get_statistics()["status_counts"]
    assert counts["CRITICAL"] >= 1
    assert cb.guard.recovery_triggered
    assert blow.lr_blown is not None
    first = cb.guard.recovery_reports[0]
    assert 30 <= first.step <= 36
    # The scheduler recomputes param_groups' LR from base_lrs each step: the cut lasts only
    # if base_lrs were scaled too.
    assert trainer.lr_scheduler.base_lrs[0] < 3e-3 * 1000.0
    assert trainer.optimizer.param_groups[0]["lr"] < blow.lr_blown
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    if cb.guard.should_stop:
        assert trainer.state.global_step < 50  # control.should_training_stop ended the run


@pytest.mark.parametrize("install", [True, False])
def test_installed_callback_sees_the_gradient_norm_before_clipping(
    tmp_path: Path, install: bool
) -> None:
    """The Trainer clips before on_pre_optimizer_step, so a norm read there is capped at
    max_grad_norm. Installed, the callback records the Trainer's own pre-clip norm, which the
    Trainer also logs: the two must agree (and a callback only passed in `callbacks=` sees the
    clipped one)."""
    cb = ZetaGuardCallback(warmup_steps=10)
    clip = 1e-3  # far below this model's gradient norms: every step is clipped
    trainer = _train(tmp_path, 20, [] if install else [cb], installed=cb if install else None,
                     max_grad_norm=clip)
    logged = [h for h in trainer.state.log_history if "grad_norm" in h and "loss" in h]
    assert len(logged) == 4
    for entry in logged:
        assert entry["grad_norm"] > 10 * clip
        if install:
            assert entry["zetaguard/grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)
        else:
            assert entry["zetaguard/grad_norm"] == pytest.approx(clip, rel=1e-3)
