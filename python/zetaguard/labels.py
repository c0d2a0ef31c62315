"""Layer labels a user recognises: the group's module path and what the module is,
``4 (Linear 128->10)``, from what the adapter reported (``Snapshot.module_types``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def group_labels(groups: Sequence[str], module_types: Mapping[str, str] | None) -> list[str]:
    """One label per group name: ``"<name> (<module summary>)"`` where the module is known,
    else the name alone. A group is a module path (``group_by="layer"``) or a parameter name
    (``"tensor"``: its module is the part before the last dot); a name without a dot that is no
    module path belongs to the root module."""
    if not module_types:
        return list(groups)
    out = []
    for g in groups:
        kind = module_types.get(g)
        if kind is None:
            head, dot, _ = g.rpartition(".")
            kind = module_types.get(head if dot else "")
        out.append(f"{g} ({kind})" if kind else g)
    return out
