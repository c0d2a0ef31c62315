"""Arguments and inputs refused, not coerced (issue "Hardening II", item 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zetaguard import ZetaGuard

W = {"w": np.ones(4, np.float32)}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"auto_recover": "no"}, TypeError, "auto_recover must be True or False"),
        ({"warmup_steps": 2.7}, TypeError, "warmup_steps must be an integer"),
        ({"drift_threshold": "0.5"}, TypeError, "drift_threshold must be a number"),
        ({"threads": 0}, ValueError, "threads must be >= 1"),
        ({"run_name": "../escape"}, ValueError, "run_name"),
        ({"run_name": ""}, ValueError, "run_name"),
    ],
)
def test_constructor_refuses(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ZetaGuard(**kwargs)


def test_number_strings_are_refused() -> None:
    with pytest.raises(TypeError, match=r"loss must be a number.*str"):
        ZetaGuard().monitor(W, loss="nan")
    with pytest.raises(TypeError, match=r"grad_norm must be a number.*str"):
        ZetaGuard().monitor(W, grad_norm="1")
    r = ZetaGuard().monitor(W, loss=np.float32(0.5), grad_norm=1)  # real numbers still read
    assert r.channels["loss"] == 0.5


def test_bytes_input_names_its_type() -> None:
    with pytest.raises(TypeError, match="bytes object"):
        ZetaGuard().monitor(b"abcd")
    with pytest.raises(TypeError, match="is a bytes with buffer format"):
        ZetaGuard().monitor({"a": b"abcd"})


class _Raises:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)


def test_interrupts_inside_dlpack_propagate() -> None:
    with pytest.raises(KeyboardInterrupt):
        ZetaGuard().monitor([_Raises(KeyboardInterrupt())])
    with pytest.raises(SystemExit):
        ZetaGuard().monitor([_Raises(SystemExit(3))])
    with pytest.raises(ValueError, match="could not be exported through DLPack"):
        ZetaGuard().monitor([_Raises(RuntimeError("broken producer"))])


def test_ml_dtypes_bfloat16_arrays_are_read_exactly() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(1)
    bf = ZetaGuard(auto_recover=False)
    f32 = ZetaGuard(auto_recover=False)
    for _ in range(6):
        x = rng.normal(size=64).astype(ml_dtypes.bfloat16)
        a, b = bf.monitor({"w": x}), f32.monitor({"w": x.astype(np.float32)})  # exact widening
        assert a.raw_jar == b.raw_jar
        assert a.zeta_value == b.zeta_value
    with pytest.raises(ValueError, match="ascontiguousarray"):
        ZetaGuard().monitor({"w": np.ones(8, ml_dtypes.bfloat16)[::2]})


def test_nested_tensor_gets_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    nt = torch.nested.nested_tensor([torch.ones(3), torch.ones(5)])
    with pytest.raises(TypeError, match="nested tensor"):
        ZetaGuard(auto_recover=False).monitor({"n": nt})


def test_orphan_temporaries_are_pruned(tmp_path: Path) -> None:
    import fcntl
    import os
    import time

    target = tmp_path / "guard.npz"
    orphan = tmp_path / ".guard.npz.abc123xy.tmp"  # what a writer killed mid-save leaves
    fresh = tmp_path / ".guard.npz.fresh0001.tmp"  # a writer that may still be working
    live = tmp_path / ".guard.npz.live00001.tmp"  # old, but its writer holds the lock
    other = tmp_path / ".other.npz.abc123xy.tmp"  # another file's temporary
    for p in (orphan, fresh, live, other):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    for p in (orphan, live, other):
        os.utime(p, (old, old))
    with open(live, "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        g = ZetaGuard()
        g.monitor(W)
        g.save_state(target)
    assert not orphan.exists()
    assert fresh.exists()
    assert live.exists()
    assert other.exists()
    ZetaGuard().load_state(target)


def test_run_name_reuse_never_mixes_step_numbers(tmp_path: Path) -> None:
    from zetaguard.store import RunReader, StoreError

    first = ZetaGuard(auto_recover=False, run_dir=tmp_path, run_name="job")
    for _ in range(5):
        first.monitor(W)
    first.save_state(tmp_path / "guard.npz")
    first.close()
    restarted = ZetaGuard(auto_recover=False, run_dir=tmp_path, run_name="job")
    with pytest.raises(StoreError, match="already holds steps up to 4"):
        restarted.monitor(W)
    resumed = ZetaGuard(auto_recover=False, run_dir=tmp_path, run_name="job")
    resumed.load_state(tmp_path / "guard.npz")
    for _ in range(3):
        resumed.monitor(W)
    resumed.close()
    with RunReader(tmp_path / "job" / "run.sqlite") as reader:
        steps = [row["step"] for row in reader.steps()]
    assert steps == list(range(8))
