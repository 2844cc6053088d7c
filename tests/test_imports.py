"""Floors, imported only downward: no module of train_jax (or data) imports one that imports it back, directly or
through others, not even for types or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports anywhere in its source (TYPE_CHECKING and local imports too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / package).glob("*.py")):
        name = f"{package}.{path.stem}"
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == package:
                    deps |= {f"{package}.{a.name}" for a in node.names}
                elif node.module.startswith(package + "."):
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith(package + ".")}
        deps.discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_train_jax_has_no_import_cycle() -> None:
    cycle = _cycle(_graph("train_jax"))
    assert cycle is None, " -> ".join(cycle or [])


def test_data_has_no_import_cycle() -> None:
    cycle = _cycle(_graph("data"))
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
