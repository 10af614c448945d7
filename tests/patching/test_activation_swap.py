"""The activation_swap rule: an activation module becomes the fusedact module of the same kind and settings;
unknown, subclassed and unsupported modules are left and reported (tolerances: patch_checks)."""

import copy

import pytest
import torch
from optional import transformers_with_models
from patch_checks import assert_same_function, assert_same_state_dict
from torch import nn

import fusedact
from fusedact import patching


class MyReLU(nn.ReLU):
    """A subclass may compute something else: never replaced."""

    def forward(self, input):
        return super().forward(input) * 2


def test_unknown_subclassed_and_unsupported_modules_are_left_and_reported():
    model = nn.Sequential(nn.Linear(4, 8), nn.Softsign(), MyReLU(), nn.GLU(dim=0), nn.Tanhshrink())
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert report.changes == []
    left = {item.path: item.reason for item in report.left}
    assert set(left) == {"1", "2", "3", "4"}
    assert "not an activation fusedact recognizes" in left["1"] and "GLU(dim=0)" in left["3"]
    assert type(model[2]) is MyReLU
    assert "left" in str(report) and "Softsign" in str(report)
    assert_same_function(model, original, torch.randn(2, 4))


def test_settings_kept_and_shared_instances_replaced_once():
    act = nn.LeakyReLU(0.3, inplace=True)
    model = nn.Sequential(nn.Identity(), act, nn.Identity(), act, nn.PReLU(4, init=0.1))
    weight = model[4].weight
    report = fusedact.patch(model)
    assert [c.path for c in report.changes] == ["1", "3", "4"]
    assert model[1] is model[3] and isinstance(model[1], fusedact.nn.LeakyReLU)
    assert (model[1].negative_slope, model[1].inplace) == (0.3, True)
    assert isinstance(model[4], fusedact.nn.PReLU) and model[4].weight is weight  # same Parameter, same key
    x = torch.randn(3, 4)
    twice = torch.nn.functional.leaky_relu(torch.nn.functional.leaky_relu(x, 0.3), 0.3)
    torch.testing.assert_close(model(x), torch.nn.functional.prelu(twice, weight))


