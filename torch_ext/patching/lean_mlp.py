"""Rule: a two-layer MLP ``fc2(act(fc1(x)))`` whose first bias was folded runs ``fusedact.mlp``'s lean block.

Runs after ``bias_folding``: ``act`` is the ``FoldedBias`` of ``fc1``. The lean block keeps x and
``fc1(x)`` for backward (the fused path keeps ``act(fc1(x))`` too), with the fused path's numbers.

Proof that the MLP is exactly ``fc2(act(fc1(x)))``, read from the code:

- a parent whose ``forward(self, x)`` is nothing but a **chain** of its children, each called once on the
  result of the one before: statements ``x = self.a(x)`` or nested calls ``self.b(self.a(x))``, then
  ``return``. Each attribute is mentioned once in the forward, so nothing else reads an intermediate.
  GPT-2 (``c_fc``, ``act``, ``c_proj``, ``dropout``), transformers' ViT and CLIP (``fc1``, ``activation_fn``,
  ``fc2``), timm's ``Mlp`` (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``);
- adjacent children of an ``nn.Sequential`` (whose forward is that chain over its children).

Within the chain, ``fc1, act, [inert...], fc2``: ``act`` the ``FoldedBias`` of ``fc1`` (a single-input
activation whose backward reads its input: relu, sigmoid, tanh read their output and gain nothing, so they
are not claimed), the layers of classes the lean block computes (``fusedact.mlp.lean_layer``: ``nn.Linear``
or transformers' ``Conv1D``, ``fc1`` the bias-skipping layer ``patch`` made, plain weights, no hooks), and
between them only ``nn.Identity`` or ``nn.Dropout`` (timm's ``norm`` and ``drop1``). Checked again at each
call: the dropouts inactive (eval mode, or ``p == 0``), no hooks, ``act`` still that ``FoldedBias``, and by
``fusedact.mlp.mlp_of`` the layers (a LoRA-style wrapper put around one later, DTensor weights under tensor
parallelism); where any fails, the chain's modules are called one by one, which is the original code
(so too without grad: nothing is kept for backward then, and the same numbers come without the checks).
Rewrite: the parent's class becomes ``Fused<Class>`` (``LeanSequential`` for ``nn.Sequential``), whose
forward runs the chain with each proven MLP on ``mlp_of``. The rest of the chain (GPT-2's last dropout)
is called as the code calls it.
Undo: the parent's class comes back, and the per-module state goes.
"""

import ast
import functools
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional, mlp, ops
from .context import Context, has_hooks, is_patched_class
from .kinds import FOLDABLE
from .layers import FoldedBias
from .source import attribute_uses, call_argument, function_tree, is_docstring, single_call

ACTION = "lean_mlp"
_INERT = (nn.Identity, nn.Dropout)  # classes that may stand between act and fc2 (inert ones at call time)


# --- Proof ---------------------------------------------------------------------------------------------------


def _calls(node: ast.AST, self_name: str, variable: str) -> Optional[list]:
    """The attributes of ``self.c(self.b(self.a(variable)))``, innermost first: ``["a", "b", "c"]``."""
    names = []
    while not (isinstance(node, ast.Name) and node.id == variable):
        call = single_call(node, self_name)
        if call is None:
            return None
        names.append(call[0])
        node = call[1]
    return names[::-1]


@functools.cache
def chain(cls: type) -> Optional[tuple[str, ...]]:
    """The attributes ``cls.forward(self, x)`` calls one after the other on ``x``, where that is all it does:
    ``x = self.a(x); x = self.b(self.c(x)); return self.d(x)`` (any variable names, each statement reading
    only the variable the one before it assigned), each attribute mentioned once in the forward."""
    tree = function_tree(cls.forward)  # not through a wrapper: this rule replaces forward itself
    if tree is None or len(tree.args.args) != 2 or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        return None
    self_name, variable = (arg.arg for arg in tree.args.args)
    *statements, last = [statement for statement in tree.body if not is_docstring(statement)] or [None]
    if not isinstance(last, ast.Return) or last.value is None:
        return None
    names = []
    for statement in statements:
        if not (isinstance(statement, ast.Assign) and len(statement.targets) == 1):
            return None
        target = statement.targets[0]
        called = _calls(statement.value, self_name, variable)
        if called is None or not isinstance(target, ast.Name):
            return None
        names += called
        variable = target.id
    called = _calls(last.value, self_name, variable)
    if called is None:
        return None
    names += called
    counts = attribute_uses(tree)
    if not names or len(set(names)) != len(names) or any(counts.get(name) != 1 for name in names):
        return None
    return tuple(names)


def _claimable_act(act: nn.Module, fc1: nn.Module) -> bool:
    """``act`` is ``fc1``'s folded bias in a single-input activation whose backward reads its input."""
    if not isinstance(act, FoldedBias) or act.bias_of is not fc1 or act.dim != -1 or act.activation not in FOLDABLE:
        return False
    try:
        activation, param, _ = functional._resolve(act.activation, act.params)
    except (TypeError, ValueError):
        return False
    return not ops.saves_output(activation, param)


