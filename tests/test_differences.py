"""fusedact.differences, the one list of deliberate differences from PyTorch: each entry is true (PyTorch
really does something else, fusedact really does what the entry says), the README says the same, and the
edges issue 12 found where fusedact differed without saying so now match PyTorch (tensors made under
``torch.inference_mode``, meta tensors) or are listed."""

import doctest
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import fusedact
from fusedact import differences
from reference import ulp, xielu_reference

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _semantics_section() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("### Inputs and semantics") :]
    return section[: section.index("\n## ")]


def _words(text: str) -> str:
    return " ".join(text.split())


def test_readme_lists_every_difference_and_nothing_else():
    """The README's sub-list of differences is exactly the entries' summaries, in the same order, and its
    'Not supported' sentence names every unsupported argument."""
    section = _semantics_section()
    items = re.findall(r"^  - (.*?)(?=^  - |^\n|\Z)", section, flags=re.M | re.S)
    assert [_words(i).rstrip(".;") for i in items] == [_words(d.summary) for d in differences.DIFFERENCES]
    not_supported = _words(section[section.index("Not supported") :])
    for entry in differences.UNSUPPORTED:
        assert entry.argument in not_supported, f"README does not mention {entry.argument!r} as not supported"


def test_docstring_example():
    """The module docstring's example runs as written (its outputs are printed values)."""
    results = doctest.testmod(differences, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 3 and results.failed == 0


def test_table_has_every_entry():
    table = differences.table()
    assert all(f"| {d.name} |" in table for d in differences.DIFFERENCES)
    assert all(f"| {u.argument} |" in table for u in differences.UNSUPPORTED)


# (public function, keyword arguments, PyTorch's float64 function of z)
LIMIT_CASES = [
    ("gelu", {}, F.gelu),
    ("gelu", {"approximate": "tanh"}, lambda z: F.gelu(z, approximate="tanh")),
    ("silu", {}, F.silu),
    ("swish", {"beta": 1.702}, lambda z: z * torch.sigmoid(1.702 * z)),
    ("swish", {"beta": -0.5}, lambda z: z * torch.sigmoid(-0.5 * z)),
    ("quick_gelu", {}, lambda z: z * torch.sigmoid(1.702 * z)),
    ("mish", {}, F.mish),
    ("hardswish", {}, F.hardswish),
    # xielu: +inf at -inf for alpha_n > beta (transformers' always), -inf below; the gradient beta - alpha_n
    (
        "xielu",
        {"alpha_p": 0.75, "alpha_n": 1.25, "beta": 0.5, "eps": -1e-6},
        lambda z: xielu_reference(z, 0.75, 1.25, 0.5, -1e-6),
    ),
    (
        "xielu",
        {"alpha_p": 0.75, "alpha_n": 0.25, "beta": 0.5, "eps": -1e-6},
        lambda z: xielu_reference(z, 0.75, 0.25, 0.5, -1e-6),
    ),
]


# (Issue 12, defect 5: fp64 tanh-GELU gave -inf at -inf and -1.7e-62 at -1e200; the float64 cases hold it.)
LIMIT_PARAMS = [
    pytest.param(*case, dtype, id=f"{case[0]}{case[1]}-{str(dtype)[6:]}")
    for case in LIMIT_CASES for dtype in (torch.float32, torch.float64)
]  # fmt: skip


@pytest.mark.parametrize("function,params,torch_function,dtype", LIMIT_PARAMS)
def test_limits(function, params, torch_function, dtype, device):
    """At +-inf (and, for the tanh GELU's gradient, past 1e154 in float64) PyTorch gives NaN; fusedact the
    limit the entry's rules say."""
    # (finite points off every kink: at hardswish's z = 3 PyTorch 2.5's gradient is 3/2, newer torch's and
    # fusedact's 1, README's Install; test_functional checks the kinks against the reference)
    z = torch.tensor([-math.inf, math.inf, -2.0, 2.5, 1e200, -1e200], dtype=torch.float64)
    z64 = z.clone().requires_grad_()
    y_torch = torch_function(z64)
    (grad_torch,) = torch.autograd.grad(y_torch, z64, torch.ones_like(z))
    assert torch.isnan(y_torch[:2]).any() or torch.isnan(grad_torch).any(), "PyTorch gives no NaN here any more"
    expected = differences.expected_output(function, z, y_torch.detach(), **params)
    expected_grad = differences.expected_gradient(function, z, grad_torch, torch.ones_like(z), **params)
    assert not torch.isnan(expected).any() and not torch.isnan(expected_grad).any()
    x = z.to(dtype).to(device).requires_grad_()
    y = getattr(fusedact, function)(x, **params)
    y.backward(torch.ones_like(y))
    if dtype == torch.float32:  # 1e200 is inf in fp32: there every element is at a limit
        z32 = z.to(dtype).double().requires_grad_()
        y32 = torch_function(z32)
        (grad32,) = torch.autograd.grad(y32, z32, torch.ones_like(z))  # (xielu's grows with z: not 1 at 1e200)
        z32 = z32.detach()
        expected = differences.expected_output(function, z32, y32.detach(), **params)
        expected_grad = differences.expected_gradient(function, z32, grad32, torch.ones_like(z), **params)
        at_limit = ~torch.isfinite(z32)
        y, x_grad, expected, expected_grad = (
            y.detach().cpu().double()[at_limit], x.grad.cpu().double()[at_limit], expected[at_limit],
            expected_grad[at_limit],
        )  # fmt: skip
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        torch.testing.assert_close(x_grad, expected_grad, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y.detach().cpu(), expected, rtol=1e-12, atol=0)
        torch.testing.assert_close(x.grad.cpu(), expected_grad, rtol=1e-9, atol=1e-300)
    assert torch.equal(torch.signbit(y.detach().cpu()), torch.signbit(expected)), "signed zeros differ"


@pytest.mark.parametrize("straight_through", [False, True])
def test_step_gradient(straight_through, device):
    x = torch.tensor([-1.0, 0.0, 2.0], device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="heaviside"):
        torch.heaviside(x, torch.tensor(0.5, device=device)).sum().backward()
    grad_y = torch.tensor([3.0, 4.0, 5.0], device=device)
    fusedact.heaviside(x, value=0.5, straight_through=straight_through).backward(grad_y)
    z = x.detach().double().cpu()
    expected = differences.expected_gradient(
        "heaviside", z, None, grad_y.double().cpu(), straight_through=straight_through
    )
    assert torch.equal(x.grad.double().cpu(), expected)


def test_celu_gradient_float64():
    """PyTorch's celu backward rounds 1/alpha to float32: off by ~3e-9 of exp(z / alpha) in float64."""
    z = torch.tensor([-0.5, -2.0, 1.0], dtype=torch.float64, requires_grad=True)
    F.celu(z, 0.8).sum().backward()
    exact = torch.where(z > 0, 1.0, torch.exp(z.detach() / 0.8))
    assert (z.grad - exact).abs().max() > 1e-10, "PyTorch's celu gradient is exact in float64 now"
    x = z.detach().clone().requires_grad_()
    fusedact.celu(x, alpha=0.8).sum().backward()
    expected = differences.expected_gradient("celu", z.detach(), z.grad, torch.ones(3, dtype=torch.float64), alpha=0.8)
    torch.testing.assert_close(x.grad, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(expected, exact, rtol=1e-15, atol=0)


def test_hardsigmoid_gradient_float64():
    """PyTorch's hardsigmoid backward multiplies by float32(1/6), in float64 too."""
    z = torch.tensor([-0.5, -2.0, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    F.hardsigmoid(z).sum().backward()
    exact = torch.tensor([1 / 6, 1 / 6, 1 / 6, 0.0], dtype=torch.float64)
    assert (z.grad - exact).abs().max() > 1e-9, "PyTorch's hardsigmoid gradient is exact in float64 now"
    x = z.detach().clone().requires_grad_()
    fusedact.hardsigmoid(x).sum().backward()
    expected = differences.expected_gradient("hardsigmoid", z.detach(), z.grad, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(expected, exact, rtol=0, atol=0)


def test_one_rounding(device):
    """bf16: fusedact is within 1 ULP of float64 everywhere and closer than eager's two roundings; the two
    differ somewhere (the difference is real)."""
    generator = torch.Generator().manual_seed(0)
    # |z| <= 3: away from the fp32 cancellation in 1 + erf(z) of the far tail (test_functional's floor)
    x = (3 * torch.rand(4096, generator=generator) - 1.5).to(torch.bfloat16).to(device)
    bias = (3 * torch.rand(4096, generator=generator) - 1.5).to(torch.bfloat16).to(device)
    exact = F.gelu(x.double().cpu() + bias.double().cpu())
    fused = fusedact.gelu(x, bias).double().cpu()
    eager = F.gelu(x + bias).double().cpu()
    step = ulp(exact, torch.bfloat16)
    assert ((fused - exact).abs() <= step).all()
    assert (fused != eager).any()
    assert (fused - exact).abs().sum() < (eager - exact).abs().sum()


def test_output_layout(device):
    x = torch.randn(5, 7, device=device).t()
    assert not F.relu(x).is_contiguous() and fusedact.relu(x).is_contiguous()
    torch.testing.assert_close(fusedact.relu(x), F.relu(x), rtol=0, atol=0)


def test_inplace_module_leaves_its_input(device):
    x = torch.randn(4, 6, device=device)
    before = x.clone()
    y = fusedact.nn.ReLU(inplace=True)(x)
    assert torch.equal(x, before) and torch.equal(y, F.relu(before))
    torch.nn.ReLU(inplace=True)(x)
    assert not torch.equal(x, before)  # PyTorch's does overwrite it


UNSUPPORTED_CALLS = {
    "inplace": lambda x: fusedact.relu(x, inplace=True),
    "dtype": lambda x: fusedact.softmax(x, dtype=torch.float64),
    "dim": lambda x: fusedact.glu(x, dim=0),
    "values": lambda x: fusedact.heaviside(x, value=torch.tensor([0.5, 1.0])),
    "type promotion": lambda x: fusedact.relu(x, torch.zeros(4, dtype=torch.float64, device=x.device)),
    "torch.func": lambda x: torch.func.grad(lambda t: fusedact.gelu(t).sum())(x),
}


@pytest.mark.parametrize("entry", differences.UNSUPPORTED, ids=[u.argument for u in differences.UNSUPPORTED])
def test_unsupported_raises(entry, device):
    x = torch.randn(2, 4, device=device)
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        UNSUPPORTED_CALLS[entry.argument](x)
    assert differences.unsupported(entry.functions[0] if entry.functions[0] != "*" else "gelu", entry.argument)


# ---------------------------------------------------------------------------------------------------
# Edges that now match PyTorch (issue 12, defect 6)

EAGER_TWINS = [
    ("gelu", lambda x, b: fusedact.gelu(x, b), lambda x, b: F.gelu(x + b)),
    ("relu", lambda x, b: fusedact.relu(x, b), lambda x, b: F.relu(x + b)),
    ("prelu", lambda x, b: fusedact.prelu(x, torch.full((4,), 0.2, device=x.device), b),
     lambda x, b: F.prelu(x + b.view(1, -1), torch.full((4,), 0.2, device=x.device))),
    ("swiglu", lambda x, b: fusedact.swiglu(x, x, b, b), lambda x, b: F.silu(x + b) * (x + b)),
    ("packed", lambda x, b: fusedact.swiglu_packed(torch.cat([x, x], -1), torch.cat([b, b])),
     lambda x, b: F.silu(x + b) * (x + b)),
    ("softmax", lambda x, b: fusedact.softmax(x, b), lambda x, b: torch.softmax(x + b, -1)),
]  # fmt: skip


@pytest.mark.parametrize("name,fused,eager", EAGER_TWINS, ids=[t[0] for t in EAGER_TWINS])
def test_inference_tensor_used_later_with_a_bias_that_requires_grad(name, fused, eager, device):
    """An input made under torch.inference_mode, used afterwards with a trainable bias: eager PyTorch works
    (its add makes a new tensor), and so does fusedact (it saves a copy), with the same bias gradient."""
    with torch.inference_mode():
        x = torch.randn(3, 4, device=device)
    results = []
    for function in (fused, eager):
        bias = torch.linspace(-1, 1, 4, device=device).requires_grad_()
        y = function(x, bias)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), bias.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # and inside inference mode, an inference tensor out, as eager's
        assert fused(x, torch.zeros(4, device=device)).is_inference()


META_CALLS = [
    ("gelu", lambda x, b: fusedact.gelu(x, b)),
    ("relu_dim1", lambda x, b: fusedact.bias_act(x, b[:3], "relu", dim=1)),
    ("prelu", lambda x, b: fusedact.prelu(x, b[:3], b[:3])),
    ("swiglu", lambda x, b: fusedact.swiglu(x, x, b, b)),
    ("packed", lambda x, b: fusedact.geglu_packed(x, b)),
    ("softmax", lambda x, b: fusedact.log_softmax(x, b)),
]


@pytest.mark.parametrize("name,call", META_CALLS, ids=[c[0] for c in META_CALLS])
def test_meta_tensors_give_meta_outputs(name, call):
    """As PyTorch's ops: shape, dtype and device without data, forward and backward (accelerate's empty
    weights, shape inference)."""
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    bias = torch.empty(8, device="meta", requires_grad=True)
    reference = call(torch.zeros(2, 3, 8), torch.zeros(8))
    y = call(x, bias)
    assert y.is_meta and y.shape == reference.shape and y.dtype == reference.dtype
    y.backward(torch.empty_like(y))
    assert x.grad.is_meta and x.grad.shape == x.shape and bias.grad.is_meta and bias.grad.shape == bias.shape
