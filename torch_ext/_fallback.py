"""The PyTorch fallback, for tensors the Triton kernels do not run on (CPU, fp64).

Evaluated in fp32 (fp64 for fp64 tensors) with one rounding to the output dtype at the end, like the
kernels. Two paths, one function:

- Fast path: PyTorch's own fused ops (``F.gelu``, ``aten.gelu_backward``, ``F.silu``...). relu and
  leaky_relu always take it: they have exactly the kernels' semantics. The smooth activations take it when
  every input is finite and below ``TAME_LIMIT`` in magnitude, where PyTorch's ops and the kernels compute
  the same function (they may differ in the last fp32 bits).
- Careful path: the twin of ``kernels/activations.py``, line for line (same formulas, same limits at
  +-inf, no spurious NaN for huge inputs), for tensors holding NaN, inf or huge values.

The tests hold both paths, and the kernels, to float64 references.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ._channels import channel_shape, reduce_to_channels

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TWO_SQRT_2_OVER_PI = 1.5957691216057308
_GELU_TANH_CUBIC = 0.044715
_GELU_TANH_CLAMP = 20.0
# Below this magnitude gelu-tanh's z^3 and its derivative's z^2 stay finite in fp32 (PyTorch's
# gelu_backward turns 0 * inf into NaN beyond ~1e19), and every other formula is exact.
TAME_LIMIT = 1e12


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


def _mish_tanh_softplus(z: Tensor) -> Tensor:
    e = torch.exp(z.clamp(max=_MISH_CLAMP))
    n = e * (e + 2.0)
    return n / (n + 2.0)


def _tame(z: Tensor) -> bool:
    """Every element finite and within TAME_LIMIT (a NaN makes aminmax NaN, so not tame). One pass."""
    if z.numel() == 0:
        return True
    low, high = torch.aminmax(z)
    return bool(low > -TAME_LIMIT) and bool(high < TAME_LIMIT)


_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_MISH_CLAMP = 20.0


def _elu_params(activation: str, param: float) -> tuple[float, float, float]:
    """(alpha, scale, input_scale) of PyTorch's ELU family: elu(alpha), selu, celu(alpha)."""
    if activation == "elu":
        return param, 1.0, 1.0
    if activation == "selu":
        return _SELU_ALPHA, _SELU_SCALE, 1.0
    return param, 1.0, 1.0 / param  # celu


def activation_forward(z: Tensor, activation: str, param: float) -> Tensor:
    # Activations whose PyTorch op has the kernels' semantics for every input, inf and NaN included.
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation in ("elu", "selu", "celu"):
        alpha, scale, input_scale = _elu_params(activation, param)
        return torch.ops.aten.elu(z, alpha, scale, input_scale)
    if activation == "relu_squared":
        return torch.relu(z).square()
    if activation in ("heaviside", "heaviside_ste"):
        return torch.heaviside(z, z.new_tensor(param))
    # The smooth ones: PyTorch's ops where they agree with the kernels, the careful twin elsewhere.
    if _tame(z):
        if activation in ("gelu", "gelu_tanh"):
            return F.gelu(z, approximate="none" if activation == "gelu" else "tanh")
        if activation == "swish":
            return F.silu(z) if param == 1.0 else z * torch.sigmoid(param * z)
        if activation == "mish":
            return F.mish(z)
    return _careful_forward(z, activation, param)


def activation_backward(grad: Tensor, saved: Tensor, activation: str, param: float) -> Tensor:
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, saved, param, False)
    if activation == "sigmoid":  # saved is the output
        return torch.ops.aten.sigmoid_backward(grad, saved)
    if activation == "tanh":  # saved is the output
        return torch.ops.aten.tanh_backward(grad, saved)
    if activation in ("elu", "selu", "celu"):
        alpha, scale, input_scale = _elu_params(activation, param)
        if _tame(saved):  # (PyTorch's elu_backward passes the gradient at NaN on some paths)
            return torch.ops.aten.elu_backward(grad, alpha, scale, input_scale, False, saved)
        return torch.where(saved > 0, grad * scale, grad * scale * alpha * input_scale * torch.exp(saved * input_scale))
    if activation == "relu_squared":
        return torch.ops.aten.threshold_backward(2.0 * saved * grad, saved, 0)
    if activation == "heaviside":
        return torch.zeros_like(grad)
    if activation == "heaviside_ste":
        return grad.clone()
    if _tame(saved):
        if activation in ("gelu", "gelu_tanh"):
            approximate = "none" if activation == "gelu" else "tanh"
            return torch.ops.aten.gelu_backward(grad, saved, approximate=approximate)
        if activation == "swish":
            if param == 1.0:
                return torch.ops.aten.silu_backward(grad, saved)
            s = torch.sigmoid(param * saved)
            return grad * s * (1.0 + param * saved * (1.0 - s))
        if activation == "mish":
            return torch.ops.aten.mish_backward(grad, saved)
    return _careful_backward(grad, saved, activation, param)