def test_the_rest_of_the_family_is_replaced():
    """Softmax and LogSoftmax (with their dim), GLU, PReLU: replaced, not folded (a bias-free or per-channel
    form fusedact.bias_act does not take), and the same function."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Softmax(dim=1), nn.Linear(6, 8), nn.LogSoftmax(dim=0), nn.GLU(), nn.PReLU(), nn.Tanh()
    )
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [(str(i), "replace") for i in range(1, 7) if i != 2]
    assert (type(model[1]), model[1].dim) == (fusedact.nn.Softmax, 1)  # dim=1, not -1: the bias is not folded
    assert (type(model[3]), model[3].dim) == (fusedact.nn.LogSoftmax, 0)
    assert_same_function(model, original, torch.randn(5, 4))


class LearnedActivation(nn.Module):
    """An activation with a learned parameter that fusedact does not know (as transformers' XIELUActivation)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * x)


def test_learned_unknown_activation_is_listed_not_skipped_unseen():
    model = nn.Sequential(nn.Linear(4, 4), LearnedActivation())
    report = fusedact.patch(model)
    assert report.changes == []
    assert [(item.path, item.module) for item in report.left] == [("1", "LearnedActivation")]
    assert "learned: alpha" in report.left[0].reason
    assert "nothing to patch" not in str(report) and "LearnedActivation" in str(report)


# --- The newer kinds: clamps, hard sigmoid/swish, softplus, learned xIELU ------------------------------------


def _xielu():
    """transformers' XIELUActivation (Apertus) with coefficients moved off their initial values."""
    transformers_with_models()
    from transformers import activations

    act = activations.XIELUActivation(alpha_p_init=0.6, alpha_n_init=1.1, dtype=torch.float32)
    with torch.no_grad():
        act.alpha_p.add_(0.3), act.alpha_n.sub_(0.2)
    return act


NEW_KINDS = {
    "ReLU6": (lambda: nn.ReLU6(inplace=True), fusedact.nn.ReLU6),
    "Hardtanh": (lambda: nn.Hardtanh(-0.5, 2.0), fusedact.nn.Hardtanh),
    "Hardswish": (nn.Hardswish, fusedact.nn.Hardswish),
    "Hardsigmoid": (nn.Hardsigmoid, fusedact.nn.Hardsigmoid),
    "Softplus": (lambda: nn.Softplus(beta=2.0, threshold=3.0), fusedact.nn.Softplus),
    "XIELUActivation": (_xielu, fusedact.nn.XIELU),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
@pytest.mark.parametrize("name", NEW_KINDS)
def test_new_kinds_are_swapped_or_folded(name, bias):
    """Without a bias to fold: the fusedact twin with the same settings (repr); with one: folded into the
    kernel, and the MLP on the lean block where the activation's backward reads its input (not xIELU's: the
    lean block takes no learned parameters). Same function (x spans the clamps and softplus's threshold)."""
    build, twin = NEW_KINDS[name]
    torch.manual_seed(0)
    act = build()
    model = nn.Sequential(nn.Linear(6, 10, bias=bias), act, nn.Linear(10, 4, bias=False))
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    actions = [(change.path, change.action) for change in report.changes]
    assert report.left == []
    if not bias:
        assert actions == [("1", "replace")] and type(model[1]) is twin
        if name != "XIELUActivation":
            assert repr(model[1]) == repr(act)
    else:
        lean = [("(root)", "lean_mlp")] if name != "XIELUActivation" else []
        assert actions == [("1", "fold_bias"), *lean], str(report)
        assert isinstance(model[1], patching.layers.FOLDED) and model[1].bias_of is model[0]
    if name == "XIELUActivation":  # its very Parameters and buffers: the same state_dict, one optimizer state
        assert model[1].alpha_p is act.alpha_p and model[1].alpha_n is act.alpha_n and model[1].beta is act.beta
    assert_same_state_dict(model, original)
    assert_same_function(model, original, 3 * torch.randn(7, 6))
    fusedact.unpatch(model)
    assert model[1] is act and type(model[0]) is nn.Linear and type(model) is nn.Sequential


@pytest.mark.parametrize("name", NEW_KINDS)
def test_new_kinds_after_a_conv(name):
    """A Conv2d's bias runs along the channels: folded (dim=-3) into the single-parameter kinds; xIELU's
    coefficients run along the last dim only, so it is swapped and the conv keeps its bias."""
    build, twin = NEW_KINDS[name]
    torch.manual_seed(0)
    act = build()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), act)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    action = "replace" if name == "XIELUActivation" else "fold_bias"
    assert [(change.path, change.action) for change in report.changes] == [("1", action)]
    assert_same_state_dict(model, original)
    assert_same_function(model, original, 3 * torch.randn(2, 3, 6, 5))


def test_xielu_state_dict_loads_either_way_and_follows_dtype():
    """A patched model's state_dict loads into the unpatched one and back; ``.double()`` converts the shared
    tensors and the fused module's floats follow the buffers (still the unpatched model's function)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _xielu())
    original = copy.deepcopy(model)
    fusedact.patch(model)
    with torch.no_grad():
        model[1].alpha_p.fill_(0.4)  # trained after patching
    fresh = nn.Sequential(nn.Linear(4, 8), _xielu())
    fresh.load_state_dict(model.state_dict())
    assert_same_function(model, fresh, torch.randn(5, 4))
    fusedact.patch(fresh)
    fresh.load_state_dict(original.state_dict())  # an unpatched checkpoint into the patched model
    assert_same_function(fresh, original, torch.randn(5, 4))
    fresh.double(), original.double()
    assert fresh[1].alpha_p.dtype == torch.float64 and fresh[1]._eps_scalar == original[1].eps.item()
    # 1e-9, not 1e-12: fusedact's fp64 xIELU takes expm1(z) - z from a series truncated at z^9 for |z| < 0.5
    # (fp32-exact; in fp64 off by up to ~1e-11 near |z| = 0.5: _fallback._expm1_minus_identity, reported).
    assert_same_function(fresh, original, torch.randn(5, 4, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_new_kinds_are_left_when_not_asked_for():
    model = nn.Sequential(nn.Linear(4, 8), _xielu(), nn.Softplus())
    report = fusedact.patch(model, activations={"gelu"})
    assert report.changes == []
    assert [(item.module, item.reason) for item in report.left] == [
        ("XIELUActivation", "xielu not among the activations asked for"),
        ("Softplus", "softplus not among the activations asked for"),
    ]
