"""The registered ops: opcheck, torch.compile, fp64 gradcheck, empty tensors, determinism, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fusedact
from fusedact import ops

OP_ACTIVATIONS = [("relu", 0.0), ("leaky_relu", 0.1), ("leaky_relu", -0.3), ("gelu", 0.0), ("gelu_tanh", 0.0),
                  ("swish", 1.0), ("swish", 0.5)]  # fmt: skip


def _randn(*shape, device, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)


def _opcheck_bias_act(x, bias, weight, activation, param, dim, weight2=None, param2=0.0):
    torch.library.opcheck(ops.bias_act, (x, bias, weight, weight2, activation, param, param2, dim))
    saved_is_output = ops.saves_output(activation, param)
    saved = ops.bias_act(x, bias, weight, weight2, activation, param, param2, dim) if saved_is_output else x
    detached = [None if t is None else t.detach() for t in (saved, bias, weight, weight2)]
    args = (torch.randn_like(x), *detached, activation, param, param2, dim, saved_is_output)
    torch.library.opcheck(ops.bias_act_backward, (*args, bias is not None, weight is not None))


@pytest.mark.parametrize("activation,param", OP_ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_bias_act(activation, param, with_bias, device):
    x = _randn(4, 9, device=device, requires_grad=True)
    bias = _randn(9, device=device, requires_grad=True) if with_bias else None
    _opcheck_bias_act(x, bias, None, activation, param, 1)


# Channel layouts (see fusedact._channels): NCHW (channels in rows), channels_last (channels in columns of
# the moved view, a channels-last result), a transposed 3-D tensor (copied), and a PReLU slope.
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "transposed"])
@pytest.mark.parametrize("weight_size", [None, 1, 3], ids=["noweight", "shared", "perchannel"])
def test_opcheck_channel_bias(layout, weight_size, device):
    x = _randn(2, 3, 4, 5, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = _randn(2, 5, 3, device=device).transpose(1, 2)
    x.requires_grad_()
    bias = _randn(3, device=device, requires_grad=True)
    weight = None if weight_size is None else _randn(weight_size, device=device).abs().requires_grad_()
    activation = "gelu" if weight is None else "prelu"
    _opcheck_bias_act(x, bias, weight, activation, 0.0, 1)


@pytest.mark.parametrize("activation,param,param2", [("hardtanh", -0.5, 2.0), ("softplus", 2.0, 3.0),
                                                     ("hardswish", 0.0, 0.0), ("hardsigmoid", 0.0, 0.0)])  # fmt: skip
def test_opcheck_two_float_parameters(activation, param, param2, device):
    x = _randn(4, 9, device=device, requires_grad=True)
    bias = _randn(9, device=device, requires_grad=True)
    _opcheck_bias_act(x, bias, None, activation, param, 1, param2=param2)


@pytest.mark.parametrize("weight_size", [1, 9], ids=["shared", "perchannel"])
def test_opcheck_two_learned_parameters(weight_size, device):
    """xIELU: alpha_p and alpha_n (weight, weight2), beta and eps (param, param2)."""
    x = _randn(4, 9, device=device, requires_grad=True)
    bias = _randn(9, device=device, requires_grad=True)
    alpha_p, alpha_n = (_randn(weight_size, device=device).abs().requires_grad_() for _ in range(2))
    _opcheck_bias_act(x, bias, alpha_p, "xielu", 0.5, 1, weight2=alpha_n, param2=-1e-6)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_gated(with_bias, device):
    gate, up = _randn(3, 8, device=device, requires_grad=True), _randn(3, 8, device=device, requires_grad=True)
    gate_bias = _randn(8, device=device, requires_grad=True) if with_bias else None
    up_bias = _randn(8, device=device, requires_grad=True) if with_bias else None
    for scale in (1.0, 0.7):  # a gate scale (Falcon-H1's gate_multiplier) runs another kernel variant
        torch.library.opcheck(ops.gated, (gate, up, gate_bias, up_bias, "swish", 1.0, 0.0, scale))
        detached = [None if t is None else t.detach() for t in (gate, up, gate_bias, up_bias)]
        args = (_randn(3, 8, device=device), *detached, "swish", 1.0, 0.0, scale, with_bias)
        torch.library.opcheck(ops.gated_backward, args)
    packed = _randn(3, 16, device=device, requires_grad=True)
    packed_bias = _randn(16, device=device, requires_grad=True) if with_bias else None
    torch.library.opcheck(ops.gated_packed, (packed, packed_bias, "swish", 1.0, 0.0, 0.7, True))
    args = (_randn(3, 8, device=device), packed.detach(), None if packed_bias is None else packed_bias.detach())
    torch.library.opcheck(ops.gated_packed_backward, (*args, "swish", 1.0, 0.0, 0.7, True, with_bias))


GRADCHECK_CASES = [("relu", {}), ("leaky_relu", {"negative_slope": -0.5}), ("gelu", {}),
                   ("gelu", {"approximate": "tanh"}), ("silu", {}), ("swish", {"beta": 2.0})]  # fmt: skip


@pytest.mark.parametrize("name,params", GRADCHECK_CASES)
def test_gradcheck_float64(name, params):
    """fp64 runs the fallback in fp64: finite differences agree with the analytic backward."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    x = (x + 0.1 * torch.sign(x)).detach().requires_grad_()  # keep relu's kink away from the samples
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    function = getattr(fusedact, name)
    assert torch.autograd.gradcheck(lambda x, b: function(x, b, **params), (x, torch.zeros_like(bias)))
    assert torch.autograd.gradcheck(lambda x, b: function(x, b, **params), (x, bias.detach().mul(0.01)
                                                                            .requires_grad_()))  # fmt: skip
    gate, up = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True).unbind(0)
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    biases = [torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(fusedact.swiglu, (gate, up, *biases))
    packed = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fusedact.swiglu_packed, (packed, torch.randn(8, dtype=torch.float64,
                                                                                 requires_grad=True)))  # fmt: skip


