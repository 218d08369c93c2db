"""The layout the fused ops keep (docs/kernels.md): no import cycles in ``fastxai/ops``, and every
Python registration of the ``torch.ops.fastxai`` ops in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import fastxai.ops as ops

PACKAGE = Path(ops.__file__).resolve().parent
FASTXAI = PACKAGE.parent
REGISTRATIONS = PACKAGE / "_registrations.py"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(FASTXAI.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``fastxai.ops`` modules ``path`` imports when it is imported (not inside functions)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastxai.ops"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastxai.ops")}
    return found


def test_no_module_of_fastxai_ops_imports_itself_through_others():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _module_level_imports(path, set(paths)) for name, path in paths.items()}
    assert len(graph) > 10 and any(graph.values())  # the walk sees the package
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            module, chain = stack.pop()
            for imported in graph.get(module, ()):
                assert imported != start, "import cycle: " + " -> ".join([*chain, imported])
                if imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*chain, imported]))


REGISTERING_CALLS = ("register_fake", "register_autograd", "register_kernel", "register_torch")


def _attribute_calls(path: Path) -> set[str]:
    return {
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def test_the_ops_are_registered_in_one_module():
    assert all(call in REGISTRATIONS.read_text() for call in REGISTERING_CALLS)
    elsewhere = {
        f"{path.relative_to(FASTXAI.parent)}: {call}"
        for path in FASTXAI.rglob("*.py")
        if path != REGISTRATIONS
        for call in _attribute_calls(path)
        if call.startswith(REGISTERING_CALLS) or call in ("custom_op", "triton_op")
    }
    assert not elsewhere
