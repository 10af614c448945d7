"""The gated_mlp rule: a Llama-style MLP, down(act(gate(x)) * up(x)), runs one gated kernel with its
projections' biases folded (tolerances: patch_checks)."""

import copy

import pytest
import torch
from patch_checks import GatedMLP, assert_same_function, assert_same_state_dict
from torch import nn

import fusedact
from fusedact import patching


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
    """Not the whole Llama MLP: this rule leaves it; its product alone runs the gated kernel (gated_forward)."""
    assert patching.gated_mlp.is_gated_mlp(GatedMLP) and not patching.gated_mlp.is_gated_mlp(GatedMLPOtherForward)
    model = GatedMLPOtherForward(8, 16, nn.SiLU())
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert [c.action for c in report.changes] == ["gated_mlp", "replace"]
    assert type(model).forward is not patching.gated_mlp._gated_mlp_forward  # the original code, rewritten
    assert report.changes[0].after == "FusedGatedMLPOtherForward (silu gated kernel)"
    assert_same_function(model, original, torch.randn(3, 8))


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
