"""Activation math for the Triton kernels: each activation's forward and derivative, written once.

All functions take and return fp32 blocks; the kernels load, upcast, call these and round once on store.

=============  =========================================  ===============================================
activation     forward f(z)                               backward: grad_z = grad_y * f'(z)
=============  =========================================  ===============================================
relu           max(z, 0)                                  g if z > 0 (or z is NaN) else 0
leaky_relu     z if z > 0 else slope * z                  g if z > 0 else slope * g
gelu (erf)     z * Phi(z),  Phi(z) = (1 + erf(z/sqrt2))/2  Phi(z) + z * phi(z),  phi = exp(-z^2/2)/sqrt(2pi)
gelu (tanh)    z * sigmoid(2u),  u = sqrt(2/pi)(z + 0.044715 z^3)   s + z s (1 - s) 2u'(z)
swish (beta)   z * sigmoid(beta z)   (silu: beta = 1)     s + z s (1 - s) beta
sigmoid        s = 1 / (1 + exp(-z))                      s (1 - s), from the output
tanh           t = (1 - exp(-2z)) / (1 + exp(-2z))        1 - t^2, from the output
elu (alpha)    z if z > 0 else alpha (exp(z) - 1)         1 if z > 0 else alpha exp(z)
selu           scale * elu(z, alpha), PyTorch's constants  scale * elu'(z, alpha)
celu (alpha)   z if z > 0 else alpha (exp(z/alpha) - 1)   1 if z > 0 else exp(z/alpha)
relu_squared   max(z, 0)^2   (Primer)                      2 max(z, 0)
mish           z * tanh(softplus(z)) = z n / (n + 2),      t + z (1 - t^2) sigmoid(z),  t = n / (n + 2)
               n = exp(z) (exp(z) + 2)
heaviside (v)  1 if z > 0, v if z == 0, else 0 (NaN: 0)    0 (no gradient: a step cannot train)
heaviside_ste  as heaviside                                1 (straight-through estimator)
=============  =========================================  ===============================================

quick_gelu (CLIP) is swish with beta = 1.702 and needs no entry of its own. PReLU is leaky_relu with a
learned slope per channel: the templates load the slope instead of taking a scalar, and
``activation_param_backward`` gives the slope's gradient, grad_y * (0 if z > 0 else z).

``exp(z) - 1`` and ``1 - exp(-2z)`` lose all precision near 0 in fp32, and Triton has no ``expm1``:
``_expm1`` uses its Taylor series below |z| = 0.25 (truncation error < 2e-9 relative), ``exp(z) - 1``
above (where the result is at least 0.22 in magnitude, so the subtraction costs at most a few ULPs).

``gelu (tanh)`` uses ``0.5 (1 + tanh(u)) = sigmoid(2u)``: it is the same function PyTorch computes with
``tanh``, without the cancellation of ``1 + tanh(u)`` for negative ``u`` (and Triton has no ``tanh``).

The backward functions take the tensor the activation saves for backward: relu and leaky_relu
(slope >= 0) work from their output, since ``y > 0`` exactly when ``z > 0``, and so do sigmoid and tanh,
whose derivatives are written in their output; the others work from their input.

Semantics at the edges follow PyTorch (NaN in, NaN out; ``relu(-0.0) = -0.0``; relu passes the gradient
of a NaN), except that where PyTorch's formula turns an infinite or huge finite input into NaN
(``gelu(-inf)``, ``silu(-inf)``, ``gelu_tanh'(1e20)``) we return the mathematical limit.
"""

import triton
import triton.language as tl

# Activation ids, passed to the kernel templates as ``tl.constexpr`` so each compiles to its own code.
RELU = tl.constexpr(0)
LEAKY_RELU = tl.constexpr(1)
GELU = tl.constexpr(2)
GELU_TANH = tl.constexpr(3)
SWISH = tl.constexpr(4)
SIGMOID = tl.constexpr(5)
TANH = tl.constexpr(6)
ELU = tl.constexpr(7)
SELU = tl.constexpr(8)
CELU = tl.constexpr(9)
RELU_SQUARED = tl.constexpr(10)
MISH = tl.constexpr(11)
HEAVISIDE = tl.constexpr(12)
HEAVISIDE_STE = tl.constexpr(13)

