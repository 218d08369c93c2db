"""Griffe extension for the API reference: the CAM methods as the functions they are.

``fastxai.gradcam = make_cam_method("gradcam", ..., summary=...)`` builds each method at import
time, which static analysis sees as a plain attribute. This extension documents each such
attribute as the function ``make_cam_method`` returns: its shared signature (the inner
``explain``) and the docstring it is given (``summary`` plus the shared ``Args``).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import griffe

_FACTORY = "make_cam_method"
_KINDS = {
    "posonlyargs": griffe.ParameterKind.positional_only,
    "args": griffe.ParameterKind.positional_or_keyword,
    "kwonlyargs": griffe.ParameterKind.keyword_only,
}


def _factory_parts(base: Path) -> tuple[griffe.Parameters, str]:
    """The parameters of ``explain`` inside the factory, and the shared docstring tail."""
    tree = ast.parse(base.read_text(encoding="utf-8"))
    shared = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "_SHARED_ARGS" for t in node.targets)
    )
    factory = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == _FACTORY)
    explain = next(n for n in factory.body if isinstance(n, ast.FunctionDef))
    args = explain.args
    parameters = griffe.Parameters()
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for group in ("posonlyargs", "args"):
        for arg in getattr(args, group):
            default = defaults[positional.index(arg)]
            parameters.add(_parameter(arg, _KINDS[group], default))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        parameters.add(_parameter(arg, _KINDS["kwonlyargs"], default))
    if args.kwarg is not None:
        parameters.add(_parameter(args.kwarg, griffe.ParameterKind.var_keyword, None))
    return parameters, shared


def _parameter(arg: ast.arg, kind: griffe.ParameterKind, default: ast.AST | None) -> Any:
    return griffe.Parameter(
        arg.arg,
        annotation=ast.unparse(arg.annotation) if arg.annotation is not None else None,
        kind=kind,
        default=ast.unparse(default) if default is not None else None,
    )


class CamMethods(griffe.Extension):
    def on_module_members(self, *, node: Any, mod: griffe.Module, **kwargs: Any) -> None:
        if not isinstance(node, ast.Module) or mod.filepath is None:
            return
        for statement in node.body:
            call = getattr(statement, "value", None)
            if not (
                isinstance(statement, ast.Assign)
                and isinstance(call, ast.Call)
                and isinstance(call.func, ast.Name)
                and call.func.id == _FACTORY
            ):
                continue
            summary = next(k.value.value for k in call.keywords if k.arg == "summary")
            parameters, shared = _factory_parts(Path(mod.filepath).parent / "_base.py")
            for target in statement.targets:
                function = griffe.Function(
                    target.id,
                    lineno=statement.lineno,
                    endlineno=statement.end_lineno,
                    parameters=parameters,
                    returns="Explanation",
                )
                function.docstring = griffe.Docstring(
                    inspect.cleandoc(summary.rstrip() + "\n" + shared),
                    parent=function,
                    parser="google",
                )
                mod.set_member(target.id, function)
