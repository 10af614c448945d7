"""The gated_mlp rule: a Llama-style MLP, down(act(gate(x)) * up(x)), runs one gated kernel with its
projections' biases folded (tolerances: patch_checks)."""

import copy

import pytest
import torch
from patch_checks import GatedMLP, assert_same_function, assert_same_state_dict, kernel_calls
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


# --- The lean block (the default): the same function, bitwise the fused path, x + gate + up kept -----------


class PackedMLP(nn.Module):
    """Phi-3's MLP: one packed gate_up projection, split with chunk, the product written up * act(gate)."""

    def __init__(self, bias=False, gate_first=True, activation_first=False):
        super().__init__()
        self.gate_up_proj = nn.Linear(8, 32, bias=bias)
        self.down_proj = nn.Linear(16, 8, bias=bias)
        self.activation_fn = nn.GELU(approximate="tanh")
        self.gate_first, self.activation_first = gate_first, activation_first

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)

        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)

        return self.down_proj(up_states)


class PackedUpFirst(PackedMLP):
    def forward(self, x):
        packed = self.gate_up_proj(x)
        up, gate = packed.chunk(2, dim=-1)
        h = self.activation_fn(gate) * up
        return self.down_proj(h)


class PackedOtherDim(PackedMLP):
    def forward(self, x):
        packed = self.gate_up_proj(x)
        gate, up = packed.chunk(2, dim=0)  # not the feature halves: not the packed MLP
        h = up * self.activation_fn(gate)
        return self.down_proj(h)


class PackedHalfReadTwice(PackedMLP):
    def forward(self, x):
        packed = self.gate_up_proj(x)
        gate, up = packed.chunk(2, dim=-1)
        h = up * self.activation_fn(gate)
        return self.down_proj(h + gate)  # the gate read again


def _run(model, x, grad):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def _saved(model, x) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = set()

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().clone().requires_grad_())
    return len(storages)


class FoldedPackedPath(nn.Module):
    """The fused path with the packed bias folded into the kernel, as the lean rule folds it (``patch(
    lean_mlp=False)`` leaves a packed bias in its GEMM: gated_forward folds only separate projections')."""

    def __init__(self, mlp: PackedUpFirst):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        packed = nn.functional.linear(x, self.mlp.gate_up_proj.weight)
        bias = self.mlp.gate_up_proj.bias
        h = fusedact.functional.gated_packed(packed, bias, "gelu", gate_first=False, approximate="tanh")
        return self.mlp.down_proj(h)


LEAN_CASES = {  # build, the lean op counted, what the fused path runs, [T, F] tensors the fused path keeps
    "Llama": (lambda: GatedMLP(8, 16, nn.SiLU(), bias=False), "lean_gated", "gated", 3),
    "Llama, biases folded": (lambda: GatedMLP(8, 16, nn.GELU(), bias=True), "lean_gated", "gated", 3),
    "packed (Phi-3)": (PackedMLP, "lean_gated_packed", "gated_packed", 2),  # x, [T, 2F], h
    "packed, bias folded, up first": (lambda: PackedUpFirst(bias=True), "lean_gated_packed", "gated_packed", 2),
}


@pytest.mark.parametrize("name", LEAN_CASES)
def test_lean_block_is_bitwise_the_fused_path(name, device):
    build, lean_op, fused_op, fused_saved = LEAN_CASES[name]
    torch.manual_seed(0)
    model = build().to(device)
    fused, original = copy.deepcopy(model), copy.deepcopy(model)
    report = fusedact.patch(model)
    assert report.changes[0].action == "gated_mlp" and report.changes[0].after.endswith(", lean block)"), str(report)
    if "packed" in name:
        assert "halves" in report.changes[0].after and ("bias folded" in report.changes[0].after) == ("bias" in name)
    fusedact.patch(fused, lean_mlp=False)
    if "bias folded" in name:
        fused = FoldedPackedPath(fused)
    assert_same_state_dict(model, original)
    x, grad = torch.randn(3, 5, 8, device=device), torch.randn(3, 5, 8, device=device)
    with kernel_calls() as calls:
        lean = _run(model, x, grad)
    with kernel_calls() as fused_calls:
        reference = _run(fused, x, grad)
    assert calls[lean_op] == 1 and not calls[fused_op] and fused_calls[fused_op] == 1 and not fused_calls[lean_op]
    assert all(torch.equal(a, b) for a, b in zip(lean, reference, strict=True))
    assert_same_function(model, original, x)
    with torch.no_grad(), kernel_calls() as calls:  # nothing to keep: the fused path (fewer checks per call)
        assert torch.equal(model(x), reference[0])
    assert calls[fused_op] == 1 and not calls[lean_op]
    argument = "hidden_states" if name == "packed (Phi-3)" else "x"
    assert torch.equal(model(**{argument: x}), reference[0])  # by the name the original forward gives it
    assert _saved(model, x) == 1 + 2 // (1 + ("packed" in name)) and _saved(fused, x) == 1 + fused_saved
    fusedact.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


def test_packed_mlps_the_code_does_not_prove():
    for build in (PackedOtherDim, PackedHalfReadTwice):
        assert patching.gated_mlp.packed_gated_mlp(build) is None
        model = build()
        report = fusedact.patch(model)
        assert "lean block" not in "".join(c.after for c in report.changes), str(report)
    assert patching.gated_mlp.packed_gated_mlp(PackedMLP) == ("gate_up_proj", "activation_fn", "down_proj", True)
    assert patching.gated_mlp.packed_gated_mlp(PackedUpFirst) == ("gate_up_proj", "activation_fn", "down_proj", False)


def test_a_wrapper_added_after_patching_runs_and_keeps_the_folded_biases():
    """The layer's own forward must run: a LoRA-style wrapper put around gate_proj after patching is called
    (the lean block cannot see what it adds), the folded bias still added; the lean block runs again once
    the wrapper is gone."""
    torch.manual_seed(0)
    model = GatedMLP(8, 16, nn.SiLU(), bias=True)
    original = copy.deepcopy(model)
    fusedact.patch(model)
    x = torch.randn(4, 8)
    for m in (model, original):
        torch.manual_seed(1)
        m.gate_proj = Adapter(m.gate_proj)
    with kernel_calls() as calls:
        model(x)
    assert calls["lean_gated"] == 0 and calls["gated"] == 1
    assert_same_function(model, original, x)
    model.gate_proj = model.gate_proj.base_layer
    with kernel_calls() as calls:
        model(x)
    assert calls["lean_gated"] == 1


def test_lean_is_claimed_only_where_it_can_run():
    """Biases the kernel cannot add (fold_bias=False) or a down projection the lean block does not compute:
    the fused forward, and the report does not say lean; the same function either way."""
    torch.manual_seed(0)
    for build, options in (
        (lambda: GatedMLP(8, 16, nn.SiLU(), bias=True), {"fold_bias": False}),
        (lambda: PackedMLP(bias=True), {"fold_bias": False}),
    ):
        model = build()
        original = copy.deepcopy(model)
        report = fusedact.patch(model, **options)
        assert "lean block" not in str(report), str(report)
        with kernel_calls() as calls:
            model(torch.randn(2, 8))
        assert not {name for name in calls if name.startswith("lean")}
        assert_same_function(model, original, torch.randn(3, 8))

    class OwnDown(nn.Linear):  # not nn.Linear by class: its forward may differ
        def forward(self, x):
            return super().forward(x)

    model = GatedMLP(8, 16, nn.SiLU())
    model.down_proj = OwnDown(16, 8)
    report = fusedact.patch(model)
    assert report.changes[0].after == "FusedGatedMLP (silu gated kernel)"
