"""``fusedact.patch(model)``: make an existing model's activations fused, in place; nothing else changes.

Three things happen, each only where fusedact can prove it computes the same function:

1. **Activation modules** (``nn.ReLU``, ``nn.GELU(approximate=...)``, ``nn.LeakyReLU(negative_slope)``, ...,
   the objects Hugging Face's ``ACT2FN`` builds such as ``GELUActivation`` or ``NewGELUActivation``, and
   timm's) are replaced by the ``fusedact.nn`` module of the same kind and settings. Classes are matched
   exactly: a subclass may override ``forward``, so it is left alone.
2. **Bias folding**: where a ``nn.Linear``, ``nn.Conv1d/2d/3d`` or Hugging Face ``Conv1D`` with a bias feeds
   an activation directly, the layer skips its bias and the activation adds it in its kernel (one read,
   one write instead of two of each). "Directly" is read from the code: adjacent children of a plain
   ``nn.Sequential``, or a parent whose ``forward`` is ``h = self.fc(h); h = self.act(h)`` or
   ``self.act(self.fc(h))`` with each attribute used once there (GPT-2's and BERT's MLPs, timm's ``Mlp``,
   CLIP's, ...). A classifier's ``Linear -> Softmax(dim=-1)`` (or ``LogSoftmax``) folds the same way.
   The bias ``Parameter`` stays where it was, so ``state_dict`` keys and values, checkpoints and optimizers
   see no difference; the layer's class becomes a subclass of its own that only changes ``forward``, so
   ``isinstance(layer, nn.Linear)`` still holds.
3. **Gated MLPs** whose ``forward`` is ``self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
   (Llama, Mistral, Qwen2/3, Gemma and the many models that copy that MLP) run the gated kernel:
   SwiGLU for SiLU, GeGLU for GELU, ReGLU for ReLU, with ``gate_proj``/``up_proj`` biases folded.

Anything else is left as it is and the report says why (an activation-like class fusedact does not know,
a layer shared between two places, a forward it cannot read). ``unpatch(model)`` restores the original
modules and classes. Patching twice is harmless.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(8, 2))
    >>> report = fusedact.patch(model)
    >>> [(change.path, change.action) for change in report.changes]
    [('1', 'fold_bias')]
    >>> model[1]
    FoldedBias(gelu, approximate='tanh', bias of Linear, dim=-1)

Save a patched model with ``state_dict()`` (it loads into the unpatched model and back); pickling the
whole module object of a patched gated MLP is not supported (its class is made at patch time).
"""

import ast
import functools
import inspect
import itertools
import re
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional as F
from . import nn as fnn

# --- Which activation a module computes ---------------------------------------------------------------

_ERF, _TANH = {"approximate": "none"}, {"approximate": "tanh"}

