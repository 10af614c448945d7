"""The lean_mlp rule: a two-layer MLP ``fc2(act(fc1(x)))`` whose fc1 bias was folded runs fusedact.mlp's lean
block, where the code proves the MLP (a chain of children, or adjacent children of an nn.Sequential) and at
each call where nothing but the proven modules would run.

Each model is written the way the architecture it stands for writes it (named in its docstring); the real
architectures are in test_integration.py. The patched model must compute the unpatched one's function
(tolerances: patch_checks, fp32 rtol=atol=1e-5) and, where the lean block ran, bitwise what
``patch(lean_mlp=False)`` gives (the fused path: the lean block's contract); it keeps x and fc1's output
for backward, one [T, F] tensor less than the fused path.
"""

import copy

import pytest
import torch
from patch_checks import assert_same_function, assert_same_state_dict, kernel_calls
from torch import nn

import fusedact
from fusedact import patching

H, FF = 8, 24


class GPT2Style(nn.Module):
    """GPT-2's MLP: statements, one variable, a dropout after the second projection."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.c_fc, self.act, self.c_proj = nn.Linear(H, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, H)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states):
        hidden_states = self.c_fc(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.c_proj(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return hidden_states


class Nested(nn.Module):
    """The nested form (Falcon's and Whisper's way of writing it)."""

    def __init__(self, activation=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(H, FF), activation or nn.SiLU(), nn.Linear(FF, H)

    def forward(self, x):
        """A docstring is not a statement of the chain."""
        return self.fc2(self.act(self.fc1(x)))


class TimmMlp(nn.Module):
    """timm's Mlp: a dropout and a norm (Identity by default) between the activation and fc2."""

    def __init__(self, drop=0.0, norm=None):
        super().__init__()
        self.fc1, self.act = nn.Linear(H, FF), nn.GELU()
        self.drop1, self.norm = nn.Dropout(drop), norm or nn.Identity()
        self.fc2, self.drop2 = nn.Linear(FF, H), nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class SequentialWithItsOwnForward(nn.Sequential):
    """An nn.Sequential subclass whose forward is its own chain (not over its children in order)."""

    def __init__(self):
        super().__init__()
        self.skipped, self.fc1, self.act, self.fc2 = nn.Linear(H, H), nn.Linear(H, FF), nn.SiLU(), nn.Linear(FF, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def sequential():
    """Adjacent children of an nn.Sequential, two MLPs in a row (the second: an erf GELU)."""
    return nn.Sequential(nn.Linear(H, FF), nn.GELU(), nn.Linear(FF, H), nn.Linear(H, FF), nn.Mish(), nn.Linear(FF, H))


CASES = {  # build, MLPs proven, (fc1, fc2) of the first
    "statements (GPT-2)": (GPT2Style, 1, ("c_fc", "c_proj")),
    "nested": (Nested, 1, ("fc1", "fc2")),
    "inert modules between (timm Mlp)": (TimmMlp, 1, ("fc1", "fc2")),
    "nn.Sequential": (sequential, 2, ("0", "2")),
    "nn.Sequential subclass, its own forward": (SequentialWithItsOwnForward, 1, ("fc1", "fc2")),
}


def _build(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()  # dropout off: what the comparison is of (training: test_per_call_checks)


def _outputs(model, x, grad):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def _saved_storages(model, x) -> int:
    """How many storages other than parameters autograd saves in one forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = set()

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().clone().requires_grad_())
    return len(storages)


@pytest.mark.parametrize("name", CASES)
def test_two_layer_mlp_runs_the_lean_block(name):
    build, mlps, (first, last) = CASES[name]
    model, fused = _build(build), _build(build)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    lean = [change for change in report.changes if change.action == "lean_mlp"]
    assert len(lean) == mlps and f"two-layer MLP {first} -> {last}, lean block" in lean[0].after, str(report)
    assert isinstance(model, type(original)) and patching.context.is_patched_class(type(model))
    assert_same_state_dict(model, original)
    x, grad = torch.randn(3, 5, H), torch.randn(3, 5, H)
    with kernel_calls() as calls:
        lean_results = _outputs(model, x, grad)
    assert calls["lean_mlp"] == mlps and calls["bias_act"] == 0
    assert_same_function(model, original, x)

    fused_report = fusedact.patch(fused, lean_mlp=False)  # the fused path: the same folds, no lean block
    assert [c for c in fused_report.changes if c.action == "lean_mlp"] == []
    fused_results = _outputs(fused, x, grad)
    for a, b in zip(lean_results[:2], fused_results[:2], strict=True):
        assert torch.equal(a, b)
    for key, grad in fused_results[2].items():  # None for a parameter the forward does not use
        assert (grad is None and lean_results[2][key] is None) or torch.equal(lean_results[2][key], grad), key
    # x and fc1's output per MLP (and each later MLP's input), where the fused path keeps act(fc1(x)) too
    assert _saved_storages(model, x) == 2 * mlps and _saved_storages(fused, x) == 3 * mlps

    fusedact.unpatch(model)
    assert type(model) is type(original) and "_fusedact_lean" not in model.__dict__
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


class MentionedTwice(Nested):
    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.fc2.bias  # fc2 mentioned twice: not a chain


class OtherOperation(Nested):
    def forward(self, x):
        x = self.act(self.fc1(x))
        return self.fc2(x * 2)  # something else between act and fc2


class ActivationLast(nn.Module):
    """A chain whose second Linear feeds an activation: its bias is folded too, so not an MLP's fc2."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.out = nn.Linear(H, FF), nn.GELU(), nn.Linear(FF, H), nn.Tanh()

    def forward(self, x):
        return self.out(self.fc2(self.act(self.fc1(x))))


NOT_PROVEN = {
    "an attribute mentioned twice": MentionedTwice,
    "an operation between": OtherOperation,
    "relu (keeps its output: nothing to gain)": lambda: Nested(nn.ReLU()),
    "tanh": lambda: Nested(nn.Tanh()),
    "a LayerNorm between (timm Mlp with norm_layer)": lambda: TimmMlp(norm=nn.LayerNorm(FF)),
    "fc2's bias folded into the next activation": ActivationLast,
    "fc1 without a bias (nothing folded)": lambda: nn.Sequential(
        nn.Linear(H, FF, bias=False), nn.GELU(), nn.Linear(FF, H)
    ),
}


@pytest.mark.parametrize("name", NOT_PROVEN)
def test_what_the_code_does_not_prove_is_left_to_the_fused_path(name):
    model = _build(NOT_PROVEN[name])
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert "lean_mlp" not in [c.action for c in report.changes], str(report)
    assert_same_function(model, original, torch.randn(4, H))


def test_per_call_checks_run_the_modules_themselves():
    """Each call checks what the lean block cannot see: an active dropout between act and fc2, a hook put on
    a layer, a LoRA-style wrapper put around fc1 after patching, act replaced. There the chain's modules are
    called one by one (the original code: the same function, the same dropout masks from the same RNG
    state), and the lean block runs again once the check passes."""
    model, original = _build(lambda: TimmMlp(drop=0.25)), _build(lambda: TimmMlp(drop=0.25))
    fusedact.patch(model)
    x = torch.randn(6, H)

    def lean_calls():
        with kernel_calls() as calls:
            model(x)
        return calls["lean_mlp"]

    assert lean_calls() == 1
    model.train(), original.train()
    assert lean_calls() == 0  # drop1 drops now: the lean block would skip it
    results = []
    for m in (model, original):
        torch.manual_seed(5)  # the same masks
        results.append(_outputs(m, x, torch.ones(6, H)))
    torch.testing.assert_close(results[0][:2], results[1][:2], rtol=1e-5, atol=1e-5)
    for key in results[1][2]:
        torch.testing.assert_close(results[0][2][key], results[1][2][key], rtol=1e-5, atol=1e-5, msg=key)
    model.drop1.p = 0.0  # a dropout that drops nothing is inert
    assert lean_calls() == 1
    model.eval(), original.eval()

    handle = model.fc2.register_forward_hook(lambda module, inputs, output: output * 2)
    assert lean_calls() == 0
    torch.testing.assert_close(model(x), 2 * original(x), rtol=1e-5, atol=1e-5)
    handle.remove()
    assert lean_calls() == 1

    class LoRA(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.low = base, nn.Linear(H, FF, bias=False)

        def forward(self, x):
            return self.base(x) + self.low(x)

    for m in (model, original):
        torch.manual_seed(7)
        m.fc1 = LoRA(m.fc1)
    assert lean_calls() == 0
    assert_same_function(model, original, x)  # the folded bias is still added, by the FoldedBias it went to

    model.act = nn.Tanh()  # not the FoldedBias the proof saw: the original code runs
    assert lean_calls() == 0
    torch.testing.assert_close(model(x), TimmMlp.forward(model, x), rtol=0, atol=0)


def test_hooks_on_the_parent_and_no_grad():
    """Hooks on the MLP itself run around its (new) forward; without grad nothing is saved and the values are
    the fused path's."""
    model, fused = _build(GPT2Style), _build(GPT2Style)
    fusedact.patch(model), fusedact.patch(fused, lean_mlp=False)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 3, H)
    with kernel_calls() as calls:
        out = model(x.requires_grad_())
    assert calls["lean_mlp"] == 1 and seen == [(2, 3, H)]
    with torch.no_grad(), kernel_calls() as calls:
        assert torch.equal(model(x), fused(x)) and torch.equal(model(x), out.detach())
    assert calls["lean_mlp"] == 0 and calls["bias_act"] == 3  # the fused path, in both
    assert torch.equal(model(hidden_states=x), out)  # called by the name the original forward gives x
    with pytest.raises(TypeError, match="takes 1 argument \\('hidden_states'\\) but 2 were given"):
        model(x, x)


def test_autocast_bf16_is_bitwise_the_fused_path():
    """CPU autocast: both GEMMs in bf16, the folded fp32 bias cast as the layer would have cast it."""
    model, fused = _build(Nested), _build(Nested)
    fusedact.patch(model), fusedact.patch(fused, lean_mlp=False)
    x, grad = torch.randn(4, 5, H), torch.randn(4, 5, H, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kernel_calls() as calls:
            lean_results = _outputs(model, x, grad)
        fused_results = _outputs(fused, x, grad)
    assert calls["lean_mlp"] == 1 and lean_results[0].dtype == torch.bfloat16
    assert torch.equal(lean_results[0], fused_results[0]) and torch.equal(lean_results[1], fused_results[1])
    assert all(torch.equal(lean_results[2][key], fused_results[2][key]) for key in fused_results[2])


def test_a_sequential_keeps_working_as_a_sequential():
    model = _build(sequential)
    fusedact.patch(model)
    assert type(model) is patching.lean_mlp.LeanSequential and isinstance(model, nn.Sequential)
    head = model[:3]  # nn.Sequential's own slicing: a LeanSequential without a plan, the modules called
    x = torch.randn(2, H)
    with kernel_calls() as calls:
        torch.testing.assert_close(head(x), model[2](model[1](model[0](x))))
    assert calls["lean_mlp"] == 0 and calls["bias_act"] == 2  # the slice's FoldedBias, and the reference's
    model.append(nn.Tanh())  # a module added after patching runs after the lean blocks
    with kernel_calls() as calls:
        out = model(x)
    assert calls["lean_mlp"] == 2 and (out.abs() <= 1).all()


@pytest.mark.slow
def test_compiles_fullgraph():
    model = _build(TimmMlp)
    original = copy.deepcopy(model)
    fusedact.patch(model)
    compiled = torch.compile(model, fullgraph=True)
    assert_same_function(model, original, torch.randn(4, H), call=lambda x: compiled(x))
