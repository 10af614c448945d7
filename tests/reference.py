"""float64 references and the tolerances the tests hold fusedact to.

References are PyTorch's own ops (the ELU family: their formula with expm1, as newer PyTorch evaluates it)
evaluated in float64 on ``z = x + bias`` (computed exactly in float64),
with the mathematical limit where PyTorch's formula gives NaN for an infinite input. Gradients come from
float64 autograd through the same ops.

Tolerances, per output dtype, for a result computed in fp32 and rounded once:
- bf16 / fp16: 1 ULP of the output dtype at the reference value. One rounding of an fp32 result that is
  within a few fp32 ULPs of the exact value lands on one of the two neighbours of the exact value.
- fp32: 8 fp32 ULPs: the GPU's exp/erf approximations are within 2 ULPs, and the formula adds a few
  roundings (sigmoid, the product, gelu-tanh's polynomial).
- all: plus an absolute floor of 2e-6 * clamp(|z|, 1, 10) * |grad|, for fp32's cancellation in ``1 + erf(z)`` and
  ``1 - sigmoid`` far in the negative tail, where the true value is below fp32 precision relative to 1
  (PyTorch's own fp32 ops share it).
- fp64 (the fallback's fp64 path): 1e-12 relative.
Bias gradients are sums over M rows in fp32 before one rounding: the floor becomes 2e-6 times the sum of
the magnitudes of the summed terms.
"""

import math

import torch
import torch.nn.functional as F

# fusedact.xielu's (and transformers' XIELUActivation's) defaults
XIELU_DEFAULTS = {"alpha_p": 0.8, "alpha_n": 0.8, "beta": 0.5, "eps": -1e-6}
# (name, fusedact function name, keyword parameters)
SINGLE_CASES = [
    ("relu", "relu", {}),
    ("leaky_relu", "leaky_relu", {"negative_slope": 0.01}),
    ("leaky_relu_negative_slope", "leaky_relu", {"negative_slope": -0.2}),
    ("gelu", "gelu", {}),
    ("gelu_tanh", "gelu", {"approximate": "tanh"}),
    ("silu", "silu", {}),
    ("swish_beta", "swish", {"beta": 1.702}),
    ("quick_gelu", "quick_gelu", {}),
    ("sigmoid", "sigmoid", {}),
    ("tanh", "tanh", {}),
    ("elu", "elu", {"alpha": 1.3}),
    ("selu", "selu", {}),
    ("celu", "celu", {"alpha": 0.7}),
    ("relu_squared", "relu_squared", {}),
    ("mish", "mish", {}),
    ("heaviside", "heaviside", {"value": 0.5}),
    ("heaviside_straight_through", "heaviside", {"value": 0.5, "straight_through": True}),
    ("relu6", "relu6", {}),
    ("hardtanh", "hardtanh", {"min_val": -0.5, "max_val": 2.0}),
    ("hardswish", "hardswish", {}),
    ("hardsigmoid", "hardsigmoid", {}),
    ("softplus", "softplus", {}),
    ("softplus_beta_threshold", "softplus", {"beta": 2.0, "threshold": 3.0}),
    # transformers' XIELUActivation at its initial values (alpha_p = softplus(raw_p), alpha_n = beta +
    # softplus(raw_n)), and coefficients as training leaves them, alpha_n below beta too (f(-inf) = -inf)
    ("xielu", "xielu", dict(XIELU_DEFAULTS)),
    ("xielu_learned", "xielu", {"alpha_p": 1.75, "alpha_n": 0.375, "beta": 0.625, "eps": -1e-4}),
]
# Smooth activations whose PyTorch formula gives NaN at +-inf: the reference takes the limits
# f(+inf) = +inf, f(-inf) = -0.0, f'(+inf) = 1, f'(-inf) = 0.
LIMIT_FIXED = ("gelu", "silu", "swish", "quick_gelu", "mish")
# Activations whose backward reads their output, rounded to the output dtype, as eager PyTorch's does.
SAVES_OUTPUT = ("sigmoid", "tanh")

