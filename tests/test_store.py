"""The run store: round trip against the guard's own results, batching, crash safety,
migrations, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard import ZetaGuard
from zetaguard.results import RecoveryReport, StabilityResult
from zetaguard.store import (
    SCHEMA_VERSION,
    RunReader,
    RunStore,
    StoreError,
    list_runs,
)


def _train(
    guard: ZetaGuard, steps: int, seed: int = 0, blowup_at: int | None = None
) -> list[StabilityResult]:
    rng = np.random.default_rng(seed)
    w = {
        "l1.weight": rng.normal(size=(32, 16)).astype(np.float32),
        "l1.bias": rng.normal(size=32).astype(np.float32),
        "l2.weight": rng.normal(size=(4, 32)).astype(np.float32),
    }
    out = []
    for i in range(steps):
        scale = 0.01 if blowup_at is None or i < blowup_at else 0.01 * 3.0 ** (i - blowup_at + 1)
        for k in w:
            w[k] = w[k] - scale * rng.normal(size=w[k].shape).astype(np.float32)
        out.append(guard.monitor(w, loss=1.0 / (i + 1)))
    return out


def test_round_trip_matches_the_guard(tmp_path: Path) -> None:
    guard = ZetaGuard(run_dir=tmp_path, run_name="rt", warmup_steps=10)
    results = _train(guard, 40, blowup_at=30)
    guard.run_store.close()
    with RunReader(tmp_path / "rt") as r:
        rows = r.steps(groups=True)
        assert r.integrity_ok()
        assert r.meta()["config"]["warmup_steps"] == 10
    assert [row["step"] for row in rows] == [res.step for res in results]
    for row, res in zip(rows, results, strict=True):
        assert row["status"] == res.status
        assert (
            row["zeta"] == pytest.approx(res.zeta_value)
            if math.isfinite(res.zeta_value)
            else row["zeta"] is None
        )
        assert row["loss"] == pytest.approx(res.channels["loss"])
        assert row["worst_group"] == res.worst_group
        assert row["channels"].keys() == res.channels.keys()
        for name, g in res.groups.items():
            stored = row["groups"][name]
            assert stored["zeta"] == pytest.approx(g.zeta_value)
            for field in ("raw_jar", "update_ratio"):
                want = getattr(g, field)
                assert stored[field] == (pytest.approx(want) if want is not None else None)
    assert any(res.status != "STABLE" for res in results), "the blow-up must leave STABLE"


def test_recommendations_incidents_recoveries(tmp_path: Path) -> None:
    guard = ZetaGuard(run_dir=tmp_path, run_name="inc", warmup_steps=10, auto_recover=False)
    results = _train(guard, 40, blowup_at=30)
    store = guard.run_store
    bad = next(r for r in results if r.status != "STABLE")
    store.record_incident(bad.step, bad.status, bad.channels, bad.worst_group, 7, "lr_cut")
    store.record_recovery(
        RecoveryReport(
            step=bad.step,
            status="CRITICAL",
            actions=["rollback", "lr_cut"],
            lr_before=0.1,
            lr_after=0.01,
        )
    )
    # Committed at once, before close: a reader sees them (and every step before them).
    with RunReader(tmp_path / "inc") as r:
        assert len(r.steps()) == 40
        # The guard records its own incidents too (one per CRITICAL step); ours is the lr_cut.
        (inc,) = [i for i in r.incidents() if i["action"] == "lr_cut"]
        assert (inc["step"], inc["status"], inc["batch_index"], inc["action"]) == (
            bad.step,
            bad.status,
            7,
            "lr_cut",
        )
        (rec,) = r.recoveries()
        assert rec["actions"] == ["rollback", "lr_cut"]
        assert rec["report"]["lr_after"] == 0.01
        texts = [x["text"] for x in r.recommendations()]
        # Each distinct piece of advice once per change, not once per step.
        # Each piece of advice once per change of wording (numbers aside), not once per step.
        want = []
        prev: list[str] = []
        for res in results:
            wording = [re.sub(r"[\d.e+-]+", "", t) for t in res.recommendations]
            if res.recommendations and wording != prev:
                want.extend(res.recommendations)
            prev = wording
        assert texts == want
        assert texts
    store.close()


def test_runs_side_by_side_and_resume(tmp_path: Path) -> None:
    a = RunStore(tmp_path, run_name="a")
    b = RunStore(tmp_path, run_name="b")
    ga, gb = ZetaGuard(warmup_steps=5), ZetaGuard(warmup_steps=5)
    for res in _train(ga, 12):
        a.record_step(res)
    for res in _train(gb, 5):
        b.record_step(res)
    a.close()
    b.close()
    again = RunStore(tmp_path, run_name="a")  # reopening appends, never truncates
    again.record_step(_train(ZetaGuard(), 1)[0])
    again.close()
    runs = {r.name: r for r in list_runs(tmp_path)}
    assert runs["a"].steps == 13
    assert runs["b"].steps == 5
    auto = RunStore(tmp_path)  # a timestamp name, distinct from the others
    auto2 = RunStore(tmp_path)
    assert auto.run_name != auto2.run_name
    auto.close()
    auto2.close()


def test_nonfinite_values_read_back_as_none(tmp_path: Path) -> None:
    guard = ZetaGuard(run_dir=tmp_path, run_name="nan", warmup_steps=5)
    rng = np.random.default_rng(1)
    w = [rng.normal(size=(8, 8)).astype(np.float32)]
    for i in range(8):
        w = [w[0] - 0.01 * rng.normal(size=(8, 8)).astype(np.float32)]
        if i == 7:
            w[0][0, 0] = np.nan
        res = guard.monitor(w, loss=float("nan") if i == 7 else 1.0)
    assert res.status == "CRITICAL"
    guard.run_store.close()
    with RunReader(tmp_path / "nan") as r:
        last = r.steps(groups=True)[-1]
    assert last["status"] == "CRITICAL"
    assert last["loss"] is None
    assert last["nonfinite"] >= 1
    json.dumps(last, allow_nan=False)  # browser-safe


def test_batched_writes_flush_on_size_and_close(tmp_path: Path) -> None:
    store = RunStore(tmp_path, run_name="batch", flush_rows=10, flush_interval=3600)
    results = _train(ZetaGuard(warmup_steps=5), 25)
    for res in results[:9]:
        store.record_step(res)
    with RunReader(store.path) as r:
        assert r.steps() == []  # still buffered
    store.record_step(results[9])
    with RunReader(store.path) as r:
        assert len(r.steps()) == 10
    for res in results[10:]:
        store.record_step(res)
    store.close()
    with RunReader(store.path) as r:
        assert [s["step"] for s in r.steps()] == list(range(25))
    with pytest.raises(StoreError, match="closed"):
        store.record_step(results[0])


def test_background_flush_commits_a_stalled_loop(tmp_path: Path) -> None:
    store = RunStore(tmp_path, run_name="timer", flush_rows=1000, flush_interval=0.05)
    store.record_step(_train(ZetaGuard(), 1)[0])
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with RunReader(store.path) as r:
            if r.steps():
                break
        time.sleep(0.02)
    else:
        pytest.fail("the background flush never committed the buffered step")
    store.close()


CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from zetaguard import ZetaGuard
    guard = ZetaGuard(run_dir=sys.argv[1], run_name="crash", warmup_steps=5)
    rng = np.random.default_rng(0)
    w = [rng.normal(size=(16, 16)).astype(np.float32)]
    step = 0
    while True:
        w = [w[0] - 0.01 * rng.normal(size=(16, 16)).astype(np.float32)]
        guard.monitor(w, loss=1.0)
        step += 1
        if step % 7 == 0:
            guard.run_store.flush()
            print(step, flush=True)
    """
)


