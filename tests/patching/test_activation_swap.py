"""The activation_swap rule: an activation module becomes the fusedact module of the same kind and settings;
unknown, subclassed and unsupported modules are left and reported (tolerances: patch_checks)."""

import copy

import torch
from patch_checks import assert_same_function
from torch import nn

import fusedact


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
