"""The C++ detector (``zetaguard._core.Detector``) against the NumPy statement of its rule
(``tests/support/reference_detector.py``): random multi-group trajectories with spikes, missing
channels, non-finite steps and rollbacks, every field compared step by step."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import _core
from zetaguard.detector import Detector

from tests.support.reference_detector import (
    CRITICAL_RATIO,
    GATE_FAST,
    GATE_MARGIN,
    GATE_SLOW,
    GROWTH_FLOOR,
    GROWTH_RATE,
    GROWTH_RATIO,
    LOSS_FLOOR,
    MIN_CALIBRATION_SAMPLES,
    NOISE_SIGMAS,
    TRACK_RATE,
    ReferenceDetector,
)

# NumPy's vectorised log and its pairwise mean may differ from libm by an ulp or two; the
# rule itself must agree to many digits.
RTOL = 1e-9


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-12)


def _steps(
    seed: int, groups: int, steps: int, with_loss: bool, with_grad: bool
) -> list[dict[str, Any]]:
    """Engine-like rows for a trajectory that is calm, then may spike, go non-finite, restart."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 2, groups))
    spike_at = int(rng.integers(steps // 2, steps))
    kind = rng.choice(["lr", "loss", "nan", "restart", "none", "zero"])
    out = []
    history = 0
    for t in range(steps):
        boost = 30.0 ** min(3, max(0, t - spike_at)) if kind == "lr" else 1.0
        x2 = (scale * np.exp(0.002 * t + rng.normal(0, 0.01, groups))) ** 2 * (
            boost if kind == "lr" else 1
        )
        v2 = x2 * 1e-6 * np.exp(rng.normal(0, 0.3, groups)) * boost
        a2 = v2 * np.exp(rng.normal(0, 0.3, groups))
        j2 = a2 * np.exp(rng.normal(0.3, 0.3, groups))
        nf = np.zeros(groups)
        if kind == "zero" and t == spike_at:
            v2[:] = 0.0  # a step that did not move: log(0) in the per-group update score
        if kind == "nan" and t == spike_at:
            nf[int(rng.integers(groups))] = 3.0
            x2[0] = math.inf
        rows = np.stack([x2, v2, a2, j2, nf], axis=1)
        if kind == "restart" and t == spike_at:
            history = 0
        loss = float(np.exp(-0.01 * t + rng.normal(0, 0.1))) if with_loss else None
        if loss is not None and kind == "loss" and t >= spike_at:
            loss *= 20.0
        if loss is not None and kind == "nan" and t == spike_at + 1:
            loss = math.nan
        grad = float(np.exp(rng.normal(0, 0.3))) if with_grad else None
        out.append(
            {
                "rows": rows,
                "history": history,
                "loss": loss,
                "grad": grad,
                "restart": kind == "restart" and t == spike_at,
            }
        )
        history = min(history + 1, 3)
    return out


def _compare(ref: Any, got: Any, where: str) -> None:
    assert got.status == ref.status or abs(got.zeta_value - ref.zeta_value) < 1e-9, where
    for field in ("zeta_value", "raw_jar", "smoothed_jar", "confidence"):
        assert _close(getattr(ref, field), getattr(got, field)), (
            where,
            field,
            getattr(ref, field),
            getattr(got, field),
        )
    assert got.nonfinite == ref.nonfinite, where
    assert got.in_warmup == ref.in_warmup, where
    assert list(got.scores) == list(ref.scores), (where, list(got.scores), list(ref.scores))
    for k, v in ref.scores.items():
        assert _close(v, got.scores[k]), (where, k, v, got.scores[k])
    expected_channels = dict(ref.channels)
    expected_channels.update({f"score_{k}": v for k, v in ref.scores.items()})
    assert list(got.channels) == list(expected_channels), where
    for k, v in expected_channels.items():
        assert _close(v, got.channels[k]), (where, k, v, got.channels[k])
    assert got.group_zeta.shape == ref.group_zeta.shape, where
    for a, b in zip(ref.group_zeta, got.group_zeta, strict=True):
        assert _close(float(a), float(b)), (where, ref.group_zeta, got.group_zeta)


def _state_close(ref: dict[str, Any], got: dict[str, Any]) -> None:
    assert set(ref) == set(got)
    flat_ref = json.loads(json.dumps(ref))
    flat_got = json.loads(json.dumps(got))

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict):
            assert isinstance(b, dict), path
            assert list(a) == list(b), path
            for k in a:
                walk(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert isinstance(b, list), path
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, float) or isinstance(b, float):
            assert _close(float(a), float(b)), (path, a, b)
        else:
            assert a == b, (path, a, b)

    walk(flat_ref, flat_got, "state")


def test_constants_agree_with_the_reference() -> None:
    c = _core.detector_constants()
    assert c["critical_ratio"] == CRITICAL_RATIO
    assert (c["noise_sigmas"], c["track_rate"], c["loss_floor"]) == (
        NOISE_SIGMAS,
        TRACK_RATE,
        LOSS_FLOOR,
    )
    assert (c["gate_fast"], c["gate_slow"], c["gate_margin"]) == (GATE_FAST, GATE_SLOW, GATE_MARGIN)
    assert (c["growth_rate"], c["growth_floor"], c["growth_ratio"]) == (
        GROWTH_RATE,
        GROWTH_FLOOR,
        GROWTH_RATIO,
    )
    assert c["min_calibration_samples"] == MIN_CALIBRATION_SAMPLES


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 6),
    warmup=st.integers(0, 40),
    with_loss=st.booleans(),
    with_grad=st.booleans(),
    calibration=st.sampled_from(["auto", "auto", "none"]),
    alpha=st.floats(0.05, 1.0),
)
def test_cpp_detector_matches_the_reference(
    seed: int,
    groups: int,
    warmup: int,
    with_loss: bool,
    with_grad: bool,
    calibration: str,
    alpha: float,
) -> None:
    kw: dict[str, Any] = dict(
        drift_threshold=0.707,
        snap_threshold=1.414,
        alpha=alpha,
        warmup_steps=warmup,
        calibration=calibration,
    )
    ref, got = ReferenceDetector(**kw), Detector(**kw)
    for t, s in enumerate(_steps(seed, groups, 120, with_loss, with_grad)):
        if s["restart"]:  # what the guard does after a rollback
            ref.smoothed_jar = None
            if ref.growth_base is not None:
                ref.growth = ref.growth_base
            got.restart_trajectory()
        o_ref = ref.observe(s["rows"], s["history"], loss=s["loss"], grad_norm=s["grad"])
        o_got = got.observe(s["rows"], s["history"], loss=s["loss"], grad_norm=s["grad"])
        _compare(o_ref, o_got, f"step {t}")
    _state_close(ref.state_dict(), got.state_dict())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), cut=st.integers(1, 119), groups=st.integers(1, 4))
