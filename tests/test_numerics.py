"""Numerics over the whole range: every activation, forward and backward, against tail-accurate float64
references (``reference.exact_activation``, itself checked against mpmath here), over every finite bf16
and fp16 value (both signs, subnormals to the largest finite) and a dense fp32 grid, without a bias.

Claims, per output dtype (the README's "one rounding"):
- bf16 / fp16: forward within 1 ULP of the exact value; backward (grad 1) within 2 ULPs: near a zero of
  f' (gelu at -0.75, silu at -1.28, mish at -1.19) the fp32 sum of its two terms cancels, which costs
  up to ~1.05 fp16 ULPs with the GPU's approximate exp and division (measured below).
- fp32: within 8 ULPs plus 3 times the condition number of f (backward: of f'), the error a rounded
  input alone would cause (silu(-80) moves 80 ULPs when z moves one); backward also 32 fp32 ULPs of the
  gate |f(z) / z|, the size of the two terms of f' = g + z g' that cancel near f''s zero. Without the
  tails' fixes these were 10^7 ULPs (a 0 where the value is a normal number).
- fp64 (the fallback): 1e-12 relative, plus the condition number's share.

Backends: the fallback sweeps every value; the interpreter (``TRITON_INTERPRET=1``) every 5th (every
bf16 exponent, both signs); the *GPU model* is the interpreter with ``exp``/``exp2``/division replaced by
the H100's approximations at their documented worst (``ex2.approx``: 2 ULPs, division: 2 ULPs, pushed
all one way, then all the other, with subnormal results flushed to 0), on every 5th value: the formulas
hold with the GPU's arithmetic, not only with numpy's exact one. On a CUDA machine the compiled kernels
sweep every value. The gated family (gate activations of swiglu, geglu, reglu, glu) runs the same sweep
through ``fusedact.gated`` with up = 1.

``python tests/test_numerics.py`` prints the max-ULP table (activation x dtype x backend). About 10-20 s on
two cores.
"""

import contextlib
import math
import os
import sys
from unittest import mock

import numpy as np
import pytest
import torch

import fusedact
from fusedact import _fallback
from reference import (
    SAVES_OUTPUT,
    SINGLE_CASES,
    XIELU_DEFAULTS,
    exact_activation,
    held_params,
    saved_output_derivative,
    ulp,
    ulp_error,
)

HAS_CUDA = torch.cuda.is_available()
HAS_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
LOW_DTYPES = [torch.bfloat16, torch.float16]
# (name, gate activation and parameters for fusedact.gated): the gated family's gates
GATED_CASES = [
    ("swiglu", "silu", {}),
    ("geglu", "gelu", {}),
    ("geglu_tanh", "gelu", {"approximate": "tanh"}),
    ("reglu", "relu", {}),
    ("glu", "sigmoid", {}),
]
_GATED_FUNCTION = {"silu": "silu", "gelu": "gelu", "relu": "relu", "sigmoid": "sigmoid"}
# Backend -> stride through the values (1: all of them).
STRIDE = {"torch": 1, "compiled": 1, "triton-interpreter": 5, "gpu-model": 5, "cuda": 1}
BACKENDS = ["torch"] + (["triton-interpreter"] if HAS_INTERPRETER else []) + (["cuda"] if HAS_CUDA else [])


