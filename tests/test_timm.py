"""fusedact.patch on timm models built with random weights (nothing downloaded): a ResNet and a ViT in detail,
and every timm model of tests/architectures.py (eva02's SwiGLU and GluMlp, mobilenetv3, efficientnet, convnext)
for the same function and the README's coverage rows.

timm needs torchvision, whose PyPI build does not import beside the CPU torch CI installs, so these tests
skip where timm is missing; run them where it is (``pip install timm``, with a matching torchvision):
``python -m pytest -q tests/test_timm.py``. Tolerances as in test_integration.py (fp32: rtol=atol=1e-5).
"""

import copy
import os

import pytest
import torch
from architectures import ARCHITECTURES, coverage_row, readme_table

import fusedact

timm = pytest.importorskip("timm")


def compare(model: torch.nn.Module, images: torch.Tensor):
    original = copy.deepcopy(model)
    report = fusedact.patch(model)
    outputs = []
    for m in (model, original):
        m.zero_grad(set_to_none=True)
        out = m(images)
        out.pow(2).mean().backward()
        outputs.append((out.detach(), {name: p.grad for name, p in m.named_parameters()}))
    (out, grads), (out_reference, grads_reference) = outputs
    torch.testing.assert_close(out, out_reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_reference.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], grads_reference[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert list(model.state_dict()) == list(original.state_dict())
    return report


def test_resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    report = compare(model, torch.randn(2, 3, 32, 32))
    # conv -> BatchNorm -> ReLU: no bias to fold, every ReLU module replaced (each block has two).
    assert {change.action for change in report.changes} == {"replace"}
    relus = [name for name, m in model.named_modules() if isinstance(m, fusedact.nn.ReLU)]
    assert len(relus) == 1 + 2 * 8 and all(type(m) is not torch.nn.ReLU for m in model.modules())


def test_vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
    ).eval()
    report = compare(model, torch.randn(2, 3, 32, 32))
    # timm's Mlp: fc1 -> GELU, the fc1 bias folded into the GELU kernel in each block, and the MLP on the
    # lean block (drop1 and norm inert: a zero-probability dropout and an Identity).
    assert [(c.path, c.action) for c in report.changes] == [
        ("blocks.0.mlp.act", "fold_bias"),
        ("blocks.1.mlp.act", "fold_bias"),
        ("blocks.0.mlp", "lean_mlp"),
        ("blocks.1.mlp", "lean_mlp"),
    ]
    assert report.left == []


# Every timm model of tests/architectures.py: the same function as unpatched, and the README's coverage row.
TIMM_ARCHITECTURES = [a for a in ARCHITECTURES if a.source == "timm"]


@pytest.mark.parametrize("architecture", TIMM_ARCHITECTURES, ids=lambda a: a.name)
def test_architecture_matches_unpatched_and_its_coverage_row(architecture):
    from test_integration import KERNELS, compare_to_unpatched

    report, kernels = compare_to_unpatched(architecture)
    assert KERNELS.get(architecture.name, set()) <= kernels, str(report)  # e.g. vit_tiny's lean MLPs
    if "gated" in architecture.name or "SwiGLU" in architecture.name or "GluMlp" in architecture.name:
        assert kernels & {"gated", "gated_packed"}, str(report)
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    rows = {row.split(" | ")[0].lstrip("| "): row for row in readme_table(readme).splitlines()[2:]}
    expected = "| " + " | ".join(coverage_row(architecture, report)) + " |"
    assert rows.get(architecture.name) == expected, (
        f"README's coverage row for {architecture.name} is stale: run `python tests/architectures.py --write`"
    )


# timm's own activation classes (timm.layers.activations, and the memory-efficient autograd.Function ones of
# activations_me that timm builds where it is asked to): folded with the Linear's bias, or swapped.
TIMM_ACTIVATIONS = [
    ("activations", "HardSwish", "hardswish"),
    ("activations", "HardSigmoid", "hardsigmoid"),
    ("activations_me", "SwishMe", "silu"),
    ("activations_me", "MishMe", "mish"),
    ("activations_me", "HardSwishMe", "hardswish"),
    ("activations_me", "HardSigmoidMe", "hardsigmoid"),
]


@pytest.mark.parametrize("module,name,kind", TIMM_ACTIVATIONS, ids=[name for _, name, _ in TIMM_ACTIVATIONS])
def test_timm_activation_classes(module, name, kind):
    import importlib

    from patch_checks import assert_same_function, assert_same_state_dict

    cls = getattr(importlib.import_module(f"timm.layers.{module}"), name)
    assert fusedact.patching.activation_kind(cls()) == (kind, {})
    torch.manual_seed(0)
    for bias, action in ((True, "fold_bias"), (False, "replace")):
        model = torch.nn.Sequential(torch.nn.Linear(6, 10, bias=bias), cls(), torch.nn.Linear(10, 4, bias=False))
        original = copy.deepcopy(model)
        report = fusedact.patch(model, lean_mlp=False)
        assert [(c.path, c.action) for c in report.changes] == [("1", action)] and report.left == []
        assert_same_state_dict(model, original)
        assert_same_function(model, original, 4 * torch.randn(7, 6))
