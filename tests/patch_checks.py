"""Shared checks for the fusedact.patch tests: the patched model computes the same function (outputs and every
gradient) with the same state_dict, and which fused kernels a call ran.

Tolerances: fp32 patched and unpatched differ only where the bias is added (inside the fp32 kernel instead
of in the GEMM or a separate add) and in the last bits of the activation (fp32 math, one rounding), so a few
fp32 ULPs of the activations: rtol=atol=1e-5 after a couple of layers.
"""

import contextlib
from collections import Counter

import torch
from torch import nn

import fusedact.functional
import fusedact.mlp

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


# The lean blocks' entries (``fusedact.mlp`` looks them up at each call) -> the name counted for each.
LEAN_ENTRIES = {"run_gated_mlp": "lean_gated", "run_gated_mlp_packed": "lean_gated_packed", "run_mlp": "lean_mlp"}


# The functional entries of the newer activations, counted too: their fusedact.nn modules call them.
NEW_ENTRIES = ("relu6", "hardtanh", "hardswish", "hardsigmoid", "softplus", "xielu")


@contextlib.contextmanager
def kernel_calls():
    """Counts the calls of fusedact's gated and bias-activation entry points while the block runs (the patched
    code looks them up on ``fusedact.functional`` at each call), and of the lean blocks' ops (``fusedact.mlp``
    looks them up likewise): ``lean_gated``, ``lean_gated_packed``, ``lean_mlp``; and ``NEW_ENTRIES``."""
    counts = Counter()
    targets = [(fusedact.functional, name, name) for name in ("gated", "gated_packed", "bias_act", *NEW_ENTRIES)]
    targets += [(fusedact.mlp, entry, name) for entry, name in LEAN_ENTRIES.items()]
    originals = [(module, entry, getattr(module, entry)) for module, entry, _ in targets]

    def counting(name, original):
        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return call

    for (module, entry, name), (_, _, original) in zip(targets, originals, strict=True):
        setattr(module, entry, counting(name, original))
    try:
        yield counts
    finally:
        for module, entry, original in originals:
            setattr(module, entry, original)


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
