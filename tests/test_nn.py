"""fusedact.nn: drop-in twins of torch.nn activations, and the modules that own a bias."""

import pytest
import torch
from optional import transformers_with_models

import fusedact

TWINS = [
    (fusedact.nn.ReLU, torch.nn.ReLU, {}),
    (fusedact.nn.ReLU, torch.nn.ReLU, {"inplace": True}),
    (fusedact.nn.LeakyReLU, torch.nn.LeakyReLU, {"negative_slope": 0.2}),
    (fusedact.nn.GELU, torch.nn.GELU, {}),
    (fusedact.nn.GELU, torch.nn.GELU, {"approximate": "tanh"}),
    (fusedact.nn.SiLU, torch.nn.SiLU, {}),
    (fusedact.nn.Sigmoid, torch.nn.Sigmoid, {}),
    (fusedact.nn.Tanh, torch.nn.Tanh, {}),
    (fusedact.nn.ELU, torch.nn.ELU, {"alpha": 0.5}),
    (fusedact.nn.SELU, torch.nn.SELU, {}),
    (fusedact.nn.CELU, torch.nn.CELU, {"alpha": 2.0}),
    (fusedact.nn.Mish, torch.nn.Mish, {}),
    (fusedact.nn.GLU, torch.nn.GLU, {}),
    (fusedact.nn.PReLU, torch.nn.PReLU, {"num_parameters": 34, "init": 0.1}),
    (fusedact.nn.ReLU6, torch.nn.ReLU6, {"inplace": True}),
    (fusedact.nn.Hardtanh, torch.nn.Hardtanh, {"min_val": -0.5, "max_val": 2.0}),
    (fusedact.nn.Hardswish, torch.nn.Hardswish, {}),
    (fusedact.nn.Hardsigmoid, torch.nn.Hardsigmoid, {}),
    (fusedact.nn.Softplus, torch.nn.Softplus, {"beta": 2.0, "threshold": 3.0}),
]

# The newer twins again in float64 on CPU with inputs across their kinks and thresholds, against torch.nn's
# module: fusedact computes float64 in float64, so 1e-12 (the kinks themselves, measure zero, are not drawn).
F64_TWINS = [
    (fusedact.nn.ReLU6, torch.nn.ReLU6, (), {}),
    (fusedact.nn.Hardtanh, torch.nn.Hardtanh, (-0.5, 2.0), {}),
    (fusedact.nn.Hardtanh, torch.nn.Hardtanh, (), {"min_val": -2.0, "max_val": -1.0}),
    (fusedact.nn.Hardswish, torch.nn.Hardswish, (), {}),
    (fusedact.nn.Hardsigmoid, torch.nn.Hardsigmoid, (), {}),
    (fusedact.nn.Softplus, torch.nn.Softplus, (), {}),
    (fusedact.nn.Softplus, torch.nn.Softplus, (0.5, 1.0), {}),
    (fusedact.nn.Softplus, torch.nn.Softplus, (), {"beta": -1.5, "threshold": 4.0}),
]


@pytest.mark.parametrize("ours,theirs,kwargs", TWINS, ids=[f"{t.__name__}{k}" for _, t, k in TWINS])
def test_module_twins(ours, theirs, kwargs, device):
    module, reference = ours(**kwargs), theirs(**kwargs)
    assert isinstance(module, theirs)
    assert repr(module) == repr(reference)
    assert module.state_dict().keys() == reference.state_dict().keys()
    module.load_state_dict(reference.state_dict())  # PReLU's weight; the others have none
    x = torch.randn(6, 34, device=device, requires_grad=True)  # even: GLU halves it
    x_reference = x.detach().clone().requires_grad_()
    y = module(x)
    y_reference = reference(x_reference.clone() if kwargs.get("inplace") else x_reference)
    # Same function; fusedact rounds once from fp32 where PyTorch may differ in the last fp32 bits.
    torch.testing.assert_close(y, y_reference, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    y_reference.sum().backward()
    torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-6, atol=1e-6)