def _careful_forward(z: Tensor, activation: str, param: float) -> Tensor:
    if activation == "gelu":
        return _scale(z, 0.5 * (1.0 + torch.erf(z * _SQRT_HALF)))
    if activation == "gelu_tanh":
        logit, _ = _gelu_tanh_logit(z)
        return _scale(z, torch.sigmoid(logit))
    if activation == "swish":
        return _scale(z, torch.sigmoid(param * z))
    if activation == "mish":
        return _scale(z, _mish_tanh_softplus(z))
    raise ValueError(f"unknown activation {activation!r}")


def _careful_backward(grad: Tensor, saved: Tensor, activation: str, param: float) -> Tensor:
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
    if activation == "mish":
        t = _mish_tanh_softplus(saved)
        return grad * (t + _scale(saved, (1.0 - t * t) * torch.sigmoid(saved)))
    raise ValueError(f"unknown activation {activation!r}")


def _with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    """t + bias in the compute dtype: one pass (a bf16 t plus an fp32 bias adds in fp32, exactly as
    upcasting t first would)."""
    dtype = compute_dtype(t.dtype)
    return t.to(dtype) if bias is None else torch.add(t, bias.to(dtype))


def _bias_grad(grad: Tensor, bias: Tensor | None, compute: bool, dim: int = -1) -> Tensor:
    """Sum over every dimension but ``dim`` in the compute dtype, then one rounding; empty when not asked for."""
    if bias is None or not compute:
        return grad.new_empty(0)
    return reduce_to_channels(grad, dim % max(grad.dim(), 1)).to(bias.dtype)


def _along(t: Tensor | None, x: Tensor, dim: int) -> Tensor | None:
    """A per-channel ``[C]`` tensor shaped to broadcast along ``dim`` of ``x``."""
    return None if t is None else t.view(channel_shape(x, dim))


def bias_act(x: Tensor, bias: Tensor | None, weight: Tensor | None, activation: str, param: float, dim: int) -> Tensor:
    z = _with_bias(x, _along(bias, x, dim))
    if weight is not None:  # PReLU: leaky_relu with a slope per channel (PyTorch's elementwise prelu)
        return torch.ops.aten._prelu_kernel(z, _along(weight, x, dim).to(z.dtype)).to(x.dtype)
    return activation_forward(z, activation, param).to(x.dtype)


def bias_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    activation: str,
    param: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    z = _with_bias(saved, None if saved_is_output else _along(bias, saved, dim))
    grad = grad_y.to(z.dtype)
    grad_weight = saved.new_empty(0)
    if weight is not None:  # PReLU; the slope's gradient is grad * z on the negative side
        grad_x, grad_slope = torch.ops.aten._prelu_kernel_backward(grad, z, _along(weight, saved, dim).to(z.dtype))
        if compute_grad_weight:
            if weight.numel() == 1:  # one slope shared by every channel
                grad_weight = grad_slope.sum().reshape(1).to(weight.dtype)
            else:
                grad_weight = _bias_grad(grad_slope, weight, True, dim)
    else:
        grad_x = activation_backward(grad, z, activation, param)
    return grad_x.to(saved.dtype), _bias_grad(grad_x, bias, compute_grad_bias, dim), grad_weight


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
    saved_is_output: bool,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z = _with_bias(gate, gate_bias)
    u = _with_bias(up, up_bias)
    grad = grad_y.to(z.dtype)
    activated = activation_forward(z, activation, param)
    grad_gate = activation_backward(grad * u, activated if saved_is_output else z, activation, param)
    grad_up = grad * activated
    return (
        grad_gate.to(gate.dtype),
        grad_up.to(up.dtype),
        _bias_grad(grad_gate, gate_bias, compute_grad_bias),
        _bias_grad(grad_up, up_bias, compute_grad_bias),
    )
