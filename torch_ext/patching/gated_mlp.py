"""Rule: a whole gated MLP runs one gated kernel, on ``fusedact.mlp``'s lean block: ``down(act(gate(x)) * up(x))``.

Proof, from the class's ``forward(x)`` code (never through a wrapper: this rule replaces ``forward`` itself):

- **Llama-style**: ``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`` (directly, or
  through one variable) - Llama, Mistral, Qwen2/3, Gemma and the many models that copy that MLP;
  ``gate_proj`` and ``up_proj`` plain ``nn.Linear``;
- **packed** (with ``lean_mlp`` only; otherwise ``gated_forward`` rewrites the product alone, as before):
  ``p = self.gate_up(x); g, u = p.chunk(2, dim=-1); h = u * self.act(g); return self.down(h)`` (either half
  the gate, either operand order) - Phi-3; each statement reads only the one before it, each attribute is
  mentioned once, ``gate_up`` is a plain ``nn.Linear``.

In both, the activation is a kind the gated kernel computes (SiLU -> SwiGLU, GELU -> GeGLU, ReLU -> ReGLU,
sigmoid -> GLU), and nothing has hooks at patch time.
Rewrite: the module's class becomes ``Fused<Class>``. With ``lean_mlp`` (the default) its forward is
``fusedact.mlp.gated_mlp_of`` / ``gated_mlp_packed_of`` on its projections: the lean block (x, gate and up
kept for backward instead of x, gate, up and the product) where every layer is a plain ``nn.Linear`` without
hooks and plain-tensor weights at call time, else the layers called (``lean_layer``: hooks, a LoRA-style
wrapper put around a projection later, DTensor weights under tensor parallelism; without grad). Claimed only
where the lean block can run: every gate/up bias folded, ``down_proj`` a plain layer. With ``lean_mlp=False``:
the layers called and the gated kernel between them (the fused path; the lean block's results are bitwise
those). With ``fold_bias``, the gate/up biases are added in the kernel: each projection's class becomes
``LinearBiasInActivation``, and the MLP holds the layers whose biases it adds, so a wrapper put around a
projection later keeps the bias.
Undo: the MLP's and the projections' classes come back, and the held state goes.
"""

import ast
import functools
from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from .. import mlp
from .context import Context, has_hooks, is_patched_class
from .kinds import GATED, activation_kind
from .layers import LinearBiasInActivation, bias_like
from .products import _chunk
from .source import attribute_uses, call_argument, function_tree, is_docstring, single_call

ACTION = "gated_mlp"
LEAN = "lean block"  # how a change's ``after`` says the lean block runs there


def _gated_mlp_forward(self, *args, **kwargs) -> Tensor:
    # The layers whose biases were folded are held here, not looked up as self.gate_proj / self.up_proj:
    # a wrapper put there later (a LoRA adapter around the layer) must not lose the bias.
    x = call_argument("forward", self._fusedact_argument, args, kwargs)
    activation, params, gate_bias_of, up_bias_of = self._fusedact_gated
    gate, up = self.gate_proj(x), self.up_proj(x)
    gate_bias = None if gate_bias_of is None else bias_like(gate_bias_of, gate)
    up_bias = None if up_bias_of is None else bias_like(up_bias_of, up)
    return self.down_proj(F.gated(gate, up, gate_bias, up_bias, activation, **params))


def _lean_gated_mlp_forward(self, *args, **kwargs) -> Tensor:
    x = call_argument("forward", self._fusedact_argument, args, kwargs)
    activation, params, gate_bias_of, up_bias_of = self._fusedact_gated
    return mlp.gated_mlp_of(
        x, self.gate_proj, self.up_proj, self.down_proj, activation, gate_bias_of, up_bias_of, **params
    )


def _lean_packed_forward(self, *args, **kwargs) -> Tensor:
    x = call_argument("forward", self._fusedact_argument, args, kwargs)
    activation, params, gate_up, down, gate_first, bias_of = self._fusedact_packed
    return mlp.gated_mlp_packed_of(
        x, getattr(self, gate_up), getattr(self, down), activation, gate_first, bias_of, **params
    )


@functools.cache
def _gated_mlp_class(cls: type, forward) -> type:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": forward, "_fusedact_original": cls})


def _one_argument(tree: Optional[ast.FunctionDef]) -> Optional[tuple[str, str, list]]:
    """(self, x, the statements) of ``forward(self, x)`` with nothing else in its signature."""
    if tree is None or len(tree.args.args) != 2 or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        return None
    self_name, x_name = (arg.arg for arg in tree.args.args)
    return self_name, x_name, [statement for statement in tree.body if not is_docstring(statement)]


@functools.cache
def is_gated_mlp(cls: type) -> bool:
    """``forward(x)`` is ``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
    (directly, or through one variable)."""
    signature = _one_argument(function_tree(cls.forward))
    if signature is None:
        return False
    self_name, x_name, body = signature
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


def _names(node: ast.AST) -> list:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]


