"""The .pyi stub of the compiled module names exactly what the module exports."""

from __future__ import annotations

import ast
from pathlib import Path

from zetaguard import _core

STUB = Path(__file__).resolve().parents[1] / "python" / "zetaguard" / "_core.pyi"


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        if isinstance(node, ast.ClassDef):
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return top, members


def test_stub_lists_every_public_name_of_the_module() -> None:
    top, members = _stub_names()
    runtime = {n for n in dir(_core) if not n.startswith("__")}
    assert top == runtime
    for cls, names in members.items():
        obj = getattr(_core, cls)
        inherited = set(dir(obj.__mro__[1])) if len(obj.__mro__) > 1 else set()
        real = {n for n in dir(obj) if not n.startswith("_") and n not in inherited}
        assert names - {"__init__"} == real, cls
