"""The bias_folding rule: a layer's bias moves into the kernel of the activation right after it, where the
code proves the layer feeds it directly (tolerances: patch_checks)."""

import copy

import pytest
import torch
from patch_checks import assert_same_function, assert_same_state_dict
from torch import nn

import fusedact
from fusedact import patching

ACTIVATIONS = [
    (nn.ReLU(), "relu", {}),
    (nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}),
    (nn.GELU(), "gelu", {"approximate": "none"}),
    (nn.GELU(approximate="tanh"), "gelu", {"approximate": "tanh"}),
    (nn.SiLU(), "silu", {}),
    (nn.Sigmoid(), "sigmoid", {}),
    (nn.Tanh(), "tanh", {}),
    (nn.ELU(alpha=0.5), "elu", {"alpha": 0.5}),
    (nn.SELU(), "selu", {}),
    (nn.CELU(alpha=2.0), "celu", {"alpha": 2.0}),
    (nn.Mish(), "mish", {}),
]


@pytest.mark.parametrize("activation,kind,settings", ACTIVATIONS, ids=[repr(a) for a, _, _ in ACTIVATIONS])
def test_linear_then_activation_folds_the_bias(activation, kind, settings, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), activation, nn.Linear(24, 5))
    model = model.to(device)
    original = copy.deepcopy(model)
    assert patching.activation_kind(activation) == (kind, settings)

    report = fusedact.patch(model, lean_mlp=False)  # this rule alone (the lean_mlp rule: test_lean_mlp.py)

    assert [(c.path, c.action) for c in report.changes] == [("1", "fold_bias")]
    assert isinstance(model[1], patching.FoldedBias)
    assert (model[1].activation, model[1].params, model[1].bias_of) == (kind, settings, model[0])
    assert_same_state_dict(model, original)
    assert_same_function(model, original, torch.randn(3, 7, 12, device=device))


def test_bias_parameter_is_not_moved_or_duplicated():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    weight, bias = model[0].weight, model[0].bias
    fusedact.patch(model)
    assert model[0].weight is weight and model[0].bias is bias
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    assert isinstance(model[0], nn.Linear)  # still a Linear (a subclass that leaves the bias to the next module)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv2d_then_relu_folds_the_channel_bias(memory_format, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.LeakyReLU(0.1))
    model = model.to(device=device, memory_format=memory_format)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [("1", "fold_bias"), ("3", "fold_bias")]
    assert model[1].dim == -3  # counted from the end, so an unbatched [C, H, W] input is right too
    x = torch.randn(2, 3, 9, 10, device=device).to(memory_format=memory_format)
    assert_same_function(model, original, x)
    assert_same_function(model, original, torch.randn(3, 9, 10, device=device))  # unbatched
    assert_same_state_dict(model, original)


def test_conv1d_and_conv3d_fold_along_their_channels():
    torch.manual_seed(0)
    for conv, shape in ((nn.Conv1d(4, 6, 3), (2, 4, 11)), (nn.Conv3d(4, 6, 3), (2, 4, 5, 6, 7))):
        model = nn.Sequential(conv, nn.SiLU())
        original = copy.deepcopy(model)
        report = fusedact.patch(model)
        assert [c.action for c in report.changes] == ["fold_bias"]
        assert_same_function(model, original, torch.randn(shape))


def test_forward_read_from_the_code():
    """Parents whose forward feeds a layer straight into an activation, in the two ways MLPs write it."""

    class Sequential_(nn.Module):  # h = self.fc1(h); h = self.act(h)
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(6, 10), nn.GELU(approximate="tanh"), nn.Linear(10, 6)

        def forward(self, x):
            x = self.fc1(x)
            x = self.act(x)
            return self.fc2(x)

    class Nested(nn.Module):  # self.act(self.fc(x))
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(6, 6), nn.SiLU()

        def forward(self, x):
            return x + self.act(self.fc(x))

    model = nn.Sequential(Sequential_(), Nested())
    original = copy.deepcopy(model)
    report = fusedact.patch(model, lean_mlp=False)
    assert sorted((c.path, c.action) for c in report.changes) == [("0.act", "fold_bias"), ("1.act", "fold_bias")]
    assert_same_function(model, original, torch.randn(5, 6))


