"""The shape of the house: no import cycles, no upward imports, torch-free statistics and reporting.

Imports are read from the source with :mod:`ast` (module-level and function-level alike; only imports
under ``if TYPE_CHECKING:`` are skipped, since they never run), so a cycle hidden in a function body is
found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import moeaudit

SRC = Path(moeaudit.__file__).parent

#: Lower layers never import higher ones. Within a layer, packages may not import each other in a circle.
LAYERS: list[set[str]] = [
    {"errors", "options", "_version", "hub"},
    {"config", "tables", "presets", "data"},
    {"rundir"},
    {"stats"},
    {"models"},
    {"scale"},
    {"observe"},
    {"metrics"},
    {"intervene"},
    {"audit"},
    {"prune"},
    {"calibration"},
    {"interactions"},
    {"report"},
    {"pipeline"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the moeaudit modules (or module attributes) that ``module`` imports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("moeaudit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("moeaudit"):
                found.update(f"{source}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            # `from moeaudit.x import y`: the module moeaudit.x.y if it exists, else moeaudit.x itself.
            while imported not in files and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported != name and imported != "moeaudit":
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_the_import_graph_reads_real_imports():
    """The checker itself: it sees function-level imports and skips TYPE_CHECKING ones."""
    tree = ast.parse("from moeaudit.models import base\n"
                     "def f():\n    from moeaudit.rundir import RunDir\n"
                     "if TYPE_CHECKING:\n    from moeaudit.cli import main\n")
    assert _imports(tree, "moeaudit.x", False) == {"moeaudit.models.base", "moeaudit.rundir.RunDir"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_modules():
    graph = _graph()
    # A package's __init__ re-exports its modules; a module importing a name through its own package's
    # __init__ is a dependency on the module that defines it, which the graph resolves where it can.
    # The only edges a package __init__ may close a circle with are those re-exports, so drop them here.
    for name in graph:
        if (SRC.parent / Path(*name.split("."))).is_dir():
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert _cycles(graph) == []


def test_no_cycles_between_packages_and_no_upward_imports():
    rank = {name: level for level, names in enumerate(LAYERS) for name in names}
    graph = _graph()
    packages: dict[str, set[str]] = {}
    upward = []
    for module, targets in graph.items():
        source = _top(module)
        if source not in rank:
            continue
        for target in targets:
            other = _top(target)
            if other == source or other not in rank:
                continue
            packages.setdefault(source, set()).add(other)
            if rank[other] > rank[source]:
                upward.append(f"{module} -> {target}")
    unknown = sorted({_top(m) for m in graph} - set(rank) - {"moeaudit"})
    assert unknown == [], f"place these in LAYERS: {unknown}"
    assert upward == []
    assert _cycles(packages) == []


@pytest.mark.parametrize("modules", [
    "moeaudit.stats, moeaudit.tables, moeaudit.config, moeaudit.options, moeaudit.rundir",
    "moeaudit.audit, moeaudit.audit.stage, moeaudit.report, moeaudit.report.html, moeaudit.report.tables",
])
def test_statistics_and_reporting_import_no_torch(modules):
    code = f"import sys\nimport {modules}\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