@functools.cache
def packed_gated_mlp(cls: type) -> Optional[tuple[str, str, str, bool]]:
    """(gate_up, act, down, gate_first) where ``forward(x)`` is, as Phi-3 writes it::

        p = self.gate_up(x)
        g, u = p.chunk(2, dim=-1)
        h = u * self.act(g)          # or self.act(g) * u; g the first or the second half
        return self.down(h)

    each statement reading only the variables the one before it assigned (so nothing else sees them) and
    each attribute mentioned once in the forward."""
    tree = function_tree(cls.forward)
    signature = _one_argument(tree)
    if signature is None:
        return None
    self_name, x_name, body = signature
    if len(body) != 4 or not all(isinstance(s, ast.Assign) and len(s.targets) == 1 for s in body[:3]):
        return None
    (project, split, product), returned = body[:3], body[3]
    packed, halves, result = (statement.targets[0] for statement in (project, split, product))
    projection = single_call(project.value, self_name)
    if not (isinstance(packed, ast.Name) and projection and _names(projection[1]) == [x_name]):
        return None
    if not (
        isinstance(halves, ast.Tuple) and len(halves.elts) == 2 and all(isinstance(n, ast.Name) for n in halves.elts)
    ):
        return None
    first, second = (n.id for n in halves.elts)
    chunk = _chunk(split.value, self_name)  # p.chunk(2, dim=-1): nothing but p read
    minus_one = ast.dump(ast.parse("-1", mode="eval").body)
    if chunk is None or first == second or ast.dump(chunk[1]) != minus_one or _names(split.value) != [packed.id]:
        return None
    expression = product.value
    if not (isinstance(expression, ast.BinOp) and isinstance(expression.op, ast.Mult) and isinstance(result, ast.Name)):
        return None
    for activated, up in ((expression.left, expression.right), (expression.right, expression.left)):
        act = single_call(activated, self_name)
        if act and isinstance(act[1], ast.Name) and isinstance(up, ast.Name) and {act[1].id, up.id} == {first, second}:
            break
    else:
        return None
    down = isinstance(returned, ast.Return) and single_call(returned.value, self_name)
    if not (down and isinstance(down[1], ast.Name) and down[1].id == result.id):
        return None
    counts = attribute_uses(tree)
    attributes = (projection[0], act[0], down[0])
    if len(set(attributes)) != 3 or any(counts.get(name) != 1 for name in attributes):
        return None
    return projection[0], act[0], down[0], act[1].id == first


def _gated_activation(module: nn.Module, act, context: Context) -> Optional[tuple[str, dict]]:
    kind = activation_kind(act) if isinstance(act, nn.Module) else None
    if kind is None or kind[0] not in GATED or not context.selected(kind[0]) or has_hooks(act):
        return None
    return GATED[kind[0]], kind[1]


def _fold(projection: nn.Module, context: Context) -> Optional[nn.Module]:
    """Fold ``projection``'s bias into the kernel where ``fold_bias`` allows it; the layer, or None."""
    if context.fold_bias and projection.bias is not None and context.single_path(projection):
        context.set_class(projection, LinearBiasInActivation)
        return projection
    return None


def _patch_packed(module: nn.Module, context: Context) -> None:
    proof = packed_gated_mlp(type(module))
    if proof is None:
        return
    gate_up_name, act_name, down_name, gate_first = proof
    gate_up, down = getattr(module, gate_up_name, None), getattr(module, down_name, None)
    activation = _gated_activation(module, getattr(module, act_name, None), context)
    if (
        activation is None
        or type(gate_up) is not nn.Linear
        or has_hooks(gate_up)
        or not mlp.lean_layer(down, None, False)
    ):
        return
    if gate_up.bias is not None and not (context.fold_bias and context.single_path(gate_up)):
        return  # a bias the kernel cannot add: the lean block would never run (gated_forward's product rule will)
    original = type(module)
    bias_of = _fold(gate_up, context)
    state = (*activation, gate_up_name, down_name, gate_first, bias_of)
    argument = function_tree(original.forward).args.args[1].arg
    context.set_class(
        module, _gated_mlp_class(original, _lean_packed_forward), _fusedact_packed=state, _fusedact_argument=argument
    )
    folded = ", 1 bias folded" if bias_of is not None else ""
    after = f"{type(module).__name__} ({activation[0]} packed gated kernel, both halves of one projection read in "
    after += f"place{folded}, {LEAN})"
    context.change(context.path(module), ACTION, original.__name__, after)


def patch(module: nn.Module, context: Context) -> None:
    """Rewrite ``module`` if it is a gated MLP the code proves."""
    if not context.gated_mlp or is_patched_class(type(module)) or has_hooks(module):
        return
    if not is_gated_mlp(type(module)):
        if context.lean_mlp:
            _patch_packed(module, context)
        return
    gate, up = module.gate_proj, module.up_proj
    activation = _gated_activation(module, module.act_fn, context)
    if activation is None or any(type(p) is not nn.Linear or has_hooks(p) for p in (gate, up)):
        return
    original = type(module)
    folded = [_fold(projection, context) for projection in (gate, up)]
    # The lean block adds gate/up biases in its kernel only: a bias left in its layer (fold_bias=False, a
    # layer shared elsewhere) or a down_proj it cannot compute would make every call take the fused path.
    lean = (
        context.lean_mlp
        and all(p.bias is None or f is not None for p, f in zip((gate, up), folded, strict=True))
        and mlp.lean_layer(module.down_proj, None, False)
    )
    forward = _lean_gated_mlp_forward if lean else _gated_mlp_forward
    argument = function_tree(original.forward).args.args[1].arg  # x: as the original forward names it
    state = {"_fusedact_gated": (*activation, *folded), "_fusedact_argument": argument}
    context.set_class(module, _gated_mlp_class(original, forward), **state)
    after = f"{type(module).__name__} ({activation[0]} gated kernel{', ' + LEAN if lean else ''})"
    context.change(context.path(module), ACTION, original.__name__, after)
