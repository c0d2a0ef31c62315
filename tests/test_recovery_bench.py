"""Smoke run of the recovery benchmark's code (``benchmarks/recovery/``) so it cannot rot: the
digits MLP, one seed, real torch trainings, judged on clean held-out data as the benchmark
judges them."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery"


@pytest.fixture(scope="module")
def bench() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        import bench_families
        import recovery_harness

        # The benchmark's MLP, cut to 120 steps to keep this test short.
        mlp = dataclasses.replace(recovery_harness.MODELS[0], steps=120, fault_at=60)
        yield bench_families, recovery_harness, mlp
    finally:
        sys.path.remove(str(BENCH))


def test_a_recurring_x1e3_batch_ruins_the_plain_run_and_zetaguard_rescues_it(bench: Any) -> None:
    families, _, mlp = bench
    reference = families.run_family(mlp, "healthy", 0, "none")
    assert reference.steps == mlp.steps
    assert reference.accuracy > 0.8  # the fault-free run learns the digits
    plain = families.run_family(mlp, "bad_x1e3", 0, "none")
    guarded = families.run_family(mlp, "bad_x1e3", 0, "zetaguard")
    assert not families.judge("bad_x1e3", plain, reference)
    assert not math.isfinite(plain.loss) or plain.loss > 10 * reference.loss
    assert families.judge("bad_x1e3", guarded, reference)
    assert guarded.steps == mlp.steps  # never stopped
    bad = len([t for t in range(mlp.steps) if t % families.K == families.K - 1])
    # Bad batches after the guard's warm-up are vetoed or undone, and nothing else is: no LR cut.
    assert 1 <= guarded.actions <= bad
    assert guarded.recoveries == 0


def test_zetaguard_takes_no_action_on_a_healthy_run_and_rescues_an_unstable_start(
    bench: Any,
) -> None:
    families, harness, mlp = bench
    reference = families.run_family(mlp, "healthy", 0, "none")
    healthy = families.run_family(mlp, "healthy", 0, "zetaguard")
    assert healthy.actions == 0
    assert harness.rescued(healthy, reference)
    unstable = families.run_family(mlp, "unstable_start", 0, "zetaguard")
    plain = families.run_family(mlp, "unstable_start", 0, "none")
    assert families.judge("unstable_start", unstable, reference)
    assert unstable.recoveries >= 1
    assert unstable.loss < unstable.initial_loss
    assert not families.judge("unstable_start", plain, reference)


def test_the_benchmark_refuses_an_unknown_family(bench: Any) -> None:
    families, harness, _ = bench
    with pytest.raises(ValueError, match="unknown family 'lr_typo'"):
        families.run_family(harness.MODELS[0], "lr_typo", 0, "none")