def test_state_from_the_reference_resumes_in_cpp(seed: int, cut: int, groups: int) -> None:
    """A state saved by the NumPy rule (as guards saved before the C++ port) loads into the
    C++ detector and continues as the reference does."""
    kw: dict[str, Any] = dict(
        drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=30
    )
    ref = ReferenceDetector(**kw)
    steps = _steps(seed, groups, 120, True, True)
    for s in steps[:cut]:
        ref.observe(s["rows"], s["history"], loss=s["loss"], grad_norm=s["grad"])
    got = Detector(**kw)
    got.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    _state_close(ref.state_dict(), got.state_dict())
    for t, s in enumerate(steps[cut:], start=cut):
        _compare(
            ref.observe(s["rows"], s["history"], loss=s["loss"], grad_norm=s["grad"]),
            got.observe(s["rows"], s["history"], loss=s["loss"], grad_norm=s["grad"]),
            f"step {t}",
        )


def test_corrupt_state_is_refused_with_a_clear_error() -> None:
    det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=5)
    good = det.state_dict()
    for broken in (
        {**good, "tracks": {"update": [0.0, 0.0]}},
        {**good, "trend": {"bogus": [0.0, 0.0]}},
        {**good, "growth": "fast"},
        {k: v for k, v in good.items() if k != "steps"},
    ):
        with pytest.raises(ValueError, match="corrupt guard state"):
            det.load_state_dict(broken)
    assert det.state_dict() == good  # a refused state changes nothing


def test_rows_of_the_wrong_shape_are_refused() -> None:
    det = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=5)
    with pytest.raises(ValueError, match=r"shape \(groups, 5\)"):
        det.observe(np.zeros((2, 4)), 0)
    with pytest.raises(ValueError, match="one group index per row"):
        _core.group_rows(np.zeros((3, 5)), np.zeros(2, dtype=np.int64), 1)
    with pytest.raises(ValueError, match="outside"):
        _core.group_rows(np.zeros((2, 5)), np.array([0, 5], dtype=np.int64), 2)


def test_group_rows_sums_like_bincount() -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(50, 5))
    rows[7, 2] = math.nan
    index = rng.integers(0, 6, 50).astype(np.int64)
    got = _core.group_rows(rows, index, 6)
    for c in range(5):
        np.testing.assert_array_equal(
            got[:, c], np.bincount(index, weights=rows[:, c], minlength=6)
        )
