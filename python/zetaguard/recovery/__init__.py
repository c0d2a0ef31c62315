"""Auto-recovery: stable snapshots, rollback with optimizer state, LR cuts, step vetoes, the
escalation ladder, emergency checkpoints. See ``docs/recovery.md``.

The core is framework-neutral; :mod:`zetaguard.recovery.backend` defines what a framework
backend provides (PyTorch's lives in :mod:`zetaguard.recovery.torch_backend` and is imported
only for torch models).
"""

from __future__ import annotations

from zetaguard.recovery.backend import (
    NumpyBackend,
    RecoveryBackend,
    StateSnapshot,
    make_backend,
    register_backend,
)

__all__ = [
    "NumpyBackend",
    "RecoveryBackend",
    "StateSnapshot",
    "make_backend",
    "register_backend",
]
