"""The gated_forward rule: each gated product ``act(gate) * up`` a forward's code shows runs the gated kernel
(packed halves of one chunk, a variable holding the activation, a scaled gate, a functional activation),
the rest of the forward untouched; the original expression where the tensors do not fit the kernel.

Each model is written the way the architecture it stands for writes it (named in its docstring); the real
architectures are in test_integration.py. Tolerances: patch_checks (fp32, rtol=atol=1e-5).
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from patch_checks import assert_same_function, assert_same_state_dict, kernel_calls
from torch import nn

import fusedact
from fusedact import patching


class PackedGateUp(nn.Module):
    """Phi-3's MLP: one gate_up projection split with chunk, the product written up * act(gate)."""

    def __init__(self, hidden=8, intermediate=12, activation=None):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.activation_fn = activation or nn.SiLU()

    def forward(self, hidden_states):
        up_states = self.gate_up_proj(hidden_states)

        gate, up_states = up_states.chunk(2, dim=-1)
        up_states = up_states * self.activation_fn(gate)

        return self.down_proj(up_states)


class GateThroughVariable(nn.Module):
    """T5 v1.1's gated GELU: the activation is held in a variable read only by the product."""

    def __init__(self, bias=False):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(8, 12, bias=bias), nn.Linear(8, 12, bias=bias)
        self.wo = nn.Linear(12, 8, bias=False)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, hidden_states):
        hidden_gelu = self.act(self.wi_0(hidden_states))
        hidden_linear = self.wi_1(hidden_states)
        hidden_states = hidden_gelu * hidden_linear
        return self.wo(hidden_states)


class SwiGLUVariables(nn.Module):
    """timm's SwiGLU: gate and up projections through variables, x reassigned along the way."""

    def __init__(self):
        super().__init__()
        self.fc1_g, self.fc1_x, self.fc2 = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act = nn.SiLU()

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.act(x_gate) * x
        x = self.fc2(x)
        return x


class ScaledGate(nn.Module):
    """Falcon-H1's MLP: a scalar on the gate, another on the output."""

    def __init__(self, bias=True):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12, bias=bias), nn.Linear(8, 12, bias=bias)
        self.down_proj = nn.Linear(12, 8, bias=bias)
        self.act_fn = nn.SiLU()
        self.gate_multiplier, self.down_multiplier = 0.7, 1.3

    def forward(self, x):
        y = self.up_proj(x) * self.act_fn(self.gate_proj(x) * self.gate_multiplier)
        y = self.down_proj(y) * self.down_multiplier
        return y


class Functional(nn.Module):
    """A functional SwiGLU (torchtitan / gpt-fast style): F.silu called on the gate."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 12)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PackedConditional(nn.Module):
    """timm's GluMlp: the chunk dim an attribute, the gate first or last by a flag, both in one expression."""

    def __init__(self, gate_last=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 24), nn.Linear(12, 8)
        self.act, self.chunk_dim, self.gate_last = nn.GELU(), -1, gate_last

    def forward(self, x):
        x = self.fc1(x)
        x1, x2 = x.chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.fc2(x)


CASES = {
    "packed (Phi-3)": (PackedGateUp, {"gated_packed": 1}, 0),
    "through a variable (T5)": (lambda: GateThroughVariable(bias=True), {"gated": 1}, 2),
    "variables (timm SwiGLU)": (SwiGLUVariables, {"gated": 1}, 2),
    "scaled gate (Falcon-H1)": (ScaledGate, {"gated": 1}, 2),  # gate_proj's bias folds under the scale
    "functional": (Functional, {"gated": 1}, 2),
    "packed, gate first (GluMlp)": (PackedConditional, {"gated_packed": 1}, 0),
    "packed, gate last (GluMlp)": (lambda: PackedConditional(gate_last=True), {"gated_packed": 1}, 0),
}


@pytest.mark.parametrize("name", CASES)
def test_gated_product_runs_the_gated_kernel(name):
    build, kernels, folded = CASES[name]
    torch.manual_seed(0)
    model = build()
    original = copy.deepcopy(model)
    report = fusedact.patch(model, lean_mlp=False)  # this rule alone: with lean blocks Phi-3's is gated_mlp's
    gated = [change for change in report.changes if change.action == "gated_mlp"]
    assert len(gated) == 1 and gated[0].after.startswith(f"Fused{type(original).__name__} ("), str(report)
    assert f"{folded} bias" in gated[0].after if folded else "folded" not in gated[0].after
    assert isinstance(model, type(original)) and patching.context.is_patched_class(type(model))
    assert_same_state_dict(model, original)
    x = torch.randn(3, 5, 8)
    with kernel_calls() as calls:
        model(x)
    assert {key: value for key, value in calls.items() if key != "bias_act"} == kernels
    assert_same_function(model, original, x)
    fusedact.unpatch(model)
    assert type(model) is type(original)
    assert all(type(m) in (nn.Linear, nn.GELU, nn.SiLU) for m in model.children())
    assert_same_function(model, original, x)


