"""A bias along any dimension (conv channels: ``bias_act(..., dim=1)``) and PReLU's learned slope, against
float64 references: every layout of ``fusedact._channels`` (channels in columns, in rows, channels-last,
copied), outputs and the gradients of input, bias and slope, on every backend of this machine."""

import math

import pytest
import torch
import torch.nn.functional as F

import fusedact
from reference import assert_close, cancellation_floor, float64_reference, reference_activation, ulp, xielu_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (shape, dim, layout)
CHANNEL_CASES = [
    ((2, 3, 5, 7), 1, "contiguous"),  # NCHW: channels in rows
    ((2, 3, 5, 7), 1, "channels_last"),  # channels in the columns of the moved view, result channels-last
    ((2, 4, 33), 1, "contiguous"),  # Conv1d output
    ((3, 4, 5), 0, "contiguous"),  # the first dimension
    ((2, 6, 5), 1, "transposed"),  # no view addresses it: one copy
    ((5, 9), 1, "contiguous"),  # the last dimension, spelled dim=1
    ((2, 3, 1, 1), 1, "contiguous"),  # 1x1 spatial: channels are the columns
    ((1, 40, 13, 11), 1, "sliced"),  # a slice of the batch: rows by stride, 143-wide rows, many row blocks
    ((2, 8, 2, 5), 1, "permuted"),  # batch and channels swapped: channels not innermost, one copy, contiguous
    ((8, 64), 0, "transposed_2d"),  # x.t() with a bias on dim 0: channels innermost, result laid out like x
]
CHANNEL_ACTIVATIONS = [("relu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("sigmoid", {}),
                       ("leaky_relu", {"negative_slope": -0.2}), ("hardswish", {}),
                       ("softplus", {"beta": 2.0, "threshold": 3.0})]  # fmt: skip


def make_layout(shape, layout, dtype, device, generator):
    def randn(*size):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * 2).to(dtype).to(device)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "channels_last":
        return randn(*shape).to(memory_format=torch.channels_last)
    if layout == "transposed":
        return randn(shape[0], shape[2], shape[1]).transpose(1, 2)
    if layout == "sliced":
        return randn(shape[0] + 2, *shape[1:])[1 : 1 + shape[0]]
    if layout == "permuted":
        return randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    if layout == "transposed_2d":
        return randn(shape[1], shape[0]).t()
    raise ValueError(layout)


def along(t, x, dim):
    shape = [1] * x.dim()
    shape[dim] = -1
    return t.view(shape)


def channel_floor(grad_ref, floor, dim):
    """fp32 sum per channel: 2e-6 times the summed magnitudes, plus the summed per-element floors."""
    dims = [d for d in range(grad_ref.dim()) if d != dim]
    return 2e-6 * grad_ref.abs().sum(dims) + (floor * torch.ones_like(grad_ref)).sum(dims)


