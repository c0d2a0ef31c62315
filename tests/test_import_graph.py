"""The package's modules import each other in one direction: no cycle, counting every import a
module names (top level, under ``TYPE_CHECKING``, and inside functions), read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

import zetaguard

PACKAGE_DIR = Path(zetaguard.__file__).parent


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` and ``.pyi`` (the extension's stub) under
    ``root`` (a package directory)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if path.suffix == ".py" or name not in out:
            out[name] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module, else of ``pkg``; importing a submodule does not count as
    importing its parent package's ``__init__`` (Python runs it, but it is not this module's
    dependency)."""
    mods = module_names(root)
    top = root.name

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package[: len(package) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    targets.append(full if full in mods else base)
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                dep = known(target)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE_DIR)
    assert "zetaguard.guard" in graph
    assert "zetaguard.engine.session" in graph["zetaguard.guard"]  # the graph sees real edges
    assert cycles(graph) == []


def test_the_parts_never_import_the_facade() -> None:
    """The guard's parts get values or narrow Protocols, never ``ZetaGuard`` itself."""
    graph = import_graph(PACKAGE_DIR)
    parts = [
        "zetaguard.selection",
        "zetaguard.settings",
        "zetaguard.engine.session",
        "zetaguard.engine.device",
        "zetaguard.stats",
        "zetaguard.state",
        "zetaguard._state_checks",
        "zetaguard._pattern_safety",
        "zetaguard.detector",
        "zetaguard.distributed",
        "zetaguard.recovery.manager",
        "zetaguard.recovery.gate",
        "zetaguard.recovery.records",
        "zetaguard.recovery.emergency",
        "zetaguard.recovery.target",
        "zetaguard.recovery.ladder",
        "zetaguard.recovery.sharded",
        "zetaguard.diagnostics",
        "zetaguard.report",
    ]
    assert {p: "zetaguard.guard" in graph[p] for p in parts} == {p: False for p in parts}


def test_a_type_only_cycle_is_found(tmp_path: Path) -> None:
    """The check itself: a cycle that exists only under ``TYPE_CHECKING`` (and one through a
    function-level import) is reported."""
    pkg = tmp_path / "zetaguard"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zetaguard.b import B\n"
    )
    (pkg / "b.py").write_text("from zetaguard import a\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..d import g\n")
    (pkg / "d.py").write_text("from zetaguard.sub import c\n")
    (pkg / "e.py").write_text("from zetaguard import a, d\n")  # depends on both, in no cycle
    assert sorted(cycles(import_graph(pkg))) == [
        ["zetaguard.a", "zetaguard.b"],
        ["zetaguard.d", "zetaguard.sub.c"],
    ]
