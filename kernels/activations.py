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
prelu (w)      z if z > 0 else w z  (w learned)            g if z > 0 else w g;  d/dw: g z if z <= 0
hardtanh       clamp(z, lo, hi)  (relu6: lo = 0, hi = 6)   0 if z <= lo or z >= hi else g (NaN: g)
hardswish      z clamp(z + 3, 0, 6) / 6                    0 if z <= -3, g (2z + 3) / 6 if z < 3, else g
hardsigmoid    clamp(z + 3, 0, 6) / 6                      g / 6 if -3 < z < 3 else 0
softplus (b,   z if b z > th, else log(1 + exp(b z)) / b   g if b z > th, else g sigmoid(b z)
  th)          = (max(t, 0) + log1p(exp(-|t|))) / b, t = b z
xielu (ap, an, ap z^2 + beta z if z > 0, else              g (2 ap z + beta) if z > 0, else
  beta, eps)   an (expm1(m) - z) + beta z, m = min(z, eps)  g (an (m' exp(m) - 1) + beta), m' = dm/dz;
               (ap, an learned)                            d/dap: g z^2 (z > 0); d/dan: g (expm1(m) - z)
=============  =========================================  ===============================================

quick_gelu (CLIP) is swish with beta = 1.702 and needs no entry of its own, nor relu6 (hardtanh(0, 6)).

Parameters. Every function takes the activation's two float parameters ``param``, ``param2`` (leaky_relu's
slope, swish's beta, elu/celu's alpha, heaviside's value at 0; hardtanh's lo and hi; softplus's beta and
threshold; xielu's beta and eps) and two per-element blocks ``weight``, ``weight2``: the learned parameters a
template loads per channel or shared by all (PReLU's slope w; xielu's ap and an), zeros where an
activation has none. ``activation_param_backward`` gives the learned parameters' gradients per element,
which the backward template sums (two accumulators; xielu's two act on disjoint sides of 0).

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
   e alone; tanh's derivative as ``(1 - t)(1 + t)`` (``1 - t`` is exact for t >= 1/2). Where the input is
   at hand (the gated template keeps gate and up), sigmoid's and tanh's derivatives come from it instead:
   ``s (1 - s)`` and ``1 - tanh^2(z) = 4 s(2z) (1 - s(2z))`` from ``_logistic``, never from an fp32 output
   that has rounded to 1 (then 1 - s is 0 while the bf16 derivative is a normal number down to z = -88).
4. Softplus: ``log1p(exp(t)) = max(t, 0) + log1p(exp(-|t|))`` (no overflow), and Triton has no log1p:
   ``_log1p`` takes ``log1p(u) = 2 atanh(u / (2 + u))``, whose odd series in s = u / (2 + u) <= 1/3
   converges to 1e-9 in eight terms, for u in [0, 1] (one division; never ``log(1 + u)``, which loses u's
   low bits in ``1 + u`` and whose ``lg2.approx`` is only 2^-22 absolute near 1). Below t = -82 the
   exponential is scaled by 2^64 as in 2., and log1p(u) = u there.
5. xIELU's negative side ``an (expm1(m) - z) + beta z`` is the difference of two terms of a size where it
   crosses 0 (z = -2.4 for the default parameters): in fp32 their roundings alone are 1e-7 of each, many
   fp16 ULPs of the small result. It is summed in fp64 as ``an expm1(m) + (beta - an) z``: every product
   of two fp32 numbers is exact there, so what is left is exp's own error times ``an exp(m)``, which is
   small where the sum cancels (0.07 at that root). ``expm1(m)`` is ``(expm1(m) - m) + m`` with
   ``expm1(m) - m`` from its series below |m| = 0.5 (exact sum in fp64), ``exp(m) - 1`` above. Five fp64
   operations per element; no fp64 transcendental.

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
``tanh``: ``_expm1`` uses its Taylor series below |z| = 0.5 (``_expm1_series``, truncated: 2e-9 relative),
``exp(z) - 1`` above (where the result is at least 0.39 in magnitude, so the subtraction costs at most ~2
ULPs); ``_tanh`` its odd series below |z| = 0.5, (1 - e) / (1 + e) with e = exp(-2|z|) <= 0.37 above.

``gelu (tanh)`` uses ``0.5 (1 + tanh(u)) = sigmoid(2u)``: it is the same function PyTorch computes with
``tanh``, without the cancellation of ``1 + tanh(u)`` for negative ``u`` (and Triton has no ``tanh``).

The backward functions take the tensor the activation saves for backward: relu and leaky_relu
(slope >= 0) work from their output, since ``y > 0`` exactly when ``z > 0`` (the same formula holds for
their input), and so do sigmoid and tanh (``SAVED_IS_OUTPUT``), whose derivatives are written in their
output; the others work from their input.

Semantics at the edges follow PyTorch (NaN in, NaN out; ``relu(-0.0) = -0.0``; relu passes the gradient
of a NaN, and so do hardtanh and hardswish, as PyTorch's CUDA kernels), except that where PyTorch's
formula turns an infinite or huge finite input into NaN (``gelu(-inf)``, ``silu(-inf)``, ``hardswish(-inf)``,
``xielu(-inf)``, ``gelu_tanh'(1e20)``) we return the mathematical limit, and that the ELU family's gradient
at a NaN input is NaN (PyTorch's is NaN or ``g * scale`` depending on the path; ``fusedact.differences``).
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
PRELU = tl.constexpr(14)
HARDTANH = tl.constexpr(15)
HARDSWISH = tl.constexpr(16)
HARDSIGMOID = tl.constexpr(17)
SOFTPLUS = tl.constexpr(18)
XIELU = tl.constexpr(19)

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
    "prelu": 14,
    "hardtanh": 15,
    "hardswish": 16,
    "hardsigmoid": 17,
    "softplus": 18,
    "xielu": 19,
}
# The activations with learned parameters (``weight``, ``weight2``) and how many each has.
LEARNED_PARAMETERS: dict[str, int] = {"prelu": 1, "xielu": 2}

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
_SIXTH = tl.constexpr(1.0 / 6)
# expm1(z) - z = z^2 (1/2 + z/6 + ... + z^7/9!): the series to |z| < 0.5 (truncated: 2e-9 relative).
_EXPM1_SERIES_LIMIT = tl.constexpr(0.5)


@triton.jit
def _times_gate(z, p):
    """``z * p`` for a gate ``p`` in [0, 1] that is 0 at one infinity and 1 at the other (swish with a
    negative beta swaps them): where p = 0 an infinite z is taken as +-FLT_MAX, so the product is a zero
    signed like z, never ``inf * 0 = NaN``; elsewhere +-inf stays +-inf. (A NaN z has a NaN gate.)"""
    return tl.where(p == 0.0, _clamp(z, -_FLOAT32_MAX, _FLOAT32_MAX), z) * p


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
def _expm1_series(z):
    """S(z) with expm1(z) = z + z^2 S(z): 1/2 + z/6 + ... + z^7/9!, Taylor's series truncated after z^9 / 9!
    (2e-9 relative below |z| = ``_EXPM1_SERIES_LIMIT``, where ``_expm1`` and ``_expm1_minus_identity`` use
    it)."""
    series = 1.0 / 362880
    series = series * z + 1.0 / 40320
    series = series * z + 1.0 / 5040
    series = series * z + 1.0 / 720
    series = series * z + 1.0 / 120
    series = series * z + 1.0 / 24
    series = series * z + 1.0 / 6
    return series * z + 0.5


@triton.jit
def _expm1(z):
    """exp(z) - 1 without the cancellation near 0: its Taylor series (``_expm1_series``) below |z| = 0.5."""
    series = z * (1.0 + z * _expm1_series(z))  # (not z + z z S: -0.0 + 0.0 would give +0.0)
    return tl.where(tl.abs(z) < _EXPM1_SERIES_LIMIT, series, tl.exp(z) - 1.0)


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
def _log1p(u):
    """log(1 + u) for u in [0, 1] (NaN gives NaN): 2 atanh(s) = 2 (s + s^3/3 + ... + s^15/15), s = u / (2 + u)
    <= 1/3, truncated at 1e-9 relative; exactly u for u below 2^-54 (a scaled tail, module docstring)."""
    s = u / (2.0 + u)
    s2 = s * s
    series = 1.0 / 15
    series = series * s2 + 1.0 / 13
    series = series * s2 + 1.0 / 11
    series = series * s2 + 1.0 / 9
    series = series * s2 + 1.0 / 7
    series = series * s2 + 1.0 / 5
    series = series * s2 + 1.0 / 3
    return (2.0 * s) * (1.0 + s2 * series)


@triton.jit
def _softplus_parts(z, beta, threshold):
    """``(t, log1p(exp(t)) / beta, tail)`` with t = beta z: ``max(t, 0) + log1p(exp(-|t|))``, the exponential
    (and so the value) scaled by 2^64 where ``tail`` (t < -82)."""
    t = beta * z
    u = -tl.abs(t) * _LOG2E
    tail = (t < 0.0) & (u < _TAIL_EXPONENT)  # (for t > 0 the tiny exp(-t) is negligible beside t: no scaling)
    e = _exp2_scaled(u, tail)
    positive = tl.where(t > 0.0, t, 0.0)  # (NaN: 0, and log1p's NaN follows)
    return t, (positive + _log1p(e)) * (1.0 / beta), tail


@triton.jit
def _expm1_minus_identity(z):
    """expm1(z) - z without the cancellation near 0: z^2 (1/2 + z/6 + ... + z^7/9!) below |z| = 0.5, else
    exp(z) - 1 - z (at least 0.1 in magnitude there). Also returns exp(z) (for the derivative)."""
    exponential = tl.exp(z)
    direct = (exponential - 1.0) - z
    return tl.where(tl.abs(z) < _EXPM1_SERIES_LIMIT, (z * z) * _expm1_series(z), direct), exponential


@triton.jit
def _xielu_negative(z, alpha_n, beta, eps):
    """``(f(z) for z <= 0 in fp64, expm1(m) in fp64, exp(m), m)``, m = min(z, eps) (NaN stays NaN):
    f = alpha_n expm1(m) + (beta - alpha_n) z summed in fp64 (module docstring, 5.)."""
    m = tl.where(z > eps, eps, z)
    e_minus_m, exponential = _expm1_minus_identity(m)
    m64 = m.to(tl.float64)
    expm1 = tl.where(tl.abs(m) < _EXPM1_SERIES_LIMIT, e_minus_m.to(tl.float64) + m64, exponential.to(tl.float64) - 1.0)
    alpha64 = alpha_n.to(tl.float64)
    slope = beta - alpha64  # exact: two fp32 numbers (beta promoted: fp32 on the GPU, as the host rounded it)
    linear = slope * z.to(tl.float64)
    linear = tl.where(slope == 0.0, 0.0, linear)  # (at z = -inf: 0 * inf; the limit is -alpha_n then)
    return alpha64 * expm1 + linear, expm1, exponential, m


@triton.jit
def activation_forward(z, ACTIVATION: tl.constexpr, param, param2, weight, weight2):
    """f(z) in fp32. ``param``/``param2``: the activation's float parameters, ``weight``/``weight2`` its learned
    ones per element (module docstring, "Parameters")."""
    if ACTIVATION == RELU:
        # `z < 0` is False for NaN and -0.0, which pass through as PyTorch's clamp_min does.
        y = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == LEAKY_RELU:
        y = tl.where(z > 0.0, z, z * param)
    elif ACTIVATION == PRELU:
        y = tl.where(z > 0.0, z, z * weight)
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
    elif ACTIVATION == HARDTANH:  # selects: NaN and -0.0 pass through, as PyTorch's clamp
        y = tl.where(z < param, param, tl.where(z > param2, param2, z))
    elif ACTIVATION == HARDSWISH:  # -inf * 0 is -0.0 here (the limit), NaN in PyTorch
        y = _times_gate(z, _clamp(z + 3.0, 0.0, 6.0) * _SIXTH)
    elif ACTIVATION == HARDSIGMOID:
        y = _clamp(z + 3.0, 0.0, 6.0) * _SIXTH
    elif ACTIVATION == SOFTPLUS:  # param: beta, param2: threshold
        t, value, tail = _softplus_parts(z, param, param2)
        y = tl.where(t > param2, z, _unscale(value, tail))
    elif ACTIVATION == XIELU:  # weight: alpha_p, weight2: alpha_n, param: beta, param2: eps
        negative, _, _, _ = _xielu_negative(z, weight2, param, param2)
        y = tl.where(z > 0.0, z * (weight * z + param), negative.to(tl.float32))
    else:  # HEAVISIDE, HEAVISIDE_STE: param is the value at 0; NaN gives 0, as torch.heaviside
        y = tl.where(z == 0.0, param, tl.where(z > 0.0, 1.0, 0.0))
    return y


@triton.jit
def activation_backward(
    grad, saved, ACTIVATION: tl.constexpr, param, param2, weight, weight2, SAVED_IS_OUTPUT: tl.constexpr
):
    """grad * f'(z) in fp32, from ``saved``: the output where ``SAVED_IS_OUTPUT`` (relu, leaky_relu with
    slope >= 0, sigmoid, tanh: what bias_act keeps), else the input (relu's and leaky_relu's formula is the
    same for both)."""
    if ACTIVATION == RELU:
        # A select, not a product: a zero derivative gives 0 even for an infinite or NaN gradient.
        grad_z = tl.where(saved <= 0.0, 0.0, grad)
    elif ACTIVATION == LEAKY_RELU:
        grad_z = tl.where(saved > 0.0, grad, grad * param)
    elif ACTIVATION == PRELU:
        grad_z = tl.where(saved > 0.0, grad, grad * weight)
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
    elif ACTIVATION == SIGMOID:
        if SAVED_IS_OUTPUT:
            grad_z = grad * saved * (1.0 - saved)
        else:  # s (1 - s) from the input: never 0 where s rounds to 1
            _, slope, tail = _logistic(saved)
            grad_z = _grad_times(grad, slope, tail)
    elif ACTIVATION == TANH:
        if SAVED_IS_OUTPUT:  # 1 - t^2 as (1 - t)(1 + t): no cancellation near |t| = 1
            grad_z = grad * ((1.0 - saved) * (1.0 + saved))
        else:  # 1 - tanh^2(z) = 4 s(2z) (1 - s(2z)), from the input
            _, slope, tail = _logistic(2.0 * saved)
            grad_z = _grad_times(grad, 4.0 * slope, tail)
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
        # Past the clamp mish' is 1 - O(z exp(-2z)): 1 in fp32 and fp64, where t = n / (n + 2) may round low.
        grad_z = tl.where(saved > _MISH_CLAMP, grad, _grad_times(grad, t + zc * slope, tail))
    elif ACTIVATION == HARDTANH:  # as PyTorch's CUDA kernel: a NaN input passes the gradient
        grad_z = tl.where((saved <= param) | (saved >= param2), 0.0, grad)
    elif ACTIVATION == HARDSWISH:  # (2z + 3) / 6: 2z + 3 is exact near its zero, z = -1.5; NaN passes grad
        grad_z = tl.where(saved <= -3.0, 0.0, tl.where(saved < 3.0, grad * ((2.0 * saved + 3.0) * _SIXTH), grad))
    elif ACTIVATION == HARDSIGMOID:
        grad_z = tl.where((saved > -3.0) & (saved < 3.0), grad * _SIXTH, 0.0)
    elif ACTIVATION == SOFTPLUS:  # f' = sigmoid(beta z)
        t = param * saved
        p, _, tail = _logistic(t)
        grad_z = tl.where(t > param2, grad, _grad_times(grad, p, tail))
    elif ACTIVATION == XIELU:
        _, expm1, exponential, m = _xielu_negative(saved, weight2, param, param2)
        alpha_n = weight2.to(tl.float64)
        beta = param
        # d/dz of alpha_n expm1(min(z, eps)) + (beta - alpha_n) z: min's derivative is 1, 1/2 at z = eps
        # (PyTorch's minimum splits a tie), 0 above; fp64 as the forward (its zero at z = -0.98 cancels too).
        below = alpha_n * expm1 + beta
        tie = alpha_n * (0.5 * exponential.to(tl.float64) - 1.0) + beta
        negative = tl.where(saved > param2, beta - alpha_n, tl.where(saved == param2, tie, below))
        grad_z = grad * tl.where(saved > 0.0, 2.0 * weight * saved + param, negative.to(tl.float32))
    elif ACTIVATION == HEAVISIDE:
        grad_z = tl.zeros_like(grad)
    else:  # HEAVISIDE_STE: the gradient passes straight through the step
        grad_z = grad
    return grad_z


@triton.jit
def activation_param_backward(grad, z, ACTIVATION: tl.constexpr, param, param2, weight, weight2):
    """``(grad * df/dweight, grad * df/dweight2)`` at the input ``z``, for the activations with learned
    parameters: PReLU's slope (d/dw (w z) = z on the negative side), xielu's alpha_p (z^2 on the positive
    side) and alpha_n (expm1(min(z, eps)) - z on the other). A NaN input gives NaN, as PyTorch's."""
    tl.static_assert(ACTIVATION == PRELU or ACTIVATION == XIELU, "only prelu and xielu have learned parameters")
    if ACTIVATION == PRELU:
        first = tl.where(z > 0.0, 0.0, grad * z)
        second = tl.zeros_like(first)
    else:
        m = tl.where(z > param2, param2, z)
        e_minus_m, _ = _expm1_minus_identity(m)
        # (m - z is eps - z above eps and 0 below it, never -inf - -inf)
        contribution = grad * tl.where(z > 0.0, z * z, e_minus_m + tl.where(z > param2, param2 - z, 0.0))
        first = tl.where(z <= 0.0, 0.0, contribution)  # (a NaN input: NaN to both, as PyTorch's formula)
        second = tl.where(z > 0.0, 0.0, contribution)
    return first, second
