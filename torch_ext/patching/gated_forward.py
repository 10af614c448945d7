"""Rule: gated products anywhere in a module's ``forward`` run the gated kernel.

Where ``gated_mlp`` proves a whole Llama-style MLP, this rule proves each product ``act(gate) * up`` in any
forward (``products``): Phi-3's packed ``gate_up_proj`` split with ``.chunk(2, dim=-1)``, T5 v1.1's gated
GELU (``wi_0``, ``wi_1``, through a variable), timm's ``SwiGLU`` (``fc1_g``, ``fc1_x``) and ``GluMlp``,
Falcon-H1's scaled gate (``up_proj(x) * act_fn(gate_proj(x) * gate_multiplier)``: the number goes to the
kernel as its ``gate_scale`` and ``gate_proj``'s bias folds under it, ``act(s (xW + b))``), and functional
forms (``F.silu(w1(x)) * w3(x)``).
Proof: the product and where its operands come from are read from the forward's code; the activation is a
module (or function) of a kind the gated kernel computes. Nothing else in the forward changes.
Rewrite: the module's class becomes ``Fused<Class>``, whose forward is the original code with each product
replaced by a call of the gated kernel (the original expression runs where the tensors do not fit it);
with ``fold_bias``, a gate or up projection read only there adds its bias in the kernel.
Undo: the module's and the projections' classes come back, and the per-module state goes.
"""

import functools

from torch import nn

from .context import Context, is_patched_class
from .kinds import activation_kind, looks_like_activation
from .products import GatedProducts, activation_attributes, apply, plan, rewrite

ACTION = "gated_mlp"


@functools.cache
def _fused_class(cls: type, forward, activations: frozenset) -> type:
    written = rewrite(forward, 0, activations)
    namespace = {"forward": written.function, "_fusedact_original": cls, "_fusedact_sites": written.sites}
    return type(f"Fused{cls.__name__}", (cls, GatedProducts), namespace)


def patch(module: nn.Module, context: Context) -> None:
    """Rewrite ``module``'s forward where it has gated products the code proves."""
    cls = type(module)
    if not context.gated_mlp or is_patched_class(cls) or "forward" in module.__dict__:
        return  # a forward set on the instance is not the class's code
    if activation_kind(module) is not None or looks_like_activation(module):
        return  # an activation itself (QuickGELU is x * sigmoid(1.702 x)): swapped whole, or left and listed
    activations = activation_attributes(module)
    written = rewrite(cls.forward, 0, activations)
    if written is None:
        return
    chosen = plan(module, written.sites, context)
    if chosen is None:
        return
    fused = _fused_class(cls, cls.forward, activations)
    apply(module, fused, chosen, context)
    packed = any(site.packed_gate_first is not None for site in written.sites)
    layout = ", both halves of one projection read in place" if packed else ""
    folded = f", {len(chosen.folds)} bias{'es' * (len(chosen.folds) > 1)} folded" if chosen.folds else ""
    scaled = any(site.gate_scale_right is not None and chosen.products[site.index] for site in written.sites)
    layout += ", gate scale in the kernel" if scaled else ""
    after = f"{fused.__name__} ({'/'.join(chosen.kinds())} gated kernel{layout}{folded})"
    context.change(context.path(module), ACTION, cls.__name__, after)
