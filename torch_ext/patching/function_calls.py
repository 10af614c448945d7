"""Report only: activations a forward calls as functions, listed with where they are called.

``F.gelu(x)``, ``torch.tanh(x)``, ``x.sigmoid()`` inside a ``forward`` (RoBERTa's LM head, Whisper's conv
stem, Gemma-2's soft-capping, MoE routers) are not modules: no swap from outside can reach them, and
``patch`` changes nothing here. What it does is say so: each call, found by reading the code of each
module's ``forward`` (and of the module-level functions of the same file that it names, such as
``eager_attention_forward``), is listed with the function, its file and line, and the modules that run it.
Calls the gated rules already rewrote are not listed: their code calls the gated kernel instead.

Found: a call whose function, read through the forward's globals without calling anything, is one of
``kinds.ACTIVATION_FUNCTIONS`` or a module-level activation module instance (RoBERTa's ``gelu =
get_activation("gelu")``); or a tensor method of ``kinds.ACTIVATION_METHODS`` (``scores.sigmoid()``).
"""

import ast
import functools
import linecache
import os
import types
from dataclasses import dataclass

from torch import nn

from .kinds import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, activation_kind, looks_like_activation
from .source import function_tree, self_attribute, walk_scope


@dataclass(frozen=True)
class FunctionCall:
    """One activation called as a function in the code of ``module``'s class: ``call`` as written
    (``F.gelu``, ``.sigmoid()``), its ``kind``, ``where`` (file:line), the line of ``code``, the function it is
    in (``forward`` or a helper the forward names), and ``paths``: the modules of that class in the model."""

    module: str
    call: str
    kind: str
    where: str
    code: str
    function: str
    paths: tuple


def _dotted(node: ast.AST):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _lookup(parts: list, namespace: dict):
    builtins = namespace.get("__builtins__", {})
    if parts[0] in namespace:
        value = namespace[parts[0]]
    elif isinstance(builtins, dict) and parts[0] in builtins:
        value = builtins[parts[0]]
    else:
        return None
    for part in parts[1:]:
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _kind_of(value) -> str:
    """The kind a called object computes, or "" where it is not an activation."""
    try:
        if value in ACTIVATION_FUNCTIONS:
            return ACTIVATION_FUNCTIONS[value]
    except TypeError:  # unhashable
        return ""
    if isinstance(value, nn.Module):
        kind = activation_kind(value)
        if kind is not None:
            return kind[0]
        return type(value).__name__ if looks_like_activation(value) else ""
    return ""


def _calls_in(function) -> list:
    """(call as written, kind, line, code, column) for each activation called in ``function``'s own code."""
    tree = function_tree(function)
    if tree is None:
        return []
    self_name = tree.args.args[0].arg if tree.args.args else None
    local = {a.arg for a in ast.walk(tree.args) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    offset = function.__code__.co_firstlineno - 1
    lines = linecache.getlines(function.__code__.co_filename)
    found = []
    for node in walk_scope(tree):
        if not isinstance(node, ast.Call):
            continue
        label, kind = None, ""
        parts = _dotted(node.func)
        if parts and parts[0] not in local and parts[0] != self_name:
            kind = _kind_of(_lookup(parts, function.__globals__))
            label = ".".join(parts)
        elif (
            isinstance(node.func, ast.Attribute)
            and node.func.attr in ACTIVATION_METHODS
            and self_attribute(node.func, self_name) is None
        ):
            kind, label = node.func.attr.rstrip("_"), f".{node.func.attr}()"
        if kind:
            line = node.lineno + offset
            code = lines[line - 1].strip() if 0 < line <= len(lines) else ast.unparse(node)
            found.append((label, kind, line, code, node.col_offset))
    return sorted(found, key=lambda call: (call[2], call[4]))


def _helpers(function) -> list:
    """Module-level functions of the same file that ``function``'s code names (``eager_attention_forward``)."""
    tree = function_tree(function)
    if tree is None:
        return []
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    helpers = []
    for name in sorted(names):
        value = function.__globals__.get(name)
        if (
            isinstance(value, types.FunctionType)
            and value is not function
            and value.__code__.co_filename == function.__code__.co_filename
        ):
            helpers.append(value)
    return helpers


@functools.cache
def class_calls(cls: type) -> tuple:
    """(call, kind, where, code, function name) for each activation call ``cls.forward`` makes, directly or in
    a module-level function of its file that it names."""
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or forward is nn.Module.forward:
        return ()
    chain = [forward]  # a decorated forward: the wrapper runs the function it wraps (``__wrapped__``)
    while isinstance(getattr(chain[-1], "__wrapped__", None), types.FunctionType) and len(chain) < 8:
        chain.append(chain[-1].__wrapped__)
    found, seen = [], set()
    helpers = [helper for wrapped in chain for helper in _helpers(wrapped)]
    for function in [*chain, *helpers]:
        if function in seen:
            continue
        seen.add(function)
        origin = getattr(function, "_fusedact_origin", None)  # a forward fusedact rewrote: name its source
        filename = os.path.basename(origin[0] if origin else function.__code__.co_filename)
        for label, kind, line, code, _ in _calls_in(function):
            where = f"{filename}:{origin[1]} (as rewritten)" if origin else f"{filename}:{line}"
            found.append((label, kind, where, code, function.__name__))
    return tuple(found)


def find(model: nn.Module) -> list:
    """Every activation ``model``'s modules call as a function: one ``FunctionCall`` per call in the code,
    with the paths of all modules of that class."""
    paths: dict = {}
    for path, module in model.named_modules():
        if activation_kind(module) is not None or looks_like_activation(module):
            continue  # an activation module's own code (ReLU6 calls hardtanh): the module is listed instead
        paths.setdefault(type(module), []).append(path or "(root)")
    calls = []
    for cls, where in paths.items():
        for label, kind, location, code, function in class_calls(cls):
            calls.append(FunctionCall(cls.__name__, label, kind, location, code, function, tuple(where)))
    return calls
