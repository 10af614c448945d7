"""fusedact.patch on real architectures, built from tiny random-weight configs (nothing downloaded):
transformers Llama, Mistral, Qwen2, GPT-2 and BERT in detail (bf16, state_dict, compile); every architecture
of tests/architectures.py (MoE, Phi-3, T5 v1.1, Falcon, Falcon-H1, Gemma-2, RoBERTa, Whisper, CLIP, BLOOM,
Apertus, MobileNet v2, LeViT, ...) for the same function, what patch fused, and the README's coverage table; timm's
in test_timm.py.

Each patched model must give the unpatched model's logits and every parameter's gradient:
- fp32: rtol=atol=1e-5. Patching changes where a bias is added (in the fp32 kernel, not in the GEMM) and the
  activation's last fp32 bits, a few ULPs per layer that the following layers carry along.
- bf16: the patched model rounds once where eager rounds twice (after the GEMM, after the activation), so it
  is not bitwise the unpatched one. The justified check is against the fp32 model: the patched bf16 model's
  RMS error must be no more than 1.25x the unpatched bf16 model's, for the logits and for all gradients
  together (measured: 0.98-1.02x); no single parameter's gradient error more than 3x (measured up to 1.75x).

Biases are re-drawn at random: transformers initializes them to zero, which would make folding them untested.
"""

import copy
import os

import pytest
import torch
from architectures import ARCHITECTURES, coverage_row, readme_table, run
from optional import transformers_with_models

import fusedact
from fusedact.lab.models import TINY_MODELS

transformers = transformers_with_models()

SEQUENCE, BATCH = 12, 2
VOCAB = TINY_MODELS["tiny-llama"][1]["vocab_size"]  # 128, as every tiny model


def _tiny(name: str, config_class: str = "", **extra):
    """The lab's built-in tiny model ``name`` (the real architecture, 2 layers of width 32), as a config of
    ``config_class`` (default: its own), with ``extra`` settings."""
    own_class, settings = TINY_MODELS[name]
    return getattr(transformers, config_class or own_class)(**settings, **extra)


CONFIGS = {
    "llama": lambda: _tiny("tiny-llama"),
    "llama-mlp-bias": lambda: _tiny("tiny-llama", mlp_bias=True),
    "mistral": lambda: _tiny("tiny-llama", "MistralConfig"),
    "qwen2": lambda: _tiny("tiny-llama", "Qwen2Config"),
    "gpt2": lambda: _tiny("tiny-gpt2"),
    "bert": lambda: _tiny("tiny-bert"),
}