# Exact class ("module.QualName") -> the module's (kind, settings). Kinds are fusedact's activation names.
_KINDS: dict[str, Callable[[nn.Module], tuple[str, dict]]] = {
    "torch.nn.modules.activation.ReLU": lambda m: ("relu", {}),
    "torch.nn.modules.activation.LeakyReLU": lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    "torch.nn.modules.activation.GELU": lambda m: ("gelu", {"approximate": m.approximate}),
    "torch.nn.modules.activation.SiLU": lambda m: ("silu", {}),
    "torch.nn.modules.activation.Sigmoid": lambda m: ("sigmoid", {}),
    "torch.nn.modules.activation.Tanh": lambda m: ("tanh", {}),
    "torch.nn.modules.activation.ELU": lambda m: ("elu", {"alpha": m.alpha}),
    "torch.nn.modules.activation.SELU": lambda m: ("selu", {}),
    "torch.nn.modules.activation.CELU": lambda m: ("celu", {"alpha": m.alpha}),
    "torch.nn.modules.activation.Mish": lambda m: ("mish", {}),
    "torch.nn.modules.activation.GLU": lambda m: ("glu", {"dim": m.dim}),
    "torch.nn.modules.activation.PReLU": lambda m: ("prelu", {"num_parameters": m.num_parameters}),
    "torch.nn.modules.activation.Softmax": lambda m: ("softmax", {"dim": m.dim}),
    "torch.nn.modules.activation.LogSoftmax": lambda m: ("log_softmax", {"dim": m.dim}),
    # Hugging Face transformers (transformers.activations.ACT2FN)
    "transformers.activations.GELUActivation": lambda m: ("gelu", dict(_ERF)),  # erf, in C or in Python
    "transformers.activations.NewGELUActivation": lambda m: ("gelu", dict(_TANH)),  # GPT-2's gelu_new
    "transformers.activations.FastGELUActivation": lambda m: ("gelu", dict(_TANH)),
    "transformers.activations.AccurateGELUActivation": lambda m: ("gelu", dict(_TANH)),
    "transformers.activations.GELUTanh": lambda m: ("gelu", dict(_TANH)),
    "transformers.activations.PytorchGELUTanh": lambda m: ("gelu", dict(_TANH)),
    "transformers.activations.QuickGELUActivation": lambda m: ("quick_gelu", {}),
    "transformers.activations.SiLUActivation": lambda m: ("silu", {}),
    "transformers.activations.MishActivation": lambda m: ("mish", {}),
    "transformers.activations.ReLUSquaredActivation": lambda m: ("relu_squared", {}),
    # timm (timm.layers.create_act_layer)
    "timm.layers.activations.GELU": lambda m: ("gelu", dict(_ERF)),
    "timm.layers.activations.GELUTanh": lambda m: ("gelu", dict(_TANH)),
    "timm.layers.activations.QuickGELU": lambda m: ("quick_gelu", {}),
    "timm.layers.activations.Swish": lambda m: ("silu", {}),
    "timm.layers.activations.Sigmoid": lambda m: ("sigmoid", {}),
    "timm.layers.activations.Tanh": lambda m: ("tanh", {}),
    "timm.layers.activations.Mish": lambda m: ("mish", {}),
    "timm.layers.activations.PReLU": lambda m: ("prelu", {"num_parameters": m.num_parameters}),
}

# fusedact's own modules: kind and settings, so patching twice (and the lab's inspect) sees them.
_FUSED_KINDS: dict[type, Callable[[nn.Module], tuple[str, dict]]] = {
    fnn.Swish: lambda m: ("swish", {"beta": m.beta}),
    fnn.ReLUSquared: lambda m: ("relu_squared", {}),
    fnn.QuickGELU: lambda m: ("quick_gelu", {}),
    fnn.Heaviside: lambda m: ("heaviside", {"value": m.value, "straight_through": m.straight_through}),
    fnn.SwiGLU: lambda m: ("swiglu", {}),
    fnn.GeGLU: lambda m: ("geglu", {"approximate": m.approximate}),
    fnn.ReGLU: lambda m: ("reglu", {}),
}

# Single-input kinds the fused bias_act kernel computes (so a preceding layer's bias can be folded in).
_FOLDABLE = frozenset(kind for kind in F.ACTIVATIONS if kind not in ("swiglu", "geglu", "reglu", "glu"))
# Row-wise kinds that take a bias along their own dim (folded only where that is the layer's bias dim).
_ROW_WISE = {"softmax": F.softmax, "log_softmax": F.log_softmax}
# Kinds whose fusedact module takes torch.nn's (accepted, ignored) ``inplace`` argument.
_TAKES_INPLACE = frozenset({"relu", "leaky_relu", "silu", "elu", "selu", "celu", "mish"})
# Gated-MLP activation kinds -> the gated kernel's activation.
_GATED = {"silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid"}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def activation_kind(module: nn.Module) -> Optional[tuple[str, dict]]:
    """``(kind, settings)`` of an activation module fusedact recognizes, else None.

    ``activation_kind(nn.GELU(approximate="tanh")) == ("gelu", {"approximate": "tanh"})``; fusedact's own
    modules are recognized too (``fusedact.nn.Swish(2.0)`` -> ``("swish", {"beta": 2.0})``).
    """
    cls = type(module)
    if isinstance(module, FoldedBias):
        return module.activation, dict(module.params)
    if cls in _FUSED_KINDS:
        return _FUSED_KINDS[cls](module)
    if cls.__module__ == fnn.__name__ and cls.__bases__[0] is not nn.Module:
        cls = cls.__bases__[0]  # fusedact.nn twins of torch.nn classes carry their twin's settings
    kind = _KINDS.get(_class_key(cls))
    return kind(module) if kind is not None else None


