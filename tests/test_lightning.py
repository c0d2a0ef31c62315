"""ZetaCallback in a real Lightning Trainer (CPU): healthy run, forced blow-up, resume."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import zetaguard.integrations.pytorch_lightning as lightning_cb
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset
from zetaguard.integrations.pytorch_lightning import ZetaCallback

from tests.support.grad_reads import count_grad_reads
from tests.support.torch_helpers import one_torch_thread  # noqa: F401  (autouse fixture)


def _loader() -> DataLoader:
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(ds, batch_size=64, shuffle=False, drop_last=True)  # 28 steps an epoch


class Net(pl.LightningModule):
    def __init__(self, blow_up_at: int | None = None, lr: float = 2e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        self.blow_up_at = blow_up_at
        self.lr_blown: float | None = None

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        if self.global_step == self.blow_up_at:
            for g in self.trainer.optimizers[0].param_groups:
                g["lr"] *= 1000.0
                self.lr_blown = g["lr"]

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(tmp: Path, steps: int, callbacks: list, **kw: object) -> pl.Trainer:  # type: ignore[type-arg]
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
        **kw,  # type: ignore[arg-type]
    )


def test_healthy_run_logs_metrics_and_raises_no_critical(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = ZetaCallback(warmup_steps=15)
    model = Net()
    trainer = _trainer(tmp_path, 50, [cb], enable_checkpointing=False)
    trainer.fit(model, _loader())
    stats = cb.guard.get_statistics()
    assert stats["steps"] == 50
    assert stats["status_counts"]["CRITICAL"] == 0
    assert cb.guard.optimizer is trainer.optimizers[0]  # recovery acts on the Trainer's
    assert "zetaguard/zeta" in trainer.logged_metrics
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["zetaguard/zeta"]) for r in rows if r.get("zetaguard/zeta")]
    assert len(logged) == 50
    assert logged[-1] == pytest.approx(cb.last_result.zeta_value)  # type: ignore[union-attr]
    grad_norm = cb.last_result.channels["grad_norm"]  # type: ignore[union-attr]
    assert grad_norm > 0


def test_blow_up_is_caught_and_handled(tmp_path: Path) -> None:
    pl.seed_everything(0)
    cb = ZetaCallback(warmup_steps=15)
    model = Net(blow_up_at=40)
    trainer = _trainer(tmp_path, 70, [cb], enable_checkpointing=False)
    trainer.fit(model, _loader())
    counts = cb.guard.get_statistics()["status_counts"]
    assert counts["CRITICAL"] >= 1
    assert cb.guard.recovery_triggered
    lr_now = trainer.optimizers[0].param_groups[0]["lr"]
    assert model.lr_blown is not None
    assert lr_now < model.lr_blown  # the cut reached the Trainer's optimizer ...
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs[0] < 0.05  # ... and its scheduler, so it lasts
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert trainer.should_stop == cb.guard.should_stop


@pytest.mark.parametrize("auto_recover", [False, True])
def test_a_run_unstable_from_its_first_update_is_critical_at_once(
    tmp_path: Path, auto_recover: bool
) -> None:
    """Adam at LR 3.0 blows the weights up in its first update. The callback takes its
    reference in on_fit_start, before that update, so the very first step is CRITICAL."""
    pl.seed_everything(0)
    cb = _Recorder(warmup_steps=15, auto_recover=auto_recover)
    model = Net(lr=3.0)
    trainer = _trainer(tmp_path, 20, [cb], enable_checkpointing=False)
    trainer.fit(model, _loader())
    statuses = [r.status for r in cb.results]
    assert statuses[0] == "CRITICAL"
    if auto_recover:
        first = cb.guard.recovery_reports[0]
        assert first.step == 0
        assert first.restored_step == -1  # the state from before the first update
        assert trainer.optimizers[0].param_groups[0]["lr"] < 3.0
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    else:
        assert statuses.count("CRITICAL") >= 15


class _Recorder(ZetaCallback):
    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.results: list = []  # type: ignore[type-arg]

    def on_train_batch_end(self, *args: object, **kw: object) -> None:
        super().on_train_batch_end(*args, **kw)  # type: ignore[arg-type]
        self.results.append(self.last_result)


@pytest.mark.parametrize("mode", ["exact", "auto"])
def test_resumed_trainer_resumes_the_guard(tmp_path: Path, mode: str) -> None:
    # Both the exact engine's ring and the tiered default's sampled ring (with its full-pass
    # schedule) travel in the checkpoint: the resumed guard has a JAR at once.
    def run(steps: int, ckpt: str | None = None) -> _Recorder:
        pl.seed_everything(0)
        cb = _Recorder(warmup_steps=10, auto_recover=False, mode=mode)
        saver = ModelCheckpoint(dirpath=tmp_path / f"ckpt{steps}", save_last=True)
        trainer = _trainer(tmp_path, steps, [cb, saver])
        trainer.fit(Net(), _loader(), ckpt_path=ckpt)
        return cb

    first = run(28)  # one whole epoch
    last = str(tmp_path / "ckpt28" / "last.ckpt")
    resumed = run(36, ckpt=last)
    assert [r.step for r in resumed.results] == list(range(28, 36))
    assert resumed.guard.get_statistics()["steps"] == 36  # counters carried over
    assert not resumed.guard.get_statistics()["in_warmup"]  # no second warm-up
    assert resumed.results[0].raw_jar is not None  # the ring came back: JAR at once

    # The checkpoint loads with torch's safe loader, and the guard it holds continues exactly
    # as the guard that wrote it would.
    ckpt = torch.load(last, weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("_Recorder"))
    restored = ZetaCallback(mode=mode)
    restored.load_state_dict(state)
    net = Net()
    net.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a, b = first.guard.monitor(net), restored.guard.monitor(net)
    assert b.step == a.step == 28
    assert b.raw_jar == a.raw_jar
    assert b.zeta_value == a.zeta_value


class _NormNet(Net):
    """Records the gradient norm in its own on_before_optimizer_step, which Lightning calls
    after the callbacks' and before it clips: the reference the guard's value is checked on."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.norms: list[float] = []

    def on_before_optimizer_step(self, optimizer: object) -> None:
        grads = [p.grad.reshape(-1) for p in self.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.cat(grads).double())))


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts full gradient-norm reads (the callback's and the backend's) and the snapshot's
    deferred gradient read, through the project's own functions."""
    return count_grad_reads(monkeypatch, lightning_cb)


