"""The PyTorch fallback, for tensors the Triton kernels do not run on (CPU, fp64).

Evaluated in fp32 (fp64 for fp64 tensors) with one rounding to the output dtype at the end, like the
kernels. Two paths, chosen per element:

- Fast path: PyTorch's own fused ops (``F.gelu``, ``aten.gelu_backward``, ``F.silu``...), for the
  elements inside the range where that op meets fusedact's accuracy (``FAST_RANGE``: bf16/fp16 within
  1 ULP and fp32 within a few ULPs of the exact value). relu, leaky_relu, tanh, the ELU family's forward
  and heaviside always take it: their PyTorch ops are accurate over the whole range and have exactly the
  kernels' semantics. Outside those ranges PyTorch's fp32 ops cancel (``1 + erf`` below z = -1.8,
  ``1 + tanh`` below -2.3, ``1 - sigmoid`` past 7) or overflow (``1 / (1 + exp(-x))`` below -88), and
  give NaN at +-inf where the function has a limit.
- Careful path: the twin of ``kernels/activations.py``, line for line (same formulas, same scaling of
  exponentials by 2^64 in the tails, same limits at +-inf; see that module's docstring), for the
  elements outside ``FAST_RANGE`` (tails, NaN, inf, huge values), and for every element when a backward
  must itself be differentiable (grad mode on and an input requiring grad: double backward) and PyTorch's
  op has no derivative (``aten.silu_backward``, ``aten.mish_backward``). Where the kernels evaluate erfc
  with their own fit of erfcx (Triton's interpreter has no libdevice), the twin calls
  ``torch.special.erfcx``, accurate in fp64 too. Every constant of the twin (clamps, scaling thresholds)
  holds in fp64 as well.

The ELU family's gradient at a NaN input is NaN (PyTorch's ``elu_backward`` gives NaN on its vectorized
CPU path and ``grad * scale`` on its scalar and CUDA paths). The tests hold both paths, and the kernels,
to float64 references over every finite bf16 and fp16 value (tests/test_numerics.py).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._channels import channel_shape, reduce_to_channels

_LOG2E = 1.4426950408889634
_HALF_LOG2E = 0.7213475204444817
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TAIL_EXPONENT = -118.0
_TAIL_SCALE = 2.0**-64
_TAIL_HALF_SCALE = 2.0**-32
_LOGISTIC_TAIL = -82.0
_LOGISTIC_CLAMP = 800.0
_GELU_TANH_A = 1.5957691216057308
_GELU_TANH_B = 0.07135481627260025
_GELU_TANH_3B = 0.21406444881780076
_GELU_TANH_CLAMP = 40.0
_GELU_CLAMP = 40.0
_GELU_TAIL = -12.8
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_SELU_NEGATIVE = 1.7580993408473766
_MISH_CLAMP = 20.0
_MISH_LOW_CLAMP = -800.0

# Below this magnitude gelu-tanh's z^3 and its derivative's z^2 stay finite in fp32 (PyTorch's
# gelu_backward turns 0 * inf into NaN beyond ~1e19); beyond it every smooth activation takes the careful path.
TAME_LIMIT = 1e12
# (activation, "forward" | "backward") -> [low, high] of the pre-activation (swish: of beta * z) where
# PyTorch's own fp32 op is within ~4 fp32 ULPs plus the condition number's share (measured over a dense
# fp32 grid of the whole range), so within 1 ULP in bf16/fp16. NaN is never inside.
FAST_RANGE: dict[tuple[str, str], tuple[float, float]] = {
    ("gelu", "forward"): (-1.5, TAME_LIMIT),  # 1 + erf cancels below
    ("gelu", "backward"): (0.0, TAME_LIMIT),  # aten.gelu_backward is 8 fp32 ULPs off already at -0.4
    ("gelu_tanh", "forward"): (-2.0, TAME_LIMIT),  # 1 + tanh cancels below
    ("gelu_tanh", "backward"): (-2.0, 4.5),  # and 1 - tanh^2 above
    ("swish", "forward"): (-80.0, TAME_LIMIT),  # 1 / (1 + exp(-x)) underflows below -88
    ("swish", "backward"): (-80.0, 7.0),  # and 1 - sigmoid cancels above
    ("sigmoid", "forward"): (-80.0, math.inf),
    ("mish", "forward"): (-80.0, TAME_LIMIT),
    ("mish", "backward"): (-80.0, 7.0),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _elu_params(activation: str, param: float) -> tuple[float, float, float]:
    """(alpha, scale, input_scale) of PyTorch's ELU family: elu(alpha), selu, celu(alpha)."""
    if activation == "elu":
        return param, 1.0, 1.0
    if activation == "selu":
        return _SELU_ALPHA, _SELU_SCALE, 1.0
    return param, 1.0, 1.0 / param  # celu


