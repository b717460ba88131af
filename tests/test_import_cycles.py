"""The relay's packages import without cycles (issue 12, "Ports, not cycles").

Every import of the relay's, the protocol's and the Python client's packages counts: module level, inside functions, and inside
``if TYPE_CHECKING:`` blocks (a cycle hidden behind TYPE_CHECKING or a function-level import is
still a dependency both ways; it only moves the failure from import time to a refactor).
The graph is read with ``ast``, never by importing, so the test needs none of the packages'
dependencies. A failure prints every cycle as a path ``a -> b -> ... -> a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The folder of the llm-relay-client distribution (its pyproject.toml and packages).
CLIENT_SOURCE = ROOT / "clients" / "python"
#: The project's import packages, each with the folder that holds it: the one place tests
#: learn where a package's source lives.
PACKAGES = {
    "relay": ROOT,
    "llm_relay_protocol": CLIENT_SOURCE,
    "llm_relay_client": CLIENT_SOURCE,
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``PACKAGES``."""
    out: dict[str, Path] = {}
    for package, source in PACKAGES.items():
        for path in sorted((source / package).rglob("*.py")):
            parts = list(path.relative_to(source).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name ``from <level dots><name>`` refers to inside ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``PACKAGES`` it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, is_package, node.level, node.module)
                targets.add(target)
                for alias in node.names:
                    # ``from . import web`` / ``from protocol import frames``: a submodule.
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in modules:
                        targets.add(sub)
        edges = set()
        for target in targets:
            # ``import a.b.c`` depends on a.b.c; keep the longest known prefix.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component
    with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
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
                    components.append(sorted(component))
    return [_a_cycle(graph, set(c), c[0]) for c in components]


def _a_cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside one component (BFS)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


def test_relay_and_protocol_have_no_import_cycles():
    found = cycles(import_graph(_modules()))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_finds_a_cycle_hidden_in_a_function_or_type_checking_block(tmp_path):
    """The detector itself: a cycle made only of a TYPE_CHECKING import and a function-level
    import is found and printed as a path (so the test above can fail)."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from .a import x\n")
    modules = {f"pkg.{p.stem}" if p.stem != "__init__" else "pkg": p for p in pkg.glob("*.py")}
    found = cycles(import_graph(modules))
    assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
