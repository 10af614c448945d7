"""fusedact.patch / unpatch as a whole (the driver): options, patching twice, unpatch, the state_dict round
trip, torch.compile and autocast, the report. Each rule's own tests are in tests/patching/ (tolerances:
patch_checks)."""

import copy

import pytest
import torch
from patch_checks import GatedMLP, assert_same_function
from torch import nn

import fusedact


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