def finite_values(dtype: torch.dtype, stride: int = 1) -> torch.Tensor:
    """Every finite value of a 16-bit dtype (every ``stride``-th bit pattern), as that dtype."""
    bits = torch.arange(0, 1 << 16, stride, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    return values[torch.isfinite(values)]


def wide_grid(dtype: torch.dtype, stride: int = 1, seed: int = 0) -> torch.Tensor:
    """A dense sample of fp32 (fp64) over the whole bf16 range: each finite bf16 value, and each again
    with random low mantissa bits (fp32 inputs that are no bf16 number)."""
    base = finite_values(torch.bfloat16, stride).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        bits = base.view(torch.int32) | torch.randint(0, 1 << 16, base.shape, generator=generator, dtype=torch.int32)
    else:
        low = torch.randint(0, 1 << 45, base.shape, generator=generator, dtype=torch.int64)
        bits = base.view(torch.int64) | low
    return torch.cat([base, bits.view(dtype)])


def condition(z: torch.Tensor, function: str, params: dict, derivative: bool) -> torch.Tensor:
    """|z g'(z) / g(z)| for g = f (or f'), in float64: how many ULPs g moves when z moves one."""
    value, slope = exact_activation(z, function, params)
    if not derivative:
        return torch.nan_to_num((z * slope / value).abs(), nan=0.0, posinf=0.0)
    h = 1e-6  # f'' by a central difference of the exact f' (float64: 1e-10 relative, plenty)
    _, above = exact_activation(z * (1 + h), function, params)
    _, below = exact_activation(z * (1 - h), function, params)
    return torch.nan_to_num(((above - below) / (2 * h * slope)).abs(), nan=0.0, posinf=0.0)


def allowed_ulps(z, function, params, dtype, derivative):
    """Per-element tolerance in ULPs of ``dtype`` at the reference (see the module docstring)."""
    if dtype in LOW_DTYPES:
        return torch.full(z.shape, 2.0 if derivative else 1.0, dtype=torch.float64)
    z = z.to(torch.float64)
    value, slope = exact_activation(z, function, params)
    reference = slope if derivative else value
    cond = condition(z, function, params, derivative)
    gate = torch.nan_to_num((value / z).abs(), nan=0.0, posinf=0.0) if derivative else torch.zeros_like(z)
    if dtype == torch.float64:
        # (relative to the smallest normal number at least: the references lose bits in fp64's subnormals)
        allowed = 1e-12 * ((1.0 + cond) * reference.abs() + gate + 2.0**-1022)
        return torch.nan_to_num(allowed / ulp(reference, dtype), nan=0.0, posinf=0.0) + 1.0
    return 8.0 + 3.0 * cond + torch.nan_to_num(32.0 * 2.0**-24 * gate / ulp(reference, dtype), nan=0.0)


def inputs_for(dtype, stride):
    return finite_values(dtype, stride) if dtype in LOW_DTYPES else wide_grid(dtype, stride)


def run_case(function, params, x, device, gated=False):
    """(output, grad_x) of one case on ``x`` (grad_y = 1), through the public API."""
    x = x.to(device).requires_grad_()
    if gated:
        up = torch.ones_like(x)
        y = fusedact.gated(x, up, activation=function, **params)
    else:
        y = getattr(fusedact, function)(x, **params)
    y.backward(torch.ones_like(y))
    return y.detach().cpu(), x.grad.detach().cpu()


def measure(function, params, dtype, device, stride, gated=False, keep=None):
    """Max ULP error of the forward and the backward, and the worst element of each against its tolerance
    (over the inputs ``keep`` keeps, if given)."""
    x = inputs_for(dtype, stride)
    x = x if keep is None else x[keep(x)]
    y, grad = run_case(function, params, x, device, gated)
    z = x.to(torch.float64)
    params = held_params(function, params, dtype)
    value, slope = exact_activation(z, function, params)
    if function in SAVES_OUTPUT:  # the backward reads the stored (rounded) output, as eager does; gated
        # ops their fp32 activation, as F.glu's backward (so 1 - s is 0 where s rounds to 1)
        slope = saved_output_derivative(value.to(torch.float32) if gated else y, function)
    results = {}
    for kind, actual, reference, derivative in (("forward", y, value, False), ("backward", grad, slope, True)):
        error = ulp_error(actual, reference, dtype)
        allowed = allowed_ulps(z, function, params, dtype, derivative)
        if derivative and gated and function in SAVES_OUTPUT:
            # s(1 - s) from the fp32 s moves up to 1 ULP of s per ULP of s's own error: one rounding, and
            # on the GPU ex2 and div.full's 2 ULPs each (measured: up to 5)
            allowed = allowed + 8.0 * ulp(value, torch.float32) / ulp(reference, dtype)
        worst = int((error / allowed).argmax())
        results[kind] = {
            "max_ulp": error.max().item(),
            "worst_ratio": (error / allowed)[worst].item(),
            "at": z[worst].item(),
            "got": actual[worst].item(),
            "exact": reference[worst].item(),
        }
    return results


def check(results, what):
    for kind, r in results.items():
        assert r["worst_ratio"] <= 1.0, (
            f"{what} {kind}: {r['worst_ratio']:.3g} x the tolerance at z = {r['at']!r}: got {r['got']!r}, "
            f"exact {r['exact']!r} (max {r['max_ulp']:.3g} ULP)"
        )


@contextlib.contextmanager
def backend(name):
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend(name if name in ("torch", "compiled") else "triton")
    try:
        yield "cuda" if name == "cuda" else "cpu"
    finally:
        fusedact.set_cpu_backend(previous)


# ---------------------------------------------------------------------------------------------------
# The GPU's approximate arithmetic, in Triton's interpreter

_LOG2E_FP32 = np.float32(1.4426950408889634)


def _approximate(values: np.ndarray, direction: float) -> np.ndarray:
    """fp32 ``values`` moved by 2^-22 relative (2 ULPs) in ``direction``, subnormal results flushed to 0."""
    if values.dtype != np.float32:
        return values
    moved = (values.astype(np.float64) * (1.0 + direction * 2.0**-22)).astype(np.float32)
    return np.where(np.abs(moved) < np.float32(2.0**-126), np.float32(0.0) * moved, moved).astype(np.float32)


@contextlib.contextmanager
def gpu_model(direction: float):
    """Triton's interpreter computing ``tl.exp2`` as ``ex2.approx.ftz.f32``, ``tl.exp(x)`` as
    ``ex2.approx.f32(x * log2(e))`` (the product rounded to fp32) and ``/`` as ``div.full.f32``, each at
    its documented worst error in ``direction`` (+1 or -1), subnormal results flushed (pessimistic)."""
    from triton.runtime import interpreter

    handle = interpreter.TensorHandle

    def exp2(self, arg):
        with np.errstate(all="ignore"):
            return handle(_approximate(np.exp2(arg.data), direction), arg.dtype.scalar)

    def exp(self, arg):
        with np.errstate(all="ignore"):
            data = arg.data
            data = np.exp2((data * _LOG2E_FP32).astype(np.float32)) if data.dtype == np.float32 else np.exp(data)
            return handle(_approximate(data, direction), arg.dtype.scalar)

    def fdiv(self, lhs, rhs):
        with np.errstate(all="ignore"):
            return handle(_approximate(np.divide(lhs.data, rhs.data), direction), lhs.dtype.scalar)

    builder = interpreter.InterpreterBuilder
    with (
        mock.patch.object(builder, "create_exp2", exp2),
        mock.patch.object(builder, "create_exp", exp),
        mock.patch.object(builder, "create_fdiv", fdiv),
    ):
        yield


# ---------------------------------------------------------------------------------------------------
# Tests

# (the hard family is piecewise linear or quadratic: no exp, nothing the GPU approximates; exact in float64)
_SMOOTH_CASES = [c for c in SINGLE_CASES if not c[1].startswith(("relu", "leaky", "heaviside", "hard"))]


@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_whole_range(case, dtype, name):
    label, function, params = case
    with backend(name) as device:
        results = measure(function, params, dtype, device, STRIDE[name])
    check(results, f"{name} {label} {dtype}")


@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_whole_range_float64(case):
    """fp64 always runs the fallback: its careful path in fp64 (the tails, past PyTorch's ops' range)."""
    label, function, params = case
    with backend("torch"):
        results = measure(function, params, torch.float64, "cpu", 4)
    check(results, f"fallback {label} float64")


_ELU_CASES = [c for c in SINGLE_CASES if c[1] in ("elu", "selu", "celu")]
# The fallback runs PyTorch's own hardswish forward and hardtanh, hardsigmoid (fp32) and ELU backward only where
# a tensor holds no NaN (hardswish: no -inf, nothing past finfo.max / 6, where its z * 6 overflows), and its
# selects elsewhere: the edge tests hold NaN, test_whole_range holds every finite value (so its hardswish
# takes the select), and this test none of those, so each takes PyTorch's op.
_SELECT_FREE = ("hardswish", "hardtanh", "hardsigmoid", "elu", "selu", "celu")
_SELECT_FREE_CASES = [c for c in SINGLE_CASES if c[1] in _SELECT_FREE]


@pytest.mark.parametrize("case", _SELECT_FREE_CASES, ids=[c[0] for c in _SELECT_FREE_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_whole_range_without_nan_or_huge_values(case, dtype):
    label, function, params = case
    stride = 4 if dtype == torch.float64 else STRIDE["torch"]
    within, answers = _fallback._within, []

    def spy(*args):
        answers.append(within(*args))
        return answers[-1]

    with backend("torch"), mock.patch.object(_fallback, "_within", spy):
        results = measure(function, params, dtype, "cpu", stride, keep=lambda x: x.abs() <= 1e30)
    if not (function == "hardsigmoid" and dtype == torch.float64):  # (the select: PyTorch's fp64 op is fp32's)
        assert any(answers), f"PyTorch's op not taken: {answers}"
    check(results, f"fallback {label} {dtype} (no NaN, |z| <= 1e30)")


@pytest.mark.parametrize("case", _ELU_CASES, ids=[c[0] for c in _ELU_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_elu_formula_where_aten_has_no_expm1(case, dtype, monkeypatch):
    """The fallback's own ELU formula, which it takes where PyTorch's ELU computes exp(z) - 1 (torch 2.5:
    +0.0 at tiny negative z), over the whole range; the -0.0 sign as the kernels'."""
    monkeypatch.setattr(_fallback, "_ATEN_ELU_EXPM1", {"cpu": False})
    label, function, params = case
    with backend("torch"):
        results = measure(function, params, dtype, "cpu", 4 if dtype == torch.float64 else STRIDE["torch"])
        y = getattr(fusedact, function)(torch.tensor([-0.0, 0.0, -1e-30], dtype=dtype), **params)
    check(results, f"expm1 formula {label} {dtype}")
    assert torch.equal(torch.signbit(y[:2]), torch.tensor([True, False])) and y[2] < 0


@pytest.mark.skipif(not HAS_INTERPRETER, reason="needs Triton's interpreter (no GPU)")
@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["high", "low"])
@pytest.mark.parametrize("case", _SMOOTH_CASES, ids=[c[0] for c in _SMOOTH_CASES])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_whole_range_gpu_model(case, dtype, direction):
    label, function, params = case
    with backend("triton-interpreter") as device, gpu_model(direction):
        results = measure(function, params, dtype, device, STRIDE["gpu-model"])
    check(results, f"gpu-model({direction:+}) {label} {dtype}")


@pytest.mark.parametrize("case", GATED_CASES, ids=[c[0] for c in GATED_CASES])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_gated_whole_range(case, dtype, name):
    label, activation, params = case
    with backend(name) as device:
        results = measure(activation, params, dtype, device, STRIDE[name], gated=True)
    check(results, f"{name} {label} gate {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gated_tanh_form_from_one_sigmoid(dtype):
    """Where every gate lies in the tanh form's fast range, the fallback's gated backward takes the value
    (up's gradient) and the derivative (the gate's) from one logit and sigmoid: both held to the float64
    references, with up = 2 and grad_y = 1, over that range (every bf16/fp16 value, a dense fp32 grid);
    the spy makes sure that path ran."""
    low, high = _fallback.FAST_RANGE[("gelu_tanh", "backward")]
    assert _fallback.FAST_RANGE[("gelu_tanh", "forward")] == (low, high)
    x = inputs_for(dtype, STRIDE["torch"])
    x = x[(x.double() >= low) & (x.double() <= high)]
    calls = []
    slope = _fallback._gelu_tanh_sigmoid_slope

    def spy(z):
        calls.append(z.numel())
        return slope(z)

    separate = _fallback._gelu_tanh_sigmoid_backward

    def separate_spy(grad, z):  # (the single activation's backward, which the gated one skips here)
        calls.append("separate")
        return separate(grad, z)

    gate, up = x.clone().requires_grad_(), torch.full_like(x, 2.0).requires_grad_()
    with backend("torch"), contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(_fallback, "_gelu_tanh_sigmoid_slope", spy))
        stack.enter_context(mock.patch.object(_fallback, "_gelu_tanh_sigmoid_backward", separate_spy))
        y = fusedact.gated(gate, up, activation="gelu", approximate="tanh")
        y.backward(torch.ones_like(y))
    assert "separate" not in calls and sum(calls) == x.numel(), calls
    z = x.double()
    params = {"approximate": "tanh"}
    value, derivative = exact_activation(z, "gelu", params)
    for what, actual, reference, is_derivative in (
        ("up's gradient", up.grad, value, False),
        ("the gate's gradient", gate.grad.double() / 2.0, derivative, True),  # (/ 2 in fp64: exact)
    ):
        error = ulp_error(actual, reference, dtype)
        allowed = allowed_ulps(z, "gelu", params, dtype, is_derivative)
        worst = int((error / allowed).argmax())
        assert bool((error <= allowed).all()), (
            f"{what} at z = {z[worst].item()!r}: {error[worst].item():.3g} ULP, allowed {allowed[worst].item():.3g}"
        )


# Edge values: limits at +-inf, NaN, huge finite inputs, the tails' zeros (signed), in every dtype. A NaN and
# a huge value in the same tensor send the fallback's whole tensor through its careful path (defect: fp64
# tanh GELU gave -1.69e38 at -1e300, -inf at -inf and -5e-261 at -30 there).
EDGES = [-math.inf, math.inf, math.nan, -0.0, 0.0, -30.0, 30.0, -1e13, 1e13, -3e38, 3e38, -100.0, -1000.0]
EDGES_FLOAT64 = EDGES + [-1e300, 1e300, -1e200, -40.0, -800.0, -1e-310]


@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_edges(case, dtype, name):
    label, function, params = case
    if dtype == torch.float64 and name != "torch":
        pytest.skip("fp64 runs the fallback on every backend")
    x = torch.tensor(EDGES_FLOAT64 if dtype == torch.float64 else EDGES, dtype=torch.float64).to(dtype)
    with backend(name) as device:
        y, grad = run_case(function, params, x, device)
    z = x.to(torch.float64)
    params = held_params(function, params, dtype)
    value, slope = exact_activation(z, function, params)
    if function in SAVES_OUTPUT:
        slope = saved_output_derivative(y, function)
    for kind, actual, reference in (("forward", y, value), ("backward", grad, slope)):
        error = ulp_error(actual, reference, dtype)
        bad = error > allowed_ulps(z, function, params, dtype, kind == "backward")
        assert not bad.any(), (
            f"{name} {label} {dtype} {kind} at {z[bad].tolist()}: {actual[bad].tolist()} != {reference[bad].tolist()}"
        )
    zeros = value == 0
    assert torch.equal(torch.signbit(y[zeros]), torch.signbit(value.to(dtype)[zeros])), f"{label}: signed zeros"


def test_gelu_tanh_float64_limits():
    """The issue's defect 5, as the user wrote it: the mathematical limits in float64."""
    x = torch.tensor([-1e300, -math.inf, -30.0, math.nan, 1e13], dtype=torch.float64)
    y = fusedact.gelu(x, approximate="tanh")
    expected = torch.tensor([-0.0, -0.0, -0.0, math.nan, 1e13], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(y[:3]).all()


@pytest.mark.parametrize("activation", ["elu", "selu", "celu"])
@pytest.mark.parametrize("length", [1, 64])  # PyTorch's CPU elu_backward: g * scale at 1 element, NaN at 64
@pytest.mark.parametrize("name", BACKENDS)
def test_elu_family_gradient_at_nan_is_nan(activation, length, name):
    """Deliberate: NaN in, NaN out. PyTorch's elu_backward gives NaN on its vectorized CPU path and
    ``grad * scale`` on its scalar CPU and CUDA paths, so no single answer matches it."""
    x = torch.full((length,), math.nan)
    with backend(name) as device:
        _, grad = run_case(activation, {"alpha": 0.7} if activation != "selu" else {}, x, device)
    assert torch.isnan(grad).all()


@pytest.mark.parametrize("case", _SMOOTH_CASES, ids=[c[0] for c in _SMOOTH_CASES])
def test_references_against_mpmath(case):
    """exact_activation is within 1e-12 of 60-digit mpmath over the whole range (tails included)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60
    _, function, params = case
    z = torch.cat(
        [
            torch.linspace(-40, 40, 161, dtype=torch.float64),
            -torch.logspace(-30, 2.5, 40, dtype=torch.float64),
            torch.logspace(-30, 2.5, 40, dtype=torch.float64),
        ]
    )
    value, slope = exact_activation(z, function, params)
    for k, point in enumerate(z.tolist()):
        exact = _mpmath_activation(mpmath, mpmath.mpf(point), function, params)
        for ours, theirs in ((value[k].item(), exact[0]), (slope[k].item(), exact[1])):
            if abs(theirs) < mpmath.mpf(10) ** -300:  # below float64's range
                continue
            relative = abs((mpmath.mpf(ours) - theirs) / theirs)
            bound = 1e-12 * (1 + point * point)  # float64 rounding of z^2 in the exponent
            assert relative <= bound, f"{function} at {point}: {ours!r} vs {mpmath.nstr(theirs, 17)}"


def _mpmath_activation(mpmath, z, function, params):
    def sigmoid(x):
        return 1 / (1 + mpmath.exp(-x))

    if function == "gelu" and params.get("approximate", "none") == "none":
        cdf = mpmath.erfc(-z / mpmath.sqrt(2)) / 2
        return z * cdf, cdf + z * mpmath.exp(-z * z / 2) / mpmath.sqrt(2 * mpmath.pi)
    if function in ("gelu", "silu", "swish", "quick_gelu"):
        if function == "gelu":
            a = mpmath.mpf(1.5957691216057308)
            logit, logit_derivative = a * (z + mpmath.mpf(0.044715) * z**3), a * (1 + 3 * mpmath.mpf(0.044715) * z * z)
        else:
            beta = mpmath.mpf({"silu": 1.0, "quick_gelu": 1.702}.get(function, params.get("beta")))
            logit, logit_derivative = beta * z, beta
        s = sigmoid(logit)
        return z * s, s + z * s * sigmoid(-logit) * logit_derivative
    if function == "sigmoid":
        return sigmoid(z), sigmoid(z) * sigmoid(-z)
    if function == "tanh":
        return mpmath.tanh(z), 1 / mpmath.cosh(z) ** 2
    if function in ("elu", "selu", "celu"):
        if function == "selu":
            alpha, scale, input_scale = mpmath.mpf(1.6732632423543772), mpmath.mpf(1.0507009873554805), 1
        else:
            alpha, scale = mpmath.mpf(params["alpha"]), 1
            input_scale = 1 if function == "elu" else 1 / alpha
        if z <= 0:
            return scale * alpha * mpmath.expm1(z * input_scale), scale * alpha * input_scale * mpmath.exp(
                z * input_scale
            )
        return scale * z, scale
    if function == "relu_squared":
        return (z * z, 2 * z) if z > 0 else (mpmath.mpf(0), mpmath.mpf(0))
    if function == "mish":
        t = mpmath.tanh(mpmath.log1p(mpmath.exp(z)))
        return z * t, t + z * (1 - t * t) * sigmoid(z)
    if function == "softplus":
        beta, threshold = mpmath.mpf(params.get("beta", 1.0)), params.get("threshold", 20.0)
        if beta * z > threshold:
            return z, mpmath.mpf(1)
        return mpmath.log1p(mpmath.exp(beta * z)) / beta, sigmoid(beta * z)
    if function == "xielu":
        p = {**XIELU_DEFAULTS, **params}
        alpha_p, alpha_n, beta, eps = (mpmath.mpf(p[k]) for k in ("alpha_p", "alpha_n", "beta", "eps"))
        if z > 0:
            return alpha_p * z * z + beta * z, 2 * alpha_p * z + beta
        m, m_slope = (z, 1) if z < eps else (eps, 0)
        return alpha_n * (mpmath.expm1(m) - z) + beta * z, alpha_n * (m_slope * mpmath.exp(m) - 1) + beta
    raise ValueError(function)


# ---------------------------------------------------------------------------------------------------
# Report


def report(names=None) -> str:
    """The max-ULP table: activation x dtype x backend, forward / backward."""
    names = names or (BACKENDS + (["gpu-model"] if HAS_INTERPRETER else []))
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    header = f"{'activation':28s} " + " ".join(f"{n[:13] + ' ' + str(d)[6:]:>22s}" for n in names for d in dtypes)
    lines = ["max ULP (forward / backward) over every finite bf16/fp16 value and a dense fp32 grid", header]
    cases = [(label, function, params, False) for label, function, params in SINGLE_CASES]
    cases += [(f"{label} (gate)", activation, params, True) for label, activation, params in GATED_CASES]
    for label, function, params, gated in cases:
        cells = []
        for name in names:
            for dtype in dtypes:
                if gated and dtype == torch.float32:
                    cells.append(f"{'':>22s}")
                    continue
                stride = STRIDE[name] if name != "torch" else 1
                context = gpu_model(1.0) if name == "gpu-model" else contextlib.nullcontext()
                with backend("triton-interpreter" if name == "gpu-model" else name) as device, context:
                    r = measure(function, params, dtype, device, stride, gated)
                cells.append(f"{r['forward']['max_ulp']:>10.3g} / {r['backward']['max_ulp']:<9.3g}")
        lines.append(f"{label:28s} " + " ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    if not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
        sys.exit("run with TRITON_INTERPRET=1 (no GPU) to include the Triton kernels")
    print(report(sys.argv[1:] or None))


# The fallback's block check (``_fallback.CHECK_BLOCK``): in a tensor of ordinary values with a few extreme
# ones, the fast op runs on every element and only the blocks holding an element outside its fast range
# are recomputed (gathered, then scattered back). Each element is still held to its tolerance; the spy
# makes sure the blocks were in fact recomputed alone. The bias puts z = x + b on the zero of gelu', the window
# of the fast backward's cancellation (``_fallback.FAST_EXCLUDED``), which no bf16 x alone reaches.
_BLOCK_CASES = [
    c for c in SINGLE_CASES if c[1] in ("gelu", "silu", "swish", "quick_gelu", "sigmoid", "mish", "softplus")
]
_GELU_ZERO = -0.7517915


def _sparse_outliers(dtype, seed=0):
    """(x [256, 128], bias [128]): N(0, 1/4) values, EDGES and values past the ranges' ends in a few blocks,
    and three columns whose bias moves -0.75 onto and beside the zero of gelu'."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=generator, dtype=torch.float64) * 0.5
    bias = torch.randn(128, generator=generator, dtype=torch.float64) * 0.1
    specials = torch.tensor(EDGES + [-3.7, -4.5, -5.0, -12.9, -20.0, 7.5, 90.0], dtype=torch.float64)
    positions = torch.randperm(x.numel(), generator=generator)[: len(specials)]
    x.view(-1)[positions] = specials
    x[5:9, :3] = -0.75
    bias[:3] = torch.tensor([_GELU_ZERO + 0.75, _GELU_ZERO + 0.75 + 1e-4, _GELU_ZERO + 0.75 - 1e-5])
    return x.to(dtype), bias.to(dtype)


@pytest.mark.parametrize("case", _BLOCK_CASES, ids=[c[0] for c in _BLOCK_CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_sparse_outliers_recomputed_in_blocks(case, dtype):
    label, function, params = case
    x, bias = _sparse_outliers(dtype)
    recomputed = []
    select = _fallback._select_accurate

    def spy(key, rows, *args, **kwargs):
        recomputed.append(rows.numel())
        return select(key, rows, *args, **kwargs)

    with backend("torch"), mock.patch.object(_fallback, "_select_accurate", spy):
        xs, bs = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = getattr(fusedact, function)(xs, bs, **params)
        y.backward(torch.ones_like(y))
    assert x.numel() >= _fallback.BLOCK_CHECK_FROM
    assert recomputed and min(recomputed) < x.numel() // 2, f"{label}: no blocks recomputed alone ({recomputed})"
    z = (x.float() + bias.float()).to(torch.float64)  # the fp32 z the fallback computes
    held = held_params(function, params, dtype)
    value, slope = exact_activation(z, function, held)
    if function in SAVES_OUTPUT:
        slope = saved_output_derivative(y.detach(), function)
    for kind, actual, reference in (("forward", y.detach(), value), ("backward", xs.grad, slope)):
        error = ulp_error(actual, reference, dtype)
        bad = error > allowed_ulps(z, function, held, dtype, kind == "backward")
        assert not bad.any(), f"{label} {dtype} {kind} at z = {z[bad].tolist()[:5]}: {actual[bad].tolist()[:5]}"


# Each of ``_fallback.FAST_RANGE_ROUNDED``'s ranges, over a dense fp32 grid of it (z = x + bias is any fp32
# number): the fast op's fp32 result, rounded once, within the tolerance (outside the excluded window).
_FAST_OPS = {
    ("gelu", "forward"): lambda z: torch.nn.functional.gelu(z),
    ("gelu", "backward"): lambda z: torch.ops.aten.gelu_backward(torch.ones_like(z), z),
    ("swish", "backward"): lambda z: torch.ops.aten.silu_backward(torch.ones_like(z), z),
}
_EXACT = {"gelu": ("gelu", {}), "swish": ("silu", {})}


@pytest.mark.parametrize("entry", sorted(_fallback.FAST_RANGE_ROUNDED, key=str), ids=str)
def test_fast_range_rounded(entry):
    activation, direction, dtype = entry
    low, high = _fallback.FAST_RANGE_ROUNDED[entry]
    z = torch.linspace(low, min(high, 100.0), 1_000_003, dtype=torch.float32)
    excluded = _fallback.FAST_EXCLUDED.get(entry)
    if excluded is not None:
        z = z[(z - excluded[0]).abs() >= excluded[1]]
    value, slope = exact_activation(z.double(), *_EXACT[activation])
    derivative = direction == "backward"
    error = ulp_error(_FAST_OPS[(activation, direction)](z).to(dtype), slope if derivative else value, dtype)
    worst = int(error.argmax())
    assert error[worst] <= (2.0 if derivative else 1.0), f"{entry}: {error[worst]:.3g} ULP at z = {z[worst].item()!r}"
