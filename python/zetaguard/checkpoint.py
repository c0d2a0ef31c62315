"""Emergency checkpoints, written atomically.

Every file goes through :func:`zetaguard._atomic.atomic_open`: the bytes land in a temporary
file in the target directory, are fsynced, and only then renamed over the target, so a writer
killed at any moment leaves the previous checkpoint intact (``tests/test_checkpoint.py`` kills
one with SIGKILL mid-write).

Two formats, both loadable without unpickling arbitrary objects:

* ``<stem>.pt``: ``{"model": {name: tensor}, "optimizer": optimizer.state_dict(),
  "scheduler": ..., "guard": {...}}`` for ``torch.load(path, weights_only=True)``;
* ``<stem>.safetensors``: the model's tensors, with the guard's JSON state in the header
  metadata under ``"zetaguard"`` (``safetensors.safe_open(path, "np").metadata()``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from zetaguard._atomic import atomic_open, atomic_write

_STEM = re.compile(r"^emergency-step(\d+)$")


def checkpoint_stem(step: int) -> str:
    return f"emergency-step{step:08d}"


def save_torch(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` atomically."""
    import torch

    with atomic_open(path) as f:
        torch.save(payload, f)


def save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, Any] | None = None
) -> None:
    """Write NumPy arrays or torch tensors as safetensors atomically; ``metadata`` (JSON-able)
    goes in the header under ``"zetaguard"``. Tensors sharing memory (tied weights) are stored
    once each, under their own names."""
    header = {"zetaguard": json.dumps(metadata or {}, default=str)}
    if tensors and _is_torch(next(iter(tensors.values()))):
        from safetensors.torch import save as save_torch_tensors

        cloned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        data = save_torch_tensors(cloned, metadata=header)
    else:
        import numpy as np
        from safetensors.numpy import save as save_numpy

        data = save_numpy({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=header)
    atomic_write(path, lambda f: f.write(data))


def _is_torch(obj: Any) -> bool:
    return type(obj).__module__.partition(".")[0] == "torch"


def latest_checkpoint(directory: str | os.PathLike[str], suffix: str = ".pt") -> Path | None:
    """The newest emergency checkpoint in ``directory`` with ``suffix`` (by step), or None."""
    best: tuple[int, Path] | None = None
    root = Path(directory)
    if not root.is_dir():
        return None
    for p in root.iterdir():
        if p.suffix != suffix:
            continue
        m = _STEM.match(p.stem)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None
