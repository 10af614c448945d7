"""Which activation a module computes, and the fusedact module that computes the same.

Shared by every rule: ``activation_kind(module)`` names a module's activation as fusedact's kinds do
(``("gelu", {"approximate": "tanh"})``), ``fused_module(kind, **settings)`` builds fusedact's module for it,
``looks_like_activation(module)`` tells the modules the report lists when no rule recognizes them.
Classes are matched exactly: a subclass may override ``forward``, so it is not taken for its base.
"""

import re
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from .. import functional as F
from .. import nn as fnn
from .layers import FOLDED, class_key

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
    "torch.nn.modules.activation.ReLU6": lambda m: ("relu6", {}),
    "torch.nn.modules.activation.Hardtanh": lambda m: ("hardtanh", {"min_val": m.min_val, "max_val": m.max_val}),
    "torch.nn.modules.activation.Hardswish": lambda m: ("hardswish", {}),
    "torch.nn.modules.activation.Hardsigmoid": lambda m: ("hardsigmoid", {}),
    "torch.nn.modules.activation.Softplus": lambda m: ("softplus", {"beta": m.beta, "threshold": m.threshold}),
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
    # learned alpha_p, alpha_n (Apertus): its settings are its tensors, taken over by ``XIELU.sharing``
    "transformers.activations.XIELUActivation": lambda m: ("xielu", {}),
    # BLOOM's tanh GELU (sqrt(2/pi) written 0.79788456: equal in fp32) with its hand-written backward
    "transformers.models.bloom.modeling_bloom.BloomGelu": lambda m: ("gelu", dict(_TANH)),
    # timm (timm.layers.create_act_layer)
    "timm.layers.activations.GELU": lambda m: ("gelu", dict(_ERF)),
    "timm.layers.activations.GELUTanh": lambda m: ("gelu", dict(_TANH)),
    "timm.layers.activations.QuickGELU": lambda m: ("quick_gelu", {}),
    "timm.layers.activations.Swish": lambda m: ("silu", {}),
    "timm.layers.activations.Sigmoid": lambda m: ("sigmoid", {}),
    "timm.layers.activations.Tanh": lambda m: ("tanh", {}),
    "timm.layers.activations.Mish": lambda m: ("mish", {}),
    "timm.layers.activations.PReLU": lambda m: ("prelu", {"num_parameters": m.num_parameters}),
    "timm.layers.activations.HardSwish": lambda m: ("hardswish", {}),
    "timm.layers.activations.HardSigmoid": lambda m: ("hardsigmoid", {}),
    # timm's memory-efficient autograd.Functions (activations_me): the same functions, hand-written backward
    "timm.layers.activations_me.SwishMe": lambda m: ("silu", {}),
    "timm.layers.activations_me.MishMe": lambda m: ("mish", {}),
    "timm.layers.activations_me.HardSwishMe": lambda m: ("hardswish", {}),
    "timm.layers.activations_me.HardSigmoidMe": lambda m: ("hardsigmoid", {}),
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
    fnn.XIELU: lambda m: ("xielu", {}),
}

# Single-input kinds the fused bias_act kernel computes (so a preceding layer's bias can be folded in).
FOLDABLE = frozenset(kind for kind in F.ACTIVATIONS if kind not in ("swiglu", "geglu", "reglu", "glu"))
# Gated-MLP activation kinds -> the gated kernel's activation.
GATED = {"silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid"}
# Kinds with learned parameters: their fusedact module takes the module's own tensors (``XIELU.sharing``).
LEARNED = F.LEARNED
# Every kind ``patch(activations=...)`` accepts.
KNOWN = frozenset(F.ACTIVATIONS) | {"prelu", "softmax", "log_softmax"}


def activation_kind(module: nn.Module) -> Optional[tuple[str, dict]]:
    """``(kind, settings)`` of an activation module fusedact recognizes, else None.

    ``activation_kind(nn.GELU(approximate="tanh")) == ("gelu", {"approximate": "tanh"})``; fusedact's own
    modules are recognized too (``fusedact.nn.Swish(2.0)`` -> ``("swish", {"beta": 2.0})``).
    """
    cls = type(module)
    if isinstance(module, FOLDED):
        return module.activation, dict(module.params)
    if cls in _FUSED_KINDS:
        return _FUSED_KINDS[cls](module)
    if cls.__module__ == fnn.__name__ and cls.__bases__[0] is not nn.Module:
        cls = cls.__bases__[0]  # fusedact.nn twins of torch.nn classes carry their twin's settings
    kind = _KINDS.get(class_key(cls))
    return kind(module) if kind is not None else None


