"""fusedact.softmax / log_softmax (with a fused bias) against float64 references and PyTorch, on every
backend of this machine (see conftest.py): values, input and bias gradients over dtype x row length x dim x
layout, PyTorch's edge semantics, the registered ops (opcheck, torch.compile, gradcheck), modules, errors.

Tolerances: ``reference.tolerance`` (1 ULP of bf16/fp16, 8 fp32 ULPs) plus a floor for what fp32 math
cannot avoid, derived per element with u = 2^-24:

- the logit ``z`` is rounded to fp32, and the max subtracted: an absolute error of
  ``u (|z| + 2|m| + 2|z - m|)`` in the argument of ``exp`` (the GPU's exp also rounds ``(z - m) log2(e)``),
  a relative error of ``y`` for softmax, an absolute one for log_softmax; the row sum adds
  ``u (log2 N + 8)`` (tree reduction; ``log(s)``).
- the backward reads the saved output, rounded to the output dtype as eager PyTorch's does: ``y`` is off by
  up to 1 ULP of its dtype (Triton's interpreter truncates to bf16, so a whole ULP, not half; 2 ULPs of the
  reference, as the stored value may lie past a power of two), which ``sum(g * y)`` and ``exp(y)`` carry
  into every element of the row.
- bias gradients sum the rows' gradients in fp32: the sum of their floors plus ``u (log2 M + 2) sum |grad|``.
"""

import math

import pytest
import torch

import fusedact
from fusedact.kernels.softmax import MAX_BLOCK_N
from reference import assert_close, float64_reference, reference_softmax, tolerance, ulp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = 2.0**-24

# (shape, dim, layout): row lengths 1, 7, 257, 4097 and one past MAX_BLOCK_N (the online loop); the last
# dim and others (rows adjacent in memory; past 512 columns the strided case loops too); contiguous,
# sliced (a window of a wider last dim), transposed (last two dims swapped in memory), permuted (first two
# swapped: no single stride addresses the rows, one copy), ascending (logits growing along the row).
CASES = [
    ((5, 1), -1, "contiguous"),
    ((3, 7), -1, "sliced"),
    ((33, 7), -1, "transposed"),
    ((2, 3, 257), -1, "contiguous"),
    ((2, 4097), -1, "sliced"),
    ((2, MAX_BLOCK_N + 100), -1, "contiguous"),
    ((4, 7, 3), 1, "contiguous"),
    ((3, 257, 5), 1, "sliced"),
    ((2, 600, 3), 1, "contiguous"),
    ((6, 33), 0, "transposed"),
    ((3, 5, 4), 0, "permuted"),
    ((4, 1, 3), 1, "contiguous"),
    ((1100, 40), -1, "sliced"),  # many row blocks: a backward program sums several, the last one partial
    ((3, 2 * MAX_BLOCK_N + 5), -1, "ascending"),  # every block of the online loop raises the running max
    ((2, 1200, 3), 1, "ascending"),
]


def make_input(shape, layout, dtype, device, generator, scale=3.0):
    def randn(*size):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "sliced":
        return randn(*shape[:-1], shape[-1] + 5)[..., 2 : 2 + shape[-1]]
    if layout == "transposed":
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "permuted":
        return randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "ascending":  # logits that grow along dim 1 (the softmax dim of the cases that use it)
        ramp = torch.linspace(-30, 30, shape[1], dtype=torch.float64).view(1, -1, *[1] * (len(shape) - 2))
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) + ramp).to(dtype).to(device)
    raise ValueError(layout)


def along(t, ndim, dim):
    """A 1-D tensor shaped to broadcast along ``dim`` of an ``ndim``-D tensor."""
    return t.view([-1 if d == dim % ndim else 1 for d in range(ndim)])


def reference(x, bias, dim, log, grad_y):
    """float64 output, grad_x, grad_bias, and the exact logits z."""

    def function(x, b):
        return reference_softmax(x if b is None else x + along(b, x.dim(), dim), dim, log)

    y, (grad_x, grad_bias) = float64_reference(function, [x, bias], grad_y)
    z = x.detach().double().cpu()
    if bias is not None:
        z = z + along(bias.detach().double().cpu(), z.dim(), dim)
    return y, grad_x, grad_bias, z


def argument_error(z, dim):
    """Absolute error of the fp32 ``z - m`` and of the row sum (module docstring)."""
    row_max = z.amax(dim, keepdim=True)
    log2_n = math.log2(max(z.shape[dim], 1))
    return U * (z.abs() + 2 * row_max.abs() + 2 * (z - row_max).abs() + log2_n + 8)