_SELU_ALPHA = 1.6732632423543772848170429916717  # PyTorch's constants (F.selu)
_SELU_SCALE = 1.0507009873554804934193349852946
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
_MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126, torch.float64: -1022}


def reference_activation(z: torch.Tensor, function: str, params: dict) -> torch.Tensor:
    """f(z) in float64 from PyTorch's own ops (differentiable), before the limits at +-inf."""
    if function == "relu":
        return F.relu(z)
    if function == "leaky_relu":
        return F.leaky_relu(z, params["negative_slope"])
    if function == "gelu":
        return F.gelu(z, approximate=params.get("approximate", "none"))
    if function == "silu":
        return F.silu(z)
    if function == "swish":
        return z * torch.sigmoid(params["beta"] * z)
    if function == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    if function == "sigmoid":
        return torch.sigmoid(z)
    if function == "tanh":
        return torch.tanh(z)
    if function in ("elu", "selu", "celu"):  # PyTorch's formula, with expm1 (PyTorch 2.5's F.elu: exp(z) - 1)
        alpha = _SELU_ALPHA if function == "selu" else params["alpha"]
        scale = _SELU_SCALE if function == "selu" else 1.0
        inner = 1.0 / alpha if function == "celu" else 1.0
        # (expm1 of z <= 0 alone, the gradient at z = 0 through it: at z = inf the unselected branch's
        # gradient would be 0 * inf = NaN)
        negative = torch.where(z > 0, torch.zeros_like(z), z)
        return torch.where(z > 0, z * scale, torch.expm1(negative * inner) * (alpha * scale))
    if function == "relu_squared":
        return F.relu(z) ** 2
    if function == "mish":
        return F.mish(z)
    if function == "heaviside":
        return _Step.apply(z, params["value"], params.get("straight_through", False))
    if function == "relu6":
        return F.relu6(z)
    if function == "hardtanh":
        return F.hardtanh(z, params.get("min_val", -1.0), params.get("max_val", 1.0))
    if function == "hardswish":  # F.hardswish's value, and its derivative's 0 and 1 at z = -3 and 3 as newer
        # torch gives them (2.13, 2.14; torch 2.5's hardswish_backward gives -1/2 and 3/2 there; README, Install)
        return z * F.relu6(z + 3.0) / 6.0
    if function == "hardsigmoid":  # F.hardsigmoid's value and kinks, from ops with second derivatives (its
        # hardsigmoid_backward has none, and multiplies by 1/6 rounded to fp32 even in float64)
        return F.relu6(z + 3.0) / 6.0
    if function == "softplus":
        return F.softplus(z, params.get("beta", 1.0), params.get("threshold", 20.0))
    if function == "xielu":
        return xielu_reference(z, **{**XIELU_DEFAULTS, **params})
    raise ValueError(function)


def xielu_reference(z: torch.Tensor, alpha_p, alpha_n, beta: float, eps: float) -> torch.Tensor:
    """transformers' ``XIELUActivation._xielu_python`` with its coefficients already through softplus:
    ``alpha_p`` and ``alpha_n`` floats or tensors (one value, or one per channel of the last dimension:
    they broadcast), differentiable in z and in them."""
    alpha_p, alpha_n = (torch.as_tensor(a, dtype=z.dtype, device=z.device) for a in (alpha_p, alpha_n))
    eps = torch.tensor(eps, dtype=z.dtype, device=z.device)
    return torch.where(z > 0, alpha_p * z * z + beta * z, (torch.expm1(torch.min(z, eps)) - z) * alpha_n + beta * z)


def held_params(function: str, params: dict, dtype: torch.dtype) -> dict:
    """``params`` as fusedact holds them for an input of ``dtype``: xielu's float parameters (and float
    coefficients) are fp32 numbers below float64 (``fusedact.xielu``). A reference must use those: the
    negative side cancels where it crosses 0, so a parameter 1e-8 away moves the result by many ULPs there."""
    if function != "xielu" or dtype == torch.float64:
        return params
    return {k: float(torch.tensor(v, dtype=torch.float32)) if isinstance(v, float) else v for k, v in params.items()}


