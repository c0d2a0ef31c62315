"""The public API of ZetaGuard on NumPy inputs and torch CPU tensors."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from zetaguard import StabilityResult, ZetaGuard
from zetaguard.detector import Detector, Observation

from tests.support.reference import raw_jar


def _walk(
    rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], steps: int, lr: float = 0.01
) -> Iterator[dict[str, npt.NDArray[np.float32]]]:
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    for _ in range(steps):
        params = {
            k: (v - lr * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()
        }
        yield params


SHAPES = {"fc1.weight": (32, 16), "fc1.bias": (32,), "fc2.weight": (4, 32)}


def test_result_carries_every_field_of_the_seed() -> None:
    guard = ZetaGuard(warmup_steps=5)
    r = None
    for p in _walk(np.random.default_rng(0), SHAPES, 8):
        r = guard.monitor(p)
    assert isinstance(r, StabilityResult)
    assert r.status in ("STABLE", "DRIFT", "CRITICAL")
    for name in (
        "zeta_value",
        "raw_jar",
        "smoothed_jar",
        "confidence",
        "recommendations",
        "timestamp",
    ):
        assert hasattr(r, name)
    assert 0.0 <= r.confidence <= 1.0
    assert set(r.groups) == {"fc1", "fc2"}  # grouped by layer by default


def test_result_wraps_the_detectors_observation() -> None:
    """The result holds the detector's one Observation and reads its numbers from it: a second
    Detector fed the same per-group sums gives an equal observation, field for field."""
    guard = ZetaGuard(warmup_steps=4, mode="exact")
    twin = Detector(drift_threshold=0.707, snap_threshold=1.414, alpha=0.3, warmup_steps=4)
    for i, p in enumerate(_walk(np.random.default_rng(1), SHAPES, 9)):
        loss = 1.0 / (i + 1)
        r = guard.monitor(p, loss=loss)
        assert r.group_rows is not None
        want = twin.observe(r.group_rows, r.history, loss=loss)
        obs = r.observation
        assert isinstance(obs, Observation)
        for name in (
            "status",
            "zeta_value",
            "raw_jar",
            "smoothed_jar",
            "confidence",
            "nonfinite",
            "in_warmup",
            "channels",
        ):
            assert getattr(r, name) is getattr(obs, name)  # not a copy
            assert getattr(obs, name) == getattr(want, name)
        assert r.group_zeta is obs.group_zeta
        np.testing.assert_array_equal(obs.group_zeta, want.group_zeta)
    assert r.raw_jar is not None
    with pytest.raises(AttributeError):
        r.zeta_value = 0.0  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(r))
    assert (back.observation.zeta_value, back.step, back.groups) == (r.zeta_value, r.step, r.groups)
    assert repr(r).startswith(f"StabilityResult(status={r.status!r}, zeta_value={r.zeta_value!r}")
    by_hand = StabilityResult(
        status="DRIFT",
        zeta_value=0.8,
        raw_jar=None,
        smoothed_jar=None,
        confidence=0.5,
        step=3,
        channels={"loss": 1.0},
    )
    assert by_hand.observation.zeta_value == 0.8
    assert by_hand.channels == {"loss": 1.0}
    assert by_hand.group_zeta is None
    assert by_hand.groups == {}
    assert by_hand.worst_group is None
    assert by_hand == StabilityResult(
        status="DRIFT",
        zeta_value=0.8,
        raw_jar=None,
        smoothed_jar=None,
        confidence=0.5,
        step=3,
        channels={"loss": 1.0},
        timestamp=by_hand.timestamp,
    )


def test_dataclasses_replace_keeps_working_on_results() -> None:
    """StabilityResult is a dataclass users copy with dataclasses.replace: a changed guard field
    keeps the same observation; a changed number goes into a copy of the observation, and None
    (raw_jar before three snapshots) or 0 are values, not "unchanged"."""
    guard = ZetaGuard(warmup_steps=4, mode="exact")
    for p in _walk(np.random.default_rng(2), SHAPES, 6):
        r = guard.monitor(p)
    assert r.raw_jar is not None
    later = dataclasses.replace(r, step=r.step + 7)
    assert later.step == r.step + 7
    assert later.observation is r.observation
    assert later.group_names == r.group_names
    assert later.timestamp == r.timestamp
    changed = dataclasses.replace(r, raw_jar=None, status="CRITICAL", nonfinite=0)
    assert (changed.raw_jar, changed.status, changed.nonfinite) == (None, "CRITICAL", 0)
    assert changed.observation is not r.observation
    assert r.raw_jar is not None  # the original is untouched
    assert r.status != "CRITICAL"
    assert changed.zeta_value == r.zeta_value
    with pytest.raises(TypeError, match="missing raw_jar, smoothed_jar, confidence"):
        StabilityResult(status="STABLE", zeta_value=0.1)


def test_results_of_the_same_steps_compare_equal() -> None:
    """Two guards fed the same steps give results equal field by field, per-group arrays
    included (compared by value, not asked for one truth value); a changed group zeta, a
    changed number or another timestamp makes them unequal."""
    steps = _walk(np.random.default_rng(5), SHAPES, 6)
    a_guard, b_guard = ZetaGuard(warmup_steps=4), ZetaGuard(warmup_steps=4)
    for p in steps:
        a = a_guard.monitor(p)
        b = b_guard.monitor(p)
    assert len(a.group_names) > 1
    assert a.observation == b.observation
    assert a.observation is not b.observation
    same_time = dataclasses.replace(b, timestamp=a.timestamp)
    assert a == same_time
    assert a != b or a.timestamp == b.timestamp
    assert a != dataclasses.replace(same_time, zeta_value=a.zeta_value + 1.0)
    other_groups = dataclasses.replace(a.observation, group_zeta=a.observation.group_zeta + 1.0)
    assert a.observation != other_groups
    assert a != dataclasses.replace(same_time, observation=other_groups)
    assert a != "STABLE"


def test_raw_jar_is_jar_as_specified_to_the_letter() -> None:
    # mode="exact": every element every step (the default tiered mode estimates it between
    # full passes; tests/test_tiered.py holds those estimates to the same formula on the sample)
    guard = ZetaGuard(mode="exact")
    history: list[np.ndarray] = []
    for i, p in enumerate(_walk(np.random.default_rng(1), SHAPES, 9)):
        flat = np.concatenate([v.ravel() for v in p.values()]).astype(np.float64)
        history.append(flat)
        r = guard.monitor(p)
        want = raw_jar(history)
        if i < 3:
            assert r.raw_jar is None
            assert want is None
        else:
            assert r.raw_jar == pytest.approx(want, rel=1e-9)


def test_smoothed_jar_is_the_exponential_average() -> None:
    guard = ZetaGuard(alpha=0.3)
    smoothed = None
    for p in _walk(np.random.default_rng(2), SHAPES, 10):
        r = guard.monitor(p)
        if r.raw_jar is not None:
            smoothed = r.raw_jar if smoothed is None else 0.3 * r.raw_jar + 0.7 * smoothed
            assert r.smoothed_jar == pytest.approx(smoothed, rel=1e-12)


def test_nonfinite_parameters_are_critical_not_a_crash() -> None:
    guard = ZetaGuard(warmup_steps=3)
    for p in _walk(np.random.default_rng(3), SHAPES, 6):
        guard.monitor(p)
    p["fc2.weight"][0, 0] = np.nan
    r = guard.monitor(p)
    assert r.status == "CRITICAL"
    assert math.isinf(r.zeta_value)
    assert r.worst_group == "fc2"
    assert r.nonfinite == 1
    assert r.recommendations


def test_nan_loss_is_critical() -> None:
    guard = ZetaGuard()
    p = next(_walk(np.random.default_rng(4), SHAPES, 1))
    assert guard.monitor(p, loss=float("nan")).status == "CRITICAL"


def test_parameter_blowup_from_the_first_step_is_critical() -> None:
    """A run unstable from step one: warm-up would learn it as normal, the parameter norm
    against its first value does not."""
    guard = ZetaGuard()
    rng = np.random.default_rng(5)
    w = rng.standard_normal(1000).astype(np.float32)
    statuses = []
    for _ in range(6):
        w = (w * 3.0).astype(np.float32)
        statuses.append(guard.monitor([w]).status)
    assert "CRITICAL" in statuses


def test_accepts_lists_dicts_single_arrays_and_named_pairs() -> None:
    a, b = np.ones(3, np.float32), np.ones(5, np.float64)
    assert set(ZetaGuard(group_by="tensor").monitor({"a": a, "b": b}).groups) == {"a", "b"}
    assert set(ZetaGuard(group_by="tensor").monitor([a, b]).groups) == {"0", "1"}
    assert set(ZetaGuard(group_by="tensor").monitor(a).groups) == {"0"}
    assert set(ZetaGuard(group_by="tensor").monitor([("x", a)]).groups) == {"x"}


def test_torch_module_parameters_and_named_parameters() -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for arg in (model, model.parameters, model.named_parameters):
        guard = ZetaGuard()
        source = arg() if callable(arg) and not isinstance(arg, torch.nn.Module) else arg
        r = guard.monitor(source)
        assert r.status == "STABLE"
    assert set(ZetaGuard().monitor(model).groups) == {"0", "2"}


def test_torch_parameters_match_numpy_copies() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g_torch, g_numpy = ZetaGuard(), ZetaGuard()
    for _ in range(6):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        rt = g_torch.monitor(model.named_parameters())
        rn = g_numpy.monitor({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
        assert rt.raw_jar == rn.raw_jar
    assert "grad_norm" in rt.channels  # read from .grad automatically


def test_empty_parameter_list_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        ZetaGuard().monitor([])
    with pytest.raises(ValueError, match=r"attach a model"):
        ZetaGuard().monitor()


def test_monitor_pattern_restricts_by_name() -> None:
    guard = ZetaGuard(group_by="tensor").monitor_pattern(r"weight$")
    r = guard.monitor(next(_walk(np.random.default_rng(6), SHAPES, 1)))
    assert set(r.groups) == {"fc1.weight", "fc2.weight"}
    with pytest.raises(ValueError, match="matches none"):
        ZetaGuard().monitor_pattern("nothing").monitor({"a": np.ones(2, np.float32)})


def test_get_metrics_and_statistics() -> None:
    guard = ZetaGuard(warmup_steps=4)
    assert guard.get_metrics() == {}
    for p in _walk(np.random.default_rng(7), SHAPES, 8):
        guard.monitor(p, loss=1.0)
    m = guard.get_metrics()
    assert {"zeta", "raw_jar", "smoothed_jar", "confidence", "status_level"} <= set(m)
    assert all(isinstance(v, float) for v in m.values())
    assert "group/fc1/zeta" in m
    s = guard.get_statistics()
    assert s["steps"] == 8
    assert sum(s["status_counts"].values()) == 8
    assert s["engine"]["mode"] == "exact"  # the full pass of the default tiered mode
    assert s["tiered"]["full_passes"] == 0  # the first scheduled one is at step 50
    assert s["tiered"]["sampled_elements"] > 0
    exact = ZetaGuard(warmup_steps=4, mode="exact")
    for p in _walk(np.random.default_rng(7), SHAPES, 8):
        exact.monitor(p, loss=1.0)
    assert exact.get_statistics()["engine"]["tensors"] == 3


def test_confidence_rises_through_warmup() -> None:
    guard = ZetaGuard(warmup_steps=10)
    conf = [guard.monitor(p).confidence for p in _walk(np.random.default_rng(8), SHAPES, 30)]
    assert conf[0] < 0.2
    assert all(b >= a for a, b in itertools.pairwise(conf))
    assert conf[-1] > 0.8


def test_reset_forgets_the_trajectory() -> None:
    guard = ZetaGuard()
    for p in _walk(np.random.default_rng(9), SHAPES, 5):
        guard.monitor(p)
    guard.reset()
    r = guard.monitor({"other": np.ones(7, np.float32)})
    assert r.raw_jar is None
    assert r.step == 0


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="drift_threshold <= snap_threshold"):
        ZetaGuard(drift_threshold=2.0, snap_threshold=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ZetaGuard(alpha=0.0)
    with pytest.raises(ValueError, match="mode"):
        ZetaGuard(mode="fast")  # type: ignore[arg-type]


def test_import_zetaguard_imports_no_framework() -> None:
    code = (
        "import sys, zetaguard; zetaguard.ZetaGuard().monitor([__import__('numpy').ones(3, 'f4')]);"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'jax', 'lightning', 'transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