@pytest.mark.parametrize("shape,dim,layout", CHANNEL_CASES, ids=[f"{s}-dim{d}-{lay}" for s, d, lay in CHANNEL_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,params", CHANNEL_ACTIVATIONS, ids=[a for a, _ in CHANNEL_ACTIVATIONS])
def test_channel_bias(activation, params, dtype, shape, dim, layout, device):
    generator = torch.Generator().manual_seed(0)
    x = make_layout(shape, layout, dtype, device, generator).requires_grad_()
    bias = make_layout(shape[dim : dim + 1], "contiguous", dtype, device, generator).requires_grad_()
    grad_y = make_layout(shape, "contiguous", dtype, device, generator)

    y = fusedact.bias_act(x, bias, activation, dim=dim, **params)
    y.backward(grad_y)

    def reference(x, b):
        return reference_activation(x + along(b, x, dim), activation, params)

    y_ref, (grad_x_ref, grad_bias_ref) = float64_reference(reference, [x, bias], grad_y)
    z = x.detach().double().cpu() + along(bias.detach().double().cpu(), x, dim)
    floor = cancellation_floor(z, grad_y.double().cpu())
    if activation == "sigmoid":  # its backward reads the output rounded to dtype (see saved_output_floor)
        floor = floor + 2.0 * grad_y.double().cpu().abs() * 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    assert_close(y, y_ref, cancellation_floor(z), "output")
    assert_close(x.grad, grad_x_ref, floor, "grad_x")
    assert_close(bias.grad, grad_bias_ref, channel_floor(grad_x_ref, floor, dim), "grad_bias")
    if layout == "channels_last":  # the memory format is kept, as PyTorch's elementwise ops keep it
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    elif layout == "transposed_2d":  # channels innermost in memory: kept, as PyTorch's elementwise ops keep it
        assert y.stride() == x.stride() and x.grad.stride() == x.stride()
    elif layout in ("contiguous", "permuted"):  # (permuted: differences.py, output_layout)
        assert y.is_contiguous()


# (shape, layout, slopes): PReLU's channels are dimension 1 (a 1-D x has one channel).
PRELU_CASES = [
    ((7,), "contiguous", 1),
    ((4, 9), "contiguous", 9),
    ((4, 9), "contiguous", 1),
    ((2, 3, 5, 7), "contiguous", 3),
    ((2, 3, 5, 7), "channels_last", 3),
    ((2, 3, 5, 7), "channels_last", 1),
    ((2, 6, 5), "transposed", 6),
    ((1, 40, 13, 11), "sliced", 40),
]


@pytest.mark.parametrize("shape,layout,slopes", PRELU_CASES, ids=[f"{s}-{lay}-{n}" for s, lay, n in PRELU_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_prelu(shape, layout, slopes, dtype, with_bias, device):
    generator = torch.Generator().manual_seed(1)
    x = make_layout(shape, layout, dtype, device, generator).requires_grad_()
    dim = 1 if x.dim() >= 2 else 0
    weight = make_layout((slopes,), "contiguous", dtype, device, generator).abs().mul(0.2).requires_grad_()
    weight.data[0] = -0.3  # a negative slope too: PReLU learns any sign
    bias = make_layout(shape[dim : dim + 1], "contiguous", dtype, device, generator) if with_bias else None
    if bias is not None:
        bias.requires_grad_()
    grad_y = make_layout(shape, "contiguous", dtype, device, generator)

    y = fusedact.prelu(x, weight, bias)
    y.backward(grad_y)

    def reference(x, w, b):
        return F.prelu(x if b is None else x + along(b, x, dim), w)

    y_ref, (grad_x_ref, grad_weight_ref, grad_bias_ref) = float64_reference(reference, [x, weight, bias], grad_y)
    # The products slope * z (forward), slope * g (backward) and g * z (the slope's gradient terms) are
    # exact in fp32 and rounded once: no floor but the fp32 sums over each channel's elements.
    assert_close(y, y_ref, 0.0, "output")
    assert_close(x.grad, grad_x_ref, 0.0, "grad_x")
    z = x.detach().double().cpu()
    if bias is not None:
        z = z + along(bias.detach().double().cpu(), x, dim)
    terms = torch.where(z > 0, 0.0, grad_y.double().cpu() * z)
    weight_floor = 2e-6 * terms.abs().sum() if slopes == 1 else channel_floor(terms, 0.0, dim)
    assert_close(weight.grad, grad_weight_ref, weight_floor, "grad_weight")
    if with_bias:
        assert_close(bias.grad, grad_bias_ref, channel_floor(grad_x_ref, 0.0, dim), "grad_bias")


# (shape, layout, alpha_p's and alpha_n's sizes): xIELU's bias and coefficients run along the last dimension.
XIELU_CASES = [
    ((7,), "contiguous", (1, 1)),
    ((4, 9), "contiguous", (9, 9)),
    ((4, 9), "contiguous", (1, 1)),
    ((2, 6, 5), "transposed", (5, 5)),
    ((1, 40, 13, 11), "sliced", (11, 11)),
    ((1, 40, 13, 11), "sliced", (1, 1)),
    ((1, 40, 13, 11), "sliced", (1, 11)),  # one shared, one per channel
    ((40, 64), "contiguous", (64, 1)),
]


@pytest.mark.parametrize("shape,layout,sizes", XIELU_CASES, ids=[f"{s}-{lay}-{n}" for s, lay, n in XIELU_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("coefficient_dtype", [torch.float32, None], ids=["fp32-coefficients", "x-dtype-coefficients"])
def test_xielu_coefficients(shape, layout, sizes, dtype, with_bias, coefficient_dtype, device):
    """xIELU's learned alpha_p and alpha_n, shared or one per channel (fp32 Parameters, as nn.XIELU's, or
    in x's dtype), against float64 autograd through transformers' formula: output and the gradients of x,
    the bias and both coefficients (summed over rows in fp32, rounded once)."""
    generator = torch.Generator().manual_seed(2)
    x = make_layout(shape, layout, dtype, device, generator).requires_grad_()
    coefficient_dtype = coefficient_dtype or dtype
    alpha_p, alpha_n = (
        (low + torch.rand(size, generator=generator)).to(device, coefficient_dtype).requires_grad_()
        for low, size in zip((0.3, 0.6), sizes, strict=True)
    )
    bias = make_layout(shape[-1:], "contiguous", dtype, device, generator).requires_grad_() if with_bias else None
    grad_y = make_layout(shape, "contiguous", dtype, device, generator)
    beta, eps = 0.5, float(torch.tensor(-1e-6))  # (as fusedact holds them below float64: fp32 numbers)

    y = fusedact.xielu(x, bias, alpha_p, alpha_n, beta=beta, eps=eps)
    y.backward(grad_y)

    def reference(x, alpha_p, alpha_n, b):
        return xielu_reference(x if b is None else x + b, alpha_p, alpha_n, beta, eps)

    y_ref, grads = float64_reference(reference, [x, alpha_p, alpha_n, bias], grad_y)
    grad_x_ref, grad_alpha_p_ref, grad_alpha_n_ref, grad_bias_ref = grads
    z = x.detach().double().cpu() + (0.0 if bias is None else bias.detach().double().cpu())
    g = grad_y.double().cpu()
    floor = cancellation_floor(z, g)
    dim = x.dim() - 1
    assert_close(y, y_ref, cancellation_floor(z), "output")
    assert_close(x.grad, grad_x_ref, floor, "grad_x")
    # The coefficients' per-element terms g z^2 and g (expm1(min(z, eps)) - z), summed in fp32
    m = torch.clamp(z, max=eps)
    for name, coefficient, expected, terms in (
        ("alpha_p", alpha_p, grad_alpha_p_ref, torch.where(z > 0, g * z * z, 0.0)),
        ("alpha_n", alpha_n, grad_alpha_n_ref, torch.where(z > 0, 0.0, g * (torch.expm1(m) - z))),
    ):
        if coefficient.numel() == 1:
            allowed = 2e-6 * terms.abs().sum() + (floor * torch.ones_like(z)).sum()
        else:
            allowed = channel_floor(terms, floor, dim)
        assert coefficient.grad.dtype == coefficient.dtype
        assert_close(coefficient.grad, expected, allowed, f"grad_{name}")
    if with_bias:
        assert_close(bias.grad, grad_bias_ref, channel_floor(grad_x_ref, floor, dim), "grad_bias")


@pytest.mark.parametrize("shared", ["alpha_p", "alpha_n"])
def test_xielu_shared_coefficient_beside_per_channel_rounds_once(shared, device):
    """One coefficient shared, the other per channel, both bf16: the shared one's gradient is the fp32 sum
    of every element's term, rounded once (within 0.5 bf16 ULP of float64, plus the fp32 sum's error),
    not 512 per-channel sums rounded to bf16 and added in bf16 (7 ULPs off at seed 4)."""
    width = 512
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        x = (2 * torch.randn(8, width, generator=generator)).to(device, torch.bfloat16)
        grad_y = torch.randn(8, width, generator=generator).to(device, torch.bfloat16)
        sizes = {"alpha_p": 1, "alpha_n": 1, shared: 1}
        sizes["alpha_n" if shared == "alpha_p" else "alpha_p"] = width
        alpha_p = torch.full((sizes["alpha_p"],), 0.5, dtype=torch.bfloat16, device=device, requires_grad=True)
        alpha_n = torch.full((sizes["alpha_n"],), 0.7, dtype=torch.bfloat16, device=device, requires_grad=True)
        eps = float(torch.tensor(-1e-6))
        fusedact.xielu(x, alpha_p=alpha_p, alpha_n=alpha_n, eps=eps).backward(grad_y)
        z, g = x.double().cpu(), grad_y.double().cpu()
        if shared == "alpha_p":
            terms, coefficient = torch.where(z > 0, g * z * z, 0.0), alpha_p
        else:
            terms, coefficient = torch.where(z > 0, 0.0, g * (torch.expm1(z.clamp(max=eps)) - z)), alpha_n
        expected = terms.sum().reshape(1)
        allowed = 0.5 * ulp(expected, torch.bfloat16) + 2e-6 * terms.abs().sum()
        error = (coefficient.grad.double().cpu() - expected).abs()
        assert error <= allowed, f"seed {seed}: grad_{shared} {coefficient.grad.item()} vs {expected.item()}"


def test_xielu_coefficients_at_infinities(device):
    """Per channel, so each coefficient's gradient comes from one input: at +-inf the coefficient that does
    not act there gets 0, where transformers' formula gives NaN (0 * inf in the branch not taken; the
    "xielu_limit" entry of fusedact.differences); elsewhere float64 autograd's value. NaN in, NaN out."""
    x = torch.tensor([[-math.inf, math.inf, -1.0, 2.0, math.nan]], device=device, requires_grad=True)
    alpha_p = torch.full((5,), 0.75, device=device, requires_grad=True)
    alpha_n = torch.full((5,), 1.25, device=device, requires_grad=True)
    fusedact.xielu(x, None, alpha_p, alpha_n, beta=0.5, eps=-1e-6).sum().backward()
    z = x.detach().double().cpu().requires_grad_()
    p64, n64 = (torch.full((5,), a, dtype=torch.float64, requires_grad=True) for a in (0.75, 1.25))
    xielu_reference(z, p64, n64, 0.5, float(torch.tensor(-1e-6))).sum().backward()
    infinite = torch.isinf(z.detach()[0])
    for name, actual, reference in (("alpha_p", alpha_p.grad, p64.grad), ("alpha_n", alpha_n.grad, n64.grad)):
        assert torch.isnan(reference[:2]).any(), "transformers' formula gives no NaN at +-inf any more"
        expected = torch.where(infinite & torch.isnan(reference), 0.0, reference)
        assert_close(actual, expected, 0.0, f"grad_{name}")


def test_prelu_special_values(device):
    """NaN, +-inf, +-0 and an exact zero: PyTorch's prelu values and gradients, bit for bit (fp32)."""
    x = torch.tensor([[float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3.0, -2.0]], device=device)
    x = x.expand(2, -1).t().contiguous().requires_grad_()  # [7, 2]: channels along the columns
    weight = torch.tensor([0.25, -1.5], device=device, requires_grad=True)
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y, y_ref = fusedact.prelu(x, weight), F.prelu(x_ref, weight_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(y), torch.signbit(y_ref))
    grad = torch.linspace(-1, 1, 14, device=device).view(7, 2)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=0, atol=0, equal_nan=True)


def test_empty_and_determinism(device):
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    weight = torch.full((3,), 0.25, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    y = fusedact.prelu(x, weight, bias)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(weight.grad, torch.zeros(3, device=device))
    assert torch.equal(bias.grad, torch.zeros(3, device=device))

    # Two backward passes are bitwise identical: fixed-order reductions, no atomics.
    x = torch.randn(4, 8, 9, 9, device=device, requires_grad=True)
    weight = torch.full((8,), 0.1, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    grad_y = torch.randn_like(x)
    grads = []
    for _ in range(2):
        grads.append(torch.autograd.grad(fusedact.prelu(x, weight, bias), (x, weight, bias), grad_y))
    for first, second in zip(*grads, strict=True):
        assert torch.equal(first, second)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = (x + 0.1 * torch.sign(x)).requires_grad_()  # keep the kink away from the samples
    weight = torch.tensor([0.25, -0.5, 1.5], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fusedact.prelu, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, b: fusedact.bias_act(x, b, "gelu", dim=1), (x, bias))
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: fusedact.bias_act(x, b, "silu", dim=1), (x_cl, bias))


@pytest.mark.slow
def test_compile_fullgraph():
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    bias = torch.nn.Parameter(torch.randn(4))
    prelu = fusedact.nn.PReLU(4)

    def block(x):
        return prelu(fusedact.bias_act(conv(x), bias, "gelu", dim=1))

    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    expected = block(x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    compiled(x).sum().backward()
    assert bias.grad is not None and prelu.weight.grad is not None


BAD_INPUTS = [
    (lambda: fusedact.prelu(torch.ones(2, 3), torch.ones(2)), ValueError, r"weight must hold 1 or 3"),
    (lambda: fusedact.prelu(torch.ones(2, 3), torch.ones(1, dtype=torch.float64)), TypeError, "weight dtype"),
    (lambda: fusedact.prelu(torch.ones(2, 3), [0.25]), TypeError, "weight must be a torch.Tensor"),
    (lambda: fusedact.prelu(torch.ones(2, 3, 4), torch.ones(3), torch.ones(4)), ValueError, r"x.shape\[1\]"),
    (lambda: fusedact.bias_act(torch.ones(2, 3, 4), torch.ones(4), "relu", dim=1), ValueError, r"x.shape\[1\]"),
    (lambda: fusedact.bias_act(torch.ones(2, 3), torch.ones(3), "relu", dim=2), ValueError, "dim=2 is out of range"),
    (lambda: fusedact.bias_act(torch.ones(2, 3), torch.ones(3), "relu", dim=1.0), TypeError, "dim must be an int"),
    (lambda: fusedact.bias_act(torch.ones(2, 4), torch.ones(2), "swiglu", dim=0), ValueError, "last dimension"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_modules():
    reference = torch.nn.PReLU(5, init=0.1)
    module = fusedact.nn.PReLU(5, init=0.1)
    assert isinstance(module, torch.nn.PReLU) and repr(module) == repr(reference)
    assert module.state_dict().keys() == reference.state_dict().keys() == {"weight"}
    module.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(module(x), reference(x), rtol=0, atol=0)

    layer = fusedact.nn.BiasAct(4, "relu", dim=1)
    assert repr(layer) == "BiasAct(4, activation='relu', dim=1)"
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(layer(x), F.relu(x + layer.bias.view(1, 4, 1, 1)), rtol=0, atol=0)