_LOOKS_LIKE_ACTIVATION = re.compile(
    r"relu|gelu|silu|swish|sigmoid|tanh|elu$|mish|glu|softplus|softsign|hardswish|hardsigmoid|hardtanh|"
    r"activation|^act$|^act\d|softmax|threshold",
    re.IGNORECASE,
)


def looks_like_activation(module: nn.Module) -> bool:
    """A parameter-free leaf module whose class name says activation (recognized by fusedact or not)."""
    return (
        bool(_LOOKS_LIKE_ACTIVATION.search(type(module).__name__))
        and next(module.children(), None) is None
        and next(module.parameters(), None) is None
    )


def fused_module(kind: str, **settings) -> nn.Module:
    """A new fusedact module computing ``kind`` with ``settings`` (as ``activation_kind`` reports them).

    ``fused_module("leaky_relu", negative_slope=0.2)`` -> ``fusedact.nn.LeakyReLU(0.2)``.
    """
    builders = {
        "relu": lambda inplace=False: fnn.ReLU(inplace),
        "leaky_relu": lambda negative_slope=0.01, inplace=False: fnn.LeakyReLU(negative_slope, inplace),
        "gelu": lambda approximate="none": fnn.GELU(approximate),
        "silu": lambda inplace=False: fnn.SiLU(inplace),
        "swish": lambda beta=1.0: fnn.Swish(beta),
        "sigmoid": lambda: fnn.Sigmoid(),
        "tanh": lambda: fnn.Tanh(),
        "elu": lambda alpha=1.0, inplace=False: fnn.ELU(alpha, inplace),
        "selu": lambda inplace=False: fnn.SELU(inplace),
        "celu": lambda alpha=1.0, inplace=False: fnn.CELU(alpha, inplace),
        "mish": lambda inplace=False: fnn.Mish(inplace),
        "relu_squared": lambda: fnn.ReLUSquared(),
        "quick_gelu": lambda: fnn.QuickGELU(),
        "heaviside": lambda value=0.0, straight_through=False: fnn.Heaviside(value, straight_through),
        "glu": lambda dim=-1: fnn.GLU(dim),
        "prelu": lambda num_parameters=1, init=0.25: fnn.PReLU(num_parameters, init),
        "swiglu": lambda: fnn.SwiGLU(),
        "geglu": lambda approximate="none": fnn.GeGLU(approximate),
        "reglu": lambda: fnn.ReGLU(),
        "softmax": lambda dim=None: fnn.Softmax(dim),
        "log_softmax": lambda dim=None: fnn.LogSoftmax(dim),
    }
    if kind not in builders:
        raise ValueError(f"no fusedact module for activation {kind!r}; expected one of {sorted(builders)}")
    try:
        return builders[kind](**settings)
    except TypeError as error:
        raise TypeError(f"{kind}: {error}") from None


def _unsupported_setting(kind: str, settings: dict) -> Optional[str]:
    """Why the fused module cannot stand in for this module, if it cannot."""
    if kind == "glu" and settings["dim"] != -1:
        return f"GLU(dim={settings['dim']}) splits a dimension the kernel does not (only the last, dim=-1)"
    return None


# --- Layers that leave their bias to the activation after them ----------------------------------------


def _bias_like(layer: nn.Module, input: Tensor) -> Optional[Tensor]:
    """``layer``'s bias in ``input``'s dtype: under autocast the bias-free GEMM returns bf16/fp16 while the
    bias Parameter stays fp32, and the layer itself would have cast it (the cast is differentiable)."""
    bias = layer.bias
    return bias if bias is None or bias.dtype == input.dtype else bias.to(input.dtype)


