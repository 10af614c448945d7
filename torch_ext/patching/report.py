"""What ``patch`` did: one ``Change`` per module it changed, one ``Left`` per activation-like module it left."""

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

# What a change did: an activation module swapped, a bias folded into the activation after it, a gated MLP
# (or a gated product in a forward) on the gated kernel, a mixture-of-experts block's experts on it, a
# two-layer MLP on the lean block.
ACTIONS = ("replace", "fold_bias", "gated_mlp", "experts", "lean_mlp")


@dataclass(frozen=True)
class Change:
    """One module ``patch`` replaced or changed: ``action`` is one of ``ACTIONS``."""

    path: str
    action: str
    before: str
    after: str


@dataclass(frozen=True)
class Left:
    """One module ``patch`` left as it was, and why."""

    path: str
    module: str
    reason: str


class PatchReport:
    """What ``patch`` did: ``changes`` (every replacement: path, before, after), ``left`` (activation-like
    modules left alone, with the reason) and ``calls`` (activations the code calls as functions, which no
    module swap reaches: ``function_calls.FunctionCall``, with where they are called). ``str(report)`` is a
    table."""

    def __init__(self, changes: list, left: list, calls: Sequence = ()) -> None:
        self.changes, self.left, self.calls = changes, left, list(calls)

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self):
        return iter(self.changes)

    def __repr__(self) -> str:
        return f"PatchReport({len(self.changes)} changes, {len(self.left)} left as they are)"

    def __str__(self) -> str:
        counts = {action: sum(c.action == action for c in self.changes) for action in ACTIONS}
        experts = f", {counts['experts']} expert blocks fused" if counts["experts"] else ""
        lean = counts["lean_mlp"] + sum(c.action == "gated_mlp" and "lean block" in c.after for c in self.changes)
        experts += f", {lean} MLPs on lean blocks" if lean else ""
        lines = [
            f"fusedact.patch: {counts['replace'] + counts['fold_bias']} activations fused ({counts['fold_bias']} "
            f"with the bias of the layer before folded in), {counts['gated_mlp']} gated MLPs fused{experts}; "
            f"{len(self.left)} activation-like modules left as they are"
        ]
        width = max((len(item.path) for item in [*self.changes, *self.left]), default=0)
        for change in self.changes:
            lines.append(f"  {change.path.ljust(width)}  {change.action:<9}  {change.before}  ->  {change.after}")
        for item in self.left:
            lines.append(f"  {item.path.ljust(width)}  left       {item.module}: {item.reason}")
        if not self.changes and not self.left:
            lines.append(
                "  nothing to patch: no unfused activation module (activations a forward calls as functions, "
                "F.gelu(x), cannot be swapped from outside; `fusedact inspect MODEL` lists what a model has)"
            )
        if self.calls:
            lines.append(
                f"  {len(self.calls)} activation calls in the code, left as they are (functions, not modules):"
            )
            for call in self.calls:
                lines.append(format_call(call))
        return "\n".join(lines)


_PACKAGE_PREFIX = {"torch": "nn.", "fusedact": "fusedact.", "transformers": "transformers.", "timm": "timm."}


def short(module: nn.Module) -> str:
    """``nn.ReLU()``, ``fusedact.ReLU()``, ``transformers.GELUActivation()``: the repr and where it is from."""
    prefix = _PACKAGE_PREFIX.get(type(module).__module__.split(".")[0], "")
    return prefix + repr(module).replace("\n", " ")


def format_call(call, indent: str = "    ") -> str:
    """``F.gelu (gelu) at modeling_roberta.py:888 in RobertaLMHead.forward: x = gelu(x) [lm_head]``."""
    shown = ", ".join(call.paths[:3]) + (f", ... ({len(call.paths)} modules)" if len(call.paths) > 3 else "")
    kind = "" if call.kind == call.call.split(".")[-1].strip("()") else f" ({call.kind})"
    return f"{indent}{call.call}{kind} at {call.where} in {call.module}.{call.function}: {call.code}  [{shown}]"
