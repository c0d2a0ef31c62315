"""Resume-exact: save mid-run, load in a NEW process, continue; results must equal an
uninterrupted run bit for bit. A truncated or corrupt state file is refused with a clear error,
leaves the loading guard untouched, and a good file is only ever replaced whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard
from zetaguard._atomic import atomic_write
from zetaguard.state import StateFileError

STEPS = 60
SAVE_AT = 27
WARMUP = 10


def trajectory(seed: int = 7) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """A noisy decaying trajectory over mixed dtypes, with a spike and a NaN after the resume
    point so the continued run crosses DRIFT/CRITICAL paths too."""
    rng = np.random.default_rng(seed)
    shapes = {"enc.weight": (64, 80), "enc.bias": (80,), "dec.weight": (80, 16), "head": (300,)}
    dtypes = {
        "enc.weight": np.float32,
        "enc.bias": np.float64,
        "dec.weight": np.float16,
        "head": np.float32,
    }
    x = {k: rng.normal(size=s) for k, s in shapes.items()}
    steps, losses = [], []
    for t in range(STEPS):
        scale = 1e-2 * (50.0 if t == 45 else 1.0)
        for k in x:
            x[k] = x[k] - scale * (0.1 * x[k] + rng.normal(size=x[k].shape))
        snap = {k: v.astype(dtypes[k]) for k, v in x.items()}
        if t == 52:
            snap["head"][5] = np.nan
        steps.append(snap)
        losses.append(float(np.exp(-t / 30.0) + 0.01 * rng.random()))
    return steps, losses


def exact_floats(obj: Any) -> Any:
    """JSON-able form in which floats compare bit for bit (hex), NaN and inf included."""
    if isinstance(obj, float):
        return obj.hex()
    if isinstance(obj, dict):
        return {str(k): exact_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [exact_floats(v) for v in obj]
    if isinstance(obj, np.generic):
        return exact_floats(obj.item())
    return obj


def describe(result: Any) -> Any:
    d = result.to_dict()
    d.pop("timestamp")
    d["groups"] = {name: vars(g) for name, g in result.groups.items()}
    return exact_floats(d)


def guard_for(mode: str) -> ZetaGuard:
    return ZetaGuard(
        warmup_steps=WARMUP,
        mode=mode,
        sketch_buckets=256,
        group_by="layer",
        auto_recover=False,
        threads=1,
    )


CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[4])
from test_resume_exact import describe, guard_for
data = np.load(sys.argv[2])
start = int(sys.argv[3])
guard = guard_for(sys.argv[5])
guard.load_state(sys.argv[1])
names = json.loads(str(data["names"]))
out = []
for t in range(start, int(data["steps"])):
    params = {k: data[f"{t}/{k}"] for k in names}
    out.append(describe(guard.monitor(params, loss=float(data["losses"][t]))))
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exact", "sketch"])
def test_resume_in_new_process_is_bit_identical(tmp_path: Path, mode: str) -> None:
    steps, losses = trajectory()
    guard = guard_for(mode)
    uninterrupted = []
    for t, (params, loss) in enumerate(zip(steps, losses, strict=True)):
        if t == SAVE_AT:
            guard.save_state(tmp_path / "mid.zg")
        uninterrupted.append(describe(guard.monitor(params, loss=loss)))
    assert guard.get_statistics()["engine"]["mode"] == mode
    statuses = {r["status"] for r in uninterrupted[SAVE_AT:]}
    assert "CRITICAL" in statuses, "the continued run should cross the NaN at step 52"

    arrays = {f"{t}/{k}": v for t, snap in enumerate(steps) for k, v in snap.items()}
    np.savez(
        tmp_path / "traj.npz",
        names=json.dumps(list(steps[0])),
        steps=STEPS,
        losses=np.array(losses),
        **arrays,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(tmp_path / "mid.zg"),
            str(tmp_path / "traj.npz"),
            str(SAVE_AT),
            str(Path(__file__).parent),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(resumed) == STEPS - SAVE_AT
    for t, (a, b) in enumerate(zip(uninterrupted[SAVE_AT:], resumed, strict=True), SAVE_AT):
        assert a == b, f"step {t} differs after resume"


def good_state(tmp_path: Path, steps: int = 12) -> tuple[Path, ZetaGuard]:
    traj, losses = trajectory()
    guard = guard_for("exact")
    for t in range(steps):
        guard.monitor(traj[t], loss=losses[t])
    path = tmp_path / "good.zg"
    guard.save_state(path)
    return path, guard


def next_results(guard: ZetaGuard, start: int, count: int = 5) -> list[Any]:
    traj, losses = trajectory()
    return [describe(guard.monitor(traj[t], loss=losses[t])) for t in range(start, start + count)]


def test_truncated_file_is_refused_and_guard_untouched(tmp_path: Path) -> None:
    path, _ = good_state(tmp_path)
    blob = path.read_bytes()
    # The guard that tries to load has a run of its own; a refused file must leave it intact.
    _, bystander = good_state(tmp_path / "other", steps=15)
    _, twin = good_state(tmp_path / "twin", steps=15)
    for cut in sorted(
        {0, 1, 10, 100, len(blob) // 3, len(blob) // 2, len(blob) - 22, len(blob) - 1}
    ):
        bad = tmp_path / f"cut{cut}.zg"
        bad.write_bytes(blob[:cut])
        with pytest.raises(StateFileError, match=r"truncated or corrupt|not a zetaguard|earlier"):
            bystander.load_state(bad)
    assert next_results(bystander, 15) == next_results(twin, 15)


def test_missing_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match=r"save one with guard\.save_state"):
        guard_for("exact").load_state(tmp_path / "nope.zg")


def test_flipped_bits_are_refused_or_harmless(tmp_path: Path) -> None:
    """Every single-bit flip either is refused or lands in a byte nothing reads (zip
    timestamps, 'version made by'), in which case the loaded guard behaves exactly as the
    good file's."""
    path, _ = good_state(tmp_path)
    blob = bytearray(path.read_bytes())
    reference = guard_for("exact")
    reference.load_state(path)
    expected = next_results(reference, 12, count=3)
    rng = np.random.default_rng(3)
    positions = sorted(set(rng.integers(0, len(blob), size=150).tolist()) | {len(blob) - 1, 0})
    refused = 0
    for pos in positions:
        flipped = bytearray(blob)
        flipped[pos] ^= 1 << int(rng.integers(0, 8))
        bad = tmp_path / "flip.zg"
        bad.write_bytes(bytes(flipped))
        guard = guard_for("exact")
        try:
            guard.load_state(bad)
        except StateFileError as e:
            message = str(e)
        else:
            assert next_results(guard, 12, count=3) == expected, f"flip at byte {pos} went unseen"
            continue
        assert str(bad) in message
        refused += 1
    assert refused >= len(positions) * 0.8