class FoldedBias(nn.Module):
    """An activation that adds the bias of the layer feeding it, in the fused kernel.

    Made by ``fusedact.patch``: the layer (``bias_of``) skips its own bias, and this module reads that
    ``Parameter`` from it on every call. It holds the layer in a tuple, not as a submodule, so the
    ``state_dict`` keeps the bias under the layer's key only.
    """

    def __init__(self, activation: str, params: dict, bias_of: nn.Module, dim: int = -1) -> None:
        super().__init__()
        self.activation = activation
        self.params = dict(params)
        self.dim = dim
        self._bias_of = (bias_of,)

    @property
    def bias_of(self) -> nn.Module:
        return self._bias_of[0]

    def forward(self, input: Tensor) -> Tensor:
        bias = _bias_like(self._bias_of[0], input)
        if self.activation in _ROW_WISE:  # a classifier's Linear -> Softmax(dim=-1): the bias along the row
            return _ROW_WISE[self.activation](input, bias, dim=self.dim)
        return F.bias_act(input, bias, self.activation, dim=self.dim, **self.params)

    def extra_repr(self) -> str:
        settings = "".join(f", {key}={value!r}" for key, value in self.params.items())
        return f"{self.activation}{settings}, bias of {type(self.bias_of).__bases__[0].__name__}, dim={self.dim}"


class LinearBiasInActivation(nn.Linear):
    """``nn.Linear`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.nn.functional.linear(input, self.weight)


class Conv1dBiasInActivation(nn.Conv1d):
    """``nn.Conv1d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


class Conv2dBiasInActivation(nn.Conv2d):
    """``nn.Conv2d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


class Conv3dBiasInActivation(nn.Conv3d):
    """``nn.Conv3d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


def _hf_conv1d_without_bias(self, x: Tensor) -> Tensor:
    # transformers' Conv1D (GPT-2): addmm(bias, x, weight) with weight [in, out]; here without the bias.
    return (x.reshape(-1, x.size(-1)) @ self.weight).view(*x.shape[:-1], self.nf)


@functools.cache
def _hf_conv1d_class(cls: type) -> type:
    return type(f"{cls.__name__}BiasInActivation", (cls,), {"forward": _hf_conv1d_without_bias})


def _bias_skipping_class(layer: nn.Module) -> Optional[tuple[type, int]]:
    """The class ``layer`` becomes when its bias is folded, and the dim the bias runs along."""
    cls = type(layer)
    static = {
        nn.Linear: (LinearBiasInActivation, -1),
        nn.Conv1d: (Conv1dBiasInActivation, -2),  # channels counted from the end: unbatched input works
        nn.Conv2d: (Conv2dBiasInActivation, -3),
        nn.Conv3d: (Conv3dBiasInActivation, -4),
    }
    if cls in static:
        return static[cls]
    if _class_key(cls) == "transformers.pytorch_utils.Conv1D":
        return _hf_conv1d_class(cls), -1
    return None


# --- Gated MLPs -----------------------------------------------------------------------------------------


def _gated_mlp_forward(self, x: Tensor) -> Tensor:
    # The layers whose biases were folded are held here, not looked up as self.gate_proj / self.up_proj:
    # a wrapper put there later (a LoRA adapter around the layer) must not lose the bias.
    activation, params, gate_bias_of, up_bias_of = self._fusedact_gated
    gate, up = self.gate_proj(x), self.up_proj(x)
    gate_bias = None if gate_bias_of is None else _bias_like(gate_bias_of, gate)
    up_bias = None if up_bias_of is None else _bias_like(up_bias_of, up)
    return self.down_proj(F.gated(gate, up, gate_bias, up_bias, activation, **params))


@functools.cache
def _gated_mlp_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": _gated_mlp_forward, "_fusedact_original": cls})


# --- Reading a forward to see what feeds what ----------------------------------------------------------


