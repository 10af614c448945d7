"""Rule: a layer's bias moves into the fused kernel of the activation right after it.

``act(layer(x))`` = ``act(layer_without_bias(x) + bias)``, which one ``bias_act`` kernel computes (one read,
one write instead of two of each). Layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (the bias along the channels,
counted from the end so unbatched input works) and transformers' ``Conv1D`` (``layers.bias_skipping_class``).
A classifier's ``Linear -> Softmax(dim=-1)`` or ``LogSoftmax(dim=-1)`` folds into the softmax kernel.

Proof that the layer feeds the activation directly, and nothing else reads its output:
- adjacent children of a plain ``nn.Sequential``; or
- a parent whose ``forward`` reads ``h = self.fc(h); h = self.act(h)`` or ``self.act(self.fc(h))``, with
  each of the two attributes mentioned once in that forward (``direct_pairs``).
The layer must have a bias, be reached at one path, and neither it nor the activation may carry hooks;
a forward set on the parent instance blocks folding (its class's code may not be what runs).
Rewrite: the layer's class becomes its bias-skipping subclass (same ``Parameter``s, same ``state_dict``), and
the activation a ``FoldedBias`` that reads the layer's bias on every call (``FoldedXIELU`` for xIELU, on the
activation's own learned Parameters; a Linear's bias only: its coefficients run along the last dim).
Undo: the layer's class and the activation module come back.
"""

import ast
import functools
import itertools

from torch import nn

from .context import Context, has_hooks, is_patched_class
from .kinds import FOLDABLE, LEARNED, activation_kind
from .layers import ROW_WISE, FoldedBias, FoldedXIELU, bias_skipping_class
from .report import short
from .source import forward_tree, single_call, uses

ACTION = "fold_bias"


@functools.cache
def direct_pairs(cls: type) -> tuple[tuple[str, str], ...]:
    """(layer, activation) attribute pairs where ``cls.forward`` feeds ``self.layer``'s output straight
    into ``self.activation`` and uses neither anywhere else."""
    tree = forward_tree(cls)
    if tree is None:
        return ()
    self_name = tree.args.args[0].arg
    pairs = []
    for node in ast.walk(tree):  # self.act(self.fc(h))
        outer = single_call(node, self_name)
        inner = outer and single_call(outer[1], self_name)
        if inner:
            pairs.append((inner[0], outer[0]))
    for body in (n.body for n in ast.walk(tree) if isinstance(getattr(n, "body", None), list)):
        for first, second in itertools.pairwise(body):  # h = self.fc(...); h = self.act(h)
            if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
                continue
            if len(first.targets) != 1 or len(second.targets) != 1 or not isinstance(first.targets[0], ast.Name):
                continue
            variable = first.targets[0].id
            layer = single_call(first.value, self_name)
            activation = single_call(second.value, self_name)
            if (
                layer
                and activation
                and isinstance(activation[1], ast.Name)
                and activation[1].id == variable
                and isinstance(second.targets[0], ast.Name)
                and second.targets[0].id == variable
            ):
                pairs.append((layer[0], activation[0]))
    counts = uses(cls)
    return tuple((layer, act) for layer, act in pairs if counts.get(layer) == 1 and counts.get(act) == 1)


def _fold(parent: nn.Module, layer_name: str, act_name: str, context: Context) -> None:
    layer, act = getattr(parent, layer_name), getattr(parent, act_name)
    kind = activation_kind(act)
    if kind is None or kind[0] not in {*FOLDABLE, *ROW_WISE} or not context.selected(kind[0]) or has_hooks(act):
        return
    if getattr(layer, "bias", None) is None or not context.single_path(layer) or has_hooks(layer):
        return
    target = bias_skipping_class(layer)
    if target is None:
        return
    new_class, dim = target
    if kind[0] in ROW_WISE and kind[1]["dim"] != dim:
        return  # a softmax across another dim than the bias's
    if kind[0] in LEARNED:  # xIELU: its coefficients run along the last dim, as a Linear's bias does
        if dim != -1:
            return
        folded = FoldedXIELU.of(act, layer)
    else:
        folded = FoldedBias(kind[0], kind[1], layer, dim)
    folded.train(act.training)
    before = short(act)
    context.set_class(layer, new_class)
    context.set_child(parent, act_name, folded)
    context.change(context.child_path(parent, act_name), ACTION, before, short(folded))


def patch(parent: nn.Module, context: Context) -> None:
    """Fold each (layer, activation) pair of ``parent``'s children that the code shows to be direct."""
    if not context.fold_bias or "forward" in parent.__dict__:
        return  # a forward set on the instance: the class's code, read below, may not be what runs
    if type(parent).forward is nn.Sequential.forward:
        for layer_name, act_name in itertools.pairwise(list(parent._modules)):
            _fold(parent, layer_name, act_name, context)
    elif not is_patched_class(type(parent)) and forward_tree(type(parent)) is not None:
        for layer_name, act_name in direct_pairs(type(parent)):
            if isinstance(getattr(parent, layer_name, None), nn.Module) and isinstance(
                getattr(parent, act_name, None), nn.Module
            ):
                _fold(parent, layer_name, act_name, context)
