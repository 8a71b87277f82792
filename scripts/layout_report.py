"""Layout figures of the ``swapformer`` package: largest files, top-level modules, import cycles.

Usage: ``.venv/bin/python scripts/layout_report.py [REPO]``. Imports are read from the source (an AST
walk, function-local imports and ``importlib.import_module("swapformer...")`` included), so nothing
is imported. A submodule importing its own package (``swapformer.zoo.runner`` → ``swapformer.zoo``)
is not counted as a cycle: Python resolves it and every package ``__init__`` re-exports its parts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module under ``root`` (the ``swapformer`` folder)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports, relative imports resolved."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.update([base] + [f"{base}.{alias.name}" for alias in node.names])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def import_graph(modules: dict[str, Path]) -> nx.DiGraph:
    """Module → module edges inside the package, without edges from a submodule to its own packages."""
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        for name in imported_names(module, path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                graph.add_edge(module, name)
    return graph


def main(repo: str = ".") -> None:
    root = Path(repo) / "swapformer"
    modules = module_files(root)
    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(root.parent))) for p in modules.values()),
                   reverse=True)
    top_level = sorted(p.name for p in root.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.parent.name for p in root.glob("*/__init__.py"))
    cycles = sorted(nx.simple_cycles(import_graph(modules)), key=len)
    print("largest files:", ", ".join(f"{name} ({n})" for n, name in sizes[:5]))
    print(f"top-level modules: {len(top_level)} ({', '.join(top_level)})")
    print(f"packages: {len(packages)} ({', '.join(packages)})")
    print(f"import cycles: {len(cycles)}")
    for cycle in cycles:
        print("  " + " -> ".join(cycle + cycle[:1]))


if __name__ == "__main__":
    main(*sys.argv[1:])
