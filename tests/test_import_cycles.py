"""The project's import graph: no cycles, and ``tokreduce.kernels`` is a leaf.

Every ``import`` / ``from ... import`` anywhere in a file counts, lazy ones inside functions included:
a lazy import hides a cycle from the interpreter, not from the reader. ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module of the project and to ``pkg`` otherwise. Being a submodule
is not an edge to the parent package, and only project modules are nodes.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Source folder -> the package it is installed as (pyproject's package-dir mapping).
PACKAGES = {
    "tokreduce": "tokreduce",
    "adapters": "tokreduce.adapters",
    "kernels": "tokreduce.kernels",
    "demo": "tokreduce.demo",
}
KERNELS = "tokreduce.kernels"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is_package) for every .py file of the project."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            modules[name] = (path, is_package)
    return modules


def _project_module(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``import a.b.c`` runs a.b.c), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _imports(name: str, path: Path, is_package: bool, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """Project modules that module ``name`` imports, anywhere in its file."""
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(_project_module(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: level 1 is this module's package, each further level one package up.
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else _project_module(base, modules))
    return targets - {None, name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = _modules()
    return {name: _imports(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """A shortest import path start -> ... -> start through the modules ``within`` (breadth first)."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & within):
            if nxt == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"{start} is on no cycle")


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A shortest cycle through every module that is on one, each listed once, e.g. ['a', 'b', 'a'].

    Every elementary cycle could be exponentially many; these cover every module of every strongly
    connected component, which is what a reader needs to find the import to move.
    """
    cycles = []
    for component in _strongly_connected(graph):
        for module in component:
            loop = _shortest_cycle(graph, module, set(component))[:-1]
            first = loop.index(min(loop))  # the same cycle found from another member reads the same
            loop = loop[first:] + loop[:first]
            if loop + [loop[0]] not in cycles:
                cycles.append(loop + [loop[0]])
    return cycles


def test_graph_covers_the_project():
    graph = import_graph()
    for module in ("tokreduce", "tokreduce.similarity", "tokreduce.adapters", "tokreduce.kernels.divprune"):
        assert module in graph
    # Relative and absolute imports both resolve to project modules.
    assert "tokreduce.similarity" in graph["tokreduce.methods.divprune"]
    assert "tokreduce.kernels.utils" in graph["tokreduce.kernels.cosine_max"]


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


def test_kernels_import_nothing_else_from_the_project():
    graph = import_graph()
    outside = {
        module: sorted(t for t in targets if t != KERNELS and not t.startswith(KERNELS + "."))
        for module, targets in graph.items()
        if module == KERNELS or module.startswith(KERNELS + ".")
    }
    outside = {module: targets for module, targets in outside.items() if targets}
    assert not outside, f"tokreduce.kernels must be a leaf; it imports {outside}"


APPS = ("tokreduce.cli", "tokreduce.eval", "tokreduce.demo", "tokreduce.lmms")


def is_app(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPS)


def test_the_core_imports_no_app():
    """The command, the evaluator with its benchmark, the demo and the lmms-eval model sit on the core; the core
    never imports them."""
    graph = import_graph()
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if not is_app(name)
        for target in targets
        if is_app(target)
    )
    assert not offenders, "core modules import apps:\n" + "\n".join(offenders)
    assert any(is_app(name) for name in graph) and any(not is_app(name) for name in graph)
