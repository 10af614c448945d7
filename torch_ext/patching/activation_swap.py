"""Rule: an activation module becomes the ``fusedact.nn`` module of the same kind and settings.

Proof: the module's exact class is one ``kinds.activation_kind`` knows (``nn.GELU``, transformers'
``NewGELUActivation``, timm's ``Swish``, ...), and its settings (slope, approximation, alpha, dim) are read
from it; the fusedact module computes the same function with them. A subclass is never taken for its base
(it may override ``forward``). PReLU's module keeps the same weight ``Parameter``, xIELU's (transformers'
``XIELUActivation``, Apertus) its ``alpha_p``/``alpha_n`` Parameters and ``beta``/``eps`` buffers (same
``state_dict``; the coefficients' gradients come from the fused backward).
Rewrite: ``parent.<name> = fusedact module``; one module at several places is replaced by one new module.
Undo: the original module object is put back (``context.set_child``).
Left and reported: activation-like modules fusedact does not recognize, kinds not asked for, and settings
the kernel does not take (``GLU(dim=0)``).
"""

from typing import Optional

from torch import nn

from .. import nn as fnn
from .context import Context
from .kinds import LEARNED, activation_kind, fused_module, looks_like_activation
from .report import short

ACTION = "replace"
# Kinds whose fusedact module takes torch.nn's (accepted, ignored) ``inplace`` argument.
_TAKES_INPLACE = frozenset(
    {"relu", "leaky_relu", "silu", "elu", "selu", "celu", "mish", "relu6", "hardtanh", "hardswish", "hardsigmoid"}
)


def _unsupported_setting(kind: str, settings: dict) -> Optional[str]:
    """Why the fused module cannot stand in for this module, if it cannot."""
    if kind == "glu" and settings["dim"] != -1:
        return f"GLU(dim={settings['dim']}) splits a dimension the kernel does not (only the last, dim=-1)"
    return None


def _replacement(module: nn.Module, kind: str, settings: dict) -> nn.Module:
    if kind in LEARNED:  # xIELU: the fused module on the module's own Parameters and buffers
        return fnn.XIELU.sharing(module)
    settings = dict(settings)
    if kind in _TAKES_INPLACE and isinstance(getattr(module, "inplace", None), bool):
        settings["inplace"] = module.inplace  # kept for the repr; the fused module writes a new tensor
    new = fused_module(kind, **settings)
    if kind == "prelu":
        new.weight = module.weight  # the same Parameter: same state_dict key and value
        new.init = getattr(module, "init", new.init)
    new.train(module.training)
    return new


def patch(parent: nn.Module, context: Context) -> None:
    """Replace each activation child of ``parent`` that fusedact recognizes."""
    replaced = context.scratch(__name__)  # id(old module) -> its replacement, across parents
    for name, module in list(parent._modules.items()):
        if module is None:
            continue
        path = context.child_path(parent, name)
        kind = activation_kind(module)
        if kind is None:
            if looks_like_activation(module):
                learned = [name for name, _ in module.named_parameters()]
                why = f" (learned: {', '.join(learned)})" if learned else ""
                context.leave(path, type(module).__name__, f"not an activation fusedact recognizes{why}")
            continue
        if type(module).__module__.split(".")[0] == "fusedact":
            continue  # already fused
        if not context.selected(kind[0]):
            context.leave(path, type(module).__name__, f"{kind[0]} not among the activations asked for")
            continue
        reason = _unsupported_setting(*kind)
        if reason is not None:
            context.leave(path, type(module).__name__, reason)
            continue
        if id(module) not in replaced:
            replaced[id(module)] = _replacement(module, *kind)
        context.set_child(parent, name, replaced[id(module)])
        context.change(path, ACTION, short(module), short(replaced[id(module)]))
