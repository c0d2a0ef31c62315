"""A fast slice of scripts/fuzz.py for CI: hypothesis drives the same harness (one byte string
decodes to one case), per case, so every entry point gets its share. Each input must succeed
with results equal to a NumPy reference of the same memory, or be refused with a clear
ValueError/TypeError; a DLPack deleter runs at most once. The full run is
``python scripts/fuzz.py --runs 100000``."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zetaguard import _core


def _load_fuzz() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("zetaguard_fuzz", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zetaguard_fuzz"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()

EXAMPLES = {"buffer": 400, "torch": 300, "capsule": 400, "state": 150, "resize": 150}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("zetaguard").setLevel(logging.ERROR)  # CRITICAL steps are expected
    warnings.simplefilter("ignore")


# Hypothesis' own byte strings lean towards zeros (and shrink to them); uniformly random ones
# from a drawn seed reach deeper into each case. Both are used.
FUZZ_BYTES = st.binary(max_size=300) | st.builds(
    lambda seed, n: np.random.default_rng(seed).bytes(n),
    st.integers(0, 2**32 - 1),
    st.integers(0, 300),
)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXAMPLES))
def test_fuzz_case(case: str) -> None:
    @settings(
        max_examples=EXAMPLES[case],
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # The same inputs every run: a damaged state file survives in ~5% of them (1-13 of
        # 150 over 40 random runs), and a full test run here once drew none, failing the check
        # below on luck, not on the harness. scripts/fuzz.py explores with other seeds.
        derandomize=True,
    )
    @given(FUZZ_BYTES)
    def run(data: bytes) -> None:
        fuzz.fuzz_one(data, case)

    before = fuzz.tally[case]
    run()
    assert fuzz.tally[case] - before >= EXAMPLES[case] // 2
    # Both outcomes must be reachable, or the case is not testing what it claims to.
    assert fuzz.tally[f"{case}:accepted"] > 0
    assert fuzz.tally[f"{case}:refused"] > 0


def _capsules(count: int) -> list[object]:
    rng = np.random.default_rng(5)
    return [fuzz.CapsuleCase(fuzz.Reader(rng.bytes(200))) for _ in range(count)]


def test_consumed_capsule_deleter_runs_once_and_reuse_is_refused() -> None:
    """Capsules the engine reads: each deleter runs exactly once, the numbers match NumPy on
    the same memory, and passing the used capsule again is refused by name."""
    read = 0
    for case in _capsules(300):
        try:
            rows = _core.Tracker().norms([case.capsule])  # type: ignore[attr-defined]
        except (ValueError, TypeError):
            continue
        fuzz.check_norms(rows, [case.reference()])  # type: ignore[attr-defined]
        assert case.deleted == 1  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match="consumed only once"):
            _core.Tracker().norms([case.capsule])  # type: ignore[attr-defined]
        assert case.deleted == 1  # type: ignore[attr-defined]
        read += 1
    assert read > 20


def test_impossible_capsules_are_refused() -> None:
    """Shapes whose size overflows, negative dimensions, absurd ndim and byte offsets past the
    address space: refused with a clear error before any memory is read."""
    refused = 0
    for case in _capsules(400):
        if case.honest:  # type: ignore[attr-defined]
            continue
        with pytest.raises((ValueError, TypeError), match=r".{15,}"):
            _core.Tracker().norms([case.capsule])  # type: ignore[attr-defined]
        refused += 1
    assert refused > 20