def segments(modules: Sequence[tuple[str, object]]) -> list[tuple[str, ...]]:
    """The proven MLPs of a chain of (name, module): each the names ``(fc1, act, *inert, fc2)``."""
    found, index = [], 0
    while index + 2 < len(modules):
        fc1, act = modules[index][1], modules[index + 1][1]
        end = index + 2
        while end < len(modules) and type(modules[end][1]) in _INERT:
            end += 1
        if (
            end < len(modules)
            and _claimable_act(act, fc1)
            and not has_hooks(act)
            and mlp.lean_layer(fc1, fc1, True)
            and mlp.lean_layer(modules[end][1], None, False)
        ):
            found.append(tuple(name for name, _ in modules[index : end + 1]))
            index = end + 1
        else:
            index += 1
    return found


# --- What runs -----------------------------------------------------------------------------------------------


def _inert(module) -> bool:
    """Calling ``module`` returns its input's values (an Identity, a dropout that drops nothing now)."""
    if type(module) is nn.Identity:
        return mlp._runs_its_class_code(module)
    if type(module) is nn.Dropout:
        return (not module.training or module.p == 0) and mlp._runs_its_class_code(module)
    return False


def _run_mlp(modules: Sequence, x: Tensor) -> Tensor:
    """``fc2(...(act(fc1(x))))``: the lean block where the chain is still the proven MLP, else each called."""
    fc1, act, *between, fc2 = modules
    if (
        torch.is_grad_enabled()  # else nothing is kept for backward: the modules called skip the checks
        and isinstance(act, FoldedBias)
        and act.dim == -1
        and act.activation in FOLDABLE
        and mlp._runs_its_class_code(act)
        and all(_inert(module) for module in between)
    ):
        return mlp.mlp_of(x, fc1, fc2, act.activation, act.bias_of, **act.params)
    for module in modules:
        x = module(x)
    return x


def _run_chain(modules: Sequence[tuple[str, object]], plan: dict, x: Tensor) -> Tensor:
    """Call the chain's modules in order, each proven MLP (``plan``: its first name -> its names) as one."""
    index = 0
    while index < len(modules):
        names = plan.get(modules[index][0])
        if names is not None and tuple(name for name, _ in modules[index : index + len(names)]) == names:
            x = _run_mlp([module for _, module in modules[index : index + len(names)]], x)
            index += len(names)
        else:
            x = modules[index][1](x)
            index += 1
    return x


def _chain_forward(self, *args, **kwargs):
    names, plan, argument = self._fusedact_lean
    x = call_argument("forward", argument, args, kwargs)
    return _run_chain([(name, getattr(self, name)) for name in names], plan, x)


class LeanSequential(nn.Sequential):
    """``nn.Sequential`` whose proven MLPs (``Linear -> FoldedBias -> Linear``) run the lean block
    (``fusedact.patch``)."""

    _fusedact_original = nn.Sequential

    def forward(self, input):
        # A slice or copy made by nn.Sequential itself (self.__class__(...)) has no plan: a plain chain.
        plan = self.__dict__.get("_fusedact_lean", {})
        return _run_chain(list(self._modules.items()), plan, input)


@functools.cache
def _fused_class(cls: type, sequential: bool) -> type:
    """``cls`` running its proven MLPs lean: over its children in order (``sequential``: nn.Sequential's own
    forward), or over the chain its forward calls."""
    if cls is nn.Sequential:
        return LeanSequential
    forward = LeanSequential.forward if sequential else _chain_forward
    return type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_fusedact_original": cls})


def patch(parent: nn.Module, context: Context) -> None:
    """Run each MLP of ``parent``'s chain that the code proves on the lean block."""
    cls = type(parent)
    if not context.lean_mlp or is_patched_class(cls) or "forward" in parent.__dict__:
        return  # a forward set on the instance: the class's code, read below, may not be what runs
    if cls.forward is nn.Sequential.forward:
        names, modules = None, list(parent._modules.items())
    else:
        names = chain(cls)
        if names is None or not all(isinstance(getattr(parent, name, None), nn.Module) for name in names):
            return
        modules = [(name, getattr(parent, name)) for name in names]
    found = segments(modules)
    if not found:
        return
    plan = {segment[0]: segment for segment in found}
    state = plan if names is None else (names, plan, function_tree(cls.forward).args.args[1].arg)
    context.set_class(parent, _fused_class(cls, names is None), _fusedact_lean=state)
    for segment in found:
        activation = dict(modules)[segment[1]].activation
        after = f"{type(parent).__name__} ({activation} two-layer MLP {segment[0]} -> {segment[-1]}, lean block)"
        context.change(context.path(parent), ACTION, cls.__name__, after)
