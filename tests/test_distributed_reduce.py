"""The cross-rank arithmetic of zetaguard.distributed, in one process.

Several "ranks" are simulated with one engine each over their shards (or replicas) of the same
trajectory; their packets are summed as an all-reduce would, and the result must equal one
engine over the whole tensors. tests/test_distributed.py runs the real 2-process version.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard, _core, distributed
from zetaguard.distributed import pack_step, unpack_step

STEPS = 5


@st.composite
def sharded_runs(draw: st.DrawFn) -> tuple[int, list[int], list[bool], list[list[int]], int]:
    world = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4))
    replicated = [draw(st.booleans()) for _ in sizes]
    cuts = [
        sorted(draw(st.lists(st.integers(0, n), min_size=world - 1, max_size=world - 1)))
        for n in sizes
    ]
    seed = draw(st.integers(0, 2**31 - 1))
    return world, sizes, replicated, cuts, seed


def _simulate(
    world: int,
    trajectory: list[list[np.ndarray]],
    replicated: list[bool],
    cuts: list[list[int]],
    losses: np.ndarray,
) -> list[distributed.ReducedStep]:
    trackers = [_core.Tracker(mode="exact") for _ in range(world)]
    out = []
    for step, whole in enumerate(trajectory):
        total = None
        for rank in range(world):
            tensors, weights = [], []
            for t, rep, cut in zip(whole, replicated, cuts, strict=True):
                if rep:
                    tensors.append(t)
                    weights.append(1.0 / world)
                else:
                    bounds = [0, *cut, t.size]
                    tensors.append(np.ascontiguousarray(t[bounds[rank] : bounds[rank + 1]]))
                    weights.append(1.0)  # shards/world with world shards
            rows = trackers[rank].update(tensors)
            packet = pack_step(
                rows * np.asarray(weights)[:, None],
                local_nonfinite=float(rows[:, 4].sum()),
                loss=float(losses[rank, step]),
                grad_norm=None,
                grad_sq=None,
                grad_nonfinite=None,
                call=step + 1,
                rank=rank,
                world=world,
            )
            total = packet if total is None else total + packet
        assert total is not None
        out.append(unpack_step(total, (len(whole), 5), world))
    return out


@settings(max_examples=40, deadline=None)
@given(sharded_runs())
def test_summed_packets_equal_one_engine_over_the_whole_tensors(
    run: tuple[int, list[int], list[bool], list[list[int]], int],
) -> None:
    world, sizes, replicated, cuts, seed = run
    rng = np.random.default_rng(seed)
    trajectory = [[rng.standard_normal(n).astype(np.float32) for n in sizes]]
    for _ in range(STEPS - 1):
        trajectory.append(
            [t + 0.1 * rng.standard_normal(t.size).astype(np.float32) for t in trajectory[-1]]
        )
    bad_step = int(rng.integers(0, STEPS))
    bad_tensor = int(rng.integers(0, len(sizes)))
    trajectory[bad_step][bad_tensor] = trajectory[bad_step][bad_tensor].copy()
    trajectory[bad_step][bad_tensor][0] = np.nan  # one non-finite value, somewhere
    losses = rng.uniform(0.5, 2.0, size=(world, STEPS))

    reduced = _simulate(world, trajectory, replicated, cuts, losses)
    whole = _core.Tracker(mode="exact")
    for step, got in enumerate(reduced):
        want = whole.update(trajectory[step])
        assert got.in_step
        np.testing.assert_allclose(got.rows[:, :4], want[:, :4], rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(got.rows[:, 4], want[:, 4])
        assert got.loss == pytest.approx(float(np.mean(losses[:, step])), rel=1e-12)
        assert got.channels["rank_max_loss"] == float(np.argmax(losses[:, step]))
        # Which rank saw the NaN: the owner of element 0 of that tensor (every rank if replicated).
        if step == bad_step:
            owners = world if replicated[bad_tensor] else 1
            assert got.channels["rank_nonfinite_count"] == owners
        else:
            assert got.channels["rank_nonfinite_count"] == 0


def _packet(rank: int, world: int, call: int, **kw: float | None) -> np.ndarray:
    args: dict[str, float | None] = {
        "loss": None,
        "grad_norm": None,
        "grad_sq": None,
        "grad_nonfinite": None,
    }
    args.update(kw)
    return pack_step(
        np.zeros((1, 5)),
        local_nonfinite=0.0,
        call=call,
        rank=rank,
        world=world,
        **args,  # type: ignore[arg-type]
    )


def test_ranks_out_of_step_are_detected_by_every_rank() -> None:
    world = 3
    # Calls 4, 4, 4: in step. Calls 3, 4, 5 have the same sum but not the same squares.
    assert unpack_step(sum(_packet(r, world, 4) for r in range(world)), (1, 5), world).in_step
    skewed = sum(_packet(r, world, 3 + r) for r in range(world))
    assert not unpack_step(skewed, (1, 5), world).in_step
    # A rank missing from the sum (fewer packets than ranks) is caught too.
    assert not unpack_step(_packet(0, world, 4) + _packet(1, world, 4), (1, 5), world).in_step


def test_gradient_norms_local_shards_add_and_caller_norms_average() -> None:
    world = 2
    local = [_packet(r, world, 1, grad_sq=sq, grad_nonfinite=0.0) for r, sq in enumerate((9, 16))]
    assert unpack_step(local[0] + local[1], (1, 5), world).grad_norm == pytest.approx(5.0)
    given_norms = [_packet(r, world, 1, grad_norm=g) for r, g in enumerate((2.0, 4.0))]
    assert unpack_step(given_norms[0] + given_norms[1], (1, 5), world).grad_norm == 3.0
    bad = [_packet(r, world, 1, grad_sq=1.0, grad_nonfinite=float(r)) for r in range(world)]
    reduced = unpack_step(bad[0] + bad[1], (1, 5), world)
    assert reduced.grad_norm == math.inf
    assert reduced.channels["rank_first_nonfinite"] == 1.0


def test_a_replicated_nonfinite_count_is_not_averaged_away() -> None:
    world = 4
    rows = np.array([[1.0, 0.0, 0.0, 0.0, 1.0]]) / world  # one NaN on one replica of four
    total = pack_step(
        rows,
        local_nonfinite=1.0,
        loss=None,
        grad_norm=None,
        grad_sq=None,
        grad_nonfinite=None,
        call=1,
        rank=0,
        world=world,
    )
    for r in range(1, world):
        total = total + pack_step(
            np.zeros((1, 5)),
            local_nonfinite=0.0,
            loss=None,
            grad_norm=None,
            grad_sq=None,
            grad_nonfinite=None,
            call=1,
            rank=r,
            world=world,
        )
    assert unpack_step(total, (1, 5), world).rows[0, 4] == 1.0


def test_single_process_guard_neither_imports_torch_nor_reduces() -> None:
    code = (
        "import sys, numpy as np, zetaguard, zetaguard.distributed as d\n"
        "g = zetaguard.ZetaGuard(mode='exact')\n"
        "g.monitor({'w': np.ones(3, np.float32)})\n"
        "assert not d.active() and g._dist is None and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_configure_rejects_a_useless_timeout() -> None:
    guard = ZetaGuard()
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        distributed.configure(guard, timeout_s=0)
    assert distributed.configure(guard, enabled=False) is guard
    assert distributed.current(guard) is None