def test_kernel_matches_on_both_backends(device):
    """The packed and the two-tensor sites on the Triton kernels too (the interpreter on CPU)."""
    torch.manual_seed(0)
    for build in (PackedGateUp, lambda: GateThroughVariable(bias=True)):
        model = build().to(device)
        original = copy.deepcopy(model)
        fusedact.patch(model)
        assert_same_function(model, original, torch.randn(2, 3, 8, device=device))


def test_rewritten_forward_keeps_the_rest_of_the_code():
    model = ScaledGate()
    fusedact.patch(model)
    source = inspect.getsource(type(model).forward)
    assert (
        "self._fusedact_gated_scaled(0, self.up_proj(x), self.act_fn, self.gate_proj(x), self.gate_multiplier)"
        in source
    )
    assert "y = self.down_proj(y) * self.down_multiplier" in source  # the rest as written
    assert "ScaledGate.forward rewritten from" in type(model).forward.__code__.co_filename


def test_operands_are_evaluated_in_the_original_order():
    """U * act(G): the code evaluates U first; the rewritten call keeps that order (side effects, RNG)."""
    order = []

    class Recording(nn.Linear):  # a Linear (its width is known) that records when it runs
        def __init__(self, name):
            super().__init__(4, 6)
            self.name = name

        def forward(self, x):
            order.append(self.name)
            return super().forward(x)

    class UpFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.gate, self.act = Recording("up"), Recording("gate"), nn.SiLU()

        def forward(self, x):
            return self.up(x) * self.act(self.gate(x))

    model = UpFirst()
    original = copy.deepcopy(model)
    assert fusedact.patch(model).changes[0].action == "gated_mlp"
    order.clear()
    assert_same_function(model, original, torch.randn(2, 4))
    assert order == ["up", "gate", "up", "gate"]  # patched, then the original: the same order


def test_shapes_that_broadcast_run_the_original_expression():
    """A gate of another width than up broadcasts in PyTorch; the kernel does not take it: the product stays
    as written (the gate's bias still folds into its sigmoid, a direct pair)."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.act = nn.Linear(4, 1), nn.Linear(4, 6), nn.Sigmoid()

        def forward(self, x, scale):
            return self.act(self.gate(x)) * self.up(x) * scale

    model = Broadcast()
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    # The gate's width (1) is read from its layer: not a site the kernel can take, so no claim is made.
    assert [c.action for c in report.changes] == ["fold_bias"]
    assert_same_function(model, original, torch.randn(3, 4), torch.randn(3, 6))


def test_runtime_fallback_when_tensors_do_not_fit():
    """Widths proven equal by the layers, but leading dimensions that broadcast, or two dtypes, at a call: the
    original expression runs there (with a folded bias added back)."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.SiLU()

        def forward(self, x, y):
            return self.act(self.gate(x)) * self.up(y)

    model = TwoInputs()
    original = copy.deepcopy(model)
    assert "2 biases folded" in fusedact.patch(model).changes[0].after
    with kernel_calls() as calls:
        assert_same_function(model, original, torch.randn(3, 4), torch.randn(3, 4))
        assert calls["gated"] == 1
        assert_same_function(model, original, torch.randn(3, 4), torch.randn(1, 4))  # broadcasts
        assert calls["gated"] == 1


class ReadTwice(nn.Module):
    """The activation's variable is read again: the activation cannot move into the product."""

    def __init__(self):
        super().__init__()
        self.wi_0, self.wi_1, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.GELU()

    def forward(self, x):
        hidden = self.act(self.wi_0(x))
        product = hidden * self.wi_1(x)
        return product + hidden


class ProductOfLayers(nn.Module):
    """Two layers' outputs multiplied: no activation, not a site."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        return self.a(x) * self.b(x)


class BiasReadTwice(nn.Module):
    """The up projection's output is read twice: its bias cannot move into the kernel (but the product runs it)."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.SiLU()

    def forward(self, x):
        up = self.up(x)
        return self.act(self.gate(x)) * up + up


@pytest.mark.parametrize("module_class", [ReadTwice, ProductOfLayers])
def test_no_rewrite_where_the_code_does_not_prove_it(module_class):
    model = module_class()
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    assert "gated_mlp" not in [c.action for c in report.changes] and type(model) is module_class
    assert_same_function(model, original, torch.randn(3, 4))


def test_a_bias_read_elsewhere_is_not_folded():
    model = BiasReadTwice()
    original = copy.deepcopy(model)
    (change, _) = fusedact.patch(model).changes
    assert change.after == "FusedBiasReadTwice (silu gated kernel, 1 bias folded)"  # the gate's, not up's
    assert type(model.up) is nn.Linear and type(model.gate) is not nn.Linear
    assert_same_function(model, original, torch.randn(3, 4))


def test_options_and_kinds_limit_the_rule():
    for options in ({"gated_mlp": False}, {"activations": {"gelu"}}):
        model = Functional()
        report = fusedact.patch(model, **options)
        assert report.changes == [] and type(model) is Functional
    model = GateThroughVariable(bias=True)
    report = fusedact.patch(model, fold_bias=False)
    assert "folded" not in report.changes[0].after and type(model.wi_0) is nn.Linear