def output_floor(y_ref, z, dim, log):
    error = argument_error(z, dim)
    return error + U * y_ref.abs() if log else y_ref.abs() * error


def grad_floor(y_ref, z, grad_y, dim, log, dtype):
    """Floor of grad_x from the saved output's error (fp32: the forward's floor; else 1 ULP of dtype)."""
    g = grad_y.detach().double().cpu()
    # the saved output's rounding (subnormals included): one ULP of the stored value, which may lie a binade
    # above the reference, so two of the reference's
    saved_error = 2 * ulp(y_ref, dtype)
    n_terms = (math.log2(max(z.shape[dim], 1)) + 2) * U
    if log:
        p = y_ref.exp()
        y_error = saved_error + output_floor(y_ref, z, dim, True)  # absolute, in log space
        total = g.sum(dim, keepdim=True)
        total_error = n_terms * g.abs().sum(dim, keepdim=True)
        return p * (total.abs() * (y_error + U * (y_ref.abs() + 4)) + total_error) + U * (g.abs() + p * total.abs())
    y_error = saved_error + output_floor(y_ref, z, dim, False)
    dot = (g * y_ref).sum(dim, keepdim=True)
    dot_error = (g.abs() * y_error).sum(dim, keepdim=True) + n_terms * (g * y_ref).abs().sum(dim, keepdim=True)
    return y_error * (g - dot).abs() + y_ref.abs() * (dot_error + U * (g.abs() + dot.abs()))