def test_kill_9_leaves_every_committed_step(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    committed = 0
    try:
        for line in proc.stdout:
            committed = int(line)
            if committed >= 70:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert committed >= 70
    with RunReader(tmp_path / "crash") as r:
        assert r.integrity_ok()
        steps = [s["step"] for s in r.steps()]
    assert len(steps) >= committed
    assert steps == list(range(len(steps)))


def test_migrations_are_recorded_and_newer_schema_refused(tmp_path: Path) -> None:
    store = RunStore(tmp_path, run_name="m")
    store.close()
    db = tmp_path / "m" / "run.sqlite"
    with sqlite3.connect(db) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        RunStore(tmp_path, run_name="m")
    with pytest.raises(StoreError, match="upgrade zetaguard"):
        RunReader(db)


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no run store"):
        RunReader(tmp_path / "missing")
    junk = tmp_path / "junk" / "run.sqlite"
    junk.parent.mkdir()
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a readable run store"):
        RunReader(junk)
    with pytest.raises(StoreError, match="cannot open run store"):
        RunStore(tmp_path, run_name="junk")
    assert junk.read_bytes() == b"this is not sqlite" * 100  # nothing overwritten
    assert [r.name for r in list_runs(tmp_path)] == []  # corrupt runs are skipped
    with pytest.raises(ValueError, match="run_name"):
        RunStore(tmp_path, run_name="../escape")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        RunStore(afile)
    with pytest.raises(StoreError, match="does not exist"):
        list_runs(tmp_path / "nowhere")


@settings(max_examples=25, deadline=None)
@given(
    channels=st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        max_size=6,
    ),
    zeta=st.floats(min_value=0, max_value=1e6),
)
def test_channels_round_trip(
    tmp_path_factory: pytest.TempPathFactory, channels: dict[str, float], zeta: float
) -> None:
    d = tmp_path_factory.mktemp("h")
    with RunStore(d, run_name="h") as store:
        store.record_step(
            StabilityResult(
                status="DRIFT",
                zeta_value=zeta,
                raw_jar=None,
                smoothed_jar=None,
                confidence=0.5,
                channels=channels,
            )
        )
    with RunReader(d / "h") as r:
        (row,) = r.steps(groups=True)
    assert row["zeta"] == pytest.approx(zeta)
    assert row["groups"] == {}
    assert row["worst_group"] is None
    want = {k: (v if math.isfinite(v) else None) for k, v in channels.items()}
    assert row["channels"] == want