class TwoUses(nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.fc, self.relu = nn.Linear(6, 6), nn.ReLU()

    def forward(self, x):
        out = self.fc(x)
        out = self.relu(out)
        return self.relu(out + x)


class Branch(nn.Module):
    """The layer's output is used twice: its bias cannot move into one of the uses."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(6, 6), nn.GELU()

    def forward(self, x):
        h = self.fc(x)
        return self.act(h) + h


@pytest.mark.parametrize("module", [TwoUses(), Branch()], ids=["activation-called-twice", "output-used-twice"])
def test_no_fold_where_the_code_does_not_prove_it(module):
    original = copy.deepcopy(module)
    report = fusedact.patch(module)
    assert [c.action for c in report.changes] == ["replace"]  # the activation alone
    assert type(module.fc) is nn.Linear
    assert_same_function(module, original, torch.randn(4, 6))


def test_a_forward_set_on_the_instance_blocks_folding():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
    model.forward = lambda x: model[1](model[0](x)) + model[0](x)  # the Linear's output used twice
    original = copy.deepcopy(model)
    original.forward = lambda x: original[1](original[0](x)) + original[0](x)
    report = fusedact.patch(model)
    assert [c.action for c in report.changes] == ["replace"]
    assert_same_function(model, original, torch.randn(3, 5))


def test_shared_layer_or_hooks_block_folding():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh())  # the same Linear at two paths
    hooked = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
    hooked[0].register_forward_hook(lambda module, args, output: None)
    for m in (model, hooked):
        original = copy.deepcopy(m)
        report = fusedact.patch(m)
        assert {c.action for c in report.changes} == {"replace"}
        assert_same_function(m, original, torch.randn(3, 5))


@pytest.mark.parametrize("softmax", [nn.Softmax(dim=-1), nn.LogSoftmax(dim=-1)], ids=repr)
def test_classifier_bias_folds_into_softmax(softmax, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), softmax).to(device)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [("1", "fold_bias")]
    assert model[1].activation == ("softmax" if isinstance(softmax, nn.Softmax) else "log_softmax")
    assert_same_function(model, original, torch.randn(3, 5, 6, device=device))


def test_deepcopy_and_dtype_moves_keep_the_fold():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU())
    fusedact.patch(model)
    twin = copy.deepcopy(model)
    assert twin[1].bias_of is twin[0]  # the copy's activation reads the copy's bias
    with torch.no_grad():
        twin[0].bias.add_(1.0)
    x = torch.randn(2, 4)
    torch.testing.assert_close(twin(x), torch.nn.functional.gelu(x @ twin[0].weight.T + twin[0].bias))
    model.to(torch.float64)
    torch.testing.assert_close(
        model(x.double()), torch.nn.functional.gelu(x.double() @ model[0].weight.T + model[0].bias)
    )


class LinearNoOverride(nn.Linear):
    """A Linear subclass that only adds an attribute: its forward is nn.Linear's."""

    tag = "mine"


class LinearBiasLast(nn.Linear):
    """transformers' FalconLinear, written the same way: the matmul, then the bias if there is one."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden_states = input @ self.weight.T
        if self.bias is None:
            return hidden_states
        return hidden_states + self.bias


class LinearScaled(nn.Linear):
    """Overrides forward with something else: not a Linear for folding."""

    def forward(self, input):
        return super().forward(input) * 2


@pytest.mark.parametrize("layer_class", [LinearNoOverride, LinearBiasLast])
def test_linear_subclass_that_is_still_a_linear_folds(layer_class):
    torch.manual_seed(0)
    model = nn.Sequential(layer_class(6, 10), nn.GELU(), nn.Linear(10, 3))
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [("1", "fold_bias")]
    assert isinstance(model[0], layer_class) and type(model[0]).__name__ == f"{layer_class.__name__}BiasInActivation"
    assert "bias of " + layer_class.__name__ in repr(model[1])
    assert_same_state_dict(model, original)
    assert_same_function(model, original, torch.randn(4, 6))
    fusedact.unpatch(model)
    assert type(model[0]) is layer_class


def test_linear_subclass_with_another_forward_keeps_its_bias():
    model = nn.Sequential(LinearScaled(6, 6), nn.ReLU())
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [c.action for c in report.changes] == ["replace"] and type(model[0]) is LinearScaled
    assert_same_function(model, original, torch.randn(4, 6))
