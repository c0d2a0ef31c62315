"""A resumed tiered guard (the default ``mode="auto"``) continues from its saved sampled ring
and full-pass schedule exactly as the guard that saved it; the ring in the file is checked as
hostile input like the rest of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard, state
from zetaguard.state import StateFileError


def _walk(seed: int, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    w: dict[str, np.ndarray] = {
        "a.weight": rng.standard_normal(64 * 1024).astype(np.float32),
        "b.weight": rng.standard_normal(8 * 1024).astype(np.float16),
    }
    out = []
    for _ in range(n):
        w = {
            k: np.asarray(v - 1e-2 * rng.standard_normal(v.size), dtype=v.dtype)
            for k, v in w.items()
        }
        out.append(w)
    return out


@pytest.mark.parametrize("save_at", [1, 2, 3, 7])
def test_a_resumed_tiered_guard_continues_exactly(tmp_path: Path, save_at: int) -> None:
    """Saved after ``save_at`` steps and loaded into a fresh guard: every later result (raw JAR
    from the first step on, zeta, status, the full-pass schedule) is the uninterrupted one's."""
    steps = _walk(0, 16)
    kw: dict[str, Any] = {"auto_recover": False, "warmup_steps": 4, "full_pass_interval": 5}
    whole, first = ZetaGuard(**kw), ZetaGuard(**kw)
    expected = [whole.monitor(p, loss=1.0) for p in steps]
    for p in steps[:save_at]:
        first.monitor(p, loss=1.0)
    first.save_state(tmp_path / "g.npz")
    resumed = ZetaGuard(auto_recover=False)
    resumed.load_state(tmp_path / "g.npz")
    got = [resumed.monitor(p, loss=1.0) for p in steps[save_at:]]
    assert got[0].raw_jar is not None or save_at < 3  # the ring came back
    for a, b in zip(expected[save_at:], got, strict=True):
        assert (b.step, b.status, b.raw_jar, b.zeta_value) == (
            a.step,
            a.status,
            a.raw_jar,
            a.zeta_value,
        )
    assert resumed.get_statistics()["tiered"] == whole.get_statistics()["tiered"]


def test_files_without_the_sampled_ring_still_load(tmp_path: Path) -> None:
    """A file written before the ring was saved: the guard loads and rebuilds the ring."""
    g = ZetaGuard(auto_recover=False)
    steps = _walk(1, 6)
    for p in steps:
        g.monitor(p)
    g.save_state(tmp_path / "g.npz")
    meta, arrays = state.load(tmp_path / "g.npz")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256", "sampler")}
    state.save(tmp_path / "old.npz", meta, {k: v for k, v in arrays.items() if k[0] != "r"})
    resumed = ZetaGuard(auto_recover=False)
    resumed.load_state(tmp_path / "old.npz")
    assert resumed.monitor(steps[-1]).raw_jar is None  # no differences until the ring refills


