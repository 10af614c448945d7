"""Double backward (``create_graph=True``): gradient penalties, Hessian-vector products, meta-learning.

When grad mode is on inside the backward and one of its tensors requires grad, every op's backward runs
the fallback's differentiable PyTorch formulas instead of the kernel (``ops.differentiating_backward``),
on the eager ``autograd.Function`` path and on the registered op's path alike; ordinary training keeps the
kernel. Held to PyTorch's own second derivatives:

- ``gradgradcheck`` in float64 (fp64 always runs the fallback, whatever the backend) for every activation,
  the gated ops, PReLU (its weight too) and softmax/log_softmax, with and without a bias;
- on every backend of this machine in fp32: the issue's example ``y = f(x * w)``, where only a *saved*
  tensor requires grad (what ``once_differentiable`` got silently wrong), and a Hessian-vector product,
  where the upstream gradient requires grad, against the same computation in float64 with PyTorch's ops;
- a WGAN-GP gradient penalty through a leaky-ReLU discriminator, against the same model in float64.

fp32 tolerance: every number below is a product of a few fp32 roundings of O(1) values (inputs are drawn
in [-2, 2], weights near 1), summed over at most 16 terms: relative 1e-5 of the largest magnitude covers
it with margin (u = 6e-8 per rounding times ~20 roundings, times the sum of magnitudes).
"""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import fusedact
from fusedact import ops
from reference import SINGLE_CASES, gate_reference, reference_activation, xielu_reference

# PyTorch's silu_backward and mish_backward have no derivative: the fallback takes differentiable formulas
# instead when grad mode is on in backward (torch_ext/_fallback.py), so every case is twice differentiable.
NOT_TWICE_DIFFERENTIABLE: set[str] = set()
_FALLBACK_REASON = "fallback: aten.silu_backward / aten.mish_backward have no derivative (fallback owner's fix)"


def _known(name):
    marks = [pytest.mark.xfail(strict=True, raises=RuntimeError, reason=_FALLBACK_REASON)]
    return marks if name in NOT_TWICE_DIFFERENTIABLE else []