class _MLP(torch.nn.Module):
    """Linear -> (bias folded into) GELU -> Linear, and a SwiGLU MLP, as a model uses fusedact."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32, bias=False)
        self.up_bias = torch.nn.Parameter(torch.randn(32))
        self.gate_up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x):
        hidden = fusedact.gelu(self.up(x), self.up_bias, approximate="tanh")
        hidden = hidden + fusedact.swiglu_packed(self.gate_up(x))
        return self.down(fusedact.leaky_relu(hidden, negative_slope=0.2))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces the ops without graph breaks and matches eager fusedact."""
    torch.manual_seed(0)
    model = _MLP().to(device)
    x = torch.randn(5, 16, device=device)
    expected = model(x)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    actual = compiled(x)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected)
    for p, grad in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """The full inductor path on CPU (C++ codegen around our ops), once, with the fallback."""
    torch.manual_seed(0)
    model = _MLP()
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_eager_entry_matches_the_op(device):
    """In eager mode the public functions skip custom-op dispatch (an autograd.Function over the same
    implementation and formulas): bitwise the op's results, double backward included (test_double_backward.py
    holds both to PyTorch's second derivatives)."""
    x = _randn(6, 10, device=device, requires_grad=True)
    bias = _randn(10, device=device, requires_grad=True)
    grad_y = _randn(6, 10, device=device)
    y = fusedact.gelu(x, bias)
    assert "bias_act_function" in type(y.grad_fn).__name__
    y_op = ops.bias_act(x, bias, None, None, "gelu", 0.0, 0.0, 1)
    assert torch.equal(y, y_op)
    grads = torch.autograd.grad(y, (x, bias), grad_y, retain_graph=True)
    grads_op = torch.autograd.grad(y_op, (x, bias), grad_y, retain_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_op, strict=True))
    second = []
    for output in (y, y_op):
        grad_x, _ = torch.autograd.grad(output, (x, bias), grad_y.requires_grad_(), create_graph=True)
        second.append(torch.autograd.grad(grad_x.square().sum(), (x, bias, grad_y)))
    assert all(torch.equal(a, b) for a, b in zip(*second, strict=True))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 5), (0,)])
