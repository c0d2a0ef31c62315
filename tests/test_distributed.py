"""Two processes on gloo (CPU): DDP and FSDP2 against the single-process guard, one status on
every rank, sharded rollback and checkpoints, rank 0's run store, and a dying rank.

One world runs every scenario (tests/support/distributed_worker.py); starting processes dominates the
cost on a small machine, so the tests below read what that one world wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from zetaguard import ZetaGuard, _core  # noqa: E402

from tests.support.distributed_worker import (  # noqa: E402
    NAN_LOSS_STEP,
    RECOVER_NAN_STEP,
    SKETCH_BUCKETS,
    STEPS,
    VETO_NAN_STEP,
    VETO_STEPS,
    build_model,
)

pytestmark = pytest.mark.slow
WORLD = 2
WORKER = Path(__file__).parent / "support" / "distributed_worker.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--out",
                str(out),
                "--rank",
                str(r),
                "--world",
                str(WORLD),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-rank world did not finish within 240 s")
    for r, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return out


def _load(world: Path, kind: str, rank: int) -> tuple[dict[str, Any], Any]:
    records = json.loads((world / f"{kind}_rank{rank}.json").read_text())
    return records, np.load(world / f"{kind}_rank{rank}.npz")


def _reference(world: Path, kind: str, mode: str) -> list[Any]:
    """The single-process guard on the same trajectory: whole parameters and gradients, the
    loss averaged over ranks."""
    _, arrays = _load(world, kind, 0)
    losses = np.mean([_load(world, kind, r)[1]["loss"] for r in range(WORLD)], axis=0)
    model = build_model()
    prefix = "module." if kind == "ddp" else ""
    guard = ZetaGuard(warmup_steps=4, mode=mode, sketch_buckets=SKETCH_BUCKETS, auto_recover=False)
    out = []
    for step in range(STEPS):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(arrays[f"param/{step}/{prefix}{name}"]))
                p.grad = torch.from_numpy(arrays[f"grad/{step}/{prefix}{name}"]).clone()
        out.append(guard.monitor(model, loss=float(losses[step])))
    return out


def _assert_matches(records: list[dict[str, Any]], reference: list[Any], rtol: float) -> None:
    assert len(records) == len(reference) == STEPS
    for rec, ref in zip(records, reference, strict=True):
        assert rec["status"] == ref.status, f"step {ref.step}"
        np.testing.assert_allclose(rec["zeta"], ref.zeta_value, rtol=rtol)
        if ref.raw_jar is None:
            assert rec["raw_jar"] is None
        else:
            np.testing.assert_allclose(rec["raw_jar"], ref.raw_jar, rtol=rtol, equal_nan=True)
        for key, value in ref.channels.items():
            np.testing.assert_allclose(rec["channels"][key], value, rtol=rtol, err_msg=key)
        np.testing.assert_allclose(np.asarray(rec["rows"]), ref.group_rows, rtol=rtol)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_exact_mode_equals_single_process_guard(world: Path, kind: str) -> None:
    records, _ = _load(world, kind, 0)
    _assert_matches(records["exact"], _reference(world, kind, "exact"), rtol=1e-9)


def test_ddp_sketch_mode_equals_single_process_guard(world: Path) -> None:
    # Replicas hold the whole tensor, so their sketches are the single-process sketches.
    records, _ = _load(world, "ddp", 0)
    _assert_matches(records["sketch"], _reference(world, "ddp", "sketch"), rtol=1e-9)


def test_fsdp_sketch_mode_sums_the_shards_estimates(world: Path) -> None:
    """Each rank sketches its own shards; the guard adds the per-shard estimates. Reference:
    a sketch engine per rank over that rank's recorded shards, summed over ranks."""
    records, arrays0 = _load(world, "fsdp", 0)
    names = [n for n, _ in build_model().named_parameters()]
    groups = [n.rpartition(".")[0] for n in names]
    expected = np.zeros((STEPS, len(dict.fromkeys(groups)), 5))
    group_index = [list(dict.fromkeys(groups)).index(g) for g in groups]
    for rank in range(WORLD):
        _, arrays = _load(world, "fsdp", rank)
        tracker = _core.Tracker(mode="sketch", sketch_buckets=SKETCH_BUCKETS, seed=0x5EED)
        for step in range(STEPS):
            rows = tracker.update([arrays[f"local/{step}/{n}"].ravel() for n in names])
            for i, g in enumerate(group_index):
                expected[step, g] += rows[i]
    got = np.asarray([r["rows"] for r in records["sketch"]])
    np.testing.assert_allclose(got[:, :, :4], expected[:, :, :4], rtol=1e-9)
    # The sharded sketch really is an estimate, not a copy of the exact values (x2 is exact).
    exact = np.asarray([r["rows"] for r in records["exact"]])
    np.testing.assert_allclose(got[:, :, 0], exact[:, :, 0], rtol=1e-12)
    assert not np.allclose(got[3:, :, 3], exact[3:, :, 3], rtol=1e-6)
    assert arrays0["loss"].shape == (STEPS,)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_every_rank_reaches_the_same_decision(world: Path, kind: str) -> None:
    per_rank = [_load(world, kind, r)[0] for r in range(WORLD)]
    for mode in ("exact", "sketch"):
        assert per_rank[0][mode] == per_rank[1][mode]
        # Rank 1 alone reported a NaN loss: both ranks go CRITICAL and name rank 1.
        bad = per_rank[0][mode][NAN_LOSS_STEP]
        assert bad["status"] == "CRITICAL"
        assert bad["channels"]["rank_first_nonfinite"] == 1.0
        assert bad["channels"]["rank_nonfinite_count"] == 1.0
        healthy = per_rank[0][mode][NAN_LOSS_STEP - 1]["channels"]
        assert healthy["rank_first_nonfinite"] == -1.0


