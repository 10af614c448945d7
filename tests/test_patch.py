"""fusedact.patch / unpatch on plain torch.nn models: what is replaced, folded and left, and that the patched
model computes the same function (outputs and every parameter gradient) with the same state_dict.

Tolerances: fp32 patched and unpatched differ only where the bias is added (inside the fp32 kernel instead
of in the GEMM or a separate add) and in the last bits of the activation (fp32 math, one rounding), so a few
fp32 ULPs of the activations: rtol=atol=1e-5 after a couple of layers.
"""

import copy

import pytest
import torch
from torch import nn

import fusedact
from fusedact import patching

FP32 = dict(rtol=1e-5, atol=1e-5)


def assert_same_function(patched: nn.Module, original: nn.Module, *inputs, call=None, **tolerance):
    """Same outputs and the same gradient for every parameter (by name) and every input. ``call``: what to
    run instead of ``patched`` itself (its compiled form), with ``patched``'s parameters."""
    tolerance = tolerance or FP32
    for parameter in [*patched.parameters(), *original.parameters()]:
        parameter.grad = None
    inputs_a = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    inputs_b = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out_a, out_b = (call or patched)(*inputs_a), original(*inputs_b)
    torch.testing.assert_close(out_a, out_b, **tolerance)
    grad = torch.randn_like(out_b)
    out_a.backward(grad)
    out_b.backward(grad)
    grads_b = {name: p.grad for name, p in original.named_parameters()}
    for name, parameter in patched.named_parameters():
        torch.testing.assert_close(parameter.grad, grads_b[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(inputs_a, inputs_b, strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, **tolerance)


def assert_same_state_dict(patched: nn.Module, original: nn.Module):
    a, b = patched.state_dict(), original.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


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

    report = fusedact.patch(model)

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
    report = fusedact.patch(model)
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


class MyReLU(nn.ReLU):
    """A subclass may compute something else: never replaced."""

    def forward(self, input):
        return super().forward(input) * 2


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


def test_unknown_subclassed_and_unsupported_modules_are_left_and_reported():
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardswish(), MyReLU(), nn.GLU(dim=0), nn.ReLU6())
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert report.changes == []
    left = {item.path: item.reason for item in report.left}
    assert set(left) == {"1", "2", "3", "4"}
    assert "not an activation fusedact recognizes" in left["1"] and "GLU(dim=0)" in left["3"]
    assert type(model[2]) is MyReLU
    assert "left" in str(report) and "Hardswish" in str(report)
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


@pytest.mark.parametrize("softmax", [nn.Softmax(dim=-1), nn.LogSoftmax(dim=-1)], ids=repr)
def test_classifier_bias_folds_into_softmax(softmax, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), softmax).to(device)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [("1", "fold_bias")]
    assert model[1].activation == ("softmax" if isinstance(softmax, nn.Softmax) else "log_softmax")
    assert_same_function(model, original, torch.randn(3, 5, 6, device=device))


def test_options_select_what_is_patched():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU())
    report = fusedact.patch(model, activations={"gelu"}, fold_bias=False)
    assert [(c.path, c.action) for c in report.changes] == [("3", "replace")]
    assert type(model[1]) is nn.ReLU and [item.path for item in report.left] == ["1"]
    assert type(model[2]) is nn.Linear
    with pytest.raises(ValueError, match="activations: unknown kinds \\['swishy'\\]"):
        fusedact.patch(model, activations=["swishy"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fusedact.patch(lambda x: x)


def test_patch_twice_is_harmless_and_unpatch_restores():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.Tanh(), nn.Identity(), nn.ReLU())
    original = copy.deepcopy(model)
    classes = [type(m) for m in model]
    first = fusedact.patch(model)
    assert len(first.changes) == 3
    second = fusedact.patch(model)
    assert second.changes == [] and second.left == []
    assert "nothing to patch: no unfused activation module" in str(second)
    assert_same_function(model, original, torch.randn(2, 4))
    assert fusedact.unpatch(model) == 5  # 2 folds (the layer's class and the activation) + 1 replacement
    assert [type(m) for m in model] == classes
    assert fusedact.unpatch(model) == 0
    assert_same_function(model, original, torch.randn(2, 4))


def test_unpatch_counts_class_and_module_changes():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.ReLU())
    fusedact.patch(model)
    assert fusedact.unpatch(model) == 3  # the Linear's class, the GELU -> FoldedBias, the ReLU
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.ReLU]


