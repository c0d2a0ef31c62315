"""zetaguard: a training watchdog.

>>> from zetaguard import ZetaGuard
>>> guard = ZetaGuard()
>>> result = guard.monitor(model.parameters())       # once per optimizer step
>>> if result.status == "CRITICAL": ...

``import zetaguard`` imports neither torch nor TensorFlow; each integration imports its own
framework when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zetaguard.guard import ZetaGuard
from zetaguard.results import GroupResult, RecoveryReport, StabilityResult, Status
from zetaguard.state import StateFileError

__version__ = "0.1.0"

__all__ = [
    "GroupResult",
    "RecoveryReport",
    "StabilityResult",
    "StateFileError",
    "Status",
    "ZetaBoard",
    "ZetaCallback",
    "ZetaGuard",
    "ZetaGuardCallback",
    "ZetaKeras",
    "__version__",
]

# Integrations resolve on first attribute access, so their frameworks load only when used.
_LAZY = {
    "ZetaKeras": "zetaguard.integrations.keras",
    "ZetaCallback": "zetaguard.integrations.pytorch_lightning",
    "ZetaGuardCallback": "zetaguard.integrations.transformers",
    "ZetaBoard": "zetaguard.integrations.tensorboard",
}

if TYPE_CHECKING:
    from zetaguard.integrations.keras import ZetaKeras
    from zetaguard.integrations.pytorch_lightning import ZetaCallback
    from zetaguard.integrations.tensorboard import ZetaBoard
    from zetaguard.integrations.transformers import ZetaGuardCallback


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zetaguard' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
