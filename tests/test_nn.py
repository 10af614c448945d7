"""fusedact.nn: drop-in twins of torch.nn activations, and the modules that own a bias."""

import pytest
import torch

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
