"""Every tensor argument of every op, in every layout a caller can hand over, against float64 references.

A kernel addresses its tensors by pointer and strides; a launcher that passes a strided, expanded or offset
tensor as if it were dense reads the wrong numbers without any error (issue 12: a ``[::2]`` bias gave
``[1, 100, 2]`` for ``[1, 2, 3]``). So each argument in turn (x, bias, PReLU's weight, xIELU's alpha_p and
alpha_n, gate, up, gate_bias, up_bias, the packed x and its bias, softmax's bias, a channel bias on dim 1,
and the upstream gradient ``grad_y`` of the backward) is handed over, with the others contiguous, as:

- ``strided``: every other element of the last dimension (``[..., ::2]``, a column stride of 2);
- ``expanded``: stride 0 along the first dimension (``expand``, as ``y.sum().backward()`` hands ``grad_y``);
- ``offset``: dense but starting past the start of its storage;
- ``channels_last``: a 4-D argument in ``torch.channels_last``;

in fp32 and bf16, on every backend of this machine (conftest.py). Outputs and every gradient are compared
with PyTorch's ops in float64 on the same values (``reference.assert_close``: 1 ULP of bf16, 8 fp32 ULPs)
plus an fp32 floor of 2e-6 times the largest product of magnitudes that enters an element (inputs are
standard normal, so |z| < 6: the floor covers fp32's cancellation in ``1 + erf`` and the softmax's row
sums), times the number of rows summed for a per-channel gradient.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from test_functional import saved_output_floor
from test_softmax import grad_floor as softmax_grad_floor

import fusedact
from reference import assert_close, float64_reference, xielu_reference

DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["strided", "expanded", "offset", "channels_last"]


def make(shape, layout, dtype, device, generator):
    """A standard-normal tensor of ``shape`` in ``layout`` (``contiguous`` or one of ``LAYOUTS``)."""

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64).to(dtype).to(device)

    if layout == "contiguous":
        return randn(*shape)
    if layout == "strided":
        return randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    if layout == "expanded":
        return randn(1, *shape[1:]).expand(shape)
    if layout == "offset":
        count = 1
        for size in shape:
            count *= size
        return randn(count + 3)[3:].view(shape)
    if layout == "channels_last":
        return randn(*shape).contiguous(memory_format=torch.channels_last)
    raise ValueError(layout)


def along(t, ndim, dim):
    """A 1-D tensor shaped to broadcast along ``dim`` of an ``ndim``-D tensor."""
    return t.view([-1 if d == dim % ndim else 1 for d in range(ndim)])


class Op(NamedTuple):
    """``fused(**arguments)`` against ``reference(**float64 copies)``; ``channels`` names the per-channel
    arguments (their gradients are sums over rows). ``saved_output_floor(y_ref, arguments, grad_y, dtype)``:
    for an op whose backward reads its output rounded to ``dtype`` (as eager's does), the gradient error
    that rounding carries (test_functional.py and test_softmax.py derive it)."""

    name: str
    shapes: dict
    fused: Callable
    reference: Callable
    channels: tuple = ()
    saved_output_floor: Optional[Callable] = None


def _sigmoid_floor(y_ref, arguments, grad_y, dtype):
    return saved_output_floor("sigmoid", y_ref, dtype, grad_y)


def _softmax_floor(dim, log):
    def floor(y_ref, arguments, grad_y, dtype):
        z = arguments["x"] + along(arguments["bias"], arguments["x"].dim(), dim)
        return softmax_grad_floor(y_ref, z, grad_y, dim, log, dtype)

    return floor


_EPS32 = float(torch.tensor(-1e-6))  # fusedact.xielu's default eps, as it holds it (fp32)


def _gelu_reference(x, bias):
    return F.gelu(x + bias)


def _glu_halves(z):
    gate, up = z.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


OPS = [
    Op("bias_act", {"x": (6, 10), "bias": (10,)}, lambda x, bias: fusedact.gelu(x, bias), _gelu_reference, ("bias",)),
    Op("bias_act_4d", {"x": (2, 3, 4, 6), "bias": (6,)}, lambda x, bias: fusedact.gelu(x, bias), _gelu_reference,
       ("bias",)),
    Op("sigmoid", {"x": (6, 10), "bias": (10,)}, lambda x, bias: fusedact.sigmoid(x, bias),
       lambda x, bias: torch.sigmoid(x + bias), ("bias",), _sigmoid_floor),
    Op("channel_bias", {"x": (2, 6, 3, 4), "bias": (6,)}, lambda x, bias: fusedact.bias_act(x, bias, "silu", dim=1),
       lambda x, bias: F.silu(x + along(bias, 4, 1)), ("bias",)),
    Op("prelu", {"x": (2, 6, 3, 4), "weight": (6,), "bias": (6,)},
       lambda x, weight, bias: fusedact.prelu(x, weight, bias),
       lambda x, weight, bias: F.prelu(x + along(bias, 4, 1), weight), ("weight", "bias")),
    Op("xielu", {"x": (6, 10), "alpha_p": (10,), "alpha_n": (10,), "bias": (10,)},
       lambda x, alpha_p, alpha_n, bias: fusedact.xielu(x, bias, alpha_p, alpha_n),
       lambda x, alpha_p, alpha_n, bias: xielu_reference(x + bias, alpha_p, alpha_n, 0.5, _EPS32),
       ("alpha_p", "alpha_n", "bias")),
    Op("gated", {"gate": (6, 10), "up": (6, 10), "gate_bias": (10,), "up_bias": (10,)},
       lambda gate, up, gate_bias, up_bias: fusedact.swiglu(gate, up, gate_bias, up_bias),
       lambda gate, up, gate_bias, up_bias: F.silu(gate + gate_bias) * (up + up_bias), ("gate_bias", "up_bias")),
    Op("packed", {"x": (6, 20), "bias": (20,)},
       lambda x, bias: fusedact.geglu_packed(x, bias, approximate="tanh"),
       lambda x, bias: _glu_halves(x + bias), ("bias",)),
    Op("softmax", {"x": (6, 10), "bias": (10,)}, lambda x, bias: fusedact.softmax(x, bias),
       lambda x, bias: torch.softmax(x + bias, -1), ("bias",), _softmax_floor(-1, False)),
    Op("log_softmax_dim1", {"x": (3, 10, 4), "bias": (10,)}, lambda x, bias: fusedact.log_softmax(x, bias, dim=1),
       lambda x, bias: torch.log_softmax(x + along(bias, 3, 1), 1), ("bias",), _softmax_floor(1, True)),
]  # fmt: skip


def _output_shape(op):
    return tuple(op.reference(**{k: torch.zeros(s, dtype=torch.float64) for k, s in op.shapes.items()}).shape)


def _cases():
    """(op, argument, layout) for every argument of every op (and grad_y) in every layout that applies."""
    for op in OPS:
        shapes = {**op.shapes, "grad_y": _output_shape(op)}
        for argument, shape in shapes.items():
            for layout in LAYOUTS:
                if layout == "channels_last" and len(shape) != 4:
                    continue
                yield pytest.param(op, argument, layout, id=f"{op.name}-{argument}-{layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op,argument,layout", list(_cases()))
def test_argument_layout(op, argument, layout, dtype, device):
    generator = torch.Generator().manual_seed(0)
    arguments = {
        name: make(shape, layout if name == argument else "contiguous", dtype, device, generator).requires_grad_()
        for name, shape in op.shapes.items()
    }
    grad_y = make(_output_shape(op), layout if argument == "grad_y" else "contiguous", dtype, device, generator)

    y = op.fused(**arguments)
    y.backward(grad_y)

    names = list(arguments)
    y_ref, grads_ref = float64_reference(
        lambda *tensors: op.reference(**dict(zip(names, tensors, strict=True))), list(arguments.values()), grad_y
    )
    assert y.shape == y_ref.shape and y.dtype == dtype
    # The floor: 2e-6 per unit of the largest product of magnitudes entering an element (module docstring).
    magnitude = max(t.detach().abs().max().item() for t in arguments.values())
    scale = (1.0 + magnitude) ** 2 * max(1.0, grad_y.abs().max().item())
    floor = 2e-6 * scale
    where = f"{op.name} with {argument} {layout} ({dtype})"
    assert_close(y, y_ref, floor, f"{where}: output")
    grad_floor = torch.tensor(floor, dtype=torch.float64)
    if op.saved_output_floor is not None:
        values = {name: t.detach().double().cpu() for name, t in arguments.items()}
        grad_floor = grad_floor + op.saved_output_floor(y_ref, values, grad_y.double().cpu(), dtype)
    largest = max(t.numel() for t in arguments.values())
    for name, grad_ref in zip(names, grads_ref, strict=True):
        assert arguments[name].grad is not None, f"{where}: no gradient for {name}"
        if name in op.channels:  # a sum over rows: each row's floor, at most the largest one
            allowed = grad_floor.max() * (largest // arguments[name].numel())
        else:
            allowed = grad_floor.expand(grad_ref.shape) if grad_floor.dim() else grad_floor
        assert_close(arguments[name].grad, grad_ref, allowed, f"{where}: gradient of {name}")


def test_issue_example_strided_bias(device):
    """Issue 12's reproduction, exactly: a ``[::2]`` bias is read by its stride."""
    bias = torch.tensor([1.0, 100.0, 2.0, 100.0, 3.0, 100.0], device=device)[::2]
    y = fusedact.relu(torch.zeros(2, 3, device=device), bias)
    assert torch.equal(y.cpu(), torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_layout(layout, device):
    """The layout fusedact promises (fusedact.differences 'output_layout'): contiguous, except that a
    channels-last input with a channel bias stays channels-last; a transposed input gives a contiguous
    output where PyTorch's elementwise op would keep the transpose."""
    x = make((2, 6, 3, 4), layout, torch.float32, device, torch.Generator().manual_seed(1))
    bias = torch.randn(6, device=device)
    y = fusedact.bias_act(x, bias, "relu", dim=1)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format)
    transposed = torch.randn(5, 7, device=device).t()
    assert fusedact.relu(transposed).is_contiguous() and not F.relu(transposed).is_contiguous()