# What patch must do per model: how many changes of each action (2 layers each).
EXPECTED = {
    "llama": {"gated_mlp": 2, "replace": 2},
    "llama-mlp-bias": {"gated_mlp": 2, "replace": 2},
    "mistral": {"gated_mlp": 2, "replace": 2},
    "qwen2": {"gated_mlp": 2, "replace": 2},
    "gpt2": {"fold_bias": 2, "lean_mlp": 2},  # c_fc (Conv1D) bias into gelu_new (tanh), on the lean block
    "bert": {"fold_bias": 3},  # 2 intermediate dense + the MLM head's transform, erf GELU
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    config._attn_implementation = "eager"
    if name == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
    return model.eval()  # dropout off: the comparison is of functions


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", CONFIGS)
def test_patched_model_matches_fp32(name):
    model = build(name)
    original = copy.deepcopy(model)
    report = fusedact.patch(model)

    actions = {}
    for change in report.changes:
        actions[change.action] = actions.get(change.action, 0) + 1
    assert actions == EXPECTED[name], str(report)
    assert report.left == []

    ids = tokens()
    logits, grads = logits_and_grads(model, ids)
    logits_reference, grads_reference = logits_and_grads(original, ids)
    torch.testing.assert_close(logits, logits_reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_reference.keys() and len(grads) == len(list(model.parameters()))
    for key in grads:
        torch.testing.assert_close(
            grads[key], grads_reference[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("name", ["llama-mlp-bias", "gpt2", "bert"])
def test_patched_bf16_is_as_close_to_fp32_as_eager_bf16(name):
    model = build(name)
    ids = tokens()
    logits_fp32, grads_fp32 = logits_and_grads(model, ids)
    eager = copy.deepcopy(model).to(torch.bfloat16)
    patched = copy.deepcopy(model).to(torch.bfloat16)
    assert len(fusedact.patch(patched)) > 0
    logits_eager, grads_eager = logits_and_grads(eager, ids)
    logits_patched, grads_patched = logits_and_grads(patched, ids)

    def rms_error(a, b):
        return (a.double() - b.double()).pow(2).mean().sqrt().item()

    assert rms_error(logits_patched, logits_fp32) <= 1.25 * rms_error(logits_eager, logits_fp32)

    def relative_error(grads):  # over all gradients together, relative to their size
        error = sum((grads[key].double() - grads_fp32[key].double()).pow(2).sum() for key in grads_fp32)
        return (error / sum(grads_fp32[key].double().pow(2).sum() for key in grads_fp32)).sqrt().item()

    assert relative_error(grads_patched) <= 1.25 * relative_error(grads_eager)
    for key in grads_fp32:  # and no single gradient far off (one parameter's ratio varies: measured 0.66-1.75x)
        assert rms_error(grads_patched[key], grads_fp32[key]) <= 3 * rms_error(grads_eager[key], grads_fp32[key]), key


@pytest.mark.parametrize("name", ["llama-mlp-bias", "gpt2", "bert"])
def test_state_dict_round_trips_with_an_unpatched_model(name):
    patched = build(name, seed=0)
    fusedact.patch(patched)
    plain = build(name, seed=1)  # other weights, until it loads the patched model's
    plain.load_state_dict(patched.state_dict())
    assert list(plain.state_dict()) == list(patched.state_dict())
    ids = tokens()
    torch.testing.assert_close(patched(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)

    other = build(name, seed=2)
    patched.load_state_dict(other.state_dict())  # an unpatched checkpoint into the patched model
    torch.testing.assert_close(patched(ids).logits, other(ids).logits, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_the_transformers_modules():
    model = build("llama-mlp-bias")
    classes = {name: type(module) for name, module in model.named_modules()}
    fusedact.patch(model)
    assert type(model.model.layers[0].mlp).__name__ == "FusedLlamaMLP"
    fusedact.unpatch(model)
    assert {name: type(module) for name, module in model.named_modules()} == classes


@pytest.mark.slow
def test_patched_llama_compiles_fullgraph():
    model = build("llama-mlp-bias")
    original = copy.deepcopy(model)
    fusedact.patch(model)
    compiled = torch.compile(model, fullgraph=True)
    ids = tokens()
    torch.testing.assert_close(compiled(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


# --- Every architecture of tests/architectures.py -----------------------------------------------------------

TRANSFORMERS_ARCHITECTURES = [a for a in ARCHITECTURES if a.source == "transformers"]
# What each must show (beyond the README table, which is checked whole below): the kernels that run.
# lean_gated / lean_gated_packed / lean_mlp: the MLP ran on fusedact.mlp's lean block (one autograd node).
KERNELS = {
    "Llama": {"lean_gated"},
    "Mistral": {"lean_gated"},
    "Qwen2": {"lean_gated"},
    "Qwen3": {"lean_gated"},
    "Gemma": {"lean_gated"},
    "Gemma-2": {"lean_gated"},
    "Mixtral": {"gated_packed"},  # the experts (grouped_mm on CPU: one call per layer)
    "Qwen2-MoE": {"lean_gated", "gated_packed"},  # the shared expert's MLP and the experts
    "Qwen3-MoE": {"gated_packed"},
    "DeepSeek-V3": {"lean_gated", "gated_packed"},  # the dense first layer and shared experts, the experts
    "Phi-3": {"lean_gated_packed"},  # gate_up_proj's halves, read in place
    "T5 v1.1": {"gated"},  # wi_0, wi_1
    "GPT-2": {"lean_mlp"},  # Conv1D layers
    "ViT": {"lean_mlp"},
    "CLIP": {"lean_mlp"},
    "Falcon": {"bias_act"},  # FalconLinear's bias folded into the GELU
    "Falcon-H1": {"gated"},  # the scaled gate: gate_multiplier as the kernel's gate_scale (test below)
    "BLOOM": {"bias_act"},  # BloomGelu (the tanh GELU) with dense_h_to_4h's bias folded in
    "Apertus": {"xielu"},  # XIELU on the model's alpha_p/alpha_n (their gradients compared with the rest)
    "MobileNet v2": {"relu6"},  # conv -> BatchNorm -> ReLU6: no bias to fold
    "LeViT": {"hardswish"},
    "timm vit_tiny": {"lean_mlp"},  # timm's Mlp (drop1 and norm inert); checked in test_timm.py
    "timm mobilenetv3": {"hardswish", "hardsigmoid"},  # the SqueezeExcite gates: hard sigmoids
    "timm tf_efficientnet_lite0": {"relu6"},
    "timm lcnet_050": {"hardswish", "hardsigmoid"},
}
LEAN_KERNELS = {"lean_gated", "lean_gated_packed", "lean_mlp"}
# Where the lean blocks' results are not bitwise the fused path's for the whole model, and why (elsewhere
# they are: the MLP's input feeds the MLP alone, so its gradient is the block's).
NOT_BITWISE = {
    # The shared expert's input also feeds the router, the experts and the shared-expert gate: autograd adds
    # the gate and up projections' input gradients into that sum one at a time, the lean block adds the two
    # first. fp32 rounding of the sum's order, below the 1e-5 the unpatched comparison holds.
    "Qwen2-MoE",
}


def _outputs_and_grads(architecture, model):
    model.zero_grad(set_to_none=True)
    out = run(architecture, model)
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def compare_to_unpatched(architecture):
    """Patch a copy; the outputs and every gradient must be the unpatched model's (fp32, rtol=atol=1e-5 as
    above), and where its MLPs ran on lean blocks, bitwise those of the copy ``patch(lean_mlp=False)`` gives
    (the lean blocks' contract: the fused path's numbers). Returns the report and the kernels one patched
    forward ran."""
    from patch_checks import kernel_calls

    model = architecture.build()
    original, fused = copy.deepcopy(model), copy.deepcopy(model)
    report = fusedact.patch(model)
    fused_report = fusedact.patch(fused, lean_mlp=False)
    assert list(model.state_dict()) == list(original.state_dict())
    with kernel_calls() as calls:
        out, grads = _outputs_and_grads(architecture, model)
    out_reference, grads_reference = _outputs_and_grads(architecture, original)
    torch.testing.assert_close(out, out_reference, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_reference.keys()
    for key in grads:
        torch.testing.assert_close(
            grads[key], grads_reference[key], rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    kernels = {name for name, count in calls.items() if count}
    if kernels & LEAN_KERNELS:
        with kernel_calls() as fused_calls:
            out_fused, grads_fused = _outputs_and_grads(architecture, fused)
        assert not set(fused_calls) & LEAN_KERNELS, str(fused_report)
        assert torch.equal(out, out_fused) and grads.keys() == grads_fused.keys()
        bitwise = architecture.name not in NOT_BITWISE
        for key in grads:
            if bitwise:
                assert torch.equal(grads[key], grads_fused[key]), key
            else:
                torch.testing.assert_close(grads[key], grads_fused[key], rtol=1e-5, atol=1e-5, msg=key)
    fusedact.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in original.named_modules()}
    return report, kernels


@pytest.mark.parametrize("architecture", TRANSFORMERS_ARCHITECTURES, ids=lambda a: a.name)
def test_architecture_matches_unpatched_and_its_coverage_row(architecture):
    report, kernels = compare_to_unpatched(architecture)
    assert KERNELS.get(architecture.name, set()) <= kernels, str(report)
    assert bool(kernels & LEAN_KERNELS) == bool(KERNELS.get(architecture.name, set()) & LEAN_KERNELS), kernels
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    rows = {row.split(" | ")[0].lstrip("| "): row for row in readme_table(readme).splitlines()[2:]}
    expected = "| " + " | ".join(coverage_row(architecture, report)) + " |"
    assert rows.get(architecture.name) == expected, (
        f"README's coverage row for {architecture.name} is stale: run `python tests/architectures.py --write`"
    )


def test_falcon_h1_gate_multiplier_is_the_kernels_gate_scale(monkeypatch):
    """Falcon-H1's ``act_fn(gate_proj(x) * gate_multiplier)``: the number reaches the gated kernel as its
    ``gate_scale`` (not a scaled gate computed before it); the model is checked whole above."""
    from architectures import BY_NAME

    model = BY_NAME["Falcon-H1"].build()
    report = fusedact.patch(model)
    mlps = [change for change in report.changes if change.action == "gated_mlp"]
    assert len(mlps) == 2 and all("gate scale in the kernel" in change.after for change in mlps), str(report)
    scales = []
    gated = fusedact.functional.gated

    def spy(*args, gate_scale=1.0, **kwargs):
        scales.append(gate_scale)
        return gated(*args, gate_scale=gate_scale, **kwargs)

    monkeypatch.setattr(fusedact.functional, "gated", spy)
    run(BY_NAME["Falcon-H1"], model)
    assert scales == [0.7, 0.7]  # the config's mlp_multipliers[0], once per layer
