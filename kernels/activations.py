"""Activation math for the Triton kernels: each activation's forward and derivative, written once.

All functions take and return fp32 blocks; the kernels load, upcast, call these and round once on store.

=============  =========================================  ===============================================
activation     forward f(z)                               backward: grad_z = grad_y * f'(z)
=============  =========================================  ===============================================
relu           max(z, 0)                                  g if z > 0 (or z is NaN) else 0
leaky_relu     z if z > 0 else slope * z                  g if z > 0 else slope * g
gelu (erf)     z * Phi(z),  Phi(z) = erfc(-z/sqrt2) / 2   Phi(z) + z * phi(z),  phi = exp(-z^2/2)/sqrt(2pi)
gelu (tanh)    z * sigmoid(2u),  u = sqrt(2/pi)(z + 0.044715 z^3)   s + z 2u'(z) s (1 - s)
swish (beta)   z * sigmoid(x),  x = beta z  (silu: 1)     s + x s (1 - s)
sigmoid        s = 1 / (1 + exp(-z))                      s (1 - s), from the output
tanh           t = (1 - exp(-2z)) / (1 + exp(-2z))        (1 - t) (1 + t), from the output
elu (alpha)    z if z > 0 else alpha (exp(z) - 1)         1 if z > 0 else alpha exp(z)
selu           scale * elu(z, alpha), PyTorch's constants  scale * elu'(z, alpha)
celu (alpha)   z if z > 0 else alpha (exp(z/alpha) - 1)   1 if z > 0 else exp(z/alpha)
relu_squared   max(z, 0)^2   (Primer)                      2 max(z, 0)
mish           z * tanh(softplus(z)) = z n / (n + 2),      t + z (1 - t^2) sigmoid(z),  t = n / (n + 2),
               n = exp(z) (exp(z) + 2)                    (1 - t^2) sigmoid(z) = 4 e (1 + e) / (n + 2)^2
heaviside (v)  1 if z > 0, v if z == 0, else 0 (NaN: 0)    0 (no gradient: a step cannot train)
heaviside_ste  as heaviside                                1 (straight-through estimator)
=============  =========================================  ===============================================

quick_gelu (CLIP) is swish with beta = 1.702 and needs no entry of its own. PReLU is leaky_relu with a
learned slope per channel: the templates load the slope instead of taking a scalar, and
``activation_param_backward`` gives the slope's gradient, grad_y * (0 if z > 0 else z).

Accuracy: every bf16/fp16 result within 1 ULP of the exact value, over the whole finite range
---------------------------------------------------------------------------------------------------
A result computed in fp32 with relative error e and rounded once to bf16 (fp16) is within
0.5 + e * 2^8 (0.5 + e * 2^11) ULPs of the exact value, so 1 ULP holds whenever the fp32 result is within
~1e-4 relative (fp16: ~1e-5): a few fp32 roundings, and the condition number of f times fp32's 6e-8 (the
exponent of an exp computed from a rounded argument), are far below that. What breaks it is an fp32
intermediate that cancels or leaves fp32's range long before the result leaves the output's range. The
formulas avoid all three ways this happens:

1. ``1 + erf(z/sqrt2)`` is 0 in fp32 below z = -5.8 while GELU's bf16 value is a normal number down to
   z = -13.4. GELU uses ``Phi(z) = h`` for z < 0 and ``1 - h`` for z >= 0 with ``h = erfc(|z|/sqrt2)/2``,
   which never cancels. Triton's interpreter has no libdevice (no erfc), so ``_gelu_parts`` writes it
   here: erfc(a) = exp(-a^2) * erfcx(a), erfcx(a) = P(t) / (1 + 2a) with t = (a - 2) / (a + 2) in [-1, 1)
   and P of degree 9 (coefficients fitted for the minimax relative error on a in [0, 10.61], the range
   where fp32 GELU is not 0; 1.6e-8 in exact arithmetic, 2.4 fp32 ULPs as evaluated). The exponential
   is the same one phi needs, so the derivative costs no second exp.
2. ``exp`` underflows into fp32's subnormals (below 2^-126, where it loses bits, and where a GPU's
   ``ex2.approx.ftz`` flushes to 0) while ``z * exp(...)`` is still a normal bf16 number: silu at -90,
   quick-GELU at -53, the tanh GELU at -10, mish at -88, GELU at -13.2, sigmoid's own subnormal range.
   ``_exp2_scaled`` computes an exponential below 2^-118 as ``2^(t + 64)`` (a normal number down to
   2^-190, far past the smallest fp32 subnormal 2^-149, and at most 2^-54, so that ``1 + e`` is exactly 1
   as ``1 + exp`` is, in fp32 and in the fallback's fp64) and the caller multiplies by 2^-64 last: one
   IEEE multiply, exact or rounding once into the subnormals (ordinary ``mul.f32`` on the GPU, which
   keeps subnormals). ``t + 64`` is exact for t < -118 (both are multiples of t's ULP).
   Backward splits the 2^-64 into 2^-32 on the gradient and 2^-32 on the derivative, so neither a huge
   gradient nor a tiny derivative leaves fp32's range before their product does.
3. ``1 / (1 + exp(-x))`` overflows to ``1 / inf = 0`` below x = -88, and ``1 - sigmoid``, ``1 - tanh^2``
   cancel where they are small: the logistic is computed as ``1 / (1 + E)`` with ``E = exp(-x)`` kept
   below 2^118.3 (the tail below x = -82 takes ``exp(x)`` scaled instead; ``_logistic``) and its
   derivative s (1 - s) as ``E / (1 + E)^2``, never forming 1 - s; mish's ``(1 - t^2) sigmoid(z)`` from
   e alone; tanh's derivative as ``(1 - t)(1 + t)`` (``1 - t`` is exact for t >= 1/2).

What each formula relies on from the GPU (H100/H200, sm_90; checked with ``python -m bench.ptx_report``):
``tl.exp2`` is ``ex2.approx.ftz.f32``, within 2 ULPs (2^-22 relative) for results that are normal
numbers, which is all these formulas ask of it (it flushes subnormal results to 0); ``tl.exp(x)`` is
``ex2.approx.f32(x * log2(e))``, whose rounded argument adds |x| * 6e-8 relative (the condition number
of exp, as the rounding of x itself would), used only where its result is at least 2^-118; ``/``
is ``div.full.f32`` (2 ULPs; every quotient here is a normal number); ``+``, ``*`` are IEEE (``add.f32``,
``mul.f32``: round to nearest, subnormals kept; the compiler may fuse them into ``fma``, which only
removes roundings). No formula needs erf, expm1, tanh or log from libdevice, so the interpreter runs the
same arithmetic. fp32 results: within a few ULPs plus the condition number of f times a few ULPs (the
tests' 8 ULPs, or the tail's condition: silu(-80) moves 80 ULPs when its input moves one).

``exp(z) - 1`` and ``1 - exp(-2z)`` lose all precision near 0 in fp32, and Triton has no ``expm1`` or
``tanh``: ``_expm1`` uses its Taylor series below |z| = 0.5 (truncation error < 1.4e-8 relative),
``exp(z) - 1`` above (where the result is at least 0.39 in magnitude, so the subtraction costs at most ~2
ULPs); ``_tanh`` its odd series below |z| = 0.5, (1 - e) / (1 + e) with e = exp(-2|z|) <= 0.37 above.

``gelu (tanh)`` uses ``0.5 (1 + tanh(u)) = sigmoid(2u)``: it is the same function PyTorch computes with
``tanh``, without the cancellation of ``1 + tanh(u)`` for negative ``u`` (and Triton has no ``tanh``).

The backward functions take the tensor the activation saves for backward: relu and leaky_relu
(slope >= 0) work from their output, since ``y > 0`` exactly when ``z > 0``, and so do sigmoid and tanh,
whose derivatives are written in their output; the others work from their input.

Semantics at the edges follow PyTorch (NaN in, NaN out; ``relu(-0.0) = -0.0``; relu passes the gradient
of a NaN), except that where PyTorch's formula turns an infinite or huge finite input into NaN
(``gelu(-inf)``, ``silu(-inf)``, ``gelu_tanh'(1e20)``) we return the mathematical limit, and that the
ELU family's gradient at a NaN input is NaN (PyTorch's is NaN or ``g * scale`` depending on the path).
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

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = 2^(x log2(e))
_HALF_LOG2E = tl.constexpr(0.7213475204444817)  # exp(-z^2 / 2) = 2^(-z^2 * _HALF_LOG2E)
_SQRT_HALF = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
# Exponentials below 2^-118 are computed as 2^(t + 64) (at most 2^-54: negligible beside 1 or 2 even in
# fp64, so sums like 1 + e take the scaled value as it is), then scaled by 2^-64 (module docstring).
_TAIL_EXPONENT = tl.constexpr(-118.0)
_TAIL_SCALE = tl.constexpr(5.421010862427522e-20)  # 2^-64
_TAIL_HALF_SCALE = tl.constexpr(2.3283064365386963e-10)  # 2^-32
# The logistic's exponential is exp(x), scaled, below x = -82 (2^-118.3), and exp(-x) <= 2^118.3 above.
_LOGISTIC_TAIL = tl.constexpr(-82.0)
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
# Past |x| = 800 the logistic's tails are 0 even in fp64 (and in fp32 even as 2^(t + 64)): clamping x in
# the derivative's product x s (1 - s) there changes no result and keeps inf * 0 out.
_LOGISTIC_CLAMP = tl.constexpr(800.0)
# The tanh GELU's 2u = z (A + B z^2); constants folded in float64, rounded to fp32 once.
_GELU_TANH_A = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
_GELU_TANH_B = tl.constexpr(0.07135481627260025)  # 2 sqrt(2 / pi) * 0.044715
_GELU_TANH_3B = tl.constexpr(0.21406444881780076)  # its derivative's 3 B
# Beyond |z| = 40 the tanh GELU's sigmoid is exactly 0 or 1 in fp32 and fp64 (|2u| > 4600): clamping the
# polynomial there keeps z^3 and its derivative finite without changing any result.
_GELU_TANH_CLAMP = tl.constexpr(40.0)
# Beyond |z| = 15 GELU's tails are 0 in fp32 (|z| Phi(-|z|) < 1e-49): the erfcx fit ends at a = 15 / sqrt2.
# Beyond |z| = 40 exp(-z^2 / 2) is 0 even in fp64: the derivative's z phi(z) takes z clamped there.
_ERFCX_CLAMP = tl.constexpr(15.0)
_GELU_TAIL = tl.constexpr(-12.8)  # exp(-z^2 / 2) < 2^-118 below
_GELU_CLAMP = tl.constexpr(40.0)
# tanh's odd Taylor coefficients: tanh(z) = z + C3 z^3 + C5 z^5 + ...
_TANH_C3 = tl.constexpr(-1.0 / 3)
_TANH_C5 = tl.constexpr(2.0 / 15)
_TANH_C7 = tl.constexpr(-17.0 / 315)
_TANH_C9 = tl.constexpr(62.0 / 2835)
_TANH_C11 = tl.constexpr(-1382.0 / 155925)
_TANH_C13 = tl.constexpr(21844.0 / 6081075)
_TANH_C15 = tl.constexpr(-929569.0 / 638512875)
_TANH_C17 = tl.constexpr(6404582.0 / 10854718875)
_SELU_ALPHA = tl.constexpr(1.6732632423543772)
_SELU_SCALE = tl.constexpr(1.0507009873554805)
_SELU_NEGATIVE = tl.constexpr(1.7580993408473766)  # scale * alpha, folded in float64
# exp(20) (exp(20) + 2) / (... + 2) is exactly 1 in fp32 and fp64: mish's tanh(softplus) saturates there.
# Below -800 its derivative's tail is 0 even in fp64 (and in fp32 even as 2^(t + 64)).
_MISH_CLAMP = tl.constexpr(20.0)
_MISH_LOW_CLAMP = tl.constexpr(-800.0)
# erfcx(a) (1 + 2a) = P((a - 2) / (a + 2)) on a in [0, 10.61]: P's coefficients, constant term first.
_ERFCX_K = tl.constexpr(2.0)
_ERFCX_P0 = tl.constexpr(1.2769783735275269)
_ERFCX_P1 = tl.constexpr(-0.0927640050649643)
_ERFCX_P2 = tl.constexpr(-0.166031613945961)
_ERFCX_P3 = tl.constexpr(0.164055734872818)
_ERFCX_P4 = tl.constexpr(-0.05420215427875519)
_ERFCX_P5 = tl.constexpr(-0.008061137981712818)
_ERFCX_P6 = tl.constexpr(0.008623635396361351)
_ERFCX_P7 = tl.constexpr(0.001312265289016068)
_ERFCX_P8 = tl.constexpr(-0.0012203205842524767)
_ERFCX_P9 = tl.constexpr(-0.00039490338531322777)


@triton.jit
def _times_gate(z, p):
    """``z * p`` for a gate ``p`` in [0, 1] that is 0 at z = -inf (and 1 at +inf): -inf is taken as -FLT_MAX,
    so the product is -0.0 there, never ``-inf * 0 = NaN``. (A NaN z has a NaN gate: NaN either way.)"""
    return tl.maximum(z, -_FLOAT32_MAX) * p


@triton.jit
def _clamp(z, low, high):
    """Clamp to [low, high], keeping NaN (``tl.minimum``/``tl.maximum`` may drop it on GPU)."""
    return tl.where(z > high, high, tl.where(z < low, low, z))


@triton.jit
def _exp2_scaled(t, tail):
    """2^t, as ``2^(t + 64)`` where ``tail`` (the caller's condition, which implies t < -118: the shift is
    then exact, and the result at most 2^-54): a normal number wherever 2^t >= 2^-190. The caller scales
    by 2^-64 last (``_unscale``)."""
    return tl.exp2(tl.where(tail, t + 64.0, t))


@triton.jit
def _unscale(v, tail):
    """``v * 2^-64`` where ``tail``: exact, or one rounding into fp32's subnormals."""
    return tl.where(tail, v * _TAIL_SCALE, v)


