"""Activation specs as the lab's commands take them: ``name`` or ``name:key=value,key=value``.

``name`` is one of ``fusedact.functional.ACTIVATIONS`` (plus the shorthands in ``ALIASES``); the keywords are
that activation's own (``leaky_relu:negative_slope=0.2``, ``gelu:approximate=tanh``, ``swish:beta=1.702``),
the keyword arguments of its public function (``fusedact.leaky_relu``). Every spec is checked against them
and run once through ``fusedact.bias_act``, so a typo fails here, with the valid names or keywords, before
any model is built.

    >>> spec = parse_activation("leaky_relu:negative_slope=0.2")
    >>> spec.label, spec.params
    ('leaky_relu(negative_slope=0.2)', {'negative_slope': 0.2})
"""

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .. import functional

# Shorthands for the variants people ask for by name (accepted, not listed among the names: each is a
# setting of one of them).
ALIASES = {
    "gelu_tanh": ("gelu", {"approximate": "tanh"}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
}

# The gated activations take a packed [gate | up] input of twice the width they return.
GATED = frozenset({"swiglu", "geglu", "reglu", "glu"})


class LabError(Exception):
    """A user-facing error of the lab (unknown model or activation, bad setting): the CLI prints it, exits 2."""


@dataclass(frozen=True)
class ActivationSpec:
    """A public fusedact activation name with its keyword parameters."""

    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``name`` alone, or ``name(key=value, ...)``: used in tables, reports and file names."""
        if not self.params:
            return self.name
        return f"{self.name}({', '.join(f'{key}={value}' for key, value in self.params.items())})"

    @property
    def gated(self) -> bool:
        return self.name in GATED

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None, dim: int = -1) -> Tensor:
        """The activation of ``x + bias`` through ``fusedact.bias_act`` (forward and backward are fusedact's)."""
        return functional.bias_act(x, bias, self.name, dim=dim, **self.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def known_activations() -> list[str]:
    """The activation names ``parse_activation`` accepts, without the shorthands of ``ALIASES``."""
    return list(functional.ACTIVATIONS)


def accepted_parameters(name: str) -> list[str]:
    """The keywords activation ``name`` takes: those of its public function after the tensors (for a gated
    one, of its packed form, which is what ``bias_act`` runs), e.g. ``["negative_slope"]`` for leaky_relu.

    >>> accepted_parameters("heaviside"), accepted_parameters("relu")
    (['value', 'straight_through'], [])
    """
    function = getattr(functional, f"{name}_packed", None) or getattr(functional, name)
    return [
        parameter.name
        for parameter in inspect.signature(function).parameters.values()
        # x and bias are the tensors; dim is bias_act's own argument (glu splits the last dimension only).
        if parameter.default is not inspect.Parameter.empty and parameter.name not in ("bias", "dim")
    ]


def parse_activation(text: str) -> ActivationSpec:
    """``"gelu"``, ``"gelu:approximate=tanh"``, ``"leaky_relu:negative_slope=0.2"`` -> a checked spec.

    Raises ``LabError`` naming the valid activations (and the closest match) for an unknown name, and the
    activation's own complaint for a bad keyword or value.
    """
    name, _, rest = text.strip().partition(":")
    params: dict = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise LabError(f"activation {text!r}: expected key=value after ':', got {item!r}")
        params[key.strip()] = _parse_value(value.strip())
    if name in ALIASES:
        alias_name, alias_params = ALIASES[name]
        name, params = alias_name, {**alias_params, **params}
    if name not in functional.ACTIVATIONS:
        close = difflib.get_close_matches(name, [*known_activations(), *ALIASES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        shorthands = ", ".join(f"{alias} = {ActivationSpec(*ALIASES[alias]).label}" for alias in ALIASES)
        raise LabError(
            f"unknown activation {name!r}{hint}; choose from: {', '.join(known_activations())} "
            f"(shorthands: {shorthands})"
        )
    unexpected = [key for key in params if key not in accepted_parameters(name)]
    if unexpected:
        accepted = accepted_parameters(name)
        takes = f"it takes: {', '.join(accepted)}" if accepted else "it takes no parameters"
        raise LabError(
            f"activation {text!r}: unexpected keyword {', '.join(map(repr, unexpected))} for {name}; {takes}"
        )
    return check_activation(ActivationSpec(name, params), text)


def check_activation(spec: ActivationSpec, text: Optional[str] = None) -> ActivationSpec:
    """``spec``, once it has run through ``fusedact.bias_act`` without complaint (else a ``LabError``)."""
    try:
        spec(torch.zeros(1, 4))
    except (TypeError, ValueError) as error:
        raise LabError(f"activation {text or spec.label!r}: {error}") from None
    return spec


def parse_activations(texts) -> list[ActivationSpec]:
    """Several specs, duplicates removed, order kept."""
    specs = []
    for text in texts:
        spec = parse_activation(text)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise LabError("no activations given")
    return specs


def resolve_device(name: Optional[str]) -> torch.device:
    """``None``: CUDA when present, else CPU; otherwise the named device, checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise LabError(f"bad device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LabError(f"device {name!r}: no CUDA GPU is available")
    if device.type not in ("cpu", "cuda"):
        raise LabError(f"device {name!r}: fusedact runs on cpu or cuda")
    return device