# Host-side table: activation name -> id. (Which tensor each one saves for backward is the host's
# policy: see ``fusedact.ops.saves_output``.)
ACTIVATIONS: dict[str, int] = {
    "relu": 0,
    "leaky_relu": 1,
    "gelu": 2,
    "gelu_tanh": 3,
    "swish": 4,
    "sigmoid": 5,
    "tanh": 6,
    "elu": 7,
    "selu": 8,
    "celu": 9,
    "relu_squared": 10,
    "mish": 11,
    "heaviside": 12,
    "heaviside_ste": 13,
}

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)
# Beyond |z| = 20 gelu-tanh's sigmoid is exactly 0 or 1 in fp32; clamping the polynomial there keeps
# z^3 and its derivative finite without changing any result.
_GELU_TANH_CLAMP = tl.constexpr(20.0)
_SELU_ALPHA = tl.constexpr(1.6732632423543772)
_SELU_SCALE = tl.constexpr(1.0507009873554805)
# exp(20) (exp(20) + 2) / (... + 2) is exactly 1 in fp32: mish's tanh(softplus) saturates there.
_MISH_CLAMP = tl.constexpr(20.0)


@triton.jit
def _signed_zero(z):
    """A zero with the sign of ``z``, from its sign bit. (Not ``tl.where(z < 0, -0.0, 0.0)``: a ``-0.0``
    literal does not survive every Triton version's constant handling; Triton 3.8 folds it to ``+0.0``.)"""
    return (z.to(tl.uint32, bitcast=True) & 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def _scale(z, p):
    """``z * p`` where a probability-like ``p`` may underflow to 0: then the signed zero, never ``inf * 0``."""
    return tl.where(p == 0.0, _signed_zero(z), z * p)


@triton.jit
def _clamp(z, limit):
    """Clamp to [-limit, limit], keeping NaN (``tl.minimum``/``tl.maximum`` may drop it on GPU)."""
    return tl.where(z > limit, limit, tl.where(z < -limit, -limit, z))


@triton.jit
def _gelu_tanh_logit(z):
    """``2u`` and its derivative for gelu-tanh, from a clamped copy of ``z``."""
    zc = _clamp(z, _GELU_TANH_CLAMP)
    z_squared = zc * zc
    logit = _TWO_SQRT_2_OVER_PI * (zc + _GELU_TANH_CUBIC * z_squared * zc)
    logit_derivative = _TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z_squared)
    return logit, logit_derivative


@triton.jit
def _expm1(z):
    """exp(z) - 1 without the cancellation near 0 (Horner form of the Taylor series there)."""
    series = z * (1.0 + z * (0.5 + z * (1.0 / 6 + z * (1.0 / 24 + z * (1.0 / 120 + z * (1.0 / 720 + z / 5040))))))
    return tl.where(tl.abs(z) < 0.25, series, tl.exp(z) - 1.0)


@triton.jit
def _tanh(z):
    """tanh from exp: the odd Taylor series below |z| = 0.25 (keeps -0.0 and tiny values exact), else
    (1 - e) / (1 + e) with e = exp(-2|z|) computed through _expm1, signed like z."""
    z_squared = z * z
    series = z * (
        1.0 - z_squared * (1.0 / 3 - z_squared * (2.0 / 15 - z_squared * (17.0 / 315 - z_squared * (62.0 / 2835))))
    )
    em1 = _expm1(-2.0 * tl.abs(z))
    magnitude = -em1 / (2.0 + em1)
    return tl.where(tl.abs(z) < 0.25, series, tl.where(z < 0.0, -magnitude, magnitude))


@triton.jit
def _elu(z, alpha, scale, input_scale):
    """PyTorch's ELU family: scale * (z if z > 0 else alpha * expm1(z * input_scale))."""
    return tl.where(z <= 0.0, scale * alpha * _expm1(z * input_scale), scale * z)


@triton.jit
def _elu_backward(grad, z, alpha, scale, input_scale):
    # `z > 0` selects the linear branch, so a NaN input takes the exp branch and gives NaN.
    return tl.where(z > 0.0, grad * scale, grad * scale * alpha * input_scale * tl.exp(z * input_scale))


@triton.jit
def _mish_tanh_softplus(z):
    """tanh(softplus(z)) = n / (n + 2), n = exp(z) (exp(z) + 2): one exp, no log, no cancellation."""
    e = tl.exp(tl.where(z > _MISH_CLAMP, _MISH_CLAMP, z))
    n = e * (e + 2.0)
    return n / (n + 2.0)


