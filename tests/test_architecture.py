"""The import graph of the package (docs/DESIGN.md): no cycles, lower layers never import
the recipes or the run layer, and the two recipes never import each other.

The graph is read from the source with ``ast``, every ``import`` included (also those
inside functions, which run later but still tie the modules together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metarun"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str) -> str | None:
    """The metarun module (or package) ``name`` refers to, or None if it names none."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return name
    return None


def import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the metarun modules it imports by name (``from metarun.a import b`` is an
    edge to ``metarun.a.b`` when that is a module, else to ``metarun.a``); with
    ``top_level_only``, only the imports that run when the module is imported."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        edges: set[str] = set()
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
                names = [n for n in names[:-1] if _resolve(n)] or [node.module]
            else:
                continue
            edges |= {n for n in names if n.split(".")[0] == "metarun" and _resolve(n)}
        graph[_module(path)] = edges - {_module(path)}
    return graph


def with_parent_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph as Python runs it: importing ``metarun.a.b`` first runs ``metarun/__init__``
    and ``metarun/a/__init__``, so their top-level imports come with it (their lazy ones,
    inside functions, do not run then)."""
    top = import_graph(top_level_only=True)
    full = {}
    for module, edges in graph.items():
        extra = set()
        for target in edges:
            parts = target.split(".")
            for i in range(1, len(parts)):
                extra |= top[".".join(parts[:i])]
        full[module] = (edges | extra) - {module}
    return full


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "metarun.tasks" in graph["metarun.data.sinusoid"]
    assert "metarun.recipes.meta_learning" in graph["metarun.recipes"]  # a lazy import counts
    assert {"metarun.run_control", "metarun.checkpoint"} <= graph["metarun.recipes.continual"]


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle():
    """The detector itself can fail: a graph with the issue's old cycle is reported."""
    graph = {
        "metarun.algorithms.maml": {"metarun.learn2learn_adapter"},
        "metarun.learn2learn_adapter": {"metarun.algorithms.metasgd"},
        "metarun.algorithms.metasgd": {"metarun.algorithms.maml"},
        "metarun.tasks": set(),
    }
    assert cycles(graph) == [sorted(graph)[:2] + ["metarun.learn2learn_adapter"]]


RUN_LAYER = ("metarun.recipes", "metarun.run_control", "metarun.cli", "metarun.trained")
FORBIDDEN = {
    # layer: what it must never reach, directly or through anything it imports
    "metarun.tasks": ("metarun.",),
    "metarun.errors": ("metarun.",),
    "metarun.data": (*RUN_LAYER, "metarun.algorithms", "metarun.models", "metarun.continual"),
    "metarun.models": (*RUN_LAYER, "metarun.algorithms", "metarun.data", "metarun.continual"),
    "metarun.algorithms": (*RUN_LAYER, "metarun.continual"),
    "metarun.continual": RUN_LAYER,
    "metarun.checkpoint": (*RUN_LAYER, "metarun.algorithms", "metarun.continual"),
    "metarun.run_control": ("metarun.recipes", "metarun.cli"),
    "metarun.recipes.meta_learning": ("metarun.recipes.continual", "metarun.cli"),
    "metarun.recipes.continual": ("metarun.recipes.meta_learning", "metarun.cli"),
}


def _matches(module: str, forbidden: str) -> bool:
    """``forbidden`` is a module or package name, or ``metarun.`` for any metarun module."""
    if forbidden.endswith("."):
        return module.startswith(forbidden)
    return module == forbidden or module.startswith(f"{forbidden}.")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_reach_the_layers_above(layer):
    graph = with_parent_packages(import_graph())
    modules = [m for m in graph if _matches(m, layer)]
    assert modules
    for module in modules:
        bad = sorted(
            target
            for target in reachable(graph, module)
            if any(_matches(target, forbidden) for forbidden in FORBIDDEN[layer])
            and not _matches(target, layer)
        )
        assert bad == [], f"{module} imports {bad}"
