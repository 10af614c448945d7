"""What a rule sees while ``patch`` runs, and the only two ways it changes a model (both undone by ``unpatch``).

A rule never assigns to a model directly: it calls ``context.set_class`` (a module's class becomes a subclass
that changes ``forward``, with optional per-instance state) or ``context.set_child`` (a child module is
replaced). Each call is recorded on the patched root, so ``unpatch`` restores exactly what was there, in
reverse order, whatever the rule was.
"""

import itertools
from collections.abc import Iterable
from typing import Optional

from torch import nn

from .report import Change, Left

UNDO = "_fusedact_undo"  # a plain list in the patched root's __dict__: never in the state_dict
_order = itertools.count()


def has_hooks(module: nn.Module) -> bool:
    """Hooks, or a forward set on the instance: what runs is not (only) the class's code."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def is_patched_class(cls: type) -> bool:
    """A class ``patch`` made (its forward is fusedact's, not the code a rule would read)."""
    return getattr(cls, "_fusedact_original", None) is not None


class Context:
    """One ``patch`` call: the model, the options, the paths of its modules as they were before any change,
    and the changes and modules left that the report lists."""

    def __init__(
        self,
        model: nn.Module,
        activations: Optional[Iterable[str]],
        fold_bias: bool,
        gated_mlp: bool,
        lean_mlp: bool = True,
    ) -> None:
        self.model = model
        self.wanted = None if activations is None else set(activations)
        # lean_mlp: whole MLPs the code proves run fusedact.mlp's lean blocks (same function, less memory)
        self.fold_bias, self.gated_mlp, self.lean_mlp = fold_bias, gated_mlp, lean_mlp
        self.paths: dict[int, list[str]] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(module), []).append(path)
        self.changes: list[Change] = []
        self.left: list[Left] = []
        self._scratch: dict[str, dict] = {}

    def selected(self, kind: str) -> bool:
        """Whether ``patch(activations=...)`` asked for this kind."""
        return self.wanted is None or kind in self.wanted

    def path(self, module: nn.Module) -> str:
        """The module's first path, ``"(root)"`` for the model itself."""
        return self.paths[id(module)][0] or "(root)"

    def child_path(self, parent: nn.Module, name: str) -> str:
        prefix = self.paths[id(parent)][0]
        return f"{prefix}.{name}" if prefix else name

    def single_path(self, module: nn.Module) -> bool:
        """Reached at exactly one place in the model (a layer shared between two places is not)."""
        return len(self.paths.get(id(module), ())) == 1

    def scratch(self, rule: str) -> dict:
        """A dict a rule keeps across the modules of this call (e.g. one replacement per shared module)."""
        return self._scratch.setdefault(rule, {})

    def set_class(self, module: nn.Module, new_class: type, **state) -> None:
        """``module.__class__ = new_class``, with ``state`` set as instance attributes (removed on undo)."""
        self._record("class", module, type(module), tuple(state))
        module.__class__ = new_class
        module.__dict__.update(state)

    def set_child(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """``setattr(parent, name, new)``."""
        self._record("attr", parent, name, getattr(parent, name))
        setattr(parent, name, new)

    def change(self, path: str, action: str, before: str, after: str) -> None:
        self.changes.append(Change(path, action, before, after))

    def leave(self, path: str, module: str, reason: str) -> None:
        self.left.append(Left(path, module, reason))

    def _record(self, *entry) -> None:
        self.model.__dict__.setdefault(UNDO, []).append((next(_order), *entry))


def undo(model: nn.Module) -> int:
    """Undo every recorded change on ``model`` and its submodules, newest first; returns how many."""
    records = []
    for module in model.modules():
        records.extend(module.__dict__.pop(UNDO, []))
    for _, what, *entry in sorted(records, key=lambda record: record[0], reverse=True):
        if what == "class":
            module, original, state = entry
            module.__class__ = original
            for key in state:
                module.__dict__.pop(key, None)
        else:
            parent, name, original = entry
            setattr(parent, name, original)
    return len(records)
