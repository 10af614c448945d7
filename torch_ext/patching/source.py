"""Reading a module's ``forward`` to see what feeds what: the proofs rules build on.

A rule rewrites a module only where its class's code shows the rewrite computes the same function. These
helpers parse that code with ``ast`` (never run it) and answer small questions about it: which
``self.<attribute>`` is called on what, how often each attribute is mentioned, which value of a variable
reaches a statement and who else reads it.

The code read is the code that runs: the source of the function's own code object (``inspect.getsource``
of a function follows ``__wrapped__``, so a decorated forward would show the function it wraps even where
the wrapper runs something else). ``forward_tree`` looks through a wrapper only where the wrapper's own
code shows it runs the wrapped function (every ``return`` returns what calling it gave: transformers'
``GradientCheckpointingLayer`` and ``deprecate_kwarg`` wrappers), never through a dispatcher that may run
another implementation (transformers' experts).
"""

import ast
import functools
import inspect
import textwrap
import types
from typing import Optional


@functools.cache
def function_tree(function) -> Optional[ast.FunctionDef]:
    """The parsed source of ``function``'s code object (what calling it runs), or None where it cannot be read.

    Callers must not modify the tree (it is cached): rewrites work on a ``copy.deepcopy``.
    """
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    try:
        source = textwrap.dedent(inspect.getsource(code))
        tree = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(tree, ast.FunctionDef) or tree.name != code.co_name:
        return None
    return tree


def _returns_what_it_calls(wrapper) -> bool:
    """Whether ``wrapper`` (with ``__wrapped__``) runs the function it wraps: each of its ``return`` values
    mentions the closure variable holding it, directly or through a variable every assignment of which does."""
    wrapped = getattr(wrapper, "__wrapped__", None)
    tree = function_tree(wrapper)
    if tree is None or wrapper.__closure__ is None:
        return False
    names = [
        name
        for name, cell in zip(wrapper.__code__.co_freevars, wrapper.__closure__, strict=True)
        if cell.cell_contents is wrapped
    ]
    if len(names) != 1:
        return False

    def mentions(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Name) and n.id == names[0] for n in ast.walk(node))

    assigned: dict = {}
    for node in walk_scope(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    returns = [node for node in walk_scope(tree) if isinstance(node, ast.Return)]

    def runs(value) -> bool:
        if value is None:
            return False
        if mentions(value):
            return True
        return isinstance(value, ast.Name) and bool(assigned.get(value.id)) and all(map(mentions, assigned[value.id]))

    return bool(returns) and all(runs(node.value) for node in returns)


@functools.cache
def forward_tree(cls: type) -> Optional[ast.FunctionDef]:
    """The parsed ``cls.forward``, looking through wrappers that run it (``_returns_what_it_calls``), or None
    where its source cannot be read. Rules that replace ``forward`` read ``function_tree(cls.forward)``
    instead: replacing a wrapped forward would drop its wrapper."""
    forward = getattr(cls, "forward", None)
    for _ in range(8):  # a forward wrapped several times (a subclass of a wrapped layer)
        if not isinstance(getattr(forward, "__wrapped__", None), types.FunctionType):
            break
        if not _returns_what_it_calls(forward):
            return None
        forward = forward.__wrapped__
    tree = function_tree(forward)
    return tree if tree is not None and tree.args.args else None  # a method: its first argument is self


def call_argument(forward_name: str, parameter: str, args: tuple, kwargs: dict):
    """The one argument a rewritten ``forward(self, parameter)`` was called with, positionally or by the name
    the original code gives it (``mlp(hidden_states=h)``); a call the original would reject raises as it would."""
    if len(args) == 1 and not kwargs:
        return args[0]
    if not args and len(kwargs) == 1 and parameter in kwargs:
        return kwargs[parameter]
    given = len(args) + len(kwargs)
    raise TypeError(f"{forward_name}() takes 1 argument ({parameter!r}) but {given} were given: {sorted(kwargs)}")


def self_attribute(node: ast.AST, self_name: str) -> Optional[str]:
    """``name`` where ``node`` is ``self.name``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def single_call(node: ast.AST, self_name: str) -> Optional[tuple[str, ast.AST]]:
    """``self.name(arg)`` with one positional argument and no keywords -> (name, arg)."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        name = self_attribute(node.func, self_name)
        if name is not None and not isinstance(node.args[0], ast.Starred):
            return name, node.args[0]
    return None


def attribute_uses(tree: ast.FunctionDef) -> dict:
    """How many times the function mentions each ``self.<attribute>``."""
    self_name = tree.args.args[0].arg
    counts: dict = {}
    for node in ast.walk(tree):
        name = self_attribute(node, self_name)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


@functools.cache
def uses(cls: type) -> dict:
    """How many times ``forward`` mentions each ``self.<attribute>``."""
    return attribute_uses(forward_tree(cls))


def is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


# --- Which value of a variable reaches a statement ------------------------------------------------------

# Statements with no statements inside them: an expression in one runs from left to right, once.
SIMPLE_STATEMENTS = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Return, ast.Expr)
# Nodes that open a scope of their own (a name inside one may not be the function's variable).
_SCOPES = (
    ast.Lambda,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
# Nodes that leave a block before its end.
_JUMPS = (ast.Return, ast.Break, ast.Continue, ast.Raise, ast.Yield, ast.YieldFrom, ast.Await)


def blocks(tree: ast.FunctionDef):
    """Every list of statements of the function (its body, loop and branch bodies...), not of nested scopes."""
    pending = [tree.body]
    while pending:
        block = pending.pop()
        yield block
        for statement in block:
            if isinstance(statement, _SCOPES):
                continue
            for field in ("body", "orelse", "finalbody"):
                inner = getattr(statement, field, None)
                if isinstance(inner, list) and inner and isinstance(inner[0], ast.stmt):
                    pending.append(inner)
            for handler in getattr(statement, "handlers", ()):
                pending.append(handler.body)
            for case in getattr(statement, "cases", ()):
                pending.append(case.body)


def walk_scope(node: ast.AST):
    """``ast.walk`` that does not enter nested scopes (lambdas, comprehensions, inner functions)."""
    pending = [node]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(child for child in ast.iter_child_nodes(current) if not isinstance(child, _SCOPES))


def _stores(node: ast.AST, name: str) -> bool:
    return any(
        (isinstance(n, ast.Name) and n.id == name and not isinstance(n.ctx, ast.Load))
        or (isinstance(n, (ast.Global, ast.Nonlocal)) and name in n.names)
        for n in ast.walk(node)
    )


def _loads(node: ast.AST, name: str) -> list:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)]