def _good(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    g = ZetaGuard(auto_recover=False)
    for p in _walk(2, 5):
        g.monitor(p)
    g.save_state(tmp_path / "good.npz")
    meta, arrays = state.load(tmp_path / "good.npz")
    return {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}, arrays


def _edit(meta: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**meta, "sampler": {**meta["sampler"], **changes}}


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda m, a: (_edit(m, history=4), a), "sampler.history"),
        (lambda m, a: (_edit(m, head=-1), a), "sampler.head -1 cannot follow"),
        (lambda m, a: (_edit(m, steps=-1), a), "sampler.steps"),
        (lambda m, a: (_edit(m, escalated="yes"), a), "sampler.escalated"),
        (lambda m, a: (_edit(m, tensors=m["sampler"]["tensors"][:1]), a), "1 tensors in the sam"),
        (lambda m, a: (_edit(m, tensors=[{"numel": 3, "dtype": "int8"}] * 2), a), "dtype"),
        (lambda m, a: (m, {**a, "r0_s1": a["r0_s1"][:-4]}), "ring slot 1 holds"),
        (lambda m, a: (m, {**a, "r1_s2": a["r1_s2"].astype(np.float64)}), "ring 1 slot 2"),
        (lambda m, a: (m, {k: v for k, v in a.items() if k != "r0_s0"}), "ring 0 slot 0"),
        (lambda m, a: ({**m, "config": {**m["config"], "mode": "exact"}}, a), "sampled ring but"),
        (
            lambda m, a: ({**m, "config": {**m["config"], "sample_fraction": 0.5}}, a),
            "another sample_fraction",
        ),
    ],
)
def test_a_damaged_sampled_ring_is_refused_and_changes_nothing(
    tmp_path: Path, damage: Any, match: str
) -> None:
    meta, arrays = _good(tmp_path)
    bad_meta, bad_arrays = damage(meta, arrays)
    state.save(tmp_path / "bad.npz", bad_meta, bad_arrays)  # a valid checksum, bad values
    g = ZetaGuard(auto_recover=False)
    with pytest.raises(StateFileError, match=match):
        g.load_state(tmp_path / "bad.npz")
    assert g.step == 0
    assert g.get_statistics()["tiered"]["sampled_elements"] == 0


def test_the_sample_cap_travels_with_the_state(tmp_path: Path) -> None:
    """A guard whose sample is capped (``max_sampled``) resumes with the same cap and the same
    results; a file from before the cap (no ``max_sampled`` in its config) was sampled
    uncapped and loads uncapped; a bad cap in a file is refused."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal(1 << 20).astype(np.float32)
    steps = []
    for _ in range(10):
        w = w - np.float32(1e-2) * rng.standard_normal(w.size, dtype=np.float32)
        steps.append({"w": w})
    kw: dict[str, Any] = {"auto_recover": False, "warmup_steps": 4, "max_sampled": 8192}
    whole, first = ZetaGuard(**kw), ZetaGuard(**kw)
    expected = [whole.monitor(p, loss=1.0) for p in steps]
    stats = whole.get_statistics()["tiered"]
    # 1M elements at 1/64 is 16K, over the cap: the fraction shrinks to 1/128.
    assert stats["max_sampled"] == 8192
    assert stats["effective_fraction"] == 1 / 128
    assert stats["sampled_elements"] == 8192
    for p in steps[:5]:
        first.monitor(p, loss=1.0)
    first.save_state(tmp_path / "capped.npz")
    resumed = ZetaGuard(auto_recover=False)  # the default cap; the file's wins
    resumed.load_state(tmp_path / "capped.npz")
    assert resumed.max_sampled == 8192
    got = [resumed.monitor(p, loss=1.0) for p in steps[5:]]
    assert [(r.status, r.raw_jar) for r in got] == [(r.status, r.raw_jar) for r in expected[5:]]

    uncapped = ZetaGuard(auto_recover=False, max_sampled=None)
    for p in steps[:5]:
        uncapped.monitor(p)
    uncapped.save_state(tmp_path / "u.npz")
    meta, arrays = state.load(tmp_path / "u.npz")
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}
    old_config = {k: v for k, v in meta["config"].items() if k != "max_sampled"}
    state.save(tmp_path / "old.npz", {**meta, "config": old_config}, arrays)
    old = ZetaGuard(auto_recover=False)
    old.load_state(tmp_path / "old.npz")
    assert old.max_sampled is None
    assert old.monitor(steps[5]).raw_jar is not None  # the uncapped ring fit its plan

    state.save(
        tmp_path / "bad.npz", {**meta, "config": {**meta["config"], "max_sampled": 0}}, arrays
    )
    with pytest.raises(StateFileError, match=r"config\.max_sampled"):
        ZetaGuard(auto_recover=False).load_state(tmp_path / "bad.npz")
    capped_meta = {**meta, "config": {**meta["config"], "max_sampled": 8192}}
    state.save(tmp_path / "other.npz", capped_meta, arrays)
    with pytest.raises(StateFileError, match="max_sampled"):
        ZetaGuard(auto_recover=False).load_state(tmp_path / "other.npz")
