"""Functional API: mirrors ``torch.nn.functional`` with an optional ``bias`` fused into the activation.

``bias`` has length ``x.shape[-1]`` and broadcasts over every leading dimension; its gradient is summed
over all of them. Math is fp32 with one rounding to ``x.dtype`` (fp16, bf16, fp32; fp64 stays fp64).

Example::

    >>> import torch, fusedact
    >>> x, b = torch.randn(8, 16), torch.zeros(16)
    >>> torch.equal(fusedact.gelu(x, b), torch.nn.functional.gelu(x))
    True
"""

from typing import Optional

import torch
from torch import Tensor

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_input(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_bias(bias: Optional[Tensor], x: Tensor, width: int, name: str, input_name: str) -> None:
    """A bias is 1-D of length ``width`` with the dtype and device of ``x``."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if x.dim() == 0:
        raise ValueError(f"{input_name} is 0-D: a {name} needs a last dimension to run along")
    if bias.dim() != 1 or bias.shape[0] != width:
        raise ValueError(f"{name} must have shape ({width},) to match {input_name}.shape[-1], got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} dtype {bias.dtype} does not match {input_name} dtype {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{name} is on {bias.device} but {input_name} is on {x.device}")


def _single(x: Tensor, bias: Optional[Tensor], activation: str, param: float) -> Tensor:
    _check_input(x, "x")
    _check_bias(bias, x, x.shape[-1] if x.dim() else 1, "bias", "x")
    return ops.bias_act(x, bias, activation, float(param))


def relu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """max(x + bias, 0). Example: ``fusedact.relu(torch.randn(4, 8), torch.zeros(8))``."""
    return _single(x, bias, "relu", 0.0)


def leaky_relu(x: Tensor, bias: Optional[Tensor] = None, negative_slope: float = 0.01) -> Tensor:
    """z if z > 0 else negative_slope * z, z = x + bias. Example: ``fusedact.leaky_relu(x, b, 0.2)``."""
    return _single(x, bias, "leaky_relu", negative_slope)


def gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """z * Phi(z), z = x + bias; ``approximate="tanh"`` for the tanh form. Example: ``fusedact.gelu(x, b)``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _single(x, bias, "gelu" if approximate == "none" else "gelu_tanh", 0.0)


def silu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z * sigmoid(z), z = x + bias. Example: ``fusedact.silu(x, b)``."""
    return _single(x, bias, "swish", 1.0)


def swish(x: Tensor, bias: Optional[Tensor] = None, beta: float = 1.0) -> Tensor:
    """z * sigmoid(beta * z), z = x + bias; beta = 1 is SiLU. Example: ``fusedact.swish(x, b, beta=1.702)``."""
    return _single(x, bias, "swish", beta)


def swiglu(gate: Tensor, up: Tensor, gate_bias: Optional[Tensor] = None, up_bias: Optional[Tensor] = None) -> Tensor:
    """silu(gate + gate_bias) * (up + up_bias), the gated MLP of Llama-style models.

    Example: ``fusedact.swiglu(gate_proj(x), up_proj(x))``.
    """
    _check_input(gate, "gate")
    _check_input(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise TypeError(f"gate ({gate.dtype}, {gate.device}) and up ({up.dtype}, {up.device}) must match")
    width = gate.shape[-1] if gate.dim() else 1
    _check_bias(gate_bias, gate, width, "gate_bias", "gate")
    _check_bias(up_bias, up, width, "up_bias", "up")
    return ops.gated(gate, up, gate_bias, up_bias, "swish", 1.0)


def swiglu_packed(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """swiglu of the two halves of ``x = [gate | up]`` along the last dimension (width 2H -> H).

    ``bias`` has length 2H (``[gate_bias | up_bias]``). The halves are read in place.
    Example: ``fusedact.swiglu_packed(gate_up_proj(x))``.
    """
    _check_input(x, "x")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension [gate | up], got shape {tuple(x.shape)}")
    _check_bias(bias, x, x.shape[-1], "bias", "x")
    return ops.gated_packed(x, bias, "swish", 1.0, True)


# name -> (function, the keyword parameters it takes)
_SINGLE_INPUT = {
    "relu": (relu, ()),
    "leaky_relu": (leaky_relu, ("negative_slope",)),
    "gelu": (gelu, ("approximate",)),
    "silu": (silu, ()),
    "swish": (swish, ("beta",)),
}
ACTIVATIONS = tuple(_SINGLE_INPUT) + ("swiglu",)


def bias_act(x: Tensor, bias: Optional[Tensor], activation: str, **params) -> Tensor:
    """Generic entry point: ``bias_act(x, b, "gelu", approximate="tanh")``.

    ``activation`` is one of ``fusedact.functional.ACTIVATIONS``; ``"swiglu"`` takes a packed ``x``.
    """
    if activation == "swiglu":
        if params:
            raise TypeError(f"swiglu takes no parameters, got {sorted(params)}")
        return swiglu_packed(x, bias)
    if activation not in _SINGLE_INPUT:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    function, accepted = _SINGLE_INPUT[activation]
    unexpected = set(params) - set(accepted)
    if unexpected:
        raise TypeError(f"{activation} does not take {sorted(unexpected)}; it takes {list(accepted) or 'none'}")
    return function(x, bias, **params)