@pytest.mark.parametrize("shape,dim,layout", CASES, ids=[f"{s}-dim{d}-{lay}" for s, d, lay in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(shape, dim, layout, dtype, log, with_bias, device):
    generator = torch.Generator().manual_seed(0)
    x = make_input(shape, layout, dtype, device, generator).requires_grad_()
    bias = make_input((shape[dim],), "contiguous", dtype, device, generator)
    bias = bias.requires_grad_() if with_bias else None
    grad_y = make_input(shape, "contiguous", dtype, device, generator, scale=1.0)
    function = fusedact.log_softmax if log else fusedact.softmax

    y = function(x, bias, dim=dim)
    y.backward(grad_y)

    y_ref, grad_x_ref, grad_bias_ref, z = reference(x, bias, dim, log, grad_y)
    name = "log_softmax" if log else "softmax"
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, y_ref, output_floor(y_ref, z, dim, log), f"{name} output vs float64 torch.{name}")
    floor = grad_floor(y_ref, z, grad_y, dim, log, dtype)
    assert_close(x.grad, grad_x_ref, floor, f"{name} grad_x vs float64 autograd")
    if with_bias:
        other = [d for d in range(len(shape)) if d != dim % len(shape)]
        rows = math.prod(shape[d] for d in other)
        summed_floor = floor.sum(other) + (math.log2(max(rows, 1)) + 2) * U * grad_x_ref.abs().sum(other)
        # each term may itself be off by its tolerance (one rounding of grad_x is not part of the sum)
        summed_floor = summed_floor + tolerance(grad_x_ref, torch.float32).sum(other)
        assert_close(bias.grad, grad_bias_ref, summed_floor, f"{name} grad_bias vs float64 autograd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_one_rounding(dtype, log, device):
    """fp32 math, one round-to-nearest on store: the bf16/fp16 result is the fp32 result of the same
    (upcast) inputs, rounded by PyTorch."""
    if dtype == torch.bfloat16 and device == "cpu" and fusedact.get_cpu_backend() == "triton":
        pytest.skip("Triton's interpreter truncates fp32 to bf16 instead of rounding to nearest")
    generator = torch.Generator().manual_seed(2)
    x = make_input((16, 33), "contiguous", dtype, device, generator)
    bias = make_input((33,), "contiguous", dtype, device, generator)
    function = fusedact.log_softmax if log else fusedact.softmax
    assert torch.equal(function(x, bias), function(x.float(), bias.float()).to(dtype))


INF, NAN = math.inf, math.nan
SPECIAL_ROWS = [
    [1e4, -1e4, 0.0, 3.0],  # large logits: exp never overflows, the row stays normalised
    [-1e4, -1e4, -1e4, -1e4],  # uniform
    [INF, 1.0, 2.0, 3.0],  # inf - inf: NaN row, as PyTorch
    [-INF, -INF, -INF, -INF],  # NaN row, as PyTorch
    [-INF, 1.0, -INF, 2.0],  # 0 probability (log: -inf)
    [NAN, 1.0, 2.0, 3.0],  # NaN row
    [3e38, -3e38, 0.0, 1.0],
]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("row_length", [4, MAX_BLOCK_N + 4], ids=["short", "online"])
def test_special_values(log, row_length, device):
    """PyTorch's results, NaN and -inf included, for extreme rows; long rows put the values at the end,
    after a block of -inf (the online loop's running max is -inf through the first block)."""
    rows = torch.tensor(SPECIAL_ROWS, dtype=torch.float32)
    if row_length > 4:
        rows = torch.cat([torch.full((len(SPECIAL_ROWS), row_length - 4), -INF), rows], dim=1)
    x = rows.clone().to(device).requires_grad_()
    grad_y = torch.linspace(-1, 1, x.numel()).view(x.shape).to(device)
    function = fusedact.log_softmax if log else fusedact.softmax
    y = function(x)
    y.backward(grad_y)
    x_torch = rows.clone().requires_grad_()
    y_torch = (torch.log_softmax if log else torch.softmax)(x_torch, -1)
    y_torch.backward(grad_y.cpu())
    for actual, expected, what in [(y, y_torch, "output"), (x.grad, x_torch.grad, "grad_x")]:
        actual, expected = actual.detach().cpu(), expected.detach()
        assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ from PyTorch"
        assert torch.equal(actual.isinf(), expected.isinf()), f"{what}: infinities differ from PyTorch"
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)
    if row_length == 4:
        half = function(rows.half().to(device))  # 1e4 in fp16 (max 65504): no overflow to inf or NaN
        assert torch.isfinite(half[0]).all() and torch.isfinite(half[1]).all()


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim,with_bias", [(-1, True), (1, False), (0, True)])
def test_opcheck(log, dim, with_bias, device):
    x = torch.randn(3, 5, 4, device=device, requires_grad=True)
    bias = torch.randn(x.shape[dim], device=device, requires_grad=True) if with_bias else None
    dim = dim % x.dim()
    torch.library.opcheck(torch.ops.fusedact.softmax.default, (x, bias, dim, log))
    y = torch.ops.fusedact.softmax(x.detach(), None if bias is None else bias.detach(), dim, log)
    args = (torch.randn_like(x), y, dim, log, with_bias)
    torch.library.opcheck(torch.ops.fusedact.softmax_backward.default, args)


class _Attention(torch.nn.Module):
    """Scores with a learned per-key bias through softmax, and a log_softmax head."""

    def __init__(self):
        super().__init__()
        self.key_bias = torch.nn.Parameter(torch.randn(6))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, q, k, v):
        probs = fusedact.softmax(q @ k.transpose(-1, -2), self.key_bias)
        return fusedact.log_softmax(self.head(probs @ v), dim=-1)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the ops without graph breaks and matches eager fusedact."""
    torch.manual_seed(0)
    model = _Attention().to(device)
    q, k, v = (torch.randn(2, 6, 8, device=device) for _ in range(3))
    expected = model(q, k, v)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    actual = compiled(q, k, v)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected)
    for p, grad in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_gradcheck_float64(log, dim):
    """fp64 runs the fallback in fp64: finite differences agree with the analytic backward."""
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(x.shape[dim], dtype=torch.float64, requires_grad=True)
    function = fusedact.log_softmax if log else fusedact.softmax
    assert torch.autograd.gradcheck(lambda x, b: function(x, b, dim=dim), (x, bias))


MODULES = [
    (fusedact.nn.Softmax, torch.nn.Softmax, {"dim": -1}),
    (fusedact.nn.Softmax, torch.nn.Softmax, {"dim": 0}),
    (fusedact.nn.LogSoftmax, torch.nn.LogSoftmax, {"dim": 1}),
    (fusedact.nn.Softmax, torch.nn.Softmax, {}),  # dim=None: torch's legacy choice, with its warning
    (fusedact.nn.LogSoftmax, torch.nn.LogSoftmax, {}),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's, re-raised by pytest.warns
@pytest.mark.parametrize("ours,theirs,kwargs", MODULES, ids=[f"{t.__name__}{k}" for _, t, k in MODULES])
@pytest.mark.parametrize("ndim", [2, 3])
def test_modules(ours, theirs, kwargs, ndim, device):
    module, twin = ours(**kwargs), theirs(**kwargs)
    assert isinstance(module, theirs) and repr(module) == repr(twin)
    assert module.state_dict() == {} == twin.state_dict()
    x = torch.randn(*(3, 5, 4)[:ndim], device=device, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_()
    if "dim" in kwargs:
        y, y_twin = module(x), twin(x_twin)
    else:
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y = module(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            y_twin = twin(x_twin)
    torch.testing.assert_close(y, y_twin, rtol=1e-6, atol=1e-6)
    y.backward(torch.ones_like(y).cumsum(-1))
    y_twin.backward(torch.ones_like(y).cumsum(-1))
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)


BAD_INPUTS = [
    (lambda d: fusedact.softmax(torch.ones(3, 4, dtype=torch.int64, device=d)), TypeError, "x must be float16"),
    (lambda d: fusedact.log_softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), torch.ones(3, device=d)), ValueError,
     r"bias must have shape \(4,\) to match x.shape\[1\]"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), torch.ones(4, device=d), dim=0), ValueError,
     r"bias must have shape \(3,\) to match x.shape\[0\]"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), torch.ones(1, 4, device=d)), ValueError,
     "bias must have shape"),
    (lambda d: fusedact.log_softmax(torch.ones(3, 4, device=d), torch.ones(4, dtype=torch.float16, device=d)),
     TypeError, "bias dtype"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), torch.ones(4, device="meta")), ValueError,
     "bias is on meta"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), dim=2), ValueError, "dim=2 is out of range"),
    (lambda d: fusedact.log_softmax(torch.ones(3, 4, device=d), dim=-3), ValueError, "dim=-3 is out of range"),
    (lambda d: fusedact.softmax(torch.ones(3, 4, device=d), dim=1.0), TypeError, "dim must be an int"),
    (lambda d: fusedact.softmax(torch.tensor(1.0, device=d), torch.ones(1, device=d)), ValueError, "0-D"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((3, 0), -1), ((2, 0, 3), 1), ((0, 4, 3), 1), ((0,), 0)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_empty(shape, dim, log, device):
    x = torch.empty(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[dim], device=device, requires_grad=True)
    y = (fusedact.log_softmax if log else fusedact.softmax)(x, bias, dim=dim)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_zero_dim(device):
    """A 0-D tensor is one row of one element, as in torch.softmax."""
    x = torch.tensor(2.5, device=device, requires_grad=True)
    y = fusedact.softmax(x, dim=0)
    assert y.shape == () and y.item() == 1.0
    assert fusedact.log_softmax(x).item() == 0.0


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((300, 130), -1), ((2, 3, MAX_BLOCK_N + 3), -1), ((40, 70, 3), 1)])
def test_bias_grad_is_deterministic(shape, dim, log, device):
    """Partial sums per row group, reduced in a fixed order: two backward passes are bitwise identical;
    the eager entry keeps only the output (no input) for backward."""
    x = torch.randn(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[dim], device=device, requires_grad=True)
    grad_y = torch.randn(shape, device=device)
    function = fusedact.log_softmax if log else fusedact.softmax
    results = []
    for _ in range(2):
        x.grad = bias.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t) or t, lambda t: t):
            y = function(x, bias, dim=dim)
        assert "softmax_function" in type(y.grad_fn).__name__
        assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr(), "backward should keep only the output"
        y.backward(grad_y)
        results.append((x.grad.clone(), bias.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_autocast_gives_pytorchs_dtype(log, device):
    """Under autocast, the dtype eager PyTorch returns: float32 on CUDA (softmax is on its fp32 list), the
    input's bf16 on the CPU; and the values of the fp32 softmax rounded to that dtype."""
    x = torch.randn(4, 33, device=device, dtype=torch.bfloat16)
    bias = torch.randn(33, device=device, dtype=torch.bfloat16)
    function, eager = (fusedact.log_softmax, torch.log_softmax) if log else (fusedact.softmax, torch.softmax)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, expected = function(x, bias, dim=-1), eager(x + bias, dim=-1)
    assert y.dtype == expected.dtype
    reference = eager(x.double() + bias.double(), dim=-1)
    if y.dtype == torch.float32:  # from bf16 inputs, in fp32: a few fp32 ULPs of the exact value
        torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-6)
    else:
        assert_close(y, reference, what="bf16 under autocast")  # one rounding: within 1 bf16 ULP
