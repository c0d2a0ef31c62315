"""Emergency checkpoints: pruning keeps the newest ``keep`` checkpoints, whole."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zetaguard.checkpoint import checkpoint_stem
from zetaguard.recovery.emergency import prune_checkpoints


def _write(directory: Path, step: int) -> None:
    stem = checkpoint_stem(step)
    (directory / f"{stem}.pt").write_bytes(b"x")
    (directory / f"{stem}.zetaguard.rank0.npz").write_bytes(b"x")
    sharded = directory / stem  # torch.distributed.checkpoint writes a directory
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"x")


@settings(max_examples=25, deadline=None)
@given(steps=st.sets(st.integers(0, 10**6), min_size=1, max_size=8), keep=st.integers(1, 4))
def test_pruning_keeps_the_newest_checkpoints_files_and_directories(
    tmp_path_factory: pytest.TempPathFactory, steps: set[int], keep: int
) -> None:
    directory = tmp_path_factory.mktemp("ckpt")
    for step in steps:
        _write(directory, step)
    newest = checkpoint_stem(max(steps))
    prune_checkpoints(directory, keep_stem=newest, keep=keep)
    kept = sorted(steps)[-keep:]
    want = set()
    for step in kept:
        stem = checkpoint_stem(step)
        want |= {f"{stem}.pt", f"{stem}.zetaguard.rank0.npz", stem, f"{stem}/__0_0.distcp"}
    have = {p.relative_to(directory).as_posix() for p in directory.rglob("*")}
    assert have == want