def test_inconsistent_header_is_a_state_file_error(tmp_path: Path) -> None:
    """A file with a valid checksum but a header the guard cannot use (as written by another
    tool) is refused with StateFileError, not a KeyError from deep inside."""
    from zetaguard import state

    path, _ = good_state(tmp_path)
    meta, arrays = state.load(path)
    for broken in (
        {"config": {}},
        {"engine": {**meta["engine"], "history": 7}},
        {"engine": {**meta["engine"], "tensors": meta["engine"]["tensors"][:1]}},
        {"names": 5},
    ):
        m = {k: v for k, v in meta.items() if k not in ("format", "version", "sha256")}
        m.update(broken)
        state.save(tmp_path / "odd.zg", m, arrays)
        with pytest.raises(StateFileError, match=r"inconsistent guard state|earlier copy"):
            guard_for("exact").load_state(tmp_path / "odd.zg")


def test_save_replaces_the_file_whole(tmp_path: Path) -> None:
    """save_state writes a new file and renames it over the old one: a reader holding the old
    file keeps reading the complete old bytes, never a mix."""
    path, guard = good_state(tmp_path)
    old = path.read_bytes()
    with open(path, "rb") as reader:
        next_results(guard, 12)
        guard.save_state(path)
        assert reader.read() == old
    assert path.read_bytes() != old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_failed_write_keeps_previous_file(tmp_path: Path) -> None:
    path, _ = good_state(tmp_path)
    old = path.read_bytes()

    def half_then_fail(f: Any) -> None:
        f.write(old[: len(old) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


KILLED_WRITER = r"""
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from test_resume_exact import guard_for
guards = []
for value in (1.0, 2.0):
    g = guard_for("exact")
    g.monitor({"w": np.full(2_000_000, value, np.float32)})
    guards.append(g)
guards[1].save_state(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    guards[i % 2].save_state(sys.argv[1])
    i += 1
"""


@pytest.mark.slow
def test_killed_writer_never_leaves_a_partial_file(tmp_path: Path) -> None:
    """SIGKILL a process that keeps saving: the path always holds one complete state."""
    target = tmp_path / "live.zg"
    rng = np.random.default_rng(11)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_WRITER, str(target), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.3 * float(rng.random()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        guard = guard_for("exact")
        guard.load_state(target)  # raises if the file were partial
        value = guard._engine.tracker.get_state()["tensors"][0]["slots"][0].view(np.float32)[0]  # type: ignore[union-attr]
        assert value in (1.0, 2.0)