def _away_from_kinks(*shape, generator, dtype=torch.float64):
    """Values in +-[0.3, 2]: finite differences (eps 1e-6) never straddle relu's or the step's kink at 0."""
    magnitude = 0.3 + 1.7 * torch.rand(*shape, generator=generator, dtype=dtype)
    sign = torch.where(torch.rand(*shape, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    return magnitude * sign


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


SINGLE_PARAMS = [pytest.param(case, marks=_known(case[1]), id=case[0]) for case in SINGLE_CASES]


@pytest.mark.parametrize("case", SINGLE_PARAMS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_single(case, with_bias):
    _, function, params = case
    generator = torch.Generator().manual_seed(0)
    # z = x + bias away from 0: x away from 0 and a small bias
    x = _away_from_kinks(3, 5, generator=generator)
    bias = 0.1 * torch.rand(5, generator=generator, dtype=torch.float64) if with_bias else None
    if bias is not None:
        x = x + torch.sign(x) * 0.1  # |x| >= 0.4 > |bias|
    x, bias = _leaves(x, bias)

    def f(x, b):
        return getattr(fusedact, function)(x, b, **params)

    assert torch.autograd.gradgradcheck(f, (x, bias))


GATED = [
    ("swiglu", lambda g, u, gb, ub: fusedact.swiglu(g, u, gb, ub)),
    ("geglu", lambda g, u, gb, ub: fusedact.geglu(g, u, gb, ub)),
    ("geglu_tanh", lambda g, u, gb, ub: fusedact.geglu(g, u, gb, ub, approximate="tanh")),
    ("reglu", lambda g, u, gb, ub: fusedact.reglu(g, u, gb, ub)),
    ("gated_sigmoid", lambda g, u, gb, ub: fusedact.gated(g, u, gb, ub, activation="sigmoid")),
    ("gated_elu", lambda g, u, gb, ub: fusedact.gated(g, u, gb, ub, activation="elu", alpha=0.7)),
]


@pytest.mark.parametrize("name,function", [pytest.param(*g, marks=_known(g[0]), id=g[0]) for g in GATED])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_gated(name, function, with_bias):
    generator = torch.Generator().manual_seed(1)
    gate, up = _away_from_kinks(2, 3, 4, generator=generator)
    biases = [0.1 * torch.rand(4, generator=generator, dtype=torch.float64) for _ in range(2)]
    if not with_bias:
        biases = [None, None]
    assert torch.autograd.gradgradcheck(function, tuple(_leaves(gate, up, *biases)))


PACKED = [
    ("swiglu", lambda x, b: fusedact.swiglu_packed(x, b)),
    ("geglu", lambda x, b: fusedact.geglu_packed(x, b, approximate="tanh")),
    ("reglu", lambda x, b: fusedact.reglu_packed(x, b)),
    ("glu", lambda x, b: fusedact.glu(x, b)),
]


@pytest.mark.parametrize("name,function", [pytest.param(*p, marks=_known(p[0]), id=p[0]) for p in PACKED])
def test_gradgradcheck_packed(name, function):
    generator = torch.Generator().manual_seed(2)
    x = _away_from_kinks(3, 8, generator=generator)
    bias = 0.1 * torch.rand(8, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(function, tuple(_leaves(x, bias)))
    assert torch.autograd.gradgradcheck(lambda x: function(x, None), tuple(_leaves(x)))


@pytest.mark.parametrize("weight_size", [1, 3], ids=["shared", "perchannel"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_prelu(weight_size, with_bias):
    """The slope's gradient is itself differentiated (d/dw of grad_x is 1 on the negative side)."""
    generator = torch.Generator().manual_seed(3)
    x = _away_from_kinks(2, 3, 4, generator=generator)
    weight = torch.rand(weight_size, generator=generator, dtype=torch.float64) - 0.3
    bias = 0.1 * torch.rand(3, generator=generator, dtype=torch.float64) if with_bias else None
    if bias is not None:
        x = x + torch.sign(x) * 0.1
    assert torch.autograd.gradgradcheck(fusedact.prelu, tuple(_leaves(x, weight, bias)))


def _xielu_coefficients(size, generator, dtype=torch.float64):
    """alpha_p in [0.3, 1.3], alpha_n in [0.6, 1.6] (above beta = 0.5, as transformers' always is)."""
    return (
        0.3 + torch.rand(size, generator=generator, dtype=dtype),
        0.6 + torch.rand(size, generator=generator, dtype=dtype),
    )


@pytest.mark.parametrize("size", [1, 5], ids=["shared", "perchannel"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_xielu(size, with_bias):
    """xIELU's coefficients' gradients are themselves differentiated (in z, and in alpha_p, alpha_n)."""
    generator = torch.Generator().manual_seed(10)
    x = _away_from_kinks(3, 5, generator=generator)
    alpha_p, alpha_n = _xielu_coefficients(size, generator)
    bias = 0.1 * torch.rand(5, generator=generator, dtype=torch.float64) if with_bias else None
    if bias is not None:
        x = x + torch.sign(x) * 0.1

    def f(x, alpha_p, alpha_n, bias):
        return fusedact.xielu(x, bias, alpha_p, alpha_n, beta=0.5, eps=-1e-6)

    assert torch.autograd.gradgradcheck(f, tuple(_leaves(x, alpha_p, alpha_n, bias)))


@pytest.mark.parametrize("size", [1, 7], ids=["shared", "perchannel"])
def test_second_order_xielu_coefficients(size, device):
    """A penalty on the gradients of x and of both coefficients reaches x, alpha_p, alpha_n and the bias, as
    float64 autograd through transformers' formula."""
    generator = torch.Generator().manual_seed(11)
    x64 = _away_from_kinks(4, 7, generator=generator, dtype=torch.float64) * 2
    alpha_p64, alpha_n64 = _xielu_coefficients(size, generator)
    bias64 = 0.1 * torch.rand(7, generator=generator, dtype=torch.float64)

    def run(xielu, dtype, device):
        leaves = _leaves(*(t.to(dtype).to(device) for t in (x64, alpha_p64, alpha_n64, bias64)))
        y = xielu(*leaves)
        first = torch.autograd.grad(y.square().sum(), leaves[:3], create_graph=True)
        sum(g.square().sum() for g in first).backward()
        return [y, *first, *(t.grad for t in leaves)]

    def reference(x, alpha_p, alpha_n, bias):
        return xielu_reference(x + bias, alpha_p, alpha_n, 0.5, -1e-6)

    actual = run(lambda x, p, n, b: fusedact.xielu(x, b, p, n, beta=0.5, eps=-1e-6), torch.float32, device)
    expected = run(reference, torch.float64, "cpu")
    names = ["y", "dx", "dalpha_p", "dalpha_n", "x", "alpha_p", "alpha_n", "bias"]
    for name, a, e in zip(names, actual, expected, strict=True):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-5, atol=1e-5 * (1 + scale), msg=name)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_gradgradcheck_softmax(log, dim, with_bias):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    bias = torch.randn(x.shape[dim], generator=generator, dtype=torch.float64) if with_bias else None
    function = fusedact.log_softmax if log else fusedact.softmax
    assert torch.autograd.gradgradcheck(lambda x, b: function(x, b, dim=dim), tuple(_leaves(x, bias)))


# ---------------------------------------------------------------------------------------------------
# On every backend, fp32, against PyTorch's second derivatives in float64.


def _second_order(function, x, w, bias, probe):
    """The issue's example and a Hessian-vector product, with the gradients of everything that requires grad.

    ``y = function(x * w, bias)``; ``(dx, dbias) = grad(y, (x, bias), probe, create_graph=True)`` where the
    upstream ``probe`` itself requires grad; then ``y.sum() + (dx ** 2).sum() + (dbias ** 2).sum()``
    backwards into x, w, bias and probe. Returns {name: tensor}."""
    y = function(x * w, bias)
    inputs = {"x": x, "bias": bias}
    inputs = {name: t for name, t in inputs.items() if t is not None}
    first = torch.autograd.grad(y, list(inputs.values()), probe, create_graph=True)
    loss = y.sum() + sum((g**2).sum() for g in first)
    leaves = {name: t for name, t in {"x": x, "w": w, "bias": bias, "probe": probe}.items() if t is not None}
    second = torch.autograd.grad(loss, list(leaves.values()))
    results = {"y": y}
    results.update({f"d{name}": g for name, g in zip(inputs, first, strict=True)})
    results.update({f"grad of {name}": g for name, g in zip(leaves, second, strict=True)})
    return results


def _compare_second_order(fused, reference, shapes, device, seed):
    generator = torch.Generator().manual_seed(seed)
    x_shape, w_shape, bias_shape = shapes
    x = _away_from_kinks(*x_shape, generator=generator)
    w = 1.0 + 0.2 * torch.rand(*w_shape, generator=generator, dtype=torch.float64)  # keeps z = x w off 0
    bias = None if bias_shape is None else 0.1 * torch.rand(*bias_shape, generator=generator, dtype=torch.float64)
    if bias is not None:
        x = x + torch.sign(x) * 0.15
    probe_shape = reference(x * w, bias).shape
    probe = torch.randn(*probe_shape, generator=generator, dtype=torch.float64)

    def run(function, dtype, device):
        tensors = [None if t is None else t.to(dtype).to(device) for t in (x, w, bias, probe)]
        return _second_order(function, *_leaves(*tensors))

    actual = run(fused, torch.float32, device)
    expected = run(reference, torch.float64, "cpu")
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        scale = e.abs().max().item() if e.numel() else 0.0
        torch.testing.assert_close(
            actual[name].double().cpu(), e, rtol=1e-5, atol=1e-5 * (1.0 + scale), msg=lambda m, n=name: f"{n}: {m}"
        )


SECOND_ORDER_SINGLE = [
    pytest.param(case, marks=_known(case[1]), id=case[0]) for case in SINGLE_CASES if case[1] != "heaviside"
]


@pytest.mark.parametrize("case", SECOND_ORDER_SINGLE)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_second_order_single(case, with_bias, device):
    _, function, params = case

    def fused(z, b):
        return getattr(fusedact, function)(z, b, **params)

    def reference(z, b):
        return reference_activation(z if b is None else z + b, function, params)

    _compare_second_order(fused, reference, ((4, 7), (7,), (7,) if with_bias else None), device, seed=5)


@pytest.mark.parametrize("straight_through", [False, True], ids=["zero", "straight_through"])
def test_second_order_heaviside(straight_through, device):
    """The step's gradient (0, or the incoming gradient) does not depend on x: its derivative in x is 0, and
    in the incoming gradient 0 (a constant zero) or 1."""
    x = torch.randn(4, 7, device=device, requires_grad=True)
    probe = torch.randn(4, 7, device=device, requires_grad=True)
    y = fusedact.heaviside(x, value=0.5, straight_through=straight_through)
    (dx,) = torch.autograd.grad(y, x, probe, create_graph=True)
    if not straight_through:
        assert not dx.any() and not dx.requires_grad
        return
    assert torch.equal(dx, probe)
    grad_x, grad_probe = torch.autograd.grad(dx.sum(), (x, probe), allow_unused=True, materialize_grads=True)
    assert torch.equal(grad_x, torch.zeros_like(x)) and torch.equal(grad_probe, torch.ones_like(probe))


@pytest.mark.parametrize("name,activation,params", [
    pytest.param("swiglu", "silu", {}, marks=_known("swiglu"), id="swiglu"),
    pytest.param("geglu", "gelu", {"approximate": "tanh"}, id="geglu_tanh"),
    pytest.param("reglu", "relu", {}, id="reglu"),
    pytest.param("glu", "sigmoid", {}, id="gated_sigmoid"),
])  # fmt: skip
@pytest.mark.parametrize("packed", [False, True], ids=["two-input", "packed"])
def test_second_order_gated(name, activation, params, packed, device):
    if packed:

        def fused(z, b):
            return fusedact.gated_packed(z, b, activation=activation, **params)

        def reference(z, b):
            gate, up = (z if b is None else z + b).chunk(2, dim=-1)
            return gate_reference(gate, activation, params) * up

        shapes = ((4, 8), (8,), (8,))
    else:  # the gate and up halves of one input, passed as two tensors

        def fused(z, b):
            gate, up = z.chunk(2, dim=-1)
            gate_bias, up_bias = (None, None) if b is None else b.chunk(2)
            return fusedact.gated(gate, up, gate_bias, up_bias, activation=activation, **params)

        def reference(z, b):
            gate, up = (z if b is None else z + b).chunk(2, dim=-1)
            return gate_reference(gate, activation, params) * up

        shapes = ((4, 8), (8,), (8,))
    _compare_second_order(fused, reference, shapes, device, seed=6)


@pytest.mark.parametrize("weight_size", [1, 3], ids=["shared", "perchannel"])
def test_second_order_prelu_weight(weight_size, device):
    """PReLU's slope as the parameter ``w`` that multiplies x: the penalty's gradient reaches it."""
    generator = torch.Generator().manual_seed(7)
    x64 = _away_from_kinks(4, 3, 5, generator=generator)
    slope64 = torch.rand(weight_size, generator=generator, dtype=torch.float64) - 0.3
    bias64 = 0.1 * torch.rand(3, generator=generator, dtype=torch.float64)

    def run(prelu, dtype, device):
        x, slope, bias = _leaves(*(t.to(dtype).to(device) for t in (x64, slope64, bias64)))
        y = prelu(x, slope, bias)
        dx, dslope = torch.autograd.grad(y.square().sum(), (x, slope), create_graph=True)
        (dx.square().sum() + dslope.square().sum()).backward()
        return y, dx, dslope, x.grad, slope.grad, bias.grad

    def reference(x, slope, bias):
        return F.prelu(x + bias.view(3, 1), slope)

    actual = run(fusedact.prelu, torch.float32, device)
    expected = run(reference, torch.float64, "cpu")
    for name, a, e in zip(["y", "dx", "dslope", "x", "slope", "bias"], actual, expected, strict=True):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-5, atol=1e-5 * (1 + scale), msg=name)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_second_order_softmax(log, device):
    function = fusedact.log_softmax if log else fusedact.softmax

    def reference(z, b):
        z = z if b is None else z + b
        return torch.log_softmax(z, -1) if log else torch.softmax(z, -1)

    _compare_second_order(function, reference, ((4, 7), (7,), (7,)), device, seed=8)


class _Discriminator(torch.nn.Module):
    """A WGAN critic: bias-free Linears with the bias added inside a leaky ReLU (fusedact) or before it."""

    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.fc1 = torch.nn.Linear(6, 16, bias=False)
        self.b1 = torch.nn.Parameter(0.1 * torch.randn(16))
        self.fc2 = torch.nn.Linear(16, 16, bias=False)
        self.b2 = torch.nn.Parameter(0.1 * torch.randn(16))
        self.out = torch.nn.Linear(16, 1)

    def act(self, h, b):
        return fusedact.leaky_relu(h, b, 0.2) if self.fused else F.leaky_relu(h + b, 0.2)

    def forward(self, x):
        return self.out(self.act(self.fc2(self.act(self.fc1(x), self.b1)), self.b2))


def _wgan_gp_step(critic, real, fake, alpha):
    """The critic's loss with the gradient penalty 10 (||grad_x D(x_hat)|| - 1)^2 (Gulrajani et al., 2017)."""
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
    (grad_x,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    penalty = 10.0 * ((grad_x.norm(2, dim=1) - 1) ** 2).mean()
    loss = critic(fake).mean() - critic(real).mean() + penalty
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in critic.named_parameters()}


def test_wgan_gradient_penalty(device):
    """Every parameter gradient of a WGAN-GP critic step equals the eager float64 model's (the penalty's
    gradient runs through the leaky ReLUs' backward, with the upstream gradient requiring grad)."""
    torch.manual_seed(9)
    fused = _Discriminator(fused=True)
    eager = copy.deepcopy(fused)
    eager.fused = False
    real, fake, alpha = torch.randn(8, 6), torch.randn(8, 6), torch.rand(8, 1)
    loss, grads = _wgan_gp_step(fused.to(device), *(t.to(device) for t in (real, fake, alpha)))
    expected_loss, expected = _wgan_gp_step(eager.double(), real.double(), fake.double(), alpha.double())
    torch.testing.assert_close(loss.double().cpu(), expected_loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad.double().cpu(), expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
    assert expected["fc1.weight"].abs().max() > 0.1  # the penalty's gradient is there to be checked


# ---------------------------------------------------------------------------------------------------
# Both entries, and where the kernel still runs


def _softmax_op(x, b):
    return importlib.import_module("fusedact.softmax").softmax(x, b, x.dim() - 1, False)


def _slope(x):
    return torch.linspace(-0.5, 0.5, 8, device=x.device)


def _alphas(x):
    return torch.linspace(0.3, 1.0, 8, device=x.device), torch.linspace(0.6, 1.2, 8, device=x.device)


PATHS = [
    ("bias_act", lambda x, b: fusedact.gelu(x, b), lambda x, b: ops.bias_act(x, b, None, None, "gelu", 0.0, 0.0, 1)),
    ("prelu", lambda x, b: fusedact.prelu(x, _slope(x), b),
     lambda x, b: ops.bias_act(x, b, _slope(x), None, "prelu", 0.0, 0.0, 1)),
    ("xielu", lambda x, b: fusedact.xielu(x, b, *_alphas(x), beta=0.5, eps=-1e-6),
     lambda x, b: ops.bias_act(x, b, *_alphas(x), "xielu", 0.5, float(torch.tensor(-1e-6)), 1)),
    ("gated", lambda x, b: fusedact.geglu(*x.chunk(2, -1), *b.chunk(2)),
     lambda x, b: ops.gated(*x.chunk(2, -1), *b.chunk(2), "gelu", 0.0, 0.0, 1.0)),
    ("scaled_gate", lambda x, b: fusedact.gated(*x.chunk(2, -1), *b.chunk(2), gate_scale=0.7),
     lambda x, b: ops.gated(*x.chunk(2, -1), *b.chunk(2), "swish", 1.0, 0.0, 0.7)),
    ("packed", lambda x, b: fusedact.reglu_packed(x, b),
     lambda x, b: ops.gated_packed(x, b, "relu", 0.0, 0.0, 1.0, True)),
    ("softmax", lambda x, b: fusedact.softmax(x, b), _softmax_op),
]  # fmt: skip


@pytest.mark.parametrize("name,public,registered", PATHS, ids=[p[0] for p in PATHS])
def test_eager_and_registered_paths_agree(name, public, registered, device):
    """The eager autograd.Function and the registered op (torch.compile's path) give the same second
    derivatives, bitwise: one formula and one differentiable backward behind both."""
    x0 = torch.randn(4, 8, device=device)
    b0 = torch.randn(8, device=device)
    results = []
    for function in (public, registered):
        x, b = _leaves(x0, b0)
        y = function(x, b)
        grads = torch.autograd.grad(y.square().sum(), (x, b), create_graph=True)
        results.append(torch.autograd.grad(sum(g.square().sum() for g in grads), (x, b)))
    for a, e in zip(*results, strict=True):
        assert torch.equal(a, e)


@pytest.mark.skipif(fusedact.ops._triton is None, reason="needs Triton")
def test_ordinary_backward_keeps_the_kernel(device):
    """Without create_graph the backward is the kernel's (no PyTorch gelu math runs); with it, the
    fallback's differentiable formula (aten.gelu_backward, or its erfc formula where some z < 0)."""
    if device == "cpu" and fusedact.get_cpu_backend() == "torch":
        pytest.skip("the fallback backend runs PyTorch's formulas either way")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    for create_graph in (False, True):
        y = fusedact.gelu(x, bias)
        with Record() as record:
            torch.autograd.grad(y.sum(), (x, bias), create_graph=create_graph)
        assert bool({"aten.gelu_backward", "aten.erfc"} & record.ops) == create_graph, sorted(record.ops)


def test_without_a_differentiable_backward_double_backward_raises():
    """An op given no differentiable backward says so at double backward, never a silent wrong number."""

    def square(x: torch.Tensor) -> torch.Tensor:
        return x * x

    def square_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 2 * grad * x

    op = torch.library.custom_op("fusedact_test::square", square, mutates_args=())
    op.register_fake(lambda x: torch.empty_like(x))
    backward_op = torch.library.custom_op("fusedact_test::square_backward", square_backward, mutates_args=())
    backward_op.register_fake(lambda grad, x: torch.empty_like(x))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def formula(ctx, grad, backward):
        return backward(grad, ctx.saved_tensors[0])

    run = ops._entry(op, square, setup_context, formula, backward_op, square_backward)
    x = torch.randn(3, requires_grad=True)
    (grad,) = torch.autograd.grad(run(x).sum(), x)  # ordinary backward works
    torch.testing.assert_close(grad, 2 * x.detach())
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(run(x).sum(), x, create_graph=True)
