"""Rule: a mixture-of-experts block's experts run the packed gated kernel, whichever implementation runs them.

transformers 5 keeps all experts of a layer in one module (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3,
...): one 3-D ``gate_up_proj`` parameter ``[experts, 2 * intermediate, hidden]``, and a ``forward`` that
``@use_experts_implementation`` replaced by a dispatcher. The dispatcher runs, by
``config._experts_implementation``, either the class's own loop over experts ("eager": ``gate, up =
F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1); h = self.act_fn(gate) * up``) or a shared
implementation ("grouped_mm", "batched_mm", the default where ``torch`` has grouped GEMMs) that calls
``self._apply_gate(gate_up)`` (``gate, up = gate_up.chunk(2, dim=-1); return self.act_fn(gate) * up``).

Proof: the class's ``forward`` is that dispatcher, read from its code (two statements: look up the
implementation by ``config._experts_implementation`` with the original loop as the default, call it), and
the loop and ``_apply_gate`` each hold gated products of the packed form (``products``), with ``act_fn`` a
kind the gated kernel computes. Shared experts are ordinary gated MLPs (``gated_mlp``).
Rewrite: ``Fused<Experts>``, whose dispatcher picks the same implementation, running the rewritten loop in
place of the original one, and whose ``_apply_gate`` is the rewritten one; the other implementations (GPU
kernels that fuse the gate themselves) run as they were.
Undo: the class comes back, and the per-module state goes.
"""

import ast
import functools
from typing import Optional

from torch import nn

from .context import Context, is_patched_class
from .products import GatedProducts, activation_attributes, apply, plan, rewrite
from .source import function_tree, is_docstring, self_attribute

ACTION = "experts"


def _dispatch(cls: type) -> Optional[tuple]:
    """(the implementations' registry, the original loop) where ``cls.forward`` is transformers' dispatcher::

    experts_forward = experts_interface.get_interface(self.config._experts_implementation, original_forward)
    return experts_forward(self, *args, **kwargs)
    """
    forward = getattr(cls, "forward", None)
    tree = function_tree(forward)
    if tree is None or not tree.args.args or forward.__closure__ is None or not (tree.args.vararg and tree.args.kwarg):
        return None
    self_name = tree.args.args[0].arg
    body = [statement for statement in tree.body if not is_docstring(statement)]
    if len(body) != 2 or not isinstance(body[0], ast.Assign) or not isinstance(body[1], ast.Return):
        return None
    (target,), lookup, call = body[0].targets, body[0].value, body[1].value
    if not (
        isinstance(target, ast.Name)
        and isinstance(lookup, ast.Call)
        and isinstance(lookup.func, ast.Attribute)
        and lookup.func.attr == "get_interface"
        and isinstance(lookup.func.value, ast.Name)
        and len(lookup.args) == 2
        and not lookup.keywords
        and isinstance(lookup.args[0], ast.Attribute)
        and lookup.args[0].attr == "_experts_implementation"
        and self_attribute(lookup.args[0].value, self_name) == "config"
        and isinstance(lookup.args[1], ast.Name)
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == target.id
        and [ast.dump(a) for a in call.args]
        == [
            ast.dump(ast.Name(self_name, ast.Load())),
            ast.dump(ast.Starred(ast.Name(tree.args.vararg.arg, ast.Load()), ast.Load())),
        ]
        and len(call.keywords) == 1
        and call.keywords[0].arg is None
        and isinstance(call.keywords[0].value, ast.Name)
        and call.keywords[0].value.id == tree.args.kwarg.arg
    ):
        return None
    cells = dict(zip(forward.__code__.co_freevars, forward.__closure__, strict=True))
    registry, loop = lookup.func.value.id, lookup.args[1].id
    if registry not in cells or loop not in cells:
        return None
    return cells[registry].cell_contents, cells[loop].cell_contents


def _fused_forward(registry, loop, fused_loop):
    def forward(self, *args, **kwargs):
        chosen = registry.get_interface(self.config._experts_implementation, loop)
        return (fused_loop if chosen is loop else chosen)(self, *args, **kwargs)

    return forward


@functools.cache
def _fused_class(cls: type, activations: frozenset) -> Optional[type]:
    dispatch = _dispatch(cls)
    if dispatch is None:
        return None
    registry, loop = dispatch
    written_loop = rewrite(loop, 0, activations)
    gate = getattr(cls, "_apply_gate", None)
    written_gate = rewrite(gate, len(written_loop.sites) if written_loop else 0, activations) if gate else None
    if written_loop is None and written_gate is None:
        return None
    namespace = {"_fusedact_original": cls, "_fusedact_sites": ()}
    if written_loop is not None:
        namespace["forward"] = _fused_forward(registry, loop, written_loop.function)
        namespace["_fusedact_sites"] += written_loop.sites
    if written_gate is not None:
        namespace["_apply_gate"] = written_gate.function
        namespace["_fusedact_sites"] += written_gate.sites
    return type(f"Fused{cls.__name__}", (cls, GatedProducts), namespace)


def patch(module: nn.Module, context: Context) -> None:
    """Rewrite ``module`` if it is a transformers experts block whose gate the code proves."""
    cls = type(module)
    if not context.gated_mlp or is_patched_class(cls) or "forward" in module.__dict__:
        return
    activations = activation_attributes(module)
    fused = _fused_class(cls, activations)
    if fused is None:
        return
    chosen = plan(module, fused._fusedact_sites, context)
    if chosen is None:
        return
    apply(module, fused, chosen, context)
    where = [name for name in ("forward", "_apply_gate") if name in fused.__dict__]
    paths = {"forward": "the eager loop", "_apply_gate": "grouped_mm/batched_mm"}
    after = (
        f"{fused.__name__} ({'/'.join(chosen.kinds())} packed gated kernel in {' and '.join(paths[w] for w in where)})"
    )
    context.change(context.path(module), ACTION, cls.__name__, after)