class _Step(torch.autograd.Function):
    """torch.heaviside with the derivative fusedact defines: 0, or 1 straight-through."""

    @staticmethod
    def forward(ctx, z, value, straight_through):
        ctx.straight_through = straight_through
        return torch.heaviside(z, torch.tensor(value, dtype=z.dtype))

    @staticmethod
    def backward(ctx, grad):
        return (grad.clone() if ctx.straight_through else torch.zeros_like(grad)), None, None


def float64_reference(function, inputs, grad_y):
    """Run ``function`` on float64 CPU copies of ``inputs`` (None passes through); return its output and
    the gradient of each input for ``grad_y``."""
    copies = [None if t is None else t.detach().to(torch.float64).cpu().requires_grad_() for t in inputs]
    y = function(*copies)
    y.backward(grad_y.detach().to(torch.float64).cpu())
    return y.detach(), [None if c is None else c.grad for c in copies]


def gate_reference(z: torch.Tensor, activation: str, params: dict) -> torch.Tensor:
    """The gate activation of the GLU family, by the name ``fusedact.gated`` takes."""
    return reference_activation(z, activation, params)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at ``|values|`` (float64), subnormals included."""
    _, exponent = torch.frexp(values.abs().to(torch.float64))
    exponent = torch.clamp(exponent - 1, min=_MIN_EXPONENT[dtype])
    return torch.pow(2.0, (exponent - _MANTISSA_BITS[dtype]).to(torch.float64))


def tolerance(reference: torch.Tensor, dtype: torch.dtype, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Allowed |error| per element (see the module docstring)."""
    if dtype == torch.float64:
        return 1e-12 * reference.abs() + 1e-300 + floor * 1e-6
    ulps = 8.0 if dtype == torch.float32 else 1.0
    return ulps * ulp(reference, dtype) + floor


def assert_close(actual: torch.Tensor, reference: torch.Tensor, floor=0.0, what: str = "") -> None:
    """Compare to a float64 reference: the same NaN and infinity positions, otherwise within tolerance."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    actual64 = actual.detach().to(torch.float64).cpu()
    reference = reference.detach().to(torch.float64).cpu()
    # A finite value beyond the dtype's range overflows to inf when stored (relu_squared(1e20) in fp32).
    reference = torch.where(torch.isinf(reference.to(actual.dtype)), reference.to(actual.dtype).double(), reference)
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(actual64), nan), f"{what}: NaN positions differ from the float64 reference"
    inf = torch.isinf(reference)
    assert torch.equal(actual64[inf], reference[inf]), f"{what}: infinities differ from the float64 reference"
    finite = ~(nan | inf)
    allowed = tolerance(reference, actual.dtype, floor)
    error = (actual64 - reference).abs()
    bad = finite & ~(error <= allowed)
    if bad.any():
        index = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {reference.numel()} elements off the float64 reference; "
            f"first at {index}: got {actual64[tuple(index)].item()!r}, reference {reference[tuple(index)].item()!r}, "
            f"allowed error {allowed[tuple(index)].item():.3g}"
        )


def cancellation_floor(z: torch.Tensor, grad: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Absolute error floor for fp32 math at pre-activation ``z``: 2e-6 * |z| (|z| taken in [1, 10]: beyond
    10 every tail is exactly 0 or 1 in fp32 and the true remainder is below 1e-20), times |grad|; zero
    where z or grad is not finite, so those elements are held to the exact limit."""
    grad = grad.abs() if isinstance(grad, torch.Tensor) else torch.tensor(abs(grad), dtype=torch.float64)
    floor = 2e-6 * torch.clamp(z.abs(), 1.0, 10.0) * grad
    return torch.where(torch.isfinite(floor), floor, 0.0)


def reference_softmax(z: torch.Tensor, dim: int, log: bool) -> torch.Tensor:
    """softmax (or log_softmax) along ``dim`` of the exact float64 ``z = x + bias`` (differentiable)."""
    return torch.log_softmax(z, dim) if log else torch.softmax(z, dim)


