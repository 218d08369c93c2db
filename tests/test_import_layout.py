"""The package's import graph has no cycles (function-level imports included), and only the
command-line package parses arguments."""

from __future__ import annotations

import ast
from pathlib import Path

import fastxai

PACKAGE = Path(fastxai.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def extensions() -> set[str]:
    """Compiled modules (``fastxai._C``): imported by name, importing nothing of ours."""
    return {f"fastxai.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.so")} | {"fastxai._C"}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastxai modules ``name`` imports anywhere in its file (``from a import b`` counts as
    ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {m for m in found if m in known and m != name}


def test_no_import_cycles():
    known = modules()
    names = set(known) | extensions()
    graph = {name: imports_of(name, path, names) for name, path in known.items()}
    graph = {name: {m for m in deps if m in known} for name, deps in graph.items()}
    # A package's __init__ importing its own submodules is how packages expose them; a
    # submodule importing its parent package back closes a cycle, so both kinds of edge count.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


def test_only_the_cli_package_parses_arguments():
    parsing = [
        name
        for name, path in modules().items()
        if "argparse"
        in {
            a.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Import)
            for a in n.names
        }
        and not name.startswith("fastxai.cli")
    ]
    assert not parsing, parsing