@functools.cache
def _forward_tree(cls: type) -> Optional[ast.FunctionDef]:
    try:
        source = textwrap.dedent(inspect.getsource(cls.forward))
        tree = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    return tree if isinstance(tree, ast.FunctionDef) and tree.args.args else None


def _self_attribute(node: ast.AST, self_name: str) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == self_name:
        return node.attr
    return None


def _single_call(node: ast.AST, self_name: str) -> Optional[tuple[str, ast.AST]]:
    """``self.name(arg)`` with one positional argument and no keywords -> (name, arg)."""
    if isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords:
        name = _self_attribute(node.func, self_name)
        if name is not None and not isinstance(node.args[0], ast.Starred):
            return name, node.args[0]
    return None


@functools.cache
def _uses(cls: type) -> dict:
    """How many times ``forward`` mentions each ``self.<attribute>``."""
    tree = _forward_tree(cls)
    self_name = tree.args.args[0].arg
    counts: dict = {}
    for node in ast.walk(tree):
        name = _self_attribute(node, self_name)
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


@functools.cache
def _direct_pairs(cls: type) -> tuple[tuple[str, str], ...]:
    """(layer, activation) attribute pairs where ``cls.forward`` feeds ``self.layer``'s output straight
    into ``self.activation`` and uses neither anywhere else."""
    tree = _forward_tree(cls)
    if tree is None:
        return ()
    self_name = tree.args.args[0].arg
    pairs = []
    for node in ast.walk(tree):  # self.act(self.fc(h))
        outer = _single_call(node, self_name)
        inner = outer and _single_call(outer[1], self_name)
        if inner:
            pairs.append((inner[0], outer[0]))
    for body in (n.body for n in ast.walk(tree) if isinstance(getattr(n, "body", None), list)):
        for first, second in itertools.pairwise(body):  # h = self.fc(...); h = self.act(h)
            if not (isinstance(first, ast.Assign) and isinstance(second, ast.Assign)):
                continue
            if len(first.targets) != 1 or len(second.targets) != 1 or not isinstance(first.targets[0], ast.Name):
                continue
            variable = first.targets[0].id
            layer = _single_call(first.value, self_name)
            activation = _single_call(second.value, self_name)
            if (
                layer
                and activation
                and isinstance(activation[1], ast.Name)
                and activation[1].id == variable
                and isinstance(second.targets[0], ast.Name)
                and second.targets[0].id == variable
            ):
                pairs.append((layer[0], activation[0]))
    uses = _uses(cls)
    return tuple((layer, act) for layer, act in pairs if uses.get(layer) == 1 and uses.get(act) == 1)


@functools.cache
def _is_gated_mlp(cls: type) -> bool:
    """``forward(x)`` is ``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
    (directly, or through one variable)."""
    tree = _forward_tree(cls)
    if tree is None or len(tree.args.args) != 2 or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        return False
    self_name, x_name = (arg.arg for arg in tree.args.args)
    body = [statement for statement in tree.body if not _is_docstring(statement)]
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
    down = _single_call(expression, self_name)
    if not down or down[0] != "down_proj" or not isinstance(down[1], ast.BinOp) or not isinstance(down[1].op, ast.Mult):
        return False
    activated, up = _single_call(down[1].left, self_name), _single_call(down[1].right, self_name)
    gate = activated and _single_call(activated[1], self_name)
    return bool(
        activated
        and activated[0] == "act_fn"
        and gate
        and gate[0] == "gate_proj"
        and up
        and up[0] == "up_proj"
        and all(isinstance(arg, ast.Name) and arg.id == x_name for arg in (gate[1], up[1]))
    )