def test_empty(shape, device):
    x = torch.empty(shape, device=device, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    y = fusedact.gelu(x, bias)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias), rtol=0, atol=0)
    if shape[-1] % 2 == 0:
        packed = torch.empty(shape, device=device, requires_grad=True)
        out = fusedact.swiglu_packed(packed, torch.randn(shape[-1], device=device))
        assert out.shape == (*shape[:-1], shape[-1] // 2)


def test_zero_dim(device):
    x = torch.tensor(-1.5, device=device, requires_grad=True)
    y = fusedact.silu(x)
    assert y.shape == ()
    torch.testing.assert_close(y, F.silu(x.detach()))
    with pytest.raises(ValueError, match="0-D"):
        fusedact.relu(x, torch.zeros(1, device=device))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_backward_is_deterministic(activation, device):
    """Bias gradients are reduced in a fixed order: two backward passes are bitwise identical."""
    x = torch.randn(300, 130, device=device, requires_grad=True)
    bias = torch.randn(130, device=device, requires_grad=True)
    grad_y = torch.randn(300, 65 if activation == "swiglu" else 130, device=device)
    results = []
    for _ in range(2):
        x.grad = bias.grad = None
        y = fusedact.bias_act(x, bias, activation)
        y.backward(grad_y)
        results.append((x.grad.clone(), bias.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_saved_tensors_are_minimal(device):
    """ReLU keeps its output, GELU its pre-bias input, SwiGLU gate and up: nothing bigger than eager keeps."""
    x = torch.randn(4, 8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    for function, keeps in [(fusedact.relu, "output"), (fusedact.gelu, "input")]:
        saved = []

        def keep(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            y = function(x, bias)
        big = [t for t in saved if t.shape == x.shape]
        assert len(big) == 1, f"{function.__name__} saved {len(big)} full-size tensors"
        expected = y if keeps == "output" else x
        assert big[0].data_ptr() == expected.data_ptr(), f"{function.__name__} should keep its {keeps}"


BAD_INPUTS = [
    (lambda d: fusedact.relu(torch.ones(3, 4, dtype=torch.int32, device=d)), TypeError, "x must be float16"),
    (lambda d: fusedact.gelu(torch.ones(3, 4, dtype=torch.bool, device=d)), TypeError, "x must be float16"),
    (
        lambda d: fusedact.relu(torch.ones(3, 4, device=d), torch.ones(5, device=d)),
        ValueError,
        r"bias must have shape \(4,\)",
    ),  # noqa: E501
    (
        lambda d: fusedact.relu(torch.ones(3, 4, device=d), torch.ones(3, 4, device=d)),
        ValueError,
        "bias must have shape",
    ),  # noqa: E501
    (
        lambda d: fusedact.relu(torch.ones(3, 4, device=d), torch.ones(4, dtype=torch.float16, device=d)),
        TypeError,
        "bias dtype",
    ),  # noqa: E501
    (lambda d: fusedact.relu(torch.ones(3, 4, device=d), torch.ones(4, device="meta")), ValueError, "bias is on meta"),  # noqa: E501
    (lambda d: fusedact.relu([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda d: fusedact.swiglu(torch.ones(3, 4, device=d), torch.ones(3, 5, device=d)), ValueError, "same shape"),
    (
        lambda d: fusedact.swiglu(torch.ones(3, 4, device=d), torch.ones(3, 4, device=d), torch.ones(5, device=d)),
        ValueError,
        "gate_bias must have shape",
    ),  # fmt: skip
    (lambda d: fusedact.swiglu_packed(torch.ones(3, 5, device=d)), ValueError, "even last dimension"),
    (
        lambda d: fusedact.swiglu_packed(torch.ones(3, 4, device=d), torch.ones(2, device=d)),
        ValueError,
        r"shape \(4,\)",
    ),  # noqa: E501
    (lambda d: fusedact.gelu(torch.ones(3, device=d), approximate="fast"), ValueError, "approximate must be"),
    (lambda d: fusedact.bias_act(torch.ones(3, device=d), None, "softsign"), ValueError, "unknown activation"),
    (lambda d: fusedact.bias_act(torch.ones(3, device=d), None, "relu", beta=2), TypeError, "unexpected keyword"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input(call, error, message, device):
    with pytest.raises(error, match=message):
        call(device)


def test_cpu_backend_switch():
    with pytest.raises(ValueError, match="backend must be"):
        fusedact.set_cpu_backend("numpy")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_than_2_31_elements():
    """int64 offsets: a bf16 tensor of 2^31 + 2048 elements (about 4.3 GB each for input, output, grads)."""
    if torch.cuda.get_device_properties(0).total_memory < 30 * 2**30:
        pytest.skip("needs 30 GB of GPU memory")
    rows, cols = 2**21 + 2, 1024
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y = fusedact.relu(x, bias)
    tail = slice(rows - 3, rows)  # rows past element 2^31
    expected = torch.relu(x[tail].float() + bias.float()).to(torch.bfloat16)
    assert torch.equal(y[tail], expected)
    del y
    x.requires_grad_()
    bias.requires_grad_()
    fusedact.silu(x, bias).backward(torch.ones_like(x))
    z = (x[tail].detach().float() + bias.detach().float()).requires_grad_()
    torch.nn.functional.silu(z).sum().backward()
    torch.testing.assert_close(x.grad[tail].float(), z.grad, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_than_2_31_elements_channels_in_rows():
    """int64 offsets for the NCHW layout: row % C and the per-row partial sums past element 2^31."""
    if torch.cuda.get_device_properties(0).total_memory < 30 * 2**30:
        pytest.skip("needs 30 GB of GPU memory")
    batch, channels, height, width = 2**11 + 1, 16, 256, 256  # 2^31 + 2^20 elements
    x = torch.randn(batch, channels, height, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.full((channels,), 0.25, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fusedact.prelu(x, weight)
    last = x[-1:].detach().float()
    assert torch.equal(y[-1:], torch.nn.functional.prelu(last, weight.detach().float()).to(torch.bfloat16))
    del y
    fusedact.prelu(x, weight).backward(torch.ones_like(x))
    assert torch.equal(x.grad[-1:], torch.where(last > 0, 1.0, 0.25).to(torch.bfloat16))
    expected = torch.where(x.detach() > 0, 0.0, x.detach().float()).sum(dim=(0, 2, 3))
    torch.testing.assert_close(weight.grad.float(), expected, rtol=1e-2, atol=1.0)


@pytest.mark.parametrize(
    "triton_version,numpy_version,problem",
    [("3.1.0", "2.0.0", "loses its stores"), ("3.1.0", "1.26.4", None), ("3.6.0", "2.4.6", "numpy<2.4"),
     ("3.6.0", "2.3.5", None), ("3.7.0", "2.4.6", None), ("3.8.0+git", "2.4.6", None)],
)  # fmt: skip
def test_interpreter_problem(monkeypatch, triton_version, numpy_version, problem):
    """Version pairs whose interpreter gives wrong answers or breaks are named, never tested through."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    ops.interpreter_problem.cache_clear()
    try:
        found = ops.interpreter_problem()
    finally:
        monkeypatch.undo()
        ops.interpreter_problem.cache_clear()
    assert (found is None) if problem is None else (problem in found), found