def test_rank_loss_channels_name_the_rank_with_the_largest_loss(world: Path) -> None:
    records, _ = _load(world, "ddp", 0)
    losses = np.stack([_load(world, "ddp", r)[1]["loss"] for r in range(WORLD)])
    for step in range(NAN_LOSS_STEP):
        ch = records["exact"][step]["channels"]
        assert ch["rank_max_loss"] == float(np.argmax(losses[:, step]))
        np.testing.assert_allclose(ch["rank_loss_spread"], np.ptp(losses[:, step]), rtol=1e-12)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_fsdp_rollback_restores_every_rank_to_the_snapshot(world: Path, where: str) -> None:
    for rank in range(WORLD):
        r = json.loads((world / f"rollback_rank{rank}.json").read_text())[where]
        assert r["moved"] > 1e-3  # training moved the weights away from the snapshot
        assert r["max_diff_full"] == 0.0
        assert r["max_diff_local"] == 0.0
        assert r["max_diff_momentum"] == 0.0
        assert r["same_objects"]  # restored in place: optimizer and FSDP keep their tensors
        assert r["lr"] == pytest.approx(0.025)  # the LR cut made after the snapshot stays
        if where == "disk":  # the snapshot directory goes when the snapshot is dropped
            assert not Path(r["snapshot_path"]).exists()


def test_sharded_grad_norm_equals_the_whole_gradient_norm(world: Path) -> None:
    for rank in range(WORLD):
        r = json.loads((world / f"rollback_rank{rank}.json").read_text())
        whole = np.sqrt(sum(float(np.sum(np.square(g))) for g in r["grads"].values()))
        np.testing.assert_allclose(r["grad_norm"], whole, rtol=1e-12)
        # Clipping scales every rank's shards by the one global factor.
        assert r["clip_before"] == r["grad_norm"]
        np.testing.assert_allclose(r["clip_after"], whole / 2, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_emergency_checkpoint_is_a_complete_sharded_directory(world: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import load

    r = json.loads((world / "rollback_rank0.json").read_text())
    (path,) = r["checkpoint"]
    ckpt = Path(path)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "guard.json",
    ]
    assert json.loads((ckpt / "guard.json").read_text()) == {"step": 7}
    assert not list(ckpt.parent.glob(".tmp-*"))  # written aside, then renamed
    # One process reads the shards of both ranks back into a whole model.
    model = build_model()
    state = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    load(state, storage_reader=FileSystemReader(ckpt), no_dist=True)
    for name, value in r["checkpoint_params"].items():
        np.testing.assert_array_equal(state["model"][name].numpy(), np.asarray(value))


def test_only_rank_zero_writes_the_run_store(world: Path) -> None:
    from zetaguard.store import RunReader, list_runs

    runs = list_runs(world / "runs")
    assert len(runs) == 1  # both ranks passed the same run_dir; the dashboard sees one run
    assert runs[0].steps == STEPS
    with RunReader(runs[0].path) as reader:
        steps = reader.steps()
    bad = steps[NAN_LOSS_STEP]
    assert bad["status"] == "CRITICAL"
    assert bad["channels"]["rank_first_nonfinite"] == 1.0  # rank 1's incident, forwarded


def test_ranks_monitoring_different_tensors_all_raise(world: Path) -> None:
    for rank in range(WORLD):
        msg = json.loads((world / f"mismatch_rank{rank}.json").read_text())["error"]
        assert msg is not None
        assert "monitor different parameters" in msg


def test_a_hung_or_dead_rank_makes_the_others_fail_clearly(world: Path) -> None:
    hung, dead = json.loads((world / "failure_rank0.json").read_text())
    for err in (hung, dead):
        assert err["error"] is not None
        assert "another rank probably died, hung, or skipped monitor()" in err["error"]
    # The guard's own deadline (2 s) ended the wait, not the process group's (120 s).
    assert "timed out" in hung["error"]
    assert hung["seconds"] < 60


def test_guard_recovery_under_fsdp_rolls_every_rank_back_to_the_same_snapshot(
    world: Path,
) -> None:
    runs = [json.loads((world / f"recover_rank{r}.json").read_text()) for r in range(WORLD)]
    assert runs[0]["statuses"] == runs[1]["statuses"]
    assert runs[0]["reports"] == runs[1]["reports"]  # the same actions on every rank
    assert all(run["backend"] == "ShardedBackend" for run in runs)
    (report,) = runs[0]["reports"]
    assert report["step"] == RECOVER_NAN_STEP
    assert runs[0]["statuses"][RECOVER_NAN_STEP] == "CRITICAL"
    restored = report["restored_step"]
    assert restored is not None
    assert restored < RECOVER_NAN_STEP
    # A one-step NaN with healthy steps around it is a transient: undone, the LR left alone.
    assert report["lr_after"] == pytest.approx(0.05)
    for run in runs:  # after the rollback: exactly the parameters of the snapshot's step
        for name, value in run["after"][RECOVER_NAN_STEP].items():
            np.testing.assert_array_equal(value, run["after"][restored][name])
        assert run["after"][RECOVER_NAN_STEP] != run["after"][RECOVER_NAN_STEP - 1]
    assert report["checkpoint_path"] is None  # an undone transient writes no emergency checkpoint


def test_one_ranks_step_veto_skips_the_step_on_every_rank(world: Path) -> None:
    runs = [json.loads((world / f"veto_rank{r}.json").read_text()) for r in range(WORLD)]
    expected = [step != VETO_NAN_STEP for step in range(VETO_STEPS)]
    assert runs[0]["landed"] == runs[1]["landed"] == expected
    assert runs[0]["params"] == runs[1]["params"]  # the DDP replicas stayed identical
