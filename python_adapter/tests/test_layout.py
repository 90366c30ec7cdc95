"""The adapter's modules form layers: no import cycle between any of them.

Every ``import`` statement counts, wherever it is: at module level, inside functions (lazy
imports) and under ``if TYPE_CHECKING:``. Also runnable as a script, printing each module's
imports::

    python python_adapter/tests/test_layout.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pyvisor_worker"


def module_imports(package_dir: Path) -> Dict[str, Set[str]]:
    """For every module of the package (``__init__`` is the package's own name), the modules
    of the same package it imports."""
    package = package_dir.name
    modules = {
        (package if path.stem == "__init__" else f"{package}.{path.stem}"): path
        for path in package_dir.glob("*.py")
    }
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        deps: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _in_package(alias.name, modules)
                    if target:
                        deps.add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level > 1:
                        raise AssertionError(f"{path}: import from above the package")
                    base = f"{package}.{node.module}" if node.module else package
                else:
                    base = node.module or ""
                target = _in_package(base, modules)
                if target is None:
                    continue
                if target == package:
                    # `from . import x`: the submodule x when there is one, else a name of
                    # the package's __init__.
                    for alias in node.names:
                        sub = f"{package}.{alias.name}"
                        deps.add(sub if sub in modules else package)
                else:
                    deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def _in_package(dotted: str, modules: Dict[str, Path]) -> Optional[str]:
    """The package module that importing ``dotted`` loads, if any (the longest match)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component
    with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    start = min(component)
    path = [start]
    seen = {start}
    node = start
    while True:
        nxt = min(d for d in graph[node] if d in component)
        path.append(nxt)
        if nxt in seen:
            return path[path.index(nxt) :]
        seen.add(nxt)
        node = nxt


def test_the_adapter_has_no_import_cycle() -> None:
    graph = module_imports(PACKAGE_DIR)
    assert "pyvisor_worker._worker" in graph and "pyvisor_worker._otel" in graph
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_tracing_does_not_import_the_runtime() -> None:
    graph = module_imports(PACKAGE_DIR)
    runtime = {
        "pyvisor_worker._worker",
        "pyvisor_worker._reader",
        "pyvisor_worker._dispatch",
        "pyvisor_worker._executors",
        "pyvisor_worker._control",
        "pyvisor_worker._replies",
        "pyvisor_worker._state",
    }
    assert not graph["pyvisor_worker._otel"] & runtime


def test_every_module_says_what_it_owns() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        if path.name == "_version.py":
            continue
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


@pytest.mark.parametrize(
    "files",
    [
        {"a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"},
        {
            "a.py": "from .b import y\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import z\n",
            "c.py": "import pkg.a\n",
        },
        {"__init__.py": "from .a import x\n", "a.py": "from pkg import helper\n"},
    ],
    ids=["lazy-import", "type-checking-import", "through-the-package"],
)
def test_the_check_sees_every_kind_of_import(tmp_path: Path, files: Dict[str, str]) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    files = {"__init__.py": "", **files}
    for name, source in files.items():
        (package / name).write_text(source)
    assert find_cycles(module_imports(package)), "the cycle was not found"


if __name__ == "__main__":
    imports = module_imports(PACKAGE_DIR)
    for module in sorted(imports):
        print(f"{module}: {', '.join(sorted(imports[module])) or '-'}")
    found = find_cycles(imports)
    for cycle in found:
        print("cycle: " + " -> ".join(cycle))
    sys.exit(1 if found else 0)