def _is_docstring(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


# --- The report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One module ``patch`` replaced or changed: ``action`` is ``"replace"``, ``"fold_bias"`` or ``"gated_mlp"``."""

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
    """What ``patch`` did: ``changes`` (every replacement: path, before, after) and ``left`` (activation-like
    modules left alone, with the reason). ``str(report)`` is a table."""

    def __init__(self, changes: list, left: list) -> None:
        self.changes, self.left = changes, left

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self):
        return iter(self.changes)

    def __repr__(self) -> str:
        return f"PatchReport({len(self.changes)} changes, {len(self.left)} left as they are)"

    def __str__(self) -> str:
        counts = {
            action: sum(c.action == action for c in self.changes) for action in ("replace", "fold_bias", "gated_mlp")
        }
        lines = [
            f"fusedact.patch: {counts['replace'] + counts['fold_bias']} activations fused ({counts['fold_bias']} "
            f"with the bias of the layer before folded in), {counts['gated_mlp']} gated MLPs fused; "
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
        return "\n".join(lines)


# --- patch / unpatch --------------------------------------------------------------------------------------

_UNDO = "_fusedact_undo"  # a plain list in the patched module's __dict__: never in the state_dict
_order = itertools.count()


def _record(root: nn.Module, *entry) -> None:
    root.__dict__.setdefault(_UNDO, []).append((next(_order), *entry))


_PACKAGE_PREFIX = {"torch": "nn.", "fusedact": "fusedact.", "transformers": "transformers.", "timm": "timm."}


def _short(module: nn.Module) -> str:
    """``nn.ReLU()``, ``fusedact.ReLU()``, ``transformers.GELUActivation()``: the repr and where it is from."""
    prefix = _PACKAGE_PREFIX.get(type(module).__module__.split(".")[0], "")
    return prefix + repr(module).replace("\n", " ")


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def patch(
    model: nn.Module,
    activations: Optional[Iterable[str]] = None,
    fold_bias: bool = True,
    gated_mlp: bool = True,
) -> PatchReport:
    """Make ``model``'s activations run fusedact's kernels, in place; returns a ``PatchReport``.

    ``activations``: the kinds to patch (``{"gelu", "silu"}``; default every kind fusedact knows).
    ``fold_bias``: fold a Linear/Conv bias into the activation after it. ``gated_mlp``: run Llama-style
    gated MLPs on the gated kernel. The model's parameters, buffers and ``state_dict`` are untouched.

        >>> report = fusedact.patch(model)          # e.g. a transformers LlamaForCausalLM
        >>> print(report)                           # every replacement: path, before, after
        >>> fusedact.unpatch(model)                 # back to the original modules
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = None if activations is None else set([activations] if isinstance(activations, str) else activations)
    if wanted is not None:
        known = set(F.ACTIVATIONS) | {"prelu", "softmax", "log_softmax"}
        if wanted - known:
            raise ValueError(f"activations: unknown kinds {sorted(wanted - known)}; expected some of {sorted(known)}")

    def selected(kind: str) -> bool:
        return wanted is None or kind in wanted

    paths: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    changes, left = [], []

    def child_path(parent: nn.Module, name: str) -> str:
        prefix = paths[id(parent)][0]
        return f"{prefix}.{name}" if prefix else name

    def foldable_layer(layer: nn.Module) -> Optional[tuple[type, int]]:
        if getattr(layer, "bias", None) is None or len(paths.get(id(layer), ())) != 1 or _has_hooks(layer):
            return None
        return _bias_skipping_class(layer)

    def fold(parent: nn.Module, layer_name: str, act_name: str) -> None:
        layer, act = getattr(parent, layer_name), getattr(parent, act_name)
        kind = activation_kind(act)
        if kind is None or kind[0] not in {*_FOLDABLE, *_ROW_WISE} or not selected(kind[0]) or _has_hooks(act):
            return
        target = foldable_layer(layer)
        if target is None:
            return
        new_class, dim = target
        if kind[0] in _ROW_WISE and kind[1]["dim"] != dim:
            return  # a softmax across another dim than the bias's
        folded = FoldedBias(kind[0], kind[1], layer, dim)
        folded.train(act.training)
        before = _short(act)
        _record(model, "class", layer, type(layer))
        layer.__class__ = new_class
        _record(model, "attr", parent, act_name, act)
        setattr(parent, act_name, folded)
        changes.append(Change(child_path(parent, act_name), "fold_bias", before, _short(folded)))

    if gated_mlp:
        for module in list(model.modules()):
            if getattr(type(module), "_fusedact_original", None) is not None or not _is_gated_mlp(type(module)):
                continue
            act, gate, up = module.act_fn, module.gate_proj, module.up_proj
            kind = activation_kind(act)
            if kind is None or kind[0] not in _GATED or not selected(kind[0]) or _has_hooks(module):
                continue
            if any(type(p) is not nn.Linear or _has_hooks(p) for p in (gate, up)):
                continue
            activation, params = _GATED[kind[0]], kind[1]
            _record(model, "class", module, type(module))
            module.__class__ = _gated_mlp_class(type(module))
            folded = []
            for projection in (gate, up):
                if fold_bias and projection.bias is not None and len(paths[id(projection)]) == 1:
                    _record(model, "class", projection, type(projection))
                    projection.__class__ = LinearBiasInActivation
                    folded.append(projection)
                else:
                    folded.append(None)
            module._fusedact_gated = (activation, params, *folded)
            path = paths[id(module)][0] or "(root)"
            changes.append(
                Change(
                    path,
                    "gated_mlp",
                    type(module).__bases__[0].__name__,
                    f"{type(module).__name__} ({activation} gated kernel)",
                )
            )

    if fold_bias:
        for parent in list(model.modules()):
            if "forward" in parent.__dict__:
                continue  # a forward set on the instance: the class's code, read below, may not be what runs
            if type(parent).forward is nn.Sequential.forward:
                names = list(parent._modules)
                for layer_name, act_name in itertools.pairwise(names):
                    fold(parent, layer_name, act_name)
            elif getattr(type(parent), "_fusedact_original", None) is None and _forward_tree(type(parent)) is not None:
                for layer_name, act_name in _direct_pairs(type(parent)):
                    if isinstance(getattr(parent, layer_name, None), nn.Module) and isinstance(
                        getattr(parent, act_name, None), nn.Module
                    ):
                        fold(parent, layer_name, act_name)

    replaced: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, module in list(parent._modules.items()):
            if module is None:
                continue
            path = child_path(parent, name)
            kind = activation_kind(module)
            if kind is None:
                if looks_like_activation(module):
                    left.append(Left(path, type(module).__name__, "not an activation fusedact recognizes"))
                continue
            if type(module).__module__.split(".")[0] == "fusedact":
                continue  # already fused
            if not selected(kind[0]):
                left.append(Left(path, type(module).__name__, f"{kind[0]} not among the activations asked for"))
                continue
            reason = _unsupported_setting(*kind)
            if reason is not None:
                left.append(Left(path, type(module).__name__, reason))
                continue
            if id(module) not in replaced:
                settings = dict(kind[1])
                if kind[0] in _TAKES_INPLACE and isinstance(getattr(module, "inplace", None), bool):
                    settings["inplace"] = module.inplace  # kept for the repr; the fused module writes a new tensor
                new = fused_module(kind[0], **settings)
                if kind[0] == "prelu":
                    new.weight = module.weight  # the same Parameter: same state_dict key and value
                    new.init = getattr(module, "init", new.init)
                new.train(module.training)
                replaced[id(module)] = new
            _record(model, "attr", parent, name, module)
            setattr(parent, name, replaced[id(module)])
            changes.append(Change(path, "replace", _short(module), _short(replaced[id(module)])))
    return PatchReport(changes, left)


def unpatch(model: nn.Module) -> int:
    """Undo every ``patch`` applied to ``model`` or to its submodules: the original modules and classes come
    back (parameters were never moved). Returns how many changes were undone."""
    records = []
    for module in model.modules():
        records.extend(module.__dict__.pop(_UNDO, []))
    for _, what, *entry in sorted(records, key=lambda record: record[0], reverse=True):
        if what == "class":
            module, original = entry
            module.__class__ = original
            module.__dict__.pop("_fusedact_gated", None)
        else:
            parent, name, original = entry
            setattr(parent, name, original)
    return len(records)