@triton.jit
def _grad_times(grad, derivative, tail):
    """``grad * derivative * 2^-64`` where ``tail`` (else ``grad * derivative``), the 2^-64 split between
    the two factors so neither leaves fp32's normal range while their product is representable (unless
    the derivative itself is below 2^-158)."""
    half = tl.where(tail, _TAIL_HALF_SCALE, 1.0)
    return (grad * half) * (derivative * half)


@triton.jit
def _logistic(x):
    """``(p, slope, tail)``: sigmoid(x) = p and sigmoid'(x) = s (1 - s) = slope, both times 2^-64 where
    ``tail`` (x < -82). From one exponential E: above the tail E = exp(-x) <= 2^118.3, p = 1 / (1 + E),
    slope = E / (1 + E)^2 (no overflow, no cancellation: 1 - s is never formed); in the tail
    E = exp(x) 2^64, where p and slope both equal E (1 + exp(x) is 1). NaN gives NaN."""
    t = x * _LOG2E
    tail = x < _LOGISTIC_TAIL
    e = tl.exp2(tl.where(tail, t + 64.0, -t))  # (the shift is exact there, as in _exp2_scaled)
    reciprocal = 1.0 / (1.0 + e)
    p = tl.where(tail, e, reciprocal)
    slope = tl.where(tail, e, e * reciprocal * reciprocal)  # (e r) r: e r <= 1, never e r^2 underflowing
    return p, slope, tail