def _fast_where_accurate(key: tuple[str, str], x: Tensor, fast, careful) -> Tensor:
    """``fast()`` where ``x`` lies in ``FAST_RANGE[key]``, ``careful(mask)`` (the careful formula on the
    elements selected by ``mask``) elsewhere; each evaluated only where needed."""
    low, high = FAST_RANGE[key]
    inside = (x >= low) & (x <= high)  # False for NaN
    if bool(inside.all()):
        return fast()
    outside = ~inside
    if bool(outside.all()):
        return careful(None)
    return fast().index_put((outside,), careful(outside))


def _pick(t: Tensor, mask: Tensor | None) -> Tensor:
    return t if mask is None or t.dim() == 0 else t[mask]


def _needs_derivative(*tensors: Tensor) -> bool:
    """Whether autograd records this backward (double backward): then no op without a derivative."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def activation_forward(z: Tensor, activation: str, param: float) -> Tensor:
    # Activations whose PyTorch op has the kernels' semantics and accuracy for every input.
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "tanh":
        return torch.tanh(z)
    if activation in ("elu", "selu", "celu"):
        alpha, scale, input_scale = _elu_params(activation, param)
        return torch.ops.aten.elu(z, alpha, scale, input_scale)
    if activation == "relu_squared":
        return torch.relu(z).square()
    if activation in ("heaviside", "heaviside_ste"):
        return torch.heaviside(z, z.new_tensor(param))

    def careful(mask):
        return _careful_forward(_pick(z, mask), activation, param)

    # The smooth ones: PyTorch's ops where they are accurate, the careful twin elsewhere.
    if activation in ("gelu", "gelu_tanh"):
        approximate = "none" if activation == "gelu" else "tanh"
        return _fast_where_accurate((activation, "forward"), z, lambda: F.gelu(z, approximate=approximate), careful)
    if activation == "swish":
        x = param * z
        fast = (lambda: F.silu(z)) if param == 1.0 else (lambda: z * torch.sigmoid(x))
        return _fast_where_accurate(("swish", "forward"), x, fast, careful)
    if activation == "sigmoid":
        return _fast_where_accurate(("sigmoid", "forward"), z, lambda: torch.sigmoid(z), careful)
    if activation == "mish":
        return _fast_where_accurate(("mish", "forward"), z, lambda: F.mish(z), careful)
    raise ValueError(f"unknown activation {activation!r}")


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
        # NaN in, NaN out (PyTorch's elu_backward passes the gradient at NaN on some of its paths). Its
        # exp(z) keeps its bits in fp32's subnormals on CPU: no scaling needed (as the kernels' is).
        return torch.where(
            torch.isnan(saved), saved, torch.ops.aten.elu_backward(grad, alpha, scale, input_scale, False, saved)
        )
    if activation == "relu_squared":
        return torch.ops.aten.threshold_backward(2.0 * saved * grad, saved, 0)
    if activation == "heaviside":
        return torch.zeros_like(grad)
    if activation == "heaviside_ste":
        return grad.clone()

    def careful(mask):
        return _careful_backward(_pick(grad, mask), _pick(saved, mask), activation, param)

    if grad.shape != saved.shape:  # (a broadcast gradient: no element-wise split)
        grad = grad.expand_as(saved)
    if activation in ("gelu", "gelu_tanh"):
        approximate = "none" if activation == "gelu" else "tanh"
        fast = lambda: torch.ops.aten.gelu_backward(grad, saved, approximate=approximate)  # noqa: E731
        return _fast_where_accurate((activation, "backward"), saved, fast, careful)
    if activation == "swish":
        if param == 1.0 and not _needs_derivative(grad, saved):  # aten.silu_backward has no derivative
            fast = lambda: torch.ops.aten.silu_backward(grad, saved)  # noqa: E731
        else:
            fast = lambda: _swish_backward_plain(grad, saved, param)  # noqa: E731
        return _fast_where_accurate(("swish", "backward"), param * saved, fast, careful)
    if activation == "mish":
        if _needs_derivative(grad, saved):  # aten.mish_backward has no derivative
            return careful(None)
        fast = lambda: torch.ops.aten.mish_backward(grad, saved)  # noqa: E731
        return _fast_where_accurate(("mish", "backward"), saved, fast, careful)
    raise ValueError(f"unknown activation {activation!r}")


def _swish_backward_plain(grad: Tensor, z: Tensor, beta: float) -> Tensor:
    s = torch.sigmoid(beta * z)
    return grad * s * (1.0 + beta * z * (1.0 - s))


# ---------------------------------------------------------------------------------------------------
# The careful twin of kernels/activations.py


def _times_gate(z: Tensor, p: Tensor) -> Tensor:
    return z.clamp(min=-torch.finfo(z.dtype).max) * p  # -inf * 0 -> -0.0; torch.clamp keeps NaN


def _exp2_scaled(t: Tensor, tail: Tensor) -> Tensor:
    return torch.exp2(torch.where(tail, t + 64.0, t))


def _unscale(v: Tensor, tail: Tensor) -> Tensor:
    return torch.where(tail, v * _TAIL_SCALE, v)


def _grad_times(grad: Tensor, derivative: Tensor, tail: Tensor) -> Tensor:
    half = torch.where(tail, _TAIL_HALF_SCALE, 1.0).to(derivative.dtype)
    return (grad * half) * (derivative * half)


def _logistic(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = x * _LOG2E
    tail = x < _LOGISTIC_TAIL
    e = torch.exp2(torch.where(tail, t + 64.0, -t))
    reciprocal = 1.0 / (1.0 + e)
    return torch.where(tail, e, reciprocal), torch.where(tail, e, e * reciprocal * reciprocal), tail


def _gelu_tanh_logit(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    zc = z.clamp(-_GELU_TANH_CLAMP, _GELU_TANH_CLAMP)  # torch.clamp keeps NaN
    z_squared = zc * zc
    return zc, zc * (_GELU_TANH_A + _GELU_TANH_B * z_squared), _GELU_TANH_A + _GELU_TANH_3B * z_squared


def _gelu_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    tail = z < _GELU_TAIL
    gaussian = _exp2_scaled(-(z * z) * _HALF_LOG2E, tail)
    # erfc(a) = exp(-a^2) erfcx(a): the kernels fit erfcx; here PyTorch's.
    half_erfc = 0.5 * torch.special.erfcx(z.abs() * _SQRT_HALF) * gaussian
    return torch.where(z < 0, half_erfc, 1.0 - half_erfc), _INV_SQRT_2PI * gaussian, tail


def _mish_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t_exp = z.clamp(max=_MISH_CLAMP) * _LOG2E
    tail = t_exp < _TAIL_EXPONENT
    e = _exp2_scaled(t_exp, tail)
    n = e * (e + 2.0)
    reciprocal = 1.0 / (n + 2.0)
    return n * reciprocal, (4.0 * e) * (1.0 + e) * (reciprocal * reciprocal), tail


def _careful_forward(z: Tensor, activation: str, param: float) -> Tensor:
    if activation == "gelu":
        cdf, _, tail = _gelu_parts(z)
        return _unscale(_times_gate(z, cdf), tail)
    if activation == "gelu_tanh":
        _, logit, _ = _gelu_tanh_logit(z)
        p, _, tail = _logistic(logit)
        return _unscale(_times_gate(z, p), tail)
    if activation == "swish":
        p, _, tail = _logistic(param * z)
        return _unscale(_times_gate(z, p), tail)
    if activation == "sigmoid":
        p, _, tail = _logistic(z)
        return _unscale(p, tail)
    if activation == "mish":
        t, _, tail = _mish_parts(z)
        return _unscale(_times_gate(z, t), tail)
    raise ValueError(f"unknown activation {activation!r}")


def _careful_backward(grad: Tensor, saved: Tensor, activation: str, param: float) -> Tensor:
    if activation == "gelu":
        cdf, pdf, tail = _gelu_parts(saved)
        return _grad_times(grad, cdf + saved.clamp(-_GELU_CLAMP, _GELU_CLAMP) * pdf, tail)
    if activation == "gelu_tanh":
        zc, logit, logit_derivative = _gelu_tanh_logit(saved)
        p, slope, tail = _logistic(logit)
        return _grad_times(grad, p + (zc * logit_derivative) * slope, tail)
    if activation == "swish":
        x = param * saved
        p, slope, tail = _logistic(x)
        return _grad_times(grad, p + x.clamp(-_LOGISTIC_CLAMP, _LOGISTIC_CLAMP) * slope, tail)
    if activation == "mish":
        t, slope, tail = _mish_parts(saved)
        return _grad_times(grad, t + saved.clamp(_MISH_LOW_CLAMP, _MISH_CLAMP) * slope, tail)
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
