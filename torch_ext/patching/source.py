"""Reading a module's ``forward`` to see what feeds what: the proofs rules build on.

A rule rewrites a module only where its class's code shows the rewrite computes the same function. These
helpers parse that code with ``ast`` (never run it) and answer small questions about it: which
``self.<attribute>`` is called on what, and how often each attribute is mentioned.
"""

import ast
import functools
import inspect
import textwrap
from typing import Optional


@functools.cache
def forward_tree(cls: type) -> Optional[ast.FunctionDef]:
    """The parsed ``cls.forward``, or None where its source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
        tree = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return tree if isinstance(tree, ast.FunctionDef) and tree.args.args else None


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


@functools.cache
def uses(cls: type) -> dict:
    """How many times ``forward`` mentions each ``self.<attribute>``."""
    tree = forward_tree(cls)
    self_name = tree.args.args[0].arg
    counts: dict = {}
    for node in ast.walk(tree):
        name = self_attribute(node, self_name)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