@triton.jit
def _gelu_tanh_logit(z):
    """``(zc, 2u, d(2u)/dz)`` for the tanh GELU, from a clamped copy ``zc`` of ``z``."""
    zc = _clamp(z, -_GELU_TANH_CLAMP, _GELU_TANH_CLAMP)
    z_squared = zc * zc
    logit = zc * (_GELU_TANH_A + _GELU_TANH_B * z_squared)
    logit_derivative = _GELU_TANH_A + _GELU_TANH_3B * z_squared
    return zc, logit, logit_derivative


@triton.jit
def _gelu_parts(z):
    """``(cdf, pdf, tail)``: Phi(z) and phi(z) = exp(-z^2 / 2) / sqrt(2 pi), both scaled by 2^64 where
    ``tail`` (z < -12.8; Phi(z) is 1 - Phi(-z) from 0 up, never scaled). Phi(-|z|) = erfc(a) / 2 with
    a = |z| / sqrt2 and erfc(a) = exp(-a^2) P(t) / (1 + 2a), t = (a - 2) / (a + 2)."""
    a = tl.where(tl.abs(z) < _ERFCX_CLAMP, tl.abs(z), _ERFCX_CLAMP) * _SQRT_HALF  # (NaN flows through exp)
    tail = z < _GELU_TAIL
    gaussian = _exp2_scaled(-(z * z) * _HALF_LOG2E, tail)  # exp(-z^2 / 2); 0 for |z| past 1e19
    plus_k = a + _ERFCX_K
    one_plus_2a = 1.0 + 2.0 * a
    reciprocal = 1.0 / (plus_k * one_plus_2a)  # one division for both t and 1 / (1 + 2a)
    t = (a - _ERFCX_K) * one_plus_2a * reciprocal
    p = _ERFCX_P9
    p = p * t + _ERFCX_P8
    p = p * t + _ERFCX_P7
    p = p * t + _ERFCX_P6
    p = p * t + _ERFCX_P5
    p = p * t + _ERFCX_P4
    p = p * t + _ERFCX_P3
    p = p * t + _ERFCX_P2
    p = p * t + _ERFCX_P1
    p = p * t + _ERFCX_P0
    half_erfc = p * (0.5 * plus_k * reciprocal) * gaussian
    cdf = tl.where(z < 0.0, half_erfc, 1.0 - half_erfc)
    return cdf, _INV_SQRT_2PI * gaussian, tail


