"""Which model-file formats run code from the file when they load, and what the CLIs say.

A file a CLI opens is untrusted: it may come from anyone. Formats whose loader can only build
data (``torch.load(weights_only=True)``, safetensors, HDF5 datasets, NumPy without pickles,
TorchScript's own restricted deserializer) open freely. Formats whose loader can run Python
code from the file open only with the explicit trust flag:

* a pickled ``nn.Module`` (``torch.load(weights_only=False)``: unpickling calls whatever the
  pickle names);
* a ``torch.export`` archive: ``torch.export.load`` unpickles some members with
  ``weights_only=False`` (sample inputs, pickled weights and constants, opaque objects), and
  rebuilds symbolic shapes with ``sympy.sympify``, which evaluates strings from the archive.
  Neither depends on the file's name, so an archive renamed ``model.pt`` is the same risk.

The format is recognised from the archive's member names, never from the file's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TRUST_FLAG = "--trust-pickle"


def is_export_archive(names: Iterable[str]) -> bool:
    """True for a zip laid out like ``torch.export.save`` output (``<root>/models/...`` or a
    serialized exported program)."""
    return any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names)


def export_refusal(path: Path) -> str:
    return (
        f"{path} is a torch.export archive; loading one runs code from the file "
        "(torch.export.load unpickles members without weights_only and evaluates symbolic "
        f"shape expressions), so it opens only with {TRUST_FLAG}, for files you made. From an "
        "untrusted source, ask for TorchScript (torch.jit.script(model).save(path)) or a state "
        "dict (torch.save(model.state_dict(), path), loaded with --factory module:function)"
    )