def test_state_dict_round_trips_between_patched_and_unpatched():
    torch.manual_seed(0)
    patched = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3), nn.PReLU())
    fusedact.patch(patched)
    plain = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3), nn.PReLU())
    plain.load_state_dict(patched.state_dict())
    assert_same_function(patched, plain, torch.randn(5, 4))
    fresh = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 3), nn.PReLU())
    fusedact.patch(fresh)
    fresh.load_state_dict(plain.state_dict())  # and back: an unpatched checkpoint into a patched model
    assert_same_function(fresh, plain, torch.randn(5, 4))


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


class GatedMLP(nn.Module):
    """Llama's MLP, written the way transformers writes it."""

    def __init__(self, hidden: int, intermediate: int, activation: nn.Module, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act_fn = activation

    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class GatedMLPOtherForward(GatedMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) + x[..., :1])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [nn.SiLU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.Sigmoid()], ids=repr)
def test_gated_mlp_runs_the_gated_kernel(activation, bias, device):
    torch.manual_seed(0)
    model = GatedMLP(8, 20, activation, bias).to(device)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [(c.path, c.action) for c in report.changes] == [("(root)", "gated_mlp"), ("act_fn", "replace")]
    assert isinstance(model, GatedMLP) and type(model).__name__ == "FusedGatedMLP"
    assert (type(model.gate_proj) is not nn.Linear) == bias  # biases folded into the gated kernel
    assert_same_state_dict(model, original)
    assert_same_function(model, original, torch.randn(2, 5, 8, device=device))
    fusedact.unpatch(model)
    assert type(model) is GatedMLP and type(model.gate_proj) is nn.Linear


def test_gated_mlp_with_a_different_forward_is_not_rewritten():
    model = GatedMLPOtherForward(8, 16, nn.SiLU())
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [c.action for c in report.changes] == ["replace"]
    assert type(model) is GatedMLPOtherForward
    assert_same_function(model, original, torch.randn(3, 8))


@pytest.mark.slow
def test_patched_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), GatedMLP(8, 16, nn.SiLU(), bias=True), nn.LeakyReLU(0.2))
    original = copy.deepcopy(model)
    fusedact.patch(model)
    compiled = torch.compile(model, fullgraph=True)
    assert_same_function(model, original, torch.randn(4, 8), call=compiled)


def test_autocast_mixed_precision_matches_unpatched(device):
    """AMP: under autocast the bias-free GEMM returns bf16 while the bias Parameters stay fp32; the folded
    bias is cast as the layer would have cast it, gradients reach the fp32 Parameters, and the patched
    model returns the unpatched model's dtype (float32 from a CUDA softmax) and values (bf16: one rounding
    less than eager, so within 2 bf16 ULPs of probabilities <= 1: atol 1e-2; gradients pass through bf16
    GEMMs on both sides, a few bf16 ULPs (2^-8 relative each) apart: rtol 5%, atol 2e-3)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), GatedMLP(16, 32, nn.SiLU(), bias=True), nn.Softmax(dim=-1))
    model = model.to(device)
    original = copy.deepcopy(model)
    fusedact.patch(model)
    x = torch.randn(4, 8, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y, y_reference = model(x), original(x)
    assert y.dtype == y_reference.dtype
    torch.testing.assert_close(y.float(), y_reference.float(), rtol=0, atol=1e-2)
    y.float().pow(2).sum().backward()
    y_reference.float().pow(2).sum().backward()
    for (name, parameter), reference in zip(model.named_parameters(), original.parameters(), strict=True):
        assert parameter.grad.dtype == torch.float32, name
        torch.testing.assert_close(
            parameter.grad, reference.grad, rtol=0.05, atol=2e-3, msg=lambda m, n=name: f"{n}: {m}"
        )


class Adapter(nn.Module):
    """What LoRA does to a Linear after patching: wraps it and adds a low-rank term."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.lora = nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora(x)


def test_folded_biases_survive_a_wrapper_added_after_patching():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), GatedMLP(8, 16, nn.SiLU(), bias=True))
    original = copy.deepcopy(model)
    fusedact.patch(model)
    for m in (model, original):  # the same adapters (same weights) on both
        torch.manual_seed(1)
        m[0] = Adapter(m[0])
        m[2].gate_proj, m[2].up_proj = Adapter(m[2].gate_proj), Adapter(m[2].up_proj)
    assert_same_function(model, original, torch.randn(3, 8))
