"""Counting gradient reads through the project's own read functions (not a framework's)."""

from __future__ import annotations

from collections import Counter
from types import ModuleType

import pytest
import zetaguard.adapters.torch as torch_adapter
from zetaguard.adapters import Snapshot


def count_grad_reads(monkeypatch: pytest.MonkeyPatch, *also_patched: ModuleType) -> Counter[str]:
    """Counts full gradient-norm reads (``grad_norm``: ``adapters.torch.grad_norm``, and the
    same name in each of ``also_patched``, modules that imported it) and the snapshot's deferred
    gradient read (``read_grads``, counted only when it does read)."""
    counts: Counter[str] = Counter()
    real_norm, real_read = torch_adapter.grad_norm, Snapshot.read_grads

    def grad_norm(parameters: object) -> float | None:
        counts["grad_norm"] += 1
        return real_norm(parameters)

    def read_grads(self: Snapshot) -> object:
        if self.grad_reader is not None:
            counts["read_grads"] += 1
        return real_read(self)

    for module in (torch_adapter, *also_patched):
        monkeypatch.setattr(module, "grad_norm", grad_norm)
    monkeypatch.setattr(Snapshot, "read_grads", read_grads)
    return counts