# ---------------------------------------------------------------------------------------------------
# Tail-accurate float64 references (tests/test_numerics.py). PyTorch's float64 formulas cancel in the
# tails as its fp32 ones do, only later: F.gelu's `1 + erf` is 0 below z = -8.3, where the bf16 value is
# -1e-16; the tanh GELU's `1 + tanh(u)` cancels below z = -6; F.mish's softplus overflows. These are
# the same functions written without cancellation (erfc, sigmoid from exp(-|x|), 1 - t from its own
# formula), each within a few float64 ULPs over the whole range; tests/test_numerics.py checks them
# against mpmath.

_SQRT_8_OVER_PI = 1.5957691216057308  # 2 sqrt(2 / pi): the tanh GELU's 2u = _SQRT_8_OVER_PI (z + 0.044715 z^3)


def _sigmoid64(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-x.abs())
    return torch.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _times(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """z * p, with p's limit 0 giving a zero signed like z (never inf * 0 = NaN)."""
    return torch.where(p == 0, torch.copysign(torch.zeros_like(z), z), z * p)


def exact_activation(z: torch.Tensor, function: str, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(z), f'(z)) in float64 for a float64 ``z``, accurate in every tail, with the limits at +-inf.
    ``function`` and ``params`` as in SINGLE_CASES. sigmoid's and tanh's derivatives here are of the
    input; their backward reads the rounded output (``saved_output_derivative``)."""
    z = z.to(torch.float64)
    one = torch.ones_like(z)
    if function == "relu":
        return torch.relu(z), torch.where(z > 0, one, torch.where(torch.isnan(z), one, 0.0))
    if function == "leaky_relu":
        slope = params["negative_slope"]
        return F.leaky_relu(z, slope), torch.where(z > 0, one, slope * one)
    if function == "gelu" and params.get("approximate", "none") == "none":
        cdf = 0.5 * torch.special.erfc(-z * 0.7071067811865476)
        pdf = 0.3989422804014327 * torch.exp(-0.5 * z * z)
        return _times(z, cdf), cdf + _times(z, pdf)
    if function in ("gelu", "silu", "swish", "quick_gelu"):
        if function == "gelu":  # tanh: z * sigmoid(2u)
            logit = _SQRT_8_OVER_PI * (z + 0.044715 * z**3)
            logit_derivative = _SQRT_8_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        else:
            beta = {"silu": 1.0, "quick_gelu": 1.702}.get(function, params.get("beta"))
            logit, logit_derivative = beta * z, beta * one
        s = _sigmoid64(logit)
        slope = s * _sigmoid64(-logit)  # s (1 - s) without the cancellation; 0 where it underflows
        slope = torch.where(slope == 0, 0.0, slope * logit_derivative)  # (0 * inf at z = +-inf)
        return _times(z, s), s + _times(z, slope)
    if function == "sigmoid":
        s = _sigmoid64(z)
        return s, s * _sigmoid64(-z)
    if function == "tanh":
        t = torch.tanh(z)
        return t, 1.0 / torch.cosh(z) ** 2
    if function in ("elu", "selu", "celu"):
        if function == "selu":
            alpha, scale, input_scale = 1.6732632423543772, 1.0507009873554805, 1.0
        else:
            alpha, scale = params["alpha"], 1.0
            input_scale = 1.0 if function == "elu" else 1.0 / alpha
        negative = z <= 0
        value = torch.where(negative, scale * alpha * torch.expm1(z * input_scale), scale * z)
        derivative = torch.where(negative, scale * alpha * input_scale * torch.exp(z * input_scale), scale * one)
        return value, torch.where(torch.isnan(z), z, derivative)
    if function == "relu_squared":
        positive = torch.relu(z)
        return positive**2, 2 * positive
    if function == "mish":
        e = torch.exp(torch.clamp(z, max=40.0))  # t = tanh(softplus(z)) is 1 in float64 past 40
        n = e * (e + 2.0)
        t = n / (n + 2.0)
        e = torch.exp(z)  # unclamped for 1 - t = 2 / (n + 2), which tends to 0 (n = inf past z = 709)
        one_minus_t_squared = 2.0 / (e * (e + 2.0) + 2.0) * (1.0 + t)
        return _times(z, t), t + _times(z, one_minus_t_squared * _sigmoid64(z))
    if function == "heaviside":
        step = torch.heaviside(z, torch.tensor(params["value"], dtype=torch.float64))
        return step, one if params.get("straight_through", False) else torch.zeros_like(z)
    if function in ("relu6", "hardtanh"):
        low, high = (0.0, 6.0) if function == "relu6" else (params.get("min_val", -1.0), params.get("max_val", 1.0))
        # the gradient passes at a NaN input (fusedact.differences "hard_nan_gradient"), 0 at the kinks
        inside = ((z > low) & (z < high)) | torch.isnan(z)
        return torch.clamp(z, low, high), inside.to(z.dtype)
    if function == "hardswish":
        gate = torch.clamp(z + 3.0, 0.0, 6.0) / 6.0
        derivative = torch.where(z <= -3.0, 0.0, torch.where(z < 3.0, (2.0 * z + 3.0) / 6.0, one))
        return _times(z, gate), torch.where(torch.isnan(z), one, derivative)  # (NaN passes the gradient)
    if function == "hardsigmoid":
        inside = (z > -3.0) & (z < 3.0)
        return torch.clamp(z + 3.0, 0.0, 6.0) / 6.0, torch.where(inside, one / 6.0, 0.0)
    if function == "softplus":
        beta, threshold = params.get("beta", 1.0), params.get("threshold", 20.0)
        t = beta * z
        value = (torch.clamp(t, min=0.0) + torch.log1p(torch.exp(-t.abs()))) / beta  # no overflow, no cancellation
        linear = t > threshold
        return torch.where(linear, z, value), torch.where(linear, one, _sigmoid64(t))
    if function == "xielu":
        p = {**XIELU_DEFAULTS, **params}
        alpha_p, alpha_n, beta, eps = p["alpha_p"], p["alpha_n"], p["beta"], p["eps"]
        m = torch.clamp(z, max=eps)
        # alpha_n (expm1(m) - z) + beta z as alpha_n expm1(m) + (beta - alpha_n) z: float64's roundings are
        # 1e-16 of terms of size |z|, where the sum crosses 0 (z = -2.4 by default) they are what is left
        linear = torch.where(torch.isinf(z) & (beta == alpha_n), 0.0, (beta - alpha_n) * z)
        negative = alpha_n * torch.expm1(m) + linear
        m_slope = torch.where(z < eps, one, torch.where(z == eps, 0.5 * one, 0.0))  # (min splits a tie)
        negative_slope = alpha_n * (m_slope * torch.exp(m) - 1.0) + beta
        value = torch.where(z > 0, alpha_p * z * z + beta * z, negative)
        derivative = torch.where(z > 0, 2.0 * alpha_p * z + beta, negative_slope)
        return value, torch.where(torch.isnan(z), z, derivative)
    raise ValueError(function)


def saved_output_derivative(y: torch.Tensor, function: str) -> torch.Tensor:
    """sigmoid's and tanh's derivative from their output ``y`` (as stored: rounded), in float64."""
    y = y.to(torch.float64)
    return y * (1.0 - y) if function == "sigmoid" else 1.0 - y * y


def ulp_error(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|actual - reference| in ULPs of ``dtype`` at the reference (float64). A reference that rounds to
    +-inf in ``dtype`` asks for that inf (0 ULP if given, inf otherwise); NaN must meet NaN (else inf)."""
    actual = actual.detach().to(torch.float64).cpu()
    reference = reference.detach().to(torch.float64).cpu()
    rounded = reference.to(dtype).to(torch.float64)
    target = torch.where(torch.isinf(rounded), rounded, reference)
    error = (actual - target).abs() / ulp(target, dtype)
    error = torch.where(actual == target, 0.0, error)  # equal infinities (inf - inf is NaN)
    both_nan = torch.isnan(actual) & torch.isnan(target)
    return torch.where(both_nan, 0.0, torch.nan_to_num(error, nan=math.inf, posinf=math.inf))
