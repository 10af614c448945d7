"""Activations a forward calls as functions: listed in the patch report (and by ``fusedact inspect``) with the
function, file and line, and the modules that run them; calls a gated rule rewrote are not listed."""

import torch
import torch.nn.functional as F
from torch import nn

import fusedact
from fusedact.patching import function_calls

module_level_gelu = nn.GELU()  # as RoBERTa's `gelu = get_activation("gelu")`


def soft_cap(scores, cap):
    """A module-level helper the forward names (as eager_attention_forward)."""
    return torch.tanh(scores / cap) * cap


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.conv = nn.Linear(6, 6), nn.Conv1d(6, 6, 1)

    def forward(self, x):
        h = module_level_gelu(self.dense(x))
        h = F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        router = h.sigmoid()
        return soft_cap(h * router, 30.0)


def test_calls_are_listed_with_where_they_are():
    model = nn.Sequential(Head(), Head())
    report = fusedact.patch(model)
    calls = sorted((c.call, c.kind, c.function, c.paths) for c in report.calls)
    assert calls == [
        (".sigmoid()", "sigmoid", "forward", ("0", "1")),
        ("F.gelu", "gelu", "forward", ("0", "1")),
        ("module_level_gelu", "gelu", "forward", ("0", "1")),
        ("torch.tanh", "tanh", "soft_cap", ("0", "1")),
    ]
    (gelu,) = [c for c in report.calls if c.call == "F.gelu"]
    assert gelu.where == f"test_function_calls.py:{Head.forward.__code__.co_firstlineno + 2}"
    assert gelu.code == "h = F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)"
    text = str(report)
    assert "4 activation calls in the code, left as they are" in text
    assert "F.gelu at test_function_calls.py:" in text and "in Head.forward" in text and "[0, 1]" in text


def test_a_rewritten_product_is_no_longer_listed():
    class FunctionalSwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3 = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x):
            return F.silu(self.w1(x)) * self.w3(x) + torch.sigmoid(x).sum()

    model = FunctionalSwiGLU()
    assert [c.call for c in function_calls.find(model)] == ["F.silu", "torch.sigmoid"]
    report = fusedact.patch(model)
    assert [c.call for c in report.calls] == ["torch.sigmoid"]  # F.silu now runs inside the gated kernel


def test_inspect_lists_them_too():
    from fusedact.lab.inspection import format_inspection, inspect_model

    report = inspect_model(nn.Sequential(Head()))
    assert [(row["call"], row["kind"], row["in"], row["modules"]) for row in report["function_calls"]] == [
        ("module_level_gelu", "gelu", "Head.forward", ["0"]),
        ("F.gelu", "gelu", "Head.forward", ["0"]),
        (".sigmoid()", "sigmoid", "Head.forward", ["0"]),
        ("torch.tanh", "tanh", "Head.soft_cap", ["0"]),
    ]
    text = format_inspection(report)
    assert "called as functions in the code (not modules: no swap reaches them):" in text
    assert "torch.tanh (tanh) at test_function_calls.py:" in text and "return torch.tanh(scores / cap) * cap" in text
