"""The experts rule: a transformers 5 mixture-of-experts block (one 3-D gate_up_proj, a dispatcher forward)
runs the packed gated kernel in each implementation the dispatcher picks (the eager loop, grouped_mm,
batched_mm), with the routing, the down projection and the state_dict as they were.

Built from transformers' own experts classes on tiny configs (nothing downloaded); whole MoE models are in
test_integration.py. Tolerances: patch_checks (fp32, rtol=atol=1e-5).
"""

import copy

import pytest
import torch
from optional import transformers_with_models
from patch_checks import assert_same_state_dict, kernel_calls
from torch import nn

import fusedact
from fusedact import patching

transformers = transformers_with_models()
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

TOKENS, HIDDEN, EXPERTS, TOP_K = 10, 8, 4, 2


def experts(implementation: str, activation: str = "silu") -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=8,  # grouped_mm: 16-byte strides
        num_local_experts=EXPERTS,
        hidden_act=activation,
    )
    config._experts_implementation = implementation
    module = MixtralExperts(config)
    with torch.no_grad():  # transformers leaves them uninitialized (torch.empty)
        module.gate_up_proj.normal_(0, 0.5)
        module.down_proj.normal_(0, 0.5)
    return module


def routing():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, HIDDEN, generator=generator)
    index = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=generator)
    return x, index, weights


def run(module, x, index, weights):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    out = module(x, index, weights)
    out.backward(torch.ones_like(out))
    return out, x.grad, weights.grad, {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_experts_run_the_packed_gated_kernel(implementation):
    module = experts(implementation)
    original = copy.deepcopy(module)
    report = fusedact.patch(module)
    assert [(c.path, c.action) for c in report.changes] == [("(root)", "experts"), ("act_fn", "replace")]
    assert report.changes[0].after == (
        "FusedMixtralExperts (silu packed gated kernel in the eager loop and grouped_mm/batched_mm)"
    )
    assert isinstance(module, MixtralExperts)
    assert_same_state_dict(module, original)
    inputs = routing()
    with kernel_calls() as calls:
        patched = run(module, *inputs)
    hit = len(set(inputs[1].flatten().tolist()))  # the eager loop calls the kernel once per expert hit
    assert calls["gated_packed"] == (hit if implementation == "eager" else 1)
    reference = run(original, *inputs)
    for a, b in zip(patched[:3], reference[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in reference[3]:
        torch.testing.assert_close(patched[3][name], reference[3][name], rtol=1e-5, atol=1e-5, msg=name)
    fusedact.unpatch(module)
    assert type(module) is MixtralExperts and "_fusedact_products" not in module.__dict__


def test_the_implementation_is_still_chosen_at_each_call():
    module = experts("eager")
    original = copy.deepcopy(module)
    fusedact.patch(module)
    inputs = routing()
    for implementation in ("grouped_mm", "eager"):
        module.config._experts_implementation = implementation
        original.config._experts_implementation = implementation
        torch.testing.assert_close(run(module, *inputs)[0], run(original, *inputs)[0], rtol=1e-5, atol=1e-5)


def test_an_activation_the_kernel_lacks_leaves_the_experts():
    module = experts("eager", activation="relu2")  # squared ReLU: not a gated kernel's activation
    report = fusedact.patch(module)
    assert "experts" not in [c.action for c in report.changes]
    assert not patching.context.is_patched_class(type(module))


def test_a_forward_that_is_not_the_dispatcher_is_not_taken():
    class LookAlike(nn.Module):  # the same attributes, its own forward: not transformers' dispatcher
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(EXPERTS, 12, HIDDEN))
            self.act_fn = nn.SiLU()

        def forward(self, *args, **kwargs):
            return args[0]

        def _apply_gate(self, gate_up_out):
            gate, up = gate_up_out.chunk(2, dim=-1)
            return self.act_fn(gate) * up

    assert patching.experts._dispatch(LookAlike) is None
    assert patching.experts._dispatch(MixtralExperts) is not None
    report = fusedact.patch(LookAlike())
    assert [c.action for c in report.changes] == ["replace"]
