"""The compiled CPU path (torch_ext/_compiled.py): the fallback's careful formulas fused by TorchInductor.

Held to the same float64 references and per-dtype tolerances as the fallback (tests/test_numerics.py: every
finite bf16/fp16 value, a dense fp32 grid, the edges: +-inf, NaN, -0.0, huge values), on every layout of x
and the bias, with the bias gradient summed in fp32 and rounded once. ``MIN_ELEMENTS`` is lowered so that
the small tensors here take the compiled path, and a spy asserts that they did. About 1-3 minutes on a
2-core machine, most of it compiling (inductor caches on disk: a second run takes seconds).
"""

import math
import warnings

import pytest
import test_numerics as numerics
import torch

import fusedact
from fusedact import _compiled, _fallback
from reference import SINGLE_CASES, exact_activation, ulp

PROBLEM = _compiled.problem()
needs_compiled = pytest.mark.skipif(PROBLEM is not None, reason=f"no compiled CPU path here: {PROBLEM}")
# The cases whose activation the compiled path takes (_compiled.ACTIVATIONS: gelu covers both forms).
CASES = [c for c in SINGLE_CASES if c[1] in ("gelu", "mish", "softplus")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def compiled(monkeypatch):
    """The compiled backend on every size; yields the list of (function name, activation) it ran."""
    ran = []
    call = _compiled._call

    def spy(function, activation, *args):
        result = call(function, activation, *args)
        if result is not None:
            ran.append((function.__name__, activation))
        return result

    monkeypatch.setattr(_compiled, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(_compiled, "_call", spy)
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("compiled")
    yield ran
    fusedact.set_cpu_backend(previous)
    assert _compiled.failure() is None, f"compiling failed: {_compiled.failure()}"
    # (PyTorch 2.5's inductor set flush-to-zero in the thread that loaded its code: _compiled.problem)
    assert bool(torch.tensor(1e-39) * 1.0 != 0), "subnormals are flushed to zero after compiling"


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_range(case, dtype, compiled):
    label, function, params = case
    results = numerics.measure(function, params, dtype, "cpu", numerics.STRIDE["compiled"])
    numerics.check(results, f"compiled {label} {dtype}")
    names = {name for name, _ in compiled}
    assert names == {"_forward", "_gradient_rounded"}, compiled


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edges(case, dtype, compiled):
    """+-inf, NaN, +-0.0 (signs of zero results included: inductor builds with -fno-signed-zeros), huge."""
    numerics.test_edges(case, dtype, "compiled")
    assert compiled


def _reference(x, bias, function, params, dim, grad):
    """(z, y, grad_x, grad_bias, sum of |grad_x| per channel) in float64: z = x + bias, the exact activation
    of z, its gradients and the magnitude the bias gradient's terms add up to."""
    shape = [-1 if d == dim else 1 for d in range(x.dim())]
    z = x.double() + bias.double().reshape(shape)
    value, slope = exact_activation(z, function, params)
    terms = grad.double() * slope
    others = [d for d in range(x.dim()) if d != dim]
    return z, value, terms, terms.sum(others), terms.abs().sum(others)


def _layout(name, dtype):
    """(x, bias, dim) in one of the layouts users pass: every tensor argument strided or offset too."""
    torch.manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(dtype)

    if name == "contiguous":
        return randn(6, 5, 40, scale=3.0), randn(40), -1
    if name == "transposed":  # x strided, the bias a column of a matrix (stride 3)
        return randn(30, 40, scale=3.0).t(), randn(30, 3)[:, 1], -1
    if name == "offset":  # x and the bias views at an offset
        return randn(31, 41, scale=3.0)[1:, 1:], randn(41)[1:], -1
    if name == "expanded_bias":  # a bias of stride 0
        return randn(20, 24, scale=3.0), randn(1).expand(24), -1
    if name == "channels_last":  # [N, C, H, W] channels-last, the bias along C
        return randn(2, 12, 5, 7, scale=3.0).to(memory_format=torch.channels_last), randn(12), 1
    if name == "channels_first":  # [N, C, L], the bias along C
        return randn(3, 16, 30, scale=3.0), randn(16), 1
    raise ValueError(name)


LAYOUTS = ["contiguous", "transposed", "offset", "expanded_bias", "channels_last", "channels_first"]


@needs_compiled
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("gelu", "mish")], ids=lambda c: c[0])
def test_bias_and_layouts(layout, dtype, case, compiled):
    """y, grad_x and grad_bias against float64 on each layout: y within the fallback's tolerance (1 ULP in
    bf16; fp32: 8 ULPs plus 3 times the condition number), grad_x within the derivative's (2 ULPs in bf16)
    plus one for the product with grad; grad_bias within one rounding to its dtype plus fp32 summation's
    error (64 fp32 ULPs of the sum of |terms|: a few hundred terms per channel here)."""
    label, function, params = case
    x, bias, dim = _layout(layout, dtype)
    x, bias = x.requires_grad_(), bias.requires_grad_()
    y = fusedact.bias_act(x, bias, function, dim=dim, **params)
    grad = torch.randn(y.shape).to(dtype)
    y.backward(grad)
    channel = dim % x.dim()
    z, value, terms, bias_terms, magnitude = _reference(x.detach(), bias.detach(), function, params, channel, grad)
    for what, actual, reference, derivative in (("y", y, value, False), ("grad_x", x.grad, terms, True)):
        ulps = numerics.allowed_ulps(z, function, params, dtype, derivative) + (1.0 if derivative else 0.0)
        error = (actual.detach().double() - reference).abs() / ulp(reference, dtype)
        assert (error <= ulps).all(), f"{label} {layout} {dtype} {what}: worst {(error / ulps).max():.3g}x"
    bound = ulp(bias_terms, dtype) + 64 * 2.0**-24 * magnitude
    assert ((bias.grad.double() - bias_terms).abs() <= bound).all(), f"{label} {layout} {dtype} grad_bias"
    assert y.stride() == fusedact.ops._channels.empty_output(x.detach(), dim).stride()
    assert {name for name, _ in compiled} == {"_forward", "_gradient"}


