"""The calibrated detector: JAR as specified, threshold semantics, confidence, persistence."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard
from zetaguard.detector import Detector
from zetaguard.results import STATUSES

LEVEL = {s: i for i, s in enumerate(STATUSES)}


def _trajectory(seed: int, steps: int, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size)
    out = []
    for _ in range(steps):
        x = x - 0.01 * x + 0.02 * rng.normal(size=size)
        out.append(x.copy())
    return out


def _rows(traj: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    """Engine rows (x2, v2, a2, j2, nonfinite) computed in NumPy, one group."""
    rows = []
    for t, x in enumerate(traj):
        v = x - traj[t - 1] if t >= 1 else np.zeros_like(x)
        a = v - (traj[t - 1] - traj[t - 2]) if t >= 2 else np.zeros_like(x)
        prev_a = (traj[t - 1] - traj[t - 2]) - (traj[t - 2] - traj[t - 3]) if t >= 3 else 0
        j = a - prev_a if t >= 3 else np.zeros_like(x)
        row = np.array([[x @ x, v @ v, a @ a, j @ j, 0.0]])
        rows.append((row, min(t, 3)))
    return rows


def test_raw_jar_is_jar_as_specified() -> None:
    traj = _trajectory(0, 30)
    guard = ZetaGuard(auto_recover=False)
    for t, x in enumerate(traj):
        r = guard.monitor([x.astype(np.float64)])
        if t < 3:
            assert r.raw_jar is None
            continue
        j = x - 3 * traj[t - 1] + 3 * traj[t - 2] - traj[t - 3]
        a = x - 2 * traj[t - 1] + traj[t - 2]
        assert r.raw_jar == pytest.approx(np.linalg.norm(j) / (np.linalg.norm(a) + 1e-12), rel=1e-9)


def test_calibration_none_is_smoothed_jar_against_fixed_thresholds() -> None:
    det = Detector(
        drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=50, calibration="none"
    )
    smoothed = None
    for row, hist in _rows(_trajectory(1, 40)):
        obs = det.observe(row, hist)
        if hist >= 3:
            jar = math.sqrt(row[0, 3]) / (math.sqrt(row[0, 2]) + 1e-12)
            smoothed = jar if smoothed is None else 0.3 * jar + 0.7 * smoothed
            assert obs.zeta_value == pytest.approx(smoothed, rel=1e-12)
            expected = (
                "CRITICAL" if smoothed >= 1.414 else "DRIFT" if smoothed >= 0.707 else "STABLE"
            )
            assert obs.status == expected


def _statuses(seed: int, drift: float, snap: float, spike_at: int, spike: float) -> list[str]:
    det = Detector(drift_threshold=drift, snap_threshold=snap, alpha=0.3, warmup_steps=20)
    rng = np.random.default_rng(seed)
    out = []
    for t, (row, hist) in enumerate(_rows(_trajectory(seed, 90))):
        loss = float(np.exp(rng.normal(0, 0.2))) * (spike if t >= spike_at else 1.0)
        grad = float(np.exp(rng.normal(0, 0.3))) * (spike if t >= spike_at + 2 else 1.0)
        out.append(det.observe(row, hist, loss=loss, grad_norm=grad).status)
    return out


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    snap=st.floats(0.8, 3.0),
    extra=st.floats(0.0, 2.0),
    spike_at=st.integers(30, 85),
    spike=st.floats(1.0, 50.0),
)
def test_raising_snap_threshold_never_adds_a_critical(
    seed: int, snap: float, extra: float, spike_at: int, spike: float
) -> None:
    low = _statuses(seed, 0.5, snap, spike_at, spike)
    high = _statuses(seed, 0.5, snap + extra, spike_at, spike)
    for a, b in zip(low, high, strict=True):
        assert not (b == "CRITICAL" and a != "CRITICAL")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    drift=st.floats(0.1, 1.4),
    less=st.floats(0.0, 0.09),
    spike_at=st.integers(30, 85),
    spike=st.floats(1.0, 50.0),
)
def test_lowering_drift_threshold_never_removes_a_drift(
    seed: int, drift: float, less: float, spike_at: int, spike: float
) -> None:
    base = _statuses(seed, drift, 1.414, spike_at, spike)
    lowered = _statuses(seed, drift - less, 1.414, spike_at, spike)
    for a, b in zip(base, lowered, strict=True):
        assert LEVEL[b] >= LEVEL[a]  # every DRIFT (and CRITICAL) stays at least that level


def test_confidence_low_in_warmup_then_rising() -> None:
    det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=50)
    conf = [det.observe(row, hist, loss=1.0).confidence for row, hist in _rows(_trajectory(2, 200))]
    assert conf[0] < 0.05
    assert all(c <= 0.8 for c in conf[:50])
    assert all(b >= a for a, b in itertools.pairwise(conf))
    assert conf[-1] > 0.95


def test_nonfinite_is_critical_not_a_crash() -> None:
    det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=5)
    rows = _rows(_trajectory(3, 10))
    for row, hist in rows[:8]:
        det.observe(row, hist, loss=1.0)
    assert det.observe(rows[8][0], 3, loss=math.nan).status == "CRITICAL"
    bad = rows[9][0].copy()
    bad[0, 4] = 2.0
    obs = det.observe(bad, 3, loss=1.0)
    assert obs.status == "CRITICAL"
    assert math.isinf(obs.zeta_value)
    assert obs.nonfinite == 2


def test_state_dict_is_json_and_resumes_exactly() -> None:
    rows = _rows(_trajectory(4, 120))
    losses = np.exp(np.random.default_rng(4).normal(0, 0.2, len(rows)))
    a = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=30)
    for (row, hist), loss in zip(rows[:60], losses[:60], strict=True):
        a.observe(row, hist, loss=float(loss), grad_norm=float(loss) * 2)
    b = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=30)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for (row, hist), loss in zip(rows[60:], losses[60:], strict=True):
        oa = a.observe(row, hist, loss=float(loss), grad_norm=float(loss) * 2)
        ob = b.observe(row, hist, loss=float(loss), grad_norm=float(loss) * 2)
        assert oa.zeta_value == ob.zeta_value
        assert oa.status == ob.status
        np.testing.assert_array_equal(oa.group_zeta, ob.group_zeta)


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="calibration"):
        Detector(
            drift_threshold=0.7, snap_threshold=1.4, alpha=0.3, warmup_steps=5, calibration="bogus"
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="drift_threshold <= snap_threshold"):
        Detector(drift_threshold=2.0, snap_threshold=1.4, alpha=0.3, warmup_steps=5)
    with pytest.raises(ValueError, match="alpha"):
        Detector(drift_threshold=0.7, snap_threshold=1.4, alpha=0.0, warmup_steps=5)


def test_growth_channel_flags_accelerating_weights_but_not_a_rollback() -> None:
    def run(restart_at: int | None) -> list[float]:
        det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=20)
        norm, scores = 10.0, []
        for t in range(80):
            rate = 0.001 if t < 40 else 0.001 * 1.15 ** (t - 40)  # runaway after step 40
            norm = norm * math.exp(rate) if restart_at is None else 10.0 + 0.001 * t
            hist = 0 if t == 0 or t == restart_at else 3
            if restart_at is not None and t >= restart_at:
                norm = 20.0 + 0.001 * t  # the weights rolled back to a larger-norm snapshot
            row = np.array([[norm**2, 1e-4, 1e-4, 1e-4, 0.0]])
            scores.append(det.observe(row, hist).scores.get("growth", 0.0))
        return scores

    runaway = run(None)
    assert max(runaway[:40]) < 0.5  # steady growth: no drift
    assert max(runaway[60:]) >= 1.0  # accelerating growth: critical
    rolled = run(50)
    assert max(rolled) < 0.5  # the norm jump across a rollback is not growth


def test_recommendations_name_the_channel() -> None:
    from zetaguard.detector import Observation
    from zetaguard.recommend import recommendations

    obs = Observation(
        status="CRITICAL",
        zeta_value=1.6,
        raw_jar=1.0,
        smoothed_jar=1.0,
        confidence=1.0,
        channels={},
        scores={"growth": 1.13, "loss": 0.2},
        group_zeta=np.zeros(1),
        nonfinite=0,
        in_warmup=False,
    )
    tips = recommendations(obs, "layer1")
    assert "parameter norm grows" in tips[0]
    assert f"{16**1.13:.1f}x" in tips[0]
    assert (
        recommendations(
            Observation(
                status="STABLE",
                zeta_value=0.1,
                raw_jar=1.0,
                smoothed_jar=1.0,
                confidence=1.0,
                channels={},
                scores={"loss": 0.07},
                group_zeta=np.zeros(1),
                nonfinite=0,
                in_warmup=False,
            ),
            None,
        )
        == []
    )


def test_recommendations_survive_an_exploded_channel() -> None:
    """A growth score in the hundreds (16 ** 300 overflows a float) still gives advice."""
    from zetaguard.detector import Observation
    from zetaguard.recommend import recommendations

    obs = Observation(
        status="CRITICAL",
        zeta_value=500.0,
        raw_jar=1.0,
        smoothed_jar=1.0,
        confidence=1.0,
        channels={},
        scores={"growth": 300.0, "update": 400.0},
        group_zeta=np.zeros(1),
        nonfinite=0,
        in_warmup=False,
    )
    tips = recommendations(obs, "layer1")
    assert any("e+" in t for t in tips)  # '1e+50x'-style factors, not an OverflowError