_LOOKS_LIKE_ACTIVATION = re.compile(
    r"relu|gelu|silu|swish|sigmoid|tanh|elu$|mish|glu|softplus|softsign|hardswish|hardsigmoid|hardtanh|"
    r"activation|^act$|^act\d|softmax|threshold",
    re.IGNORECASE,
)


def looks_like_activation(module: nn.Module) -> bool:
    """A leaf module whose class name says activation (recognized by fusedact or not, learned or not:
    ``XIELUActivation`` has two parameters). fusedact's own classes are not: they are known or are layers
    ``patch`` made (``LinearBiasInActivation``)."""
    cls = type(module)
    return (
        bool(_LOOKS_LIKE_ACTIVATION.search(cls.__name__))
        and next(module.children(), None) is None
        and cls.__module__.split(".")[0] != "fusedact"
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
        "relu6": lambda inplace=False: fnn.ReLU6(inplace),
        "hardtanh": lambda min_val=-1.0, max_val=1.0, inplace=False: fnn.Hardtanh(min_val, max_val, inplace),
        "hardswish": lambda inplace=False: fnn.Hardswish(inplace),
        "hardsigmoid": lambda inplace=False: fnn.Hardsigmoid(inplace),
        "softplus": lambda beta=1.0, threshold=20.0: fnn.Softplus(beta, threshold),
        "xielu": lambda **settings: fnn.XIELU(**settings),  # fresh coefficients; patch shares the module's
        "softmax": lambda dim=None: fnn.Softmax(dim),
        "log_softmax": lambda dim=None: fnn.LogSoftmax(dim),
    }
    if kind not in builders:
        raise ValueError(f"no fusedact module for activation {kind!r}; expected one of {sorted(builders)}")
    try:
        return builders[kind](**settings)
    except TypeError as error:
        raise TypeError(f"{kind}: {error}") from None


# Activation functions a forward may call instead of a module, by the kind fusedact gives them (or, where
# fusedact has none, by their own name): what ``function_calls`` lists. Tensor methods by name likewise.
ACTIVATION_FUNCTIONS: dict = {
    torch.nn.functional.relu: "relu",
    torch.relu: "relu",
    torch.nn.functional.leaky_relu: "leaky_relu",
    torch.nn.functional.gelu: "gelu",
    torch.nn.functional.silu: "silu",
    torch.nn.functional.mish: "mish",
    torch.nn.functional.elu: "elu",
    torch.nn.functional.selu: "selu",
    torch.selu: "selu",
    torch.nn.functional.celu: "celu",
    torch.nn.functional.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    torch.nn.functional.tanh: "tanh",
    torch.tanh: "tanh",
    torch.nn.functional.glu: "glu",
    torch.nn.functional.prelu: "prelu",
    torch.nn.functional.softmax: "softmax",
    torch.softmax: "softmax",
    torch.nn.functional.log_softmax: "log_softmax",
    torch.log_softmax: "log_softmax",
    torch.nn.functional.softplus: "softplus",
    torch.nn.functional.hardswish: "hardswish",
    torch.nn.functional.hardsigmoid: "hardsigmoid",
    torch.nn.functional.hardtanh: "hardtanh",
    torch.nn.functional.relu6: "relu6",
    torch.nn.functional.logsigmoid: "logsigmoid",
    torch.nn.functional.softsign: "softsign",
}
ACTIVATION_METHODS = frozenset({"relu", "sigmoid", "tanh", "softmax", "log_softmax", "relu_", "sigmoid_", "tanh_"})

# Of those, the ones whose call with one positional argument and no keyword is a gated kernel's activation.
_GATED_FUNCTIONS = {
    torch.nn.functional.silu: ("silu", {}),
    torch.nn.functional.gelu: ("gelu", dict(_ERF)),
    torch.nn.functional.relu: ("relu", {}),
    torch.relu: ("relu", {}),
    torch.nn.functional.sigmoid: ("sigmoid", {}),
    torch.sigmoid: ("sigmoid", {}),
}


def function_kind(function) -> Optional[tuple[str, dict]]:
    """``(kind, settings)`` of ``function(x)`` (one positional argument, no keyword) where it is an activation
    the gated kernel computes: ``function_kind(torch.nn.functional.silu) == ("silu", {})``."""
    try:
        kind = _GATED_FUNCTIONS.get(function)
    except TypeError:  # unhashable
        return None
    return (kind[0], dict(kind[1])) if kind else None