@needs_compiled
def test_large_bias_gradient_in_pieces(compiled):
    """A tensor of several cache-sized pieces: the bias gradient summed over every piece, rounded once."""
    torch.manual_seed(1)
    x = (torch.randn(1200, 512) * 2).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(512).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(1200, 512).to(torch.bfloat16)
    fusedact.gelu(x, bias=bias).backward(grad)
    _, _, terms, bias_terms, magnitude = _reference(x.detach(), bias.detach(), "gelu", {}, 1, grad)
    assert ((x.grad.double() - terms).abs() <= 3 * ulp(terms, torch.bfloat16)).all()
    bound = ulp(bias_terms, torch.bfloat16) + 64 * 2.0**-24 * magnitude
    assert ((bias.grad.double() - bias_terms).abs() <= bound).all()
    assert compiled.count(("_gradient", "gelu")) >= 2  # more than one piece


@needs_compiled
def test_under_an_outer_torch_compile(compiled):
    """A model compiled with fullgraph=True calls the op; the op's compiled path runs inside it."""
    torch.manual_seed(2)
    x, bias = torch.randn(64, 32), torch.randn(32)

    def model(x, bias):
        return fusedact.gelu(x, bias=bias) * 2.0

    actual = torch.compile(model, fullgraph=True)(x, bias)
    z = x.double() + bias.double()
    value, _ = exact_activation(z, "gelu", {})
    error = (actual.double() - 2.0 * value).abs() / ulp(2.0 * value, torch.float32)
    assert (error <= numerics.allowed_ulps(z, "gelu", {}, torch.float32, False)).all()
    assert ("_forward", "gelu") in compiled


