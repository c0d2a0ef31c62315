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


def _train(
    tmp: Path,
    steps: int,
    callbacks: list,
    seed: int = 0,  # type: ignore[type-arg]
    installed: ZetaGuardCallback | None = None,
    max_grad_norm: float = 1.0,
    learning_rate: float = 3e-3,
) -> Trainer:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=str(tmp),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        dataloader_num_workers=0,
        max_grad_norm=max_grad_norm,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=args, train_dataset=_Tokens(), callbacks=callbacks
    )
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
def test_the_callback_sees_the_gradient_norm_before_clipping(tmp_path: Path, install: bool) -> None:
    """The Trainer clips before on_pre_optimizer_step, so a norm read there is capped at
    max_grad_norm. Installed, the callback records the Trainer's own pre-clip norm; passed in
    `callbacks=`, its gradient hooks take the norm before the clip. The Trainer logs its own
    pre-clip norm: the guard's must agree with it either way."""
    cb = ZetaGuardCallback(warmup_steps=10)
    clip = 1e-3  # far below this model's gradient norms: every step is clipped
    trainer = _train(
        tmp_path, 20, [] if install else [cb], installed=cb if install else None, max_grad_norm=clip
    )
    logged = [h for h in trainer.state.log_history if "grad_norm" in h and "loss" in h]
    assert len(logged) == 4
    for entry in logged:
        assert entry["grad_norm"] > 10 * clip
        assert entry["zetaguard/grad_norm"] == pytest.approx(entry["grad_norm"], rel=1e-5)


class _Recorder(ZetaGuardCallback):
    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.results: list = []  # type: ignore[type-arg]

    def on_step_end(self, *args, **kw):  # type: ignore[no-untyped-def]
        out = super().on_step_end(*args, **kw)
        self.results.append(self.last_result)
        return out


def test_the_callback_sees_the_per_step_loss_without_install(tmp_path: Path) -> None:
    """The Trainer logs the mean training loss over each logging window (5 steps here): the
    per-step losses the callback read from the model's outputs average to it."""
    cb = _Recorder(warmup_steps=10)
    trainer = _train(tmp_path, 20, [cb])
    losses = {r.step: r.channels["loss"] for r in cb.results}
    assert sorted(losses) == list(range(1, 21))
    logged = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    assert len(logged) == 4
    for entry in logged:
        window = [losses[s] for s in range(entry["step"] - 4, entry["step"] + 1)]
        assert sum(window) / 5 == pytest.approx(entry["loss"], abs=2e-3)


@pytest.mark.parametrize("auto_recover", [False, True])
def test_a_run_unstable_from_its_first_update_is_critical_at_once(
    tmp_path: Path, auto_recover: bool
) -> None:
    """LR 1.0 on this GPT-2 blows the weights up ~13x in its first AdamW update. With the
    reference taken before that update and the loss seen, the first step is CRITICAL (the
    callback used to report only DRIFT on such a run: its reference was the blown-up state)."""
    cb = _Recorder(warmup_steps=15, auto_recover=auto_recover)
    _train(tmp_path, 12, [cb], learning_rate=1.0)
    statuses = [r.status for r in cb.results]
    assert "CRITICAL" in statuses[:3]
    if auto_recover:
        first = cb.guard.recovery_reports[0]
        assert first.step <= 3
        assert first.restored_step == -1  # back to the state before the first update
        assert first.lr_after is not None
        assert first.lr_before is not None
        assert first.lr_after < first.lr_before
    else:
        assert statuses.count("CRITICAL") >= 10