@triton.jit
def _expm1(z):
    """exp(z) - 1 without the cancellation near 0: its Taylor series (to z^8 / 8!) below |z| = 0.5."""
    series = 1.0 / 40320
    series = series * z + 1.0 / 5040
    series = series * z + 1.0 / 720
    series = series * z + 1.0 / 120
    series = series * z + 1.0 / 24
    series = series * z + 1.0 / 6
    series = series * z + 0.5
    series = z * (1.0 + z * series)  # (not z + z z S: -0.0 + 0.0 would give +0.0)
    return tl.where(tl.abs(z) < 0.5, series, tl.exp(z) - 1.0)


@triton.jit
def _tanh(z):
    """tanh from exp: the odd Taylor series below |z| = 0.5 (keeps -0.0 and tiny values exact; truncated
    after z^17, < 1e-8 relative), else (1 - e) / (1 + e) with e = exp(-2|z|) <= 0.37, signed like z
    (1 - e >= 0.63: an error in e is diluted, not amplified)."""
    s = z * z
    series = _TANH_C17
    series = series * s + _TANH_C15
    series = series * s + _TANH_C13
    series = series * s + _TANH_C11
    series = series * s + _TANH_C9
    series = series * s + _TANH_C7
    series = series * s + _TANH_C5
    series = series * s + _TANH_C3
    series = z * (1.0 + s * series)  # (not z + z s P: -0.0 + 0.0 would give +0.0)
    e = tl.exp(-2.0 * tl.abs(z))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(tl.abs(z) < 0.5, series, tl.where(z < 0.0, -magnitude, magnitude))


