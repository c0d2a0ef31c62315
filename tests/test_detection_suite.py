"""Smoke run of the detection scenario suite (``--quick``: one seed per family), asserting on
the metrics it produces: real torch trainings, every detector replayed on the same runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "detection"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list, str]:  # type: ignore[type-arg]
    sys.path.insert(0, str(SUITE))
    import run_suite

    cache = tmp_path_factory.mktemp("suite") / "traces.pkl"
    scores = run_suite.main(["--quick", "--cache", str(cache)])
    import pickle

    with open(cache, "rb") as f:
        traces = pickle.load(f)
    return scores, traces, str(cache)


@pytest.mark.slow
def test_quick_suite_default_guard_is_quiet_on_stable_runs(quick: tuple) -> None:  # type: ignore[type-arg]
    scores, traces, _ = quick
    from run_suite import STABLE_FAMILIES

    steps = sum(t.steps for t in traces if t.stable)
    assert steps >= 400 * len(STABLE_FAMILIES)
    zg = scores["zetaguard"]
    assert sum(zg[f].critical_alarms for f in STABLE_FAMILIES) == 0
    assert sum(zg[f].drift_alarms for f in STABLE_FAMILIES) <= 0.005 * steps
    # the literal rule (JAR as specified) is what the calibration replaces: it cries wolf on
    # healthy runs
    literal = scores["literal-jar"]
    assert sum(literal[f].critical_alarms for f in STABLE_FAMILIES) > 0.1 * steps


@pytest.mark.slow
def test_quick_suite_default_guard_catches_collapses_in_time(quick: tuple) -> None:  # type: ignore[type-arg]
    scores, _, _ = quick
    from run_suite import HELD_OUT, UNSTABLE_FAMILIES

    tuned = [f for f in UNSTABLE_FAMILIES if f != HELD_OUT]
    zg = scores["zetaguard"]
    collapsed = sum(zg[f].collapsed for f in tuned)
    assert collapsed >= len(tuned) - 2  # ground truth: nearly every unstable run collapses
    assert sum(zg[f].critical_hits for f in tuned) >= 0.9 * collapsed
    # the gradual families give warning well ahead of the collapse
    assert np.median(zg["lr-ramp"].any_leads) >= 5
    assert np.median(zg["exploding-tanh"].any_leads) >= 5
    # NaN injection: the guard sees the non-finite parameters one step before the loss does
    assert zg["nan-inject"].critical_leads == [1]
    assert scores["terminate-nan"]["nan-inject"].critical_leads == [0]


@pytest.mark.slow
def test_live_guard_equals_replay(quick: tuple) -> None:  # type: ignore[type-arg]
    _, traces, _ = quick
    from run_suite import live_matches_replay

    assert live_matches_replay(traces) == 0


def test_collapse_definition() -> None:
    sys.path.insert(0, str(SUITE))
    from metrics import collapse_step

    flat = np.full(100, 1.0)
    assert collapse_step(flat) is None
    spike = flat.copy()
    spike[60] = 10.0  # one bad batch that the run recovers from is not a collapse
    assert collapse_step(spike) is None
    up = flat.copy()
    up[70:] = 5.0
    assert collapse_step(up) == 70
    nan = flat.copy()
    nan[40] = np.nan
    assert collapse_step(nan) == 40
    late = flat.copy()
    late[97:] = 5.0  # too close to the end to tell a spike from a collapse
    assert collapse_step(late) is None
    tiny = np.full(100, 0.01)
    tiny[:10] = 2.3
    tiny[80:] = 0.05  # 5x a near-zero loss, but below the floor of 10% of the first loss
    assert collapse_step(tiny, 50) is None
