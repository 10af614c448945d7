"""Compiling a rewritten copy of a function: same globals, same closure cells, same defaults.

A rule that rewrites code (``products``) parses the function with ``source.function_tree``, changes a deep
copy of the tree, and gets a new function from ``compile_function``. The new function runs in the original's
module namespace (nothing is added to it) and shares the original's closure cells, so every name in the
code means what it meant. Its source is registered with ``linecache`` under a name that says where it comes
from, so tracebacks and ``inspect.getsource`` show the code that runs.
"""

import ast
import itertools
import linecache
import types
from typing import Optional

_serial = itertools.count()


def _mangled(tree: ast.AST) -> bool:
    """Whether the code uses a ``__private`` name: in a class body Python renames it, at module level not."""

    def private(name: Optional[str]) -> bool:
        return bool(name) and name.startswith("__") and not name.endswith("__")

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and private(node.id):
            return True
        if isinstance(node, ast.Attribute) and private(node.attr):
            return True
        if isinstance(node, ast.arg) and private(node.arg):
            return True
    return False


def can_compile(function, tree: ast.FunctionDef) -> bool:
    """Whether ``compile_function`` can stand a rewrite of ``function`` in for it."""
    return (
        isinstance(function, types.FunctionType)
        and not _mangled(tree)
        and not any(isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)) for node in ast.walk(tree))
    )


def compile_function(function: types.FunctionType, tree: ast.FunctionDef) -> types.FunctionType:
    """A function running ``tree`` (a rewritten copy of ``function``'s ``function_tree``) in ``function``'s place."""
    tree.decorator_list = []  # already applied: ``function`` is what they returned, and its code is this def's
    tree.returns = None  # annotations and defaults are taken from ``function``, not evaluated again
    for arg in [*tree.args.posonlyargs, *tree.args.args, *tree.args.kwonlyargs, tree.args.vararg, tree.args.kwarg]:
        if arg is not None:
            arg.annotation = None
    tree.args.defaults, tree.args.kw_defaults = [], [None] * len(tree.args.kwonlyargs)
    free = function.__code__.co_freevars
    if free:  # defined inside a function whose variables it reads: give it the same cells
        no_args = dict(posonlyargs=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
        since_312 = {"type_params": []} if "type_params" in ast.FunctionDef._fields else {}
        outer = ast.FunctionDef(
            name="_fusedact_scope",
            args=ast.arguments(args=[ast.arg(arg=name) for name in free], **no_args),
            body=[tree, ast.Return(ast.Name(tree.name, ast.Load()))],
            decorator_list=[],
            returns=None,
            **since_312,
        )
        module = ast.Module(body=[outer], type_ignores=[])
    else:
        module = ast.Module(body=[tree], type_ignores=[])
    source = ast.unparse(ast.fix_missing_locations(module)) + "\n"
    code = function.__code__
    filename = (
        f"<fusedact {next(_serial)}: {function.__qualname__} rewritten from {code.co_filename}:{code.co_firstlineno}>"
    )
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), function.__globals__, namespace)  # defines into namespace only
    if free:
        scope = namespace["_fusedact_scope"].__code__
        inner = next(c for c in scope.co_consts if isinstance(c, types.CodeType) and c.co_name == tree.name)
        cells = dict(zip(free, function.__closure__, strict=True))
        new = types.FunctionType(
            inner, function.__globals__, function.__name__, None, tuple(cells[name] for name in inner.co_freevars)
        )
    else:
        new = namespace[tree.name]
    new.__defaults__, new.__kwdefaults__ = function.__defaults__, function.__kwdefaults__
    new.__annotations__ = dict(function.__annotations__)
    new.__qualname__, new.__doc__, new.__module__ = function.__qualname__, function.__doc__, function.__module__
    new._fusedact_origin = (code.co_filename, code.co_firstlineno)
    return new
