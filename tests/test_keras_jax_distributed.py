"""Keras 3 on JAX over two host devices (``keras.distribution``), run for real in a subprocess
(``tests/support/keras_jax_runner.py``; JAX fixes its device count at start-up). About 10 s.

``DataParallel`` keeps every weight replicated on both devices: ZetaKeras reads each once (the
first device's copy, in place), so the guard makes one decision per batch from norms equal to
NumPy's of the same weights, not from the replicas counted twice. ``ModelParallel`` splits the
kernels over the devices: they are assembled, with the same result.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tests.support.keras_jax_runner import run_in_subprocess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed"),
]

CHANNELS = ("param_norm", "update_norm", "accel_norm", "raw_jar")


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    out = run_in_subprocess()
    assert out["devices"] == 2
    return out


def assert_matches_numpy(rows: list[dict[str, Any]]) -> None:
    """Every batch's norms and raw JAR equal NumPy's on copies of the same weights."""
    compared = 0
    for i, row in enumerate(rows):
        for key in CHANNELS:
            ours, ref = row[key], row[f"ref_{key}"]
            if ours is None or ref is None:
                continue
            assert ours == pytest.approx(ref, rel=1e-9), (i, key)
            compared += 1
    assert compared >= 3 * len(rows)


@pytest.mark.parametrize("scenario", ["data_parallel", "model_parallel"])
def test_one_decision_per_batch_from_numpy_equal_norms(runs: dict[str, Any], scenario: str) -> None:
    run = runs[scenario]
    expected = (
        ["replicated"] * 4
        if scenario == "data_parallel"
        else ["sharded", "replicated", "sharded", "replicated"]
    )
    assert run["layouts"] == expected  # the layout the test means to exercise is real
    # One guard call per batch, each variable once (a replica counted twice would show as a
    # second name, or as a norm sqrt(2) times NumPy's).
    assert run["monitor_calls"] == run["steps"] == len(run["rows"]) == 32
    assert len(run["monitored"]) == run["trainable_weights"] == 4
    assert_matches_numpy(run["rows"])
    assert run["status_counts"]["CRITICAL"] == 0  # a healthy fit (Adam 1e-3)


def test_blow_up_under_data_parallel_is_caught(runs: dict[str, Any]) -> None:
    run = runs["blow_up"]  # SGD-momentum; the LR jumps 0.05 -> 20 at step 20
    statuses = [r["status"] for r in run["rows"]]
    assert "CRITICAL" not in statuses[:20]
    assert statuses[20] == "CRITICAL"
    assert run["stopped"]  # stop_on_critical ended the fit at that batch
    assert len(statuses) == 21
    assert_matches_numpy(run["rows"])


def test_plain_jax_arrays_of_both_layouts(runs: dict[str, Any]) -> None:
    plain = runs["plain"]
    assert plain["layouts"] == ["replicated", "sharded", "sharded"]
    assert plain["monitored"] == ["replicated", "sharded", "sharded_bf16"]
    for ours, ref in plain["norms"]:
        assert ours == pytest.approx(ref, rel=1e-9)
    assert plain["zero_copy"]


def test_an_array_sharded_across_processes_is_refused_clearly() -> None:
    """Two JAX processes (jax.distributed, gloo): a replicated array is read from the local
    copy; one sharded across the processes is refused with an error that says what to pass."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.jax_processes import MARK
    from tests.support.keras_jax_runner import ROOT
    from tests.support.launch import free_port

    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="3")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.jax_processes", str(i), port],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            lines = [ln for ln in stdout.splitlines() if ln.startswith(MARK)]
            assert p.returncode == 0, stderr[-3000:]
            assert lines, stderr[-3000:]
            outs.append(json.loads(lines[-1][len(MARK) :]))
    finally:
        for p in procs:
            p.kill()
    for out in outs:
        assert not out["sharded_local"]
        assert not out["replicated_local"]  # replicated, but over both processes' devices
        assert out["replicated_norm"] == pytest.approx(out["expected_norm"], rel=1e-12)
        assert "sharded over devices of several processes" in out["refused"]
        assert "addressable_shards" in out["refused"]  # names what to pass instead


def test_example_rolls_back_a_blow_up_and_keeps_the_replicas(runs: dict[str, Any]) -> None:
    """examples/distributed_keras_jax.py: the LR jumps to 20 at step 40 under DataParallel;
    the guard rolls weights and optimizer back and cuts the LR, and the weights come out of
    the restore still replicated on both devices and finite."""
    ex = runs["example"]
    assert ex["devices"] == 2
    assert ex["steps"] == 64  # 1024 samples / 32 x 2 epochs, every batch scored once
    assert ex["status_counts"]["CRITICAL"] >= 1
    first = ex["recoveries"][0]
    assert first["step"] == 40
    assert first["restored_step"] is not None
    assert first["restored_step"] < 40
    assert ex["lr"] < 1.0  # the jump to 20 was cut
    assert ex["replicated"]
    assert ex["finite"]