def test_swish_and_swiglu_modules(device):
    x = torch.randn(4, 10, device=device)
    torch.testing.assert_close(fusedact.nn.Swish(1.0)(x), torch.nn.functional.silu(x), rtol=1e-6, atol=1e-6)
    assert repr(fusedact.nn.Swish(2.0)) == "Swish(beta=2.0)"
    gate, up = x[:, :5], x[:, 5:]
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(fusedact.nn.SwiGLU()(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fusedact.nn.SwiGLU()(gate, up), expected, rtol=1e-6, atol=1e-6)


def test_bias_act_module(device):
    layer = fusedact.nn.BiasAct(8, "leaky_relu", negative_slope=0.2).to(device)
    assert list(layer.state_dict()) == ["bias"] and torch.equal(layer.bias, torch.zeros(8, device=device))
    assert repr(layer) == "BiasAct(8, activation='leaky_relu', negative_slope=0.2)"
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(3, 8, device=device)
    expected = torch.nn.functional.leaky_relu(x + layer.bias, 0.2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    expected_grad = torch.where(x + layer.bias > 0, 1.0, 0.2).sum(0)
    torch.testing.assert_close(layer.bias.grad, expected_grad.detach())

    swiglu = fusedact.nn.BiasAct(8, "swiglu").to(device)
    assert swiglu(x).shape == (3, 4)
    with pytest.raises(ValueError, match="unknown activation"):
        fusedact.nn.BiasAct(8, "softsign")


def test_modules_without_torch_twin(device):
    x = torch.randn(4, 10, device=device, dtype=torch.float64)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    F = torch.nn.functional
    torch.testing.assert_close(fusedact.nn.ReLUSquared()(x), F.relu(x) ** 2, **tol)
    torch.testing.assert_close(fusedact.nn.QuickGELU()(x), x * torch.sigmoid(1.702 * x), **tol)
    step = fusedact.nn.Heaviside(value=0.5)
    assert repr(step) == "Heaviside(value=0.5, straight_through=False)"
    torch.testing.assert_close(step(x), torch.heaviside(x, torch.tensor(0.5, dtype=x.dtype, device=device)), **tol)
    gate, up = x[:, :5], x[:, 5:]
    for module, expected in [
        (fusedact.nn.GeGLU(), F.gelu(gate) * up),
        (fusedact.nn.GeGLU(approximate="tanh"), F.gelu(gate, approximate="tanh") * up),
        (fusedact.nn.ReGLU(), F.relu(gate) * up),
    ]:
        torch.testing.assert_close(module(x), expected, **tol)
        torch.testing.assert_close(module(gate, up), expected, **tol)
        assert module.state_dict() == {}
    assert repr(fusedact.nn.GeGLU(approximate="tanh")) == "GeGLU(approximate='tanh')"


@pytest.mark.parametrize("ours,theirs,args,kwargs", F64_TWINS, ids=[f"{t.__name__}{a}{k}" for _, t, a, k in F64_TWINS])
def test_new_twins_in_float64(ours, theirs, args, kwargs):
    module, reference = ours(*args, **kwargs), theirs(*args, **kwargs)
    assert isinstance(module, theirs) and repr(module) == repr(reference) and module.state_dict() == {}
    x = (8 * torch.rand(5, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 4).requires_grad_()
    x_reference = x.detach().clone().requires_grad_()
    y, y_reference = module(x), reference(x_reference)
    torch.testing.assert_close(y, y_reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_reference.backward(grad)
    # PyTorch's CPU hardsigmoid backward scales by 1/6 rounded to fp32 (0.1666666716) even in float64:
    # fusedact's exact 1/6 is 3e-8 from it, relatively; checked exactly against 1/6 instead.
    if ours is fusedact.nn.Hardsigmoid:
        torch.testing.assert_close(x.grad, grad * ((x > -3) & (x < 3)) / 6, rtol=1e-15, atol=0)
        torch.testing.assert_close(x.grad, x_reference.grad, rtol=5e-8, atol=0)
    else:
        torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-12, atol=1e-12)


def test_xielu_mirrors_transformers(device):
    """Same constructor, Parameters and buffers (names, values, dtypes) as transformers' XIELUActivation, a
    state_dict that loads either way, the same function and gradients (alpha_p's and alpha_n's included).
    fp32: both compute in fp32 from the same coefficients; fusedact rounds once, so a few ULPs."""
    transformers_with_models()
    from transformers import activations

    kwargs = dict(alpha_p_init=0.6, alpha_n_init=1.1, beta=0.4, eps=-1e-5, dtype=torch.float32)
    module, reference = fusedact.nn.XIELU(**kwargs), activations.XIELUActivation(**kwargs)
    assert list(module.state_dict()) == list(reference.state_dict()) == ["alpha_p", "alpha_n", "beta", "eps"]
    for key, value in reference.state_dict().items():
        assert torch.equal(module.state_dict()[key], value) and module.state_dict()[key].dtype == value.dtype, key
    with torch.no_grad():
        reference.alpha_p.add_(0.25), reference.alpha_n.sub_(0.5)  # trained values, loaded into fusedact's
    module.load_state_dict(reference.state_dict())
    reference.load_state_dict(module.state_dict())
    module, reference = module.to(device), reference.to(device)
    x = 3 * torch.randn(6, 40, device=device)
    x[0, :3] = torch.tensor([0.0, -1e-6, -1e-5])  # around eps: the clamp of the negative side
    x_reference = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_reference = module(x), reference(x_reference)
    torch.testing.assert_close(y, y_reference, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_reference.backward(grad)
    torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-5, atol=1e-6)
    for name in ("alpha_p", "alpha_n"):  # sums over 240 elements: fp32 rounding of the sum's order
        ours, theirs = getattr(module, name).grad, getattr(reference, name).grad
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_xielu_default_dtype_and_sharing():
    """The default dtype is bfloat16, as transformers'; ``sharing`` takes the module's very tensors."""
    module = fusedact.nn.XIELU()
    assert module.alpha_p.dtype == module.beta.dtype == torch.bfloat16 and module.alpha_p.shape == (1,)
    shared = fusedact.nn.XIELU.sharing(module)
    assert shared.alpha_p is module.alpha_p and shared.eps is module.eps
    assert (shared._beta_scalar, shared._eps_scalar) == (module._beta_scalar, module._eps_scalar)
