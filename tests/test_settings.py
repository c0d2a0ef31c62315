"""The guard's settings live in one frozen GuardSettings: the attributes of the same names read
and assign its fields, config() is its config(), and load_state() takes the file's settings
while this process keeps its own threads, device and full-pass placement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard.settings import GuardSettings

FIELDS = [f.name for f in dataclasses.fields(GuardSettings)]


def test_attributes_are_the_settings_fields() -> None:
    guard = ZetaGuard(drift_threshold=0.5, mode="sketch", threads=2, seed=7)
    for name in FIELDS:
        assert getattr(guard, name) == getattr(guard.settings, name)
    assert guard.config() == guard.settings.config()
    assert (guard.drift_threshold, guard.mode, guard.threads, guard.seed) == (0.5, "sketch", 2, 7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        guard.settings.alpha = 0.9  # type: ignore[misc]


def test_assigning_an_attribute_replaces_that_field_only() -> None:
    guard = ZetaGuard(mode="exact")
    before = guard.settings
    guard.seed = 11
    assert guard.settings is not before
    assert guard.settings.seed == 11
    assert guard.config()["seed"] == 11
    assert dataclasses.replace(before, seed=11) == guard.settings


def test_checked_refuses_what_the_constructor_refuses() -> None:
    with pytest.raises(TypeError, match="alpha"):
        ZetaGuard(alpha="0.3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_fraction"):
        ZetaGuard(sample_fraction=0.0)


def test_load_state_takes_the_files_settings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(64).astype(np.float32)]
    saved = ZetaGuard(
        drift_threshold=0.6,
        snap_threshold=1.2,
        alpha=0.5,
        warmup_steps=3,
        mode="exact",
        seed=5,
        group_by="tensor",
        calibration="none",
        threads=1,
    )
    for _ in range(4):
        params = [p + 0.01 * rng.standard_normal(p.shape).astype(np.float32) for p in params]
        saved.monitor(params)
    saved.save_state(tmp_path / "g.npz")

    loaded = ZetaGuard(threads=3)
    loaded.load_state(tmp_path / "g.npz")
    cfg = saved.config()
    for name in ("drift_threshold", "snap_threshold", "alpha", "warmup_steps", "mode", "seed"):
        assert getattr(loaded, name) == cfg[name]
    assert (loaded.group_by, loaded.calibration) == ("tensor", "none")
    assert loaded.threads == 3
    assert loaded.device == "auto"
    assert loaded.config() == {**cfg, "threads": 3}
