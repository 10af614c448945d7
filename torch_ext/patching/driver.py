"""``patch`` and ``unpatch``: walk the model and ask each rule in turn.

Each rule (a module of this package) has ``patch(module, context)``: it looks at one module, proves from
its code what it computes, and changes it through ``context`` only where the fused version computes the
same function. The driver knows nothing of what a rule proves; adding a rule is one line in ``RULES``.

Order matters only in one way: rules that rewrite a module's own forward (gated MLPs) come before rules
that read that forward (bias folding) and before the swap of the activation children, so the activation a
gated kernel absorbs is still the model's own when it is read, and a rewritten forward is not read again;
and ``lean_mlp`` comes after bias folding, whose ``FoldedBias`` it puts on the lean block.
"""

from collections.abc import Iterable
from typing import Optional

from torch import nn

from . import activation_swap, bias_folding, experts, function_calls, gated_forward, gated_mlp, lean_mlp
from .context import Context, undo
from .kinds import KNOWN
from .report import PatchReport

RULES = (gated_mlp, experts, gated_forward, bias_folding, lean_mlp, activation_swap)


def patch(
    model: nn.Module,
    activations: Optional[Iterable[str]] = None,
    fold_bias: bool = True,
    gated_mlp: bool = True,
    lean_mlp: bool = True,
) -> PatchReport:
    """Make ``model``'s activations run fusedact's kernels, in place; returns a ``PatchReport``.

    ``activations``: the kinds to patch (``{"gelu", "silu"}``; default every kind fusedact knows).
    ``fold_bias``: fold a Linear/Conv bias into the activation after it. ``gated_mlp``: run Llama-style
    gated MLPs on the gated kernel. ``lean_mlp``: whole MLPs the code proves (gated, packed gated, two-layer
    with a folded bias) run ``fusedact.mlp``'s lean blocks, the same function keeping one [tokens,
    intermediate] tensor less for backward; ``False`` keeps the fused path (the layers called, the kernel
    between them). The model's parameters, buffers and ``state_dict`` are untouched.

        >>> report = fusedact.patch(model)          # e.g. a transformers LlamaForCausalLM
        >>> print(report)                           # every replacement: path, before, after
        >>> fusedact.unpatch(model)                 # back to the original modules
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = None if activations is None else set([activations] if isinstance(activations, str) else activations)
    if wanted is not None and wanted - KNOWN:
        raise ValueError(f"activations: unknown kinds {sorted(wanted - KNOWN)}; expected some of {sorted(KNOWN)}")
    context = Context(model, wanted, fold_bias=fold_bias, gated_mlp=gated_mlp, lean_mlp=lean_mlp)
    for rule in RULES:
        for module in list(model.modules()):  # anew per rule: the modules the rules before it put in
            rule.patch(module, context)
    return PatchReport(context.changes, context.left, function_calls.find(model))


def unpatch(model: nn.Module) -> int:
    """Undo every ``patch`` applied to ``model`` or to its submodules: the original modules and classes come
    back (parameters were never moved). Returns how many changes were undone."""
    return undo(model)
