"""The house: imports walk one way. No module of fusednn imports, directly or through others, a module
that imports it back (function-level imports included), and the library never imports the tools."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fusednn": ROOT / "fusednn", "fusednn.tools": ROOT / "fusednn" / "tools", "fusednn.compiler": ROOT / "compiler",
            "fusednn.compiler.templates": ROOT / "compiler" / "templates", "fusednn.kernels": ROOT / "kernels"}
# What runs on top of the library: the command line and what it drives. Nothing else may import these.
TOOLS = {m for m in (f"fusednn.tools.{p.stem}" for p in (ROOT / "fusednn" / "tools").glob("*.py"))
         if not m.endswith("__init__")} | {"fusednn.tools", "fusednn.__main__", "fusednn.models"}
# The library entry points that hand over to a tool on request (CompiledModule.dump): allowed, one way.
TOOL_DOORS = {("fusednn.api", "fusednn.tools.dump")}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """fusednn modules `name` imports anywhere in its file (inside functions too)."""
    out = set()
    pkg = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ importing its submodules is how Python packages work; a submodule importing
    # its package back (to reach a sibling) is a cycle.
    for pkg in PACKAGES:
        if pkg in graph:
            graph[pkg] = {m for m in graph[pkg] if not m.startswith(pkg + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_library_does_not_import_tools():
    for m, deps in _graph().items():
        if m in TOOLS or m == "fusednn":
            continue
        bad = {d for d in deps if d in TOOLS and (m, d) not in TOOL_DOORS}
        assert not bad, f"library module {m} imports tool modules {sorted(bad)}"
