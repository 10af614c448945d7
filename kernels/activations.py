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
=============  =========================================  ===============================================

``gelu (tanh)`` uses ``0.5 (1 + tanh(u)) = sigmoid(2u)``: it is the same function PyTorch computes with
``tanh``, without the cancellation of ``1 + tanh(u)`` for negative ``u`` (and Triton has no ``tanh``).

The backward functions take the tensor the activation saves for backward (``SAVES_OUTPUT`` below):
relu and leaky_relu (slope >= 0) work from their output, since ``y > 0`` exactly when ``z > 0``; the
smooth activations work from their input.

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

# Host-side table: name -> (id, saves its output for backward).
ACTIVATIONS: dict[str, tuple[int, bool]] = {
    "relu": (0, True),
    "leaky_relu": (1, True),  # the host saves the input instead when the slope is negative
    "gelu": (2, False),
    "gelu_tanh": (3, False),
    "swish": (4, False),
}

_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)
# Beyond |z| = 20 gelu-tanh's sigmoid is exactly 0 or 1 in fp32; clamping the polynomial there keeps
# z^3 and its derivative finite without changing any result.
_GELU_TANH_CLAMP = tl.constexpr(20.0)


@triton.jit
def _scale(z, p):
    """``z * p`` where a probability-like ``p`` may underflow to 0: then the signed zero, never ``inf * 0``."""
    return tl.where(p == 0.0, tl.where(z < 0.0, -0.0, 0.0), z * p)


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
def activation_forward(z, ACTIVATION: tl.constexpr, param):
    """f(z) in fp32. ``param`` is leaky_relu's slope or swish's beta, ignored by the others."""
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
    else:  # SWISH
        y = _scale(z, tl.sigmoid(param * z))
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
    else:  # SWISH
        s = tl.sigmoid(param * saved)
        grad_z = grad * (s + _scale(saved, s * (1.0 - s) * param))
    return grad_z
