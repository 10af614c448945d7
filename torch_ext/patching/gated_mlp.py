"""Rule: a Llama-style gated MLP runs one gated kernel: ``down(act(gate(x)) * up(x))``.

Proof: the class's ``forward(x)`` is ``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
(directly, or through one variable) - Llama, Mistral, Qwen2/3, Gemma and the many models that copy that
MLP - and ``act_fn`` is an activation of a kind the gated kernel computes (SiLU -> SwiGLU, GELU -> GeGLU,
ReLU -> ReGLU, sigmoid -> GLU); ``gate_proj`` and ``up_proj`` are plain ``nn.Linear``; no hooks.
Rewrite: the module's class becomes ``Fused<Class>`` (a subclass whose forward calls the gated kernel on
``gate_proj(x)`` and ``up_proj(x)``); with ``fold_bias``, their biases are added in that kernel (each
projection's class becomes ``LinearBiasInActivation``, and the MLP holds the layers whose biases it adds,
so a LoRA-style wrapper put around a projection later keeps the bias).
Undo: the MLP's and the projections' classes come back, and the held state goes.
"""

import ast
import functools

from torch import Tensor, nn

from .. import functional as F
from .context import Context, has_hooks, is_patched_class
from .kinds import GATED, activation_kind
from .layers import LinearBiasInActivation, bias_like
from .source import function_tree, is_docstring, single_call

ACTION = "gated_mlp"


def _gated_mlp_forward(self, x: Tensor) -> Tensor:
    # The layers whose biases were folded are held here, not looked up as self.gate_proj / self.up_proj:
    # a wrapper put there later (a LoRA adapter around the layer) must not lose the bias.
    activation, params, gate_bias_of, up_bias_of = self._fusedact_gated
    gate, up = self.gate_proj(x), self.up_proj(x)
    gate_bias = None if gate_bias_of is None else bias_like(gate_bias_of, gate)
    up_bias = None if up_bias_of is None else bias_like(up_bias_of, up)
    return self.down_proj(F.gated(gate, up, gate_bias, up_bias, activation, **params))


@functools.cache
def _gated_mlp_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": _gated_mlp_forward, "_fusedact_original": cls})


@functools.cache
def is_gated_mlp(cls: type) -> bool:
    """``forward(x)`` is ``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
    (directly, or through one variable)."""
    tree = function_tree(cls.forward)  # not through a wrapper: this rule replaces forward itself
    if tree is None or len(tree.args.args) != 2 or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        return False
    self_name, x_name = (arg.arg for arg in tree.args.args)
    body = [statement for statement in tree.body if not is_docstring(statement)]
    if len(body) == 2 and isinstance(body[0], ast.Assign) and isinstance(body[1], ast.Return):
        target, returned = body[0].targets, body[1].value
        if len(target) != 1 or not isinstance(target[0], ast.Name) or not isinstance(returned, ast.Name):
            return False
        if target[0].id != returned.id:
            return False
        expression = body[0].value
    elif len(body) == 1 and isinstance(body[0], ast.Return):
        expression = body[0].value
    else:
        return False
    down = single_call(expression, self_name)
    if not down or down[0] != "down_proj" or not isinstance(down[1], ast.BinOp) or not isinstance(down[1].op, ast.Mult):
        return False
    activated, up = single_call(down[1].left, self_name), single_call(down[1].right, self_name)
    gate = activated and single_call(activated[1], self_name)
    return bool(
        activated
        and activated[0] == "act_fn"
        and gate
        and gate[0] == "gate_proj"
        and up
        and up[0] == "up_proj"
        and all(isinstance(arg, ast.Name) and arg.id == x_name for arg in (gate[1], up[1]))
    )


def patch(module: nn.Module, context: Context) -> None:
    """Rewrite ``module`` if it is a gated MLP the code proves."""
    if not context.gated_mlp or is_patched_class(type(module)) or not is_gated_mlp(type(module)):
        return
    act, gate, up = module.act_fn, module.gate_proj, module.up_proj
    kind = activation_kind(act)
    if kind is None or kind[0] not in GATED or not context.selected(kind[0]) or has_hooks(module):
        return
    if any(type(p) is not nn.Linear or has_hooks(p) for p in (gate, up)):
        return
    activation, params = GATED[kind[0]], kind[1]
    original = type(module)
    folded = []
    for projection in (gate, up):
        if context.fold_bias and projection.bias is not None and context.single_path(projection):
            context.set_class(projection, LinearBiasInActivation)
            folded.append(projection)
        else:
            folded.append(None)
    context.set_class(module, _gated_mlp_class(original), _fusedact_gated=(activation, params, *folded))
    after = f"{type(module).__name__} ({activation} gated kernel)"
    context.change(context.path(module), ACTION, original.__name__, after)
