"""Imports run one way: runtime/cli.py and runtime/commands/ -> exporter | runtime -> the shared layer.

The import graph of treespec's own modules is read from the source (AST, every import, also the
ones inside functions, except `if TYPE_CHECKING:` blocks, which never run), with module names
placed by pyproject's package-dir map. It must have no cycle; the exporter must never import the
runtime, and the runtime must import the exporter only from its CLI (runtime/cli.py and
runtime/commands/); the shared layer (treespec_pkg/) imports neither wing.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WINGS = ("treespec.exporter", "treespec.runtime")
CLI = ("treespec.runtime.cli", "treespec.runtime.commands")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def project_modules() -> dict[str, Path]:
    """module name -> file, as pyproject's package-dir places the folders."""
    package_dir = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            modules.setdefault(".".join([package, *parts]), path)
    return modules


def _runtime_imports(tree: ast.AST):
    """Import nodes that execute: everything but the bodies of `if TYPE_CHECKING:`."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package upwards
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}".rstrip(".")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                target = _owner(name, modules)
                if target is not None and target != module and name.startswith("treespec"):
                    edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """Imports against the one direction (see the module docstring)."""
    bad = []
    for module, targets in sorted(edges.items()):
        if any(_within(module, cli) for cli in CLI):
            continue
        side = next((w for w in WINGS if _within(module, w)), None)
        for target in sorted(targets):
            other = next((w for w in WINGS if _within(target, w)), None)
            if other is not None and other != side:
                bad.append(f"{module} -> {target}")
    return bad


def test_the_checker_finds_cycles_and_wrong_way_imports():
    edges = {"treespec.a": {"treespec.b"}, "treespec.b": {"treespec.c"}, "treespec.c": {"treespec.a"},
             "treespec.exporter.x": {"treespec.runtime.y"}, "treespec.runtime.y": {"treespec.a"},
             "treespec.runtime.commands.z": {"treespec.exporter.x"}, "treespec.errors": {"treespec.runtime.y"}}
    assert cycles(edges) == [["treespec.a", "treespec.b", "treespec.c"]]
    assert wrong_way(edges) == ["treespec.errors -> treespec.runtime.y", "treespec.exporter.x -> treespec.runtime.y"]


def test_the_graph_covers_the_project_and_reads_function_imports():
    modules = project_modules()
    assert {"treespec.artifacts", "treespec.exporter.pipeline", "treespec.runtime.loader",
            "treespec.runtime.cli"} <= set(modules)
    edges = import_graph(modules)
    assert "treespec.runtime.loader" in edges["treespec.runtime.api"]
    assert "treespec.artifacts" in edges["treespec.exporter.pipeline"]


def test_no_import_cycles():
    found = cycles(import_graph(project_modules()))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_run_one_way():
    bad = wrong_way(import_graph(project_modules()))
    assert not bad, "exporter <-> runtime (or shared -> wing) imports outside runtime/cli.py and runtime/commands/:\n" \
        + "\n".join(bad)
