"""fusedact.functional against float64 references: every activation x dtype x shape x layout x bias,
outputs, input gradients and bias gradients, on every backend of this machine (see conftest.py)."""

import math

import pytest
import torch

import fusedact
from fusedact import differences
from reference import (
    LIMIT_FIXED,
    SAVES_OUTPUT,
    SINGLE_CASES,
    assert_close,
    cancellation_floor,
    float64_reference,
    gate_reference,
    held_params,
    reference_activation,
    ulp,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (shape, layout): last dim 1, 7, 24, 257, 4097; 1-D to 4-D; contiguous, sliced, transposed, permuted.
SHAPES = [
    ((7,), "contiguous"),
    ((4097,), "sliced"),
    ((3, 257), "contiguous"),
    ((257, 3), "transposed"),
    ((5, 4097), "sliced"),
    ((2, 3, 1), "contiguous"),
    ((2, 5, 7), "permuted"),
    ((2, 2, 3, 257), "sliced"),
    ((3000, 33), "sliced"),  # many row blocks: each backward program loops over several, last group partial
    ((6, 24), "sliced4"),  # rows 4 elements past an alignment: 4-element accesses (8 bytes in bf16)
]


def make_input(shape, layout, dtype, device, generator, scale=2.0):
    """A tensor of ``shape`` laid out as asked, filled with N(0, scale^2) values (never zeros)."""

    def randn(*size):
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "sliced":  # a window of a wider last dimension: row stride > width, offset start
        return randn(*shape[:-1], shape[-1] + 5)[..., 2 : 2 + shape[-1]]
    if layout == "sliced4":  # from the fifth column of a row 8 wider: an aligned stride, a start 4 elements in
        return randn(*shape[:-1], shape[-1] + 8)[..., 4 : 4 + shape[-1]]
    if layout == "transposed":  # last dimension not contiguous
        return randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "permuted":  # leading dimensions no single row stride addresses: one copy
        return randn(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    raise ValueError(layout)


def with_bias(x, bias):
    return x if bias is None else x + bias


def reference_single(x, bias, function, params, grad_y):
    """Output, grad_x and grad_bias of f(x + bias) in float64, and the pre-activation z; where fusedact
    differs from PyTorch on purpose (NaN, +-inf), what ``fusedact.differences`` says it returns."""
    params = held_params(function, params, x.dtype)
    y, (grad_x, grad_bias) = float64_reference(
        lambda x, b: reference_activation(with_bias(x, b), function, params), [x, bias], grad_y
    )
    z = with_bias(x.detach().double().cpu(), None if bias is None else bias.detach().double().cpu())
    if function in LIMIT_FIXED:
        y = torch.where(z == math.inf, math.inf, torch.where(z == -math.inf, -0.0, y))
        grad_x = torch.where(z == math.inf, grad_y.detach().double().cpu(), grad_x)
        grad_x = torch.where(z == -math.inf, 0.0, grad_x)
    g = grad_y.detach().double().cpu()
    y = differences.expected_output(function, z, y, **params)
    grad_x = differences.expected_gradient(function, z, grad_x, g, **params)
    return y, grad_x, grad_bias, z


def saved_output_floor(function, y_ref, dtype, grad_y):
    """sigmoid/tanh differentiate their output rounded to ``dtype``, as eager does. That output is within
    1 ULP of the exact value (half an ULP when rounded to nearest; Triton's interpreter truncates to
    bf16), and |d(1 - y^2)/dy| = 2|y| <= 2, |d(y(1 - y))/dy| = |1 - 2y| <= 1: so 2 |grad| ulp(y)."""
    if function not in SAVES_OUTPUT or dtype == torch.float64:
        return 0.0
    return 2.0 * grad_y.detach().double().cpu().abs() * ulp(y_ref, dtype)


@pytest.mark.parametrize("shape,layout", SHAPES, ids=[f"{s}-{layout}" for s, layout in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_single_input(case, dtype, shape, layout, with_bias, device):
    _, function, params = case
    generator = torch.Generator().manual_seed(0)
    x = make_input(shape, layout, dtype, device, generator).requires_grad_()
    bias = make_input(shape[-1:], "contiguous", dtype, device, generator).requires_grad_() if with_bias else None
    grad_y = make_input(shape, "contiguous", dtype, device, generator)

    y = getattr(fusedact, function)(x, bias, **params)
    y.backward(grad_y)

    y_ref, grad_x_ref, grad_bias_ref, z = reference_single(x, bias, function, params, grad_y)
    assert y.dtype == dtype and y.device == x.device
    assert_close(y, y_ref, cancellation_floor(z), f"{function} output")
    grad_floor = cancellation_floor(z, grad_y.to(torch.float64).cpu())
    grad_floor = grad_floor + saved_output_floor(function, y_ref, dtype, grad_y)
    assert_close(x.grad, grad_x_ref, grad_floor, f"{function} grad_x")
    if with_bias:
        # fp32 sum of M terms: floor scaled by the sum of magnitudes of the terms.
        magnitude = grad_x_ref.abs().reshape(-1, shape[-1]).sum(0)
        summed_floor = (grad_floor * torch.ones_like(grad_x_ref)).reshape(-1, shape[-1]).sum(0)
        assert_close(bias.grad, grad_bias_ref, 2e-6 * magnitude + summed_floor, f"{function} grad_bias")


GATED_SHAPES = [
    ((7,), "contiguous"),
    ((3, 257), "contiguous"),
    ((257, 3), "transposed"),
    ((2, 3, 4097), "sliced"),
    ((3000, 33), "contiguous"),
    ((5, 12), "contiguous"),  # packed bf16/fp16: the up half 8 bytes past an alignment (4-element accesses)
    ((6, 24), "sliced4"),
]


# (name, activation and parameters for fusedact.gated, packed layout: gate first or F.glu's [up | gate])
GATED_CASES = [
    ("swiglu", "silu", {}, True),
    ("geglu", "gelu", {}, True),
    ("geglu_tanh", "gelu", {"approximate": "tanh"}, True),
    ("reglu", "relu", {}, True),
    ("glu", "sigmoid", {}, False),
]


@pytest.mark.parametrize("shape,layout", GATED_SHAPES, ids=[f"{s}-{layout}" for s, layout in GATED_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("biases", ["none", "gate", "both"])
@pytest.mark.parametrize("packed", [False, True], ids=["two-input", "packed"])
@pytest.mark.parametrize("case", GATED_CASES, ids=[c[0] for c in GATED_CASES])
def test_gated(case, shape, layout, dtype, biases, packed, device):
    _, activation, params, gate_first = case
    generator = torch.Generator().manual_seed(1)
    width = shape[-1]

    def bias(present):
        return make_input((width,), "contiguous", dtype, device, generator).requires_grad_() if present else None

    def split(t):  # (gate, up) of a packed tensor, in this case's layout
        first, second = t[..., :width], t[..., width:]
        return (first, second) if gate_first else (second, first)

    if packed:  # bias packed the same way; a zero up half where only the gate has a bias
        x = make_input((*shape[:-1], 2 * width), layout, dtype, device, generator).requires_grad_()
        packed_bias = None
        if biases != "none":
            gate_bias = bias(True).detach()
            up_bias = torch.zeros(width, dtype=dtype, device=device) if biases == "gate" else bias(True).detach()
            halves = [gate_bias, up_bias] if gate_first else [up_bias, gate_bias]
            packed_bias = torch.cat(halves).requires_grad_()
        inputs = [x, packed_bias]

        def reference(x, b):
            gate, up = split(with_bias(x, b))
            return gate_reference(gate, activation, params) * up

        y = fusedact.gated_packed(*inputs, activation=activation, gate_first=gate_first, **params)
        if activation == "sigmoid":  # the F.glu-compatible entry point gives the same result
            torch.testing.assert_close(fusedact.glu(*inputs), y, rtol=0, atol=0)
    else:
        gate = make_input(shape, layout, dtype, device, generator).requires_grad_()
        up = make_input(shape, layout, dtype, device, generator).requires_grad_()
        inputs = [gate, up, bias(biases != "none"), bias(biases == "both")]

        def reference(gate, up, gate_bias, up_bias):
            return gate_reference(with_bias(gate, gate_bias), activation, params) * with_bias(up, up_bias)

        y = fusedact.gated(*inputs, activation=activation, **params)
    grad_y = make_input(shape, "contiguous", dtype, device, generator)
    y.backward(grad_y)
    y_ref, grads_ref = float64_reference(reference, inputs, grad_y)

    # One floor for every output: fp32 cancellation scaled by the largest factor that multiplies it.
    scale = 1.0 + max(t.detach().abs().max().item() for t in inputs if t is not None and t.numel()) ** 2
    floor = 2e-6 * scale * max(1.0, grad_y.abs().max().item())
    assert_close(y, y_ref, floor, f"{activation} gated output")
    for index, (tensor, grad_ref) in enumerate(zip(inputs, grads_ref, strict=True)):
        if tensor is None:
            continue
        rows = grad_ref.numel() // grad_ref.shape[-1] if tensor.dim() == 1 else 1
        assert_close(tensor.grad, grad_ref, floor * rows, f"{activation} gated grad of input {index}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_one_rounding(case, dtype, device):
    """fp32 math, one round-to-nearest-even on store: the bf16/fp16 result is exactly the fp32 result of
    the same inputs (upcast) rounded by PyTorch."""
    if dtype == torch.bfloat16 and device == "cpu" and fusedact.get_cpu_backend() == "triton":
        pytest.skip("Triton's interpreter truncates fp32 to bf16 instead of rounding to nearest")
    _, function, params = case
    generator = torch.Generator().manual_seed(2)
    x = make_input((64, 33), "contiguous", dtype, device, generator)
    bias = make_input((33,), "contiguous", dtype, device, generator)
    low = getattr(fusedact, function)(x, bias, **params)
    high = getattr(fusedact, function)(x.float(), bias.float(), **params)
    assert torch.equal(low, high.to(dtype)), f"{function}: not one rounding of the fp32 result"


SPECIAL = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e20, -1e20, 3e38, -3e38, 1e-30, -1e-30, 60.0, -60.0,
           100.0, -100.0, 1000.0, -1000.0,
           3.0, -3.0, 6.0, 2.0, -0.5, -1e-6, -1e-4, 1.5, 10.0]  # fmt: skip
# (the last row: the hard family's kinks, softplus's thresholds, xielu's eps)


@pytest.mark.parametrize("case", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_special_values(case, device):
    """NaN propagates, +-inf give the limits, huge finite inputs give no spurious NaN/inf, -0.0 as PyTorch."""
    _, function, params = case
    x = torch.tensor(SPECIAL, dtype=torch.float32, device=device, requires_grad=True)
    y = getattr(fusedact, function)(x, **params)
    y.backward(torch.ones_like(y))
    y_ref, grad_ref, _, z = reference_single(x, None, function, params, torch.ones_like(y))
    if function in ("relu", "leaky_relu", "relu_squared", "heaviside", "relu6", "hardtanh"):  # selections: bitwise
        y_torch = reference_activation(x.detach().cpu(), function, params)
        torch.testing.assert_close(y.detach().cpu(), y_torch, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(y.detach().cpu()), torch.signbit(y_torch)), "signed zeros differ"
    assert_close(y, y_ref, cancellation_floor(z), f"{function} output")
    grad_floor = cancellation_floor(z) + saved_output_floor(function, y_ref, torch.float32, torch.ones_like(y))
    assert_close(x.grad, grad_ref, grad_floor, f"{function} grad")
    zeros = y_ref == 0  # signed zeros as the float64 reference (-0.0 in gives -0.0 out, as in PyTorch)
    assert torch.equal(torch.signbit(y.detach().cpu()[zeros]), torch.signbit(y_ref[zeros])), "signed zeros differ"