@triton.jit
def _elu(z, negative_coefficient, scale, input_scale):
    """PyTorch's ELU family: scale * z if z > 0 else negative_coefficient * expm1(z * input_scale)."""
    return tl.where(z <= 0.0, negative_coefficient * _expm1(z * input_scale), scale * z)


@triton.jit
def _elu_backward(grad, z, negative_coefficient, scale, input_scale):
    """The ELU family's grad * f'(z); exp(z * input_scale) scaled by 2^64 where it falls below 2^-118 (its
    product with a gradient can be a normal number below exp(-87), where exp itself is subnormal).
    `z > 0` selects the linear branch, so a NaN input takes the exp branch and gives NaN (PyTorch gives
    NaN or grad * scale depending on its path)."""
    t = z * input_scale * _LOG2E
    tail = t < _TAIL_EXPONENT
    exponential = _exp2_scaled(t, tail)
    negative = _grad_times(grad, (negative_coefficient * input_scale) * exponential, tail)
    return tl.where(z > 0.0, grad * scale, negative)


@triton.jit
def _mish_parts(z):
    """``(t, slope, tail)`` for mish: t = tanh(softplus(z)) = n / (n + 2), n = e (e + 2), e = exp(z), and
    slope = (1 - t^2) sigmoid(z) = 4 e (1 + e) / (n + 2)^2 (so mish' = t + z slope), both scaled by 2^64
    where ``tail`` (z < -81.8): one exp, one division, no log, no cancellation."""
    t_exp = tl.where(z > _MISH_CLAMP, _MISH_CLAMP, z) * _LOG2E
    tail = t_exp < _TAIL_EXPONENT
    # Scaled where tail, and then at most 2^-54: 1 + e, e + 2 and n + 2 take it as it is.
    e = _exp2_scaled(t_exp, tail)
    one_plus_e = 1.0 + e
    n = e * (e + 2.0)
    reciprocal = 1.0 / (n + 2.0)
    return n * reciprocal, (4.0 * e) * one_plus_e * (reciprocal * reciprocal), tail


