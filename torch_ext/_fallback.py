"""PyTorch twin of ``kernels/activations.py``, for tensors the Triton kernels do not run on.

Same formulas and the same edge-case rules as the Triton math (see that module's docstring), evaluated
in fp32 (fp64 for fp64 tensors) with one rounding to the output dtype at the end. Kept line for line
beside the Triton version so the two can be read together; the tests hold both to float64 references.
"""

import torch
from torch import Tensor

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TWO_SQRT_2_OVER_PI = 1.5957691216057308
_GELU_TANH_CUBIC = 0.044715
_GELU_TANH_CLAMP = 20.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(z: Tensor, p: Tensor) -> Tensor:
    signed_zero = torch.where(z < 0, -0.0, 0.0).to(z.dtype)
    return torch.where(p == 0, signed_zero, z * p)


def _gelu_tanh_logit(z: Tensor) -> tuple[Tensor, Tensor]:
    zc = z.clamp(-_GELU_TANH_CLAMP, _GELU_TANH_CLAMP)  # torch.clamp keeps NaN
    z_squared = zc * zc
    logit = _TWO_SQRT_2_OVER_PI * (zc + _GELU_TANH_CUBIC * z_squared * zc)
    logit_derivative = _TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z_squared)
    return logit, logit_derivative


def activation_forward(z: Tensor, activation: str, param: float) -> Tensor:
    if activation == "relu":
        return torch.where(z < 0, 0.0, z)
    if activation == "leaky_relu":
        return torch.where(z > 0, z, z * param)
    if activation == "gelu":
        return _scale(z, 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)))
    if activation == "gelu_tanh":
        logit, _ = _gelu_tanh_logit(z)
        return _scale(z, torch.sigmoid(logit))
    if activation == "swish":
        return _scale(z, torch.sigmoid(param * z))
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(grad: Tensor, saved: Tensor, activation: str, param: float) -> Tensor:
    if activation == "relu":
        return torch.where(saved <= 0, 0.0, grad)
    if activation == "leaky_relu":
        return torch.where(saved > 0, grad, grad * param)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(saved * _SQRT_HALF))
        pdf = _INV_SQRT_2PI * torch.exp(-0.5 * saved * saved)
        return grad * (cdf + _scale(saved, pdf))
    if activation == "gelu_tanh":
        logit, logit_derivative = _gelu_tanh_logit(saved)
        s = torch.sigmoid(logit)
        return grad * (s + _scale(saved, s * (1.0 - s) * logit_derivative))
    if activation == "swish":
        s = torch.sigmoid(param * saved)
        return grad * (s + _scale(saved, s * (1.0 - s) * param))
    raise ValueError(f"unknown activation {activation!r}")


def _with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    t = t.to(compute_dtype(t.dtype))
    return t if bias is None else t + bias.to(t.dtype)


def _bias_grad(grad: Tensor, bias: Tensor | None, compute: bool) -> Tensor:
    """Sum over every leading dimension in the compute dtype, then one rounding; empty when not asked for."""
    if bias is None or not compute:
        return grad.new_empty(0)
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


def bias_act(x: Tensor, bias: Tensor | None, activation: str, param: float) -> Tensor:
    return activation_forward(_with_bias(x, bias), activation, param).to(x.dtype)


def bias_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    bias: Tensor | None,
    activation: str,
    param: float,
    saved_is_output: bool,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor]:
    z = _with_bias(saved, None if saved_is_output else bias)
    grad_x = activation_backward(grad_y.to(z.dtype), z, activation, param)
    return grad_x.to(saved.dtype), _bias_grad(grad_x, bias, compute_grad_bias)


def gated(
    gate: Tensor, up: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None, activation: str, param: float
) -> Tensor:
    z = _with_bias(gate, gate_bias)
    return (activation_forward(z, activation, param) * _with_bias(up, up_bias)).to(gate.dtype)


def gated_backward(
    grad_y: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    activation: str,
    param: float,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = _with_bias(gate, gate_bias)
    u = _with_bias(up, up_bias)
    grad = grad_y.to(z.dtype)
    grad_gate = activation_backward(grad * u, z, activation, param)
    grad_up = grad * activation_forward(z, activation, param)
    return (
        grad_gate.to(gate.dtype),
        grad_up.to(up.dtype),
        _bias_grad(grad_gate, gate_bias, compute_grad_bias),
        _bias_grad(grad_up, up_bias, compute_grad_bias),
    )
