"""The shape of the code, held by tests: functions fit on a screen, and modules import in one direction."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from long_functions import long_functions  # noqa: E402

PACKAGE = ROOT / "parallelnn"


def test_no_function_is_longer_than_80_lines():
    assert long_functions(PACKAGE, 80) == []


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_at_load(path: Path) -> set[str]:
    """The parallelnn modules a module imports when it is loaded (top level; not inside functions or
    TYPE_CHECKING blocks)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports nothing at run time
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("parallelnn")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parallelnn"):
            for alias in node.names:  # `from parallelnn import x` may import the module parallelnn.x
                sub = f"{node.module}.{alias.name}"
                found.add(sub if is_module(sub) else node.module)
    return found


def test_modules_import_without_circles():
    graph = {module_name(p): imports_at_load(p) for p in PACKAGE.rglob("*.py")}
    for module in graph:  # a package's __init__ runs before its modules: importing a.b imports a
        graph[module] = {m for m in graph[module] if m != module}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