@triton.jit
def activation_forward(z, ACTIVATION: tl.constexpr, param):
    """f(z) in fp32. ``param``: leaky_relu's slope, swish's beta, elu/celu's alpha, heaviside's value at 0."""
    if ACTIVATION == RELU:
        # `z < 0` is False for NaN and -0.0, which pass through as PyTorch's clamp_min does.
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * param)
    elif ACTIVATION == GELU:
        cdf, _, tail = _gelu_parts(z)
        y = _unscale(_times_gate(z, cdf), tail)
    elif ACTIVATION == GELU_TANH:
        _, logit, _ = _gelu_tanh_logit(z)
        p, _, tail = _logistic(logit)
        y = _unscale(_times_gate(z, p), tail)
    elif ACTIVATION == SWISH:
        p, _, tail = _logistic(param * z)
        y = _unscale(_times_gate(z, p), tail)
    elif ACTIVATION == SIGMOID:
        p, _, tail = _logistic(z)
        y = _unscale(p, tail)
    elif ACTIVATION == TANH:
        y = _tanh(z)
    elif ACTIVATION == ELU:
        y = _elu(z, param, 1.0, 1.0)
    elif ACTIVATION == SELU:
        y = _elu(z, _SELU_NEGATIVE, _SELU_SCALE, 1.0)
    elif ACTIVATION == CELU:
        y = _elu(z, param, 1.0, 1.0 / param)
    elif ACTIVATION == RELU_SQUARED:
        positive = tl.where(z < 0.0, 0.0, z)
        y = positive * positive
    elif ACTIVATION == MISH:
        t, _, tail = _mish_parts(z)
        y = _unscale(_times_gate(z, t), tail)
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
        cdf, pdf, tail = _gelu_parts(saved)
        zc = _clamp(saved, -_GELU_CLAMP, _GELU_CLAMP)  # no inf * 0 at +-inf
        grad_z = _grad_times(grad, cdf + zc * pdf, tail)
    elif ACTIVATION == GELU_TANH:
        zc, logit, logit_derivative = _gelu_tanh_logit(saved)
        p, slope, tail = _logistic(logit)
        grad_z = _grad_times(grad, p + (zc * logit_derivative) * slope, tail)
    elif ACTIVATION == SWISH:
        x = param * saved
        p, slope, tail = _logistic(x)
        xc = _clamp(x, -_LOGISTIC_CLAMP, _LOGISTIC_CLAMP)
        grad_z = _grad_times(grad, p + xc * slope, tail)
    elif ACTIVATION == SIGMOID:  # saved is the output
        grad_z = grad * saved * (1.0 - saved)
    elif ACTIVATION == TANH:  # saved is the output; 1 - t^2 as (1 - t)(1 + t): no cancellation near |t| = 1
        grad_z = grad * ((1.0 - saved) * (1.0 + saved))
    elif ACTIVATION == ELU:
        grad_z = _elu_backward(grad, saved, param, 1.0, 1.0)
    elif ACTIVATION == SELU:
        grad_z = _elu_backward(grad, saved, _SELU_NEGATIVE, _SELU_SCALE, 1.0)
    elif ACTIVATION == CELU:
        grad_z = _elu_backward(grad, saved, param, 1.0, 1.0 / param)
    elif ACTIVATION == RELU_SQUARED:
        grad_z = tl.where(saved <= 0.0, 0.0, 2.0 * saved * grad)
    elif ACTIVATION == MISH:
        t, slope, tail = _mish_parts(saved)
        zc = _clamp(saved, _MISH_LOW_CLAMP, _MISH_CLAMP)  # no inf * 0 at +-inf
        grad_z = _grad_times(grad, t + zc * slope, tail)
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