@pytest.mark.parametrize(
    ("kw", "trainer_kw", "full_reads", "sample_reads"),
    [
        ({}, {}, 1, 0),  # the veto reads the exact norm; monitor() takes it
        ({"skip_bad_steps": False}, {}, 0, 1),  # nothing else needs it: the sample's estimate
        ({"skip_bad_steps": False}, {"gradient_clip_val": 0.05}, 1, 0),  # before the clip
        ({"skip_bad_steps": False, "exact_grad_norm": True}, {}, 1, 0),
    ],
)
def test_the_gradients_are_read_once_a_step(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kw: dict[str, object],
    trainer_kw: dict[str, object],
    full_reads: int,
    sample_reads: int,
) -> None:
    reads = _count_reads(monkeypatch)
    pl.seed_everything(0)
    # sample_fraction=1: the cheap tier's estimate is the exact norm, so every arm is checked
    # against the same reference; no scheduled full pass in 20 steps.
    cb = _Recorder(warmup_steps=10, sample_fraction=1.0, full_pass_interval=1000, **kw)
    model = _NormNet()
    trainer = _trainer(tmp_path, 20, [cb], enable_checkpointing=False, **trainer_kw)
    trainer.fit(model, _loader())
    assert reads["grad_norm"] == 20 * full_reads
    # The snapshot reads the gradients in a step that estimates the norm, and in one with a
    # full pass (a DRIFT escalates; it reads them for non-finite values), never twice.
    full_passes = cb.guard.get_statistics()["tiered"]["full_passes"]
    assert reads["read_grads"] == (20 if sample_reads else full_passes)
    seen = [r.channels["grad_norm"] for r in cb.results]
    # The norm of the gradients before Lightning's clip (here 0.05 changes every step).
    assert seen == pytest.approx(model.norms, rel=1e-6)
    if "gradient_clip_val" in trainer_kw:
        assert min(model.norms) > 0.05


def test_unstable_from_its_first_update_without_the_veto(tmp_path: Path) -> None:
    """No veto, no clipping: the guard estimates the gradient norm from its sample (default
    fraction), and a run unstable from its first update is still CRITICAL at once."""
    pl.seed_everything(0)
    cb = _Recorder(warmup_steps=15, auto_recover=False, skip_bad_steps=False)
    trainer = _trainer(tmp_path, 20, [cb], enable_checkpointing=False)
    trainer.fit(Net(lr=3.0), _loader())
    statuses = [r.status for r in cb.results]
    assert statuses[0] == "CRITICAL"
    assert statuses.count("CRITICAL") >= 15