@triton.jit
def activation_forward(z, ACTIVATION: tl.constexpr, param):
    """f(z) in fp32. ``param``: leaky_relu's slope, swish's beta, elu/celu's alpha, heaviside's value at 0."""
    if ACTIVATION == RELU:
        # `z < 0` is False for NaN and -0.0, which pass through as PyTorch's clamp_min does.
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * param)
    elif ACTIVATION == GELU:
        y = _scale(z, 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)))
    elif ACTIVATION == GELU_TANH:
        logit, _ = _gelu_tanh_logit(z)
        y = _scale(z, tl.sigmoid(logit))
    elif ACTIVATION == SWISH:
        y = _scale(z, tl.sigmoid(param * z))
    elif ACTIVATION == SIGMOID:
        y = tl.sigmoid(z)
    elif ACTIVATION == TANH:
        y = _tanh(z)
    elif ACTIVATION == ELU:
        y = _elu(z, param, 1.0, 1.0)
    elif ACTIVATION == SELU:
        y = _elu(z, _SELU_ALPHA, _SELU_SCALE, 1.0)
    elif ACTIVATION == CELU:
        y = _elu(z, param, 1.0, 1.0 / param)
    elif ACTIVATION == RELU_SQUARED:
        positive = tl.where(z < 0.0, 0.0, z)
        y = positive * positive
    elif ACTIVATION == MISH:
        y = _scale(z, _mish_tanh_softplus(z))
    else:  # HEAVISIDE, HEAVISIDE_STE: param is the value at 0; NaN gives 0, as torch.heaviside
        y = tl.where(z == 0.0, param, tl.where(z > 0.0, 1.0, 0.0))
    return y


@triton.jit
def activation_backward(grad, saved, ACTIVATION: tl.constexpr, param):
    """grad * f'(z) in fp32, from ``saved``: the output for relu/leaky_relu(slope >= 0), else the input."""
    if ACTIVATION == RELU:
        # A select, not a product: a zero derivative gives 0 even for an infinite or NaN gradient.
        grad_z = tl.where(saved <= 0.0, 0.0, grad)
    elif ACTIVATION == LEAKY_RELU:
        grad_z = tl.where(saved > 0.0, grad, grad * param)
    elif ACTIVATION == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(saved * _SQRT_HALF))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * saved * saved)
        grad_z = grad * (cdf + _scale(saved, pdf))
    elif ACTIVATION == GELU_TANH:
        logit, logit_derivative = _gelu_tanh_logit(saved)
        s = tl.sigmoid(logit)
        grad_z = grad * (s + _scale(saved, s * (1.0 - s) * logit_derivative))
    elif ACTIVATION == SWISH:
        s = tl.sigmoid(param * saved)
        grad_z = grad * (s + _scale(saved, s * (1.0 - s) * param))
    elif ACTIVATION == SIGMOID:  # saved is the output
        grad_z = grad * saved * (1.0 - saved)
    elif ACTIVATION == TANH:  # saved is the output
        grad_z = grad * (1.0 - saved * saved)
    elif ACTIVATION == ELU:
        grad_z = _elu_backward(grad, saved, param, 1.0, 1.0)
    elif ACTIVATION == SELU:
        grad_z = _elu_backward(grad, saved, _SELU_ALPHA, _SELU_SCALE, 1.0)
    elif ACTIVATION == CELU:
        grad_z = _elu_backward(grad, saved, param, 1.0, 1.0 / param)
    elif ACTIVATION == RELU_SQUARED:
        grad_z = tl.where(saved <= 0.0, 0.0, 2.0 * saved * grad)
    elif ACTIVATION == MISH:
        t = _mish_tanh_softplus(saved)
        grad_z = grad * (t + _scale(saved, (1.0 - t * t) * tl.sigmoid(saved)))
    elif ACTIVATION == HEAVISIDE:
        grad_z = tl.zeros_like(grad)
    else:  # HEAVISIDE_STE: the gradient passes straight through the step
        grad_z = grad
    return grad_z


@triton.jit
def activation_param_backward(grad, z, ACTIVATION: tl.constexpr):
    """grad * df/dparam at the input ``z``, for activations with a learned parameter: leaky_relu's slope
    (PReLU), d/dslope (slope * z) = z on the negative side. A NaN input gives NaN, as PyTorch's prelu."""
    tl.static_assert(ACTIVATION == LEAKY_RELU, "only leaky_relu (PReLU) has a learned parameter")
    return tl.where(z > 0.0, 0.0, grad * z)