def test_layer_labels_name_module_path_and_kind(tmp_path: Path) -> None:
    import torch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10)
    )
    model(torch.zeros(1, 3, 6, 6))  # materialise the lazy layer: Linear 128->10
    model.add_module("norm", torch.nn.LayerNorm(10))
    model.add_module("emb", torch.nn.Embedding(50, 4))
    guard = ZetaGuard(run_dir=tmp_path, run_name="labels", warmup_steps=2)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        guard.monitor(model)
    guard.close()
    with RunReader(tmp_path / "labels") as r:
        labels = r.group_labels()
        (last,) = r.tail(1)
        groups = r.steps(since_id=last["id"] - 1, groups=True)[0]["groups"]
    assert labels == {
        "0": "0 (Conv2d 3->8 3x3)",
        "3": "3 (Linear 128->10)",
        "norm": "norm (LayerNorm 10)",
        "emb": "emb (Embedding 50x4)",
    }
    assert {g["label"] for g in groups.values()} == set(labels.values())
    # The group names themselves stay the module paths the rest of the API uses.
    assert set(groups) == set(labels)


def test_group_labels_without_module_facts() -> None:
    from zetaguard.labels import group_labels

    assert group_labels(["a", "b"], None) == ["a", "b"]
    # group_by="tensor": the module is the name's head; a root parameter belongs to "".
    types = {"enc.0": "Linear 4->4", "": "MyNet"}
    assert group_labels(["enc.0.weight", "scale", "other.x"], types) == [
        "enc.0.weight (Linear 4->4)",
        "scale (MyNet)",
        "other.x",
    ]