@needs_compiled
def test_past_dynamos_recompile_limit_a_call_takes_the_fallback(compiled, monkeypatch):
    """A layout past the variants dynamo keeps runs the fallback, for that call only: no warning, the path
    stays on."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(_compiled, "_dynamo_settings", lambda: config.patch(**{name: 1, "specialize_float": True}))
    _compiled._compiled.cache_clear()  # (fresh code objects: no variant compiled yet)
    x, bias = torch.randn(48, 40) * 3, torch.randn(40)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fusedact.softplus(x, bias=bias)  # the first variant: compiled
            transposed = fusedact.softplus(x.t().contiguous().t(), bias=bias)  # a second: over the limit
    finally:
        _compiled._compiled.cache_clear()
    assert compiled == [("_forward", "softplus")] and _compiled.failure() is None
    fusedact.set_cpu_backend("torch")
    assert torch.equal(transposed, fusedact.softplus(x.t().contiguous().t(), bias=bias))  # the fallback's bits


def test_a_piece_the_compiled_code_cannot_take_runs_the_fallback(monkeypatch):
    """Where the compiled call gives up on a piece of the backward (past the recompile limit), the fallback
    computes that piece: grad_x and the bias gradient are then the fallback's own, bit for bit."""
    monkeypatch.setattr(_compiled, "_call", lambda *args: None)
    monkeypatch.setattr(_compiled, "_enabled", True)
    monkeypatch.setattr(_compiled, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(_fallback, "CHUNK_ELEMENTS", 4096)  # several pieces
    torch.manual_seed(3)
    grad, x, bias = torch.randn(64, 256), torch.randn(64, 256) * 3, torch.randn(256)
    args = (grad, x, bias, None, None, "gelu", 0.0, 0.0, -1, False, True)
    grad_x, grad_bias = _compiled.bias_act_backward(*args)
    monkeypatch.setattr(_compiled, "_enabled", False)
    expected = _fallback.bias_act_backward(*args, False)
    assert torch.equal(grad_x, expected[0]) and torch.equal(grad_bias, expected[1])


def test_small_tensors_and_other_activations_take_the_fallback(monkeypatch):
    """Below MIN_ELEMENTS, for activations whose PyTorch op is exact already, and for a backward autograd
    records (double backward), the fallback runs: nothing is compiled."""
    calls = []
    monkeypatch.setattr(_compiled, "_call", lambda *args: calls.append(args) or None)
    monkeypatch.setattr(fusedact.ops, "_cpu_backend", "compiled")  # (the tests' default is the interpreter)
    monkeypatch.setattr(_compiled, "_enabled", True)
    fusedact.gelu(torch.randn(8, 8), bias=torch.randn(8))
    big = torch.randn(_compiled.MIN_ELEMENTS // 256, 256)
    fusedact.relu(big, bias=torch.randn(256))
    x = big.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fusedact.gelu(x).sum(), x, create_graph=True)
    gx.sum().backward()
    assert len(calls) == 1 and calls[0][0] is _compiled._forward  # the big gelu's forward only


def test_compile_failure_warns_and_falls_back(monkeypatch):
    """Where compiling fails (no C++ compiler), one warning names why, and the fallback's results follow."""

    def broken(*args, **kwargs):
        def call(*a):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(_compiled, "_failure", None)
    monkeypatch.setattr(fusedact.ops, "_cpu_backend", "compiled")
    monkeypatch.setattr(_compiled, "_enabled", True)
    _compiled._compiled.cache_clear()
    x, bias = torch.randn(300, 256), torch.randn(256)
    try:
        with pytest.warns(UserWarning, match="no C\\+\\+ compiler found"):
            y = fusedact.gelu(x, bias=bias)
        assert _compiled.failure() == "RuntimeError: no C++ compiler found"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = fusedact.gelu(x, bias=bias)  # no second warning, no second attempt
    finally:
        _compiled._compiled.cache_clear()
    expected = _fallback.bias_act(x, bias, None, None, "gelu", 0.0, 0.0, -1)
    assert torch.equal(y, expected) and torch.equal(again, expected)


def test_set_cpu_backend_compiled():
    previous = fusedact.get_cpu_backend()
    if PROBLEM is not None:
        with pytest.raises(RuntimeError, match="'compiled' CPU backend cannot run here"):
            fusedact.set_cpu_backend("compiled")
        return
    try:
        fusedact.set_cpu_backend("compiled")
        assert fusedact.get_cpu_backend() == "compiled" and _compiled._enabled
        fusedact.set_cpu_backend("torch")
        assert not _compiled._enabled
    finally:
        fusedact.set_cpu_backend(previous)
    with pytest.raises(ValueError, match="'torch', 'compiled' or 'triton'"):
        fusedact.set_cpu_backend("inductor")


def test_erfcx_fit_is_the_kernels():
    """The compiled path's fp32 GELU evaluates the kernels' erfcx fit."""
    activations = pytest.importorskip("fusedact.kernels.activations")
    kernel = [float(getattr(activations, f"_ERFCX_P{k}").value) for k in range(len(_fallback._ERFCX_P))]
    assert list(_fallback._ERFCX_P) == kernel
    assert _fallback._ERFCX_K == activations._ERFCX_K.value and _fallback._ERFCX_CLAMP == activations._ERFCX_CLAMP.value


def test_fit_against_float64_in_fp32():
    """The fit, as the compiled path evaluates it in fp32, against float64's erfc over z in [-15, 15]: within
    16 fp32 ULPs (the fit, exp2's own error) plus 2 z^2 (exp(-z^2 / 2) from z^2 and its product with
    log2(e) / 2, each rounded in fp32: the gaussian's condition number)."""
    z = torch.linspace(-15.0, 15.0, 200_001, dtype=torch.float64)
    zf = z.float()
    tail = zf < _fallback._GELU_TAIL
    gaussian = _fallback._exp2_scaled(-(zf * zf) * _fallback._HALF_LOG2E, tail)  # as _gelu_parts
    half_erfc = _fallback._half_erfc_fit(zf, gaussian).double()
    half_erfc = torch.where(tail, half_erfc * 2.0**-64, half_erfc)
    cdf = torch.where(z < 0, half_erfc, 1.0 - half_erfc)
    exact = 0.5 * torch.special.erfc(-z / math.sqrt(2.0))
    normal = exact > 2.0**-126
    relative = ((cdf - exact).abs() / exact / (2.0**-24 * (16.0 + 2.0 * z * z)))[normal]
    assert relative.max() <= 1.0, f"{relative.max():.3g}x the bound at z = {z[normal][relative.argmax()]:.6g}"