def reaching_definition(block: list, index: int, name: str) -> Optional[int]:
    """The index of the statement of ``block`` whose assignment to ``name`` is the value ``name`` has when
    ``block[index]`` runs: the closest earlier statement that stores it, where that statement is a plain
    ``name = ...`` or ``a, b = ...`` at the block's own level. None where no such statement exists or another
    store (in a nested branch, a loop, a walrus) may come between."""
    if any(isinstance(n, ast.NamedExpr) for n in ast.walk(block[index])):
        return None
    for position in range(index - 1, -1, -1):
        statement = block[position]
        if not _stores(statement, name):
            continue
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            if all(isinstance(n, ast.Name) for n in names) and name in [n.id for n in names]:
                if not any(isinstance(n, ast.NamedExpr) for n in ast.walk(statement.value)):
                    return position
        return None
    return None


def only_reader(tree: ast.FunctionDef, block: list, definition: int, name: str, reader: ast.Name) -> bool:
    """Whether ``reader`` (a load of ``name``) is the only code that can see the value ``block[definition]``
    gives ``name``: either the function reads ``name`` nowhere else, or the next plain assignment to it in
    the same block comes after ``reader`` with no other read and no jump in between, and no ``try`` could
    let a handler see the value."""
    everywhere = _loads(tree, name)
    if everywhere == [reader]:
        return True
    if (
        any(isinstance(n, ast.Try) for n in ast.walk(tree))
        or hasattr(ast, "TryStar")
        and any(isinstance(n, ast.TryStar) for n in ast.walk(tree))
    ):
        return False
    seen = []
    for statement in block[definition + 1 :]:
        seen += _loads(statement, name)
        if isinstance(statement, ast.Assign) and any(
            isinstance(n, ast.Name) and n.id == name
            for target in statement.targets
            for n in (target.elts if isinstance(target, ast.Tuple) else [target])
        ):
            return seen == [reader]  # killed here: later code sees the new value
        if _stores(statement, name) or any(isinstance(n, _JUMPS) for n in ast.walk(statement)):
            return False
    return False
