"""The package's import graph keeps the architecture's boundaries (issue 12).

Walks every module of `cwm_connector` with `ast` (no imports executed), resolves
each `import`/`from … import` to a module of the package, and fails on a cycle or
on an edge the subpackages' docstrings forbid. Imports under `if TYPE_CHECKING:`
count for the boundaries (a type is still a dependency) but not for cycles
(they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cwm_connector

PACKAGE_DIR = Path(cwm_connector.__file__).resolve().parent
PACKAGE = "cwm_connector"

# part -> parts of the package it must never import (see each part's __init__.py)
FORBIDDEN = {
    "store": {"engine", "windows", "control", "connector", "demo", "cli"},
    "control": {"engine", "store", "windows", "connector", "demo", "cli"},
    "engine": {"windows", "control", "connector", "demo", "cli"},
    "windows": {"connector", "demo", "cli"},
}
TORCH_FREE = ["cwm_connector.engine.scheduler", "cwm_connector.engine.plans"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(node: ast.AST) -> list[str]:
    """Every module name (inside or outside the package) that one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{alias.name}" for alias in node.names]
        return [node.module] + [s for s in subs if s in MODULES]
    return []


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module, runs at run time) for every import in the file."""
    found: list[tuple[str, bool]] = []

    def walk(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for sub in child.body:
                    found.extend((name, False) for name in imported(sub))
                    walk(sub, False)
                for sub in child.orelse:
                    walk(sub, runtime)
                continue
            found.extend((name, runtime) for name in imported(child))
            walk(child, runtime)

    walk(ast.parse(path.read_text(), str(path)), True)
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_edges(runtime_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, runtime in imports_of(path):
            if target in MODULES and target != name and (runtime or not runtime_only):
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path of modules, or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_walk_sees_the_package() -> None:
    graph = package_edges(runtime_only=False)
    assert {"cwm_connector.connector", "cwm_connector.engine.scheduler"} <= set(graph)
    assert "cwm_connector.windows.records" in graph["cwm_connector.windows.core"]
    assert "cwm_connector.store.blob" in graph["cwm_connector.store.disk"]


def test_no_import_cycles() -> None:
    assert find_cycle(package_edges(runtime_only=True)) is None


def test_find_cycle_reports_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_part_imports_no_forbidden_part(part: str) -> None:
    bad = [
        f"{src} -> {dst}"
        for src, targets in package_edges(runtime_only=False).items()
        if part_of(src) == part
        for dst in targets
        if part_of(dst) in FORBIDDEN[part]
    ]
    assert bad == []


@pytest.mark.parametrize("module", TORCH_FREE)
def test_planning_never_imports_torch(module: str) -> None:
    # Statically: no torch import anywhere in the module or what it imports from the package.
    graph = package_edges(runtime_only=True)
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    for name in seen:
        assert not any(t.split(".")[0] == "torch" for t, _ in imports_of(MODULES[name])), name
    # And for real, in a fresh interpreter.
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