def test_patch_twice_deepcopy_and_state_dict():
    torch.manual_seed(0)
    model = SwiGLUVariables()
    original = copy.deepcopy(model)
    fusedact.patch(model)
    assert fusedact.patch(model).changes == []
    twin = copy.deepcopy(model)  # the copy's kernel reads the copy's folded biases
    with torch.no_grad():
        twin.fc1_g.bias.add_(1.0)
        original.fc1_g.bias.add_(1.0)
    assert_same_function(twin, original, torch.randn(2, 8))
    plain = SwiGLUVariables()
    plain.load_state_dict(model.state_dict())
    assert_same_function(model, plain, torch.randn(2, 8))


def test_a_forward_with_a_closure_and_private_names():
    """A forward defined inside a function reads its variables through the same cells after the rewrite;
    one using a class-private name (renamed by Python in a class body) is left alone."""

    def make(scale):
        class Closure(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate, self.up, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.SiLU()

            def forward(self, x):
                return self.act(self.gate(x)) * self.up(x) * scale

        return Closure()

    model = make(3.0)
    original = copy.deepcopy(model)
    assert fusedact.patch(model).changes[0].action == "gated_mlp"
    assert_same_function(model, original, torch.randn(2, 4))

    class Private(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.__up, self.act = nn.Linear(4, 6), nn.Linear(4, 6), nn.SiLU()

        def forward(self, x):
            return self.act(self.gate(x)) * self.__up(x)

    private = Private()
    assert "gated_mlp" not in [c.action for c in fusedact.patch(private).changes]
    assert type(private) is Private


@pytest.mark.slow
def test_rewritten_forwards_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(PackedGateUp(), GateThroughVariable(bias=True))
    original = copy.deepcopy(model)
    fusedact.patch(model)
    compiled = torch.compile(model, fullgraph=True)
    assert_same_function(model, original, torch.randn(4, 8), call=compiled)


# --- Scaled gates: act(G * s) with s a number runs gated(G, U, gate_scale=s) ---------------------------------


class ScaleOnTheLeft(nn.Module):
    """``act(s * gate_proj(x)) * up_proj(x)``: the scale written first, a tanh GELU."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12), nn.Linear(8, 12)
        self.act_fn, self.gate_multiplier = nn.GELU(approximate="tanh"), 1.5

    def forward(self, x):
        return self.act_fn(self.gate_multiplier * self.gate_proj(x)) * self.up_proj(x)


class ConstantScale(nn.Module):
    """A constant on the gate (an int: a number as well)."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.up_proj(x) * self.act_fn(self.gate_proj(x) * 2)


class DividedGate(nn.Module):
    """``act(gate_proj(x) / s)``: not a gate_scale (1/s is not exact), the scaled gate is the kernel's input."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12), nn.Linear(8, 12)
        self.act_fn, self.temperature = nn.SiLU(), 3.0

    def forward(self, x):
        return self.up_proj(x) * self.act_fn(self.gate_proj(x) / self.temperature)


def _tensor_scaled_gate():
    model = ScaledGate()
    model.gate_multiplier = torch.tensor(0.7)  # a tensor, not a number: the original expression runs
    return model


# name -> (build, the gate_scale the kernel gets per call (None: no gated call), biases folded, in the report)
SCALED = {
    "Falcon-H1 (G * s)": (ScaledGate, 0.7, 2, True),
    "s * G": (ScaleOnTheLeft, 1.5, 2, True),
    "constant": (ConstantScale, 2, 0, True),
    "divided: not a scale": (DividedGate, 1.0, 1, False),
    "tensor scale": (_tensor_scaled_gate, None, 2, True),
}


@pytest.mark.parametrize("name", SCALED)
def test_scaled_gate_goes_to_the_kernel(name, monkeypatch):
    build, scale, folded, in_kernel = SCALED[name]
    torch.manual_seed(0)
    model = build()
    original = copy.deepcopy(model)
    report = fusedact.patch(model, lean_mlp=False)
    (change,) = [change for change in report.changes if change.action == "gated_mlp"]
    assert ("gate scale in the kernel" in change.after) == in_kernel, change.after
    assert (f"{folded} bias" in change.after) if folded else "folded" not in change.after
    scales = []
    gated = fusedact.functional.gated
    monkeypatch.setattr(
        fusedact.functional,
        "gated",
        lambda *args, gate_scale=1.0, **kwargs: (
            scales.append(gate_scale) or gated(*args, gate_scale=gate_scale, **kwargs)
        ),
    )
    x = torch.randn(3, 5, 8)
    assert_same_function(model, original, x)
    assert scales == ([] if scale is None else [scale])
    assert_same_state_dict(model, original)
    fusedact.unpatch(model)
    assert type(model) is type(original) and type(model.gate_proj) is nn.Linear


def test_scaled_gate_on_both_backends(device):
    torch.manual_seed(0)
    for build in (ScaledGate, ScaleOnTheLeft):
        model = build().to(device)
        original = copy.deepcopy(model)
        fusedact.patch(model)
        assert_same_function(model, original, torch.randn(2, 3, 8, device=device))
