"""Imports flow one way (docs/architecture.md): the package's import graph has no cycle.

Read from the source with ast, so an import inside a function (the usual workaround for a cycle)
counts too; imports under `if TYPE_CHECKING:` do not, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flexgen_lab

PACKAGE = Path(flexgen_lab.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(node: ast.AST) -> set[str]:
    """Module names the imports under `node` may load (TYPE_CHECKING blocks left out)."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return set().union(*(_imported_names(child) for child in node.orelse))
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module:
        # `from a import b` loads a, and a.b where b is a module
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return set().union(*(_imported_names(child) for child in ast.iter_child_nodes(node)))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: (_imported_names(ast.parse(path.read_text())) & modules.keys()) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that starts and ends on the same module, or None."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str] | None:
        if module in on_path:
            return on_path[on_path.index(module):] + [module]
        if module in done:
            return None
        on_path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        on_path.pop()
        done.add(module)
        return None

    return next((c for m in sorted(graph) if (c := visit(m))), None)


def test_find_cycle_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_reads_the_models_edges():
    graph = import_graph()
    assert "flexgen_lab.models.opt" in graph["flexgen_lab.models.families"]
    assert "flexgen_lab.models.families" in graph["flexgen_lab.models.spec"]
    # opt needs ModelSpec for type hints only: under TYPE_CHECKING, so no edge back to spec
    assert "flexgen_lab.models.spec" not in graph["flexgen_lab.models.opt"]


def test_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None
