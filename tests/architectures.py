"""Tiny random-weight models of real architectures (nothing downloaded), for the patch integration tests and the
README's coverage table.

Each entry builds the architecture's own classes from a config (transformers) or a model name (timm) with two
layers of width 32, and an input for it. ``python tests/architectures.py`` prints the coverage table (what
``fusedact.patch`` fuses in each and what it leaves, and why), read from the patch report of each model;
``--write`` puts it into README.md between its coverage markers. test_integration.py checks that the README's
table is the one the models give, so it stays true.

Biases are re-drawn at random: transformers initializes them to zero, which would make folding them untested.
"""

import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

SEQUENCE, BATCH, VOCAB = 12, 2, 128
_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def run(architecture, model):
    """The tensor to compare from one forward of ``model`` on the architecture's inputs."""
    inputs = architecture.inputs()
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return architecture.output(out)


@dataclass(frozen=True)
class Architecture:
    name: str  # as the README's table names it
    source: str  # "transformers" or "timm"
    build: Callable  # () -> the model (random weights, eval mode)
    inputs: Callable  # () -> the inputs of one forward: a tuple (positional) or a dict (keywords)
    output: Callable = lambda out: out  # the tensor to compare, from the model's output


def _tokens():
    return (torch.randint(0, VOCAB, (BATCH, SEQUENCE), generator=torch.Generator().manual_seed(1)),)


def _images(size=32):
    return (torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _randomize_biases(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or name.endswith("_bias"):
                parameter.normal_(0.0, 0.5)
            elif parameter.dim() == 3 and "proj" in name:  # MoE experts' 3-D weights start uninitialized
                parameter.normal_(0.0, 0.2)
    return model.eval()


def _hf(config_class: str, model_class: str = "AutoModelForCausalLM", **settings):
    def build():
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_class)(**settings)
        config._attn_implementation = "eager"
        factory = getattr(transformers, model_class)
        model = factory.from_config(config) if model_class.startswith("Auto") else factory(config)
        return _randomize_biases(model)

    return build


def _timm(name: str, **settings):
    def build():
        import timm

        torch.manual_seed(0)
        return _randomize_biases(timm.create_model(name, pretrained=False, num_classes=10, **settings))

    return build


def _logits(out):
    return out.logits


def _whisper_inputs():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(BATCH, 16, 64, generator=generator)
    return dict(input_features=features, decoder_input_ids=torch.randint(0, VOCAB, (BATCH, 6), generator=generator))


def _whisper_output(out):
    return out.logits


def _clip_inputs():
    return dict(input_ids=_tokens()[0], pixel_values=_images()[0])


ARCHITECTURES = [
    Architecture("Llama", "transformers", _hf("LlamaConfig", **_DECODER), _tokens, _logits),
    Architecture("Mistral", "transformers", _hf("MistralConfig", **_DECODER), _tokens, _logits),
    Architecture("Qwen2", "transformers", _hf("Qwen2Config", **_DECODER), _tokens, _logits),
    Architecture("Qwen3", "transformers", _hf("Qwen3Config", **_DECODER, head_dim=8), _tokens, _logits),
    Architecture(
        "Qwen2-MoE",
        "transformers",
        _hf("Qwen2MoeConfig", **_DECODER, **_MOE, num_experts=4, shared_expert_intermediate_size=48),
        _tokens,
        _logits,
    ),
    Architecture(
        "Qwen3-MoE",
        "transformers",
        _hf("Qwen3MoeConfig", **_DECODER, **_MOE, num_experts=4, head_dim=8),
        _tokens,
        _logits,
    ),
    Architecture(
        "Mixtral",
        "transformers",
        _hf("MixtralConfig", **_DECODER, num_local_experts=4, num_experts_per_tok=2),
        _tokens,
        _logits,
    ),
    Architecture(
        "DeepSeek-V3",
        "transformers",
        _hf(
            "DeepseekV3Config",
            **{**_DECODER, "num_key_value_heads": 4},
            **_MOE,
            n_routed_experts=4,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        _tokens,
        _logits,
    ),
    Architecture("Phi-3", "transformers", _hf("Phi3Config", **_DECODER, pad_token_id=0), _tokens, _logits),
    Architecture("Gemma", "transformers", _hf("GemmaConfig", **_DECODER, head_dim=8), _tokens, _logits),
    Architecture("Gemma-2", "transformers", _hf("Gemma2Config", **_DECODER, head_dim=8), _tokens, _logits),
    Architecture(
        "GPT-2",
        "transformers",
        _hf(
            "GPT2Config",
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        _tokens,
        _logits,
    ),
    Architecture("BERT", "transformers", _hf("BertConfig", "BertForMaskedLM", **_ENCODER), _tokens, _logits),
    Architecture(
        "RoBERTa",
        "transformers",
        _hf("RobertaConfig", "RobertaForMaskedLM", **_ENCODER, pad_token_id=1),
        _tokens,
        _logits,
    ),
    Architecture(
        "T5 v1.1",
        "transformers",
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        ),
        lambda: dict(input_ids=_tokens()[0], decoder_input_ids=_tokens()[0][:, :5]),
        _logits,
    ),
    Architecture(
        "Falcon",
        "transformers",
        _hf("FalconConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True),
        _tokens,
        _logits,
    ),
    Architecture(
        "Falcon-H1",
        "transformers",
        _hf(
            "FalconH1Config",
            **_DECODER,
            head_dim=8,
            mamba_d_ssm=32,
            mamba_n_heads=4,
            mamba_d_head=8,
            mamba_d_state=8,
            mamba_n_groups=1,
            mamba_chunk_size=4,
            mlp_multipliers=[0.7, 1.3],
        ),
        _tokens,
        _logits,
    ),
    Architecture(
        "BLOOM",
        "transformers",
        _hf("BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        _tokens,
        _logits,
    ),
    Architecture("Apertus", "transformers", _hf("ApertusConfig", **_DECODER), _tokens, _logits),
    Architecture(
        "MobileNet v2",
        "transformers",
        _hf(
            "MobileNetV2Config",
            "MobileNetV2ForImageClassification",
            image_size=32,
            depth_multiplier=0.35,
            num_labels=10,
        ),
        _images,
        _logits,
    ),
    Architecture(
        "LeViT",
        "transformers",
        _hf(
            "LevitConfig",
            "LevitForImageClassification",
            image_size=64,
            hidden_sizes=[16, 32],
            num_attention_heads=[2, 2],
            depths=[1, 1],
            key_dim=[8, 8],
            mlp_ratio=[2, 2],
            attention_ratio=[2, 2],
            down_ops=[["Subsample", 8, 2, 4, 2, 2]],
            num_labels=10,
        ),
        lambda: _images(64),
        _logits,
    ),
    Architecture(
        "ViT",
        "transformers",
        _hf("ViTConfig", "ViTForImageClassification", **_VISION, intermediate_size=64),
        _images,
        _logits,
    ),
    Architecture(
        "CLIP",
        "transformers",
        _hf(
            "CLIPConfig",
            "CLIPModel",
            text_config=dict(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
            ),
            vision_config=dict(**_VISION, intermediate_size=64),
            projection_dim=16,
        ),
        _clip_inputs,
        lambda out: out.logits_per_image,
    ),
    Architecture(
        "Whisper",
        "transformers",
        _hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        _whisper_inputs,
        _whisper_output,
    ),
    Architecture("timm resnet18", "timm", _timm("resnet18"), _images),
    Architecture("timm vit_tiny", "timm", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), _images),
    Architecture(
        "timm eva02_tiny (GluMlp)", "timm", _timm("eva02_tiny_patch14_224", img_size=28, depth=2), lambda: _images(28)
    ),
    Architecture(
        "timm eva02_base (SwiGLU)",
        "timm",
        _timm("eva02_base_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2),
        lambda: _images(28),
    ),
    Architecture("timm mobilenetv3", "timm", _timm("mobilenetv3_small_050"), _images),
    Architecture("timm efficientnet_b0", "timm", _timm("efficientnet_b0"), _images),
    Architecture("timm tf_efficientnet_lite0", "timm", _timm("tf_efficientnet_lite0"), _images),
    Architecture("timm lcnet_050", "timm", _timm("lcnet_050"), _images),
    Architecture("timm convnext_atto", "timm", _timm("convnext_atto"), _images),
]
BY_NAME = {architecture.name: architecture for architecture in ARCHITECTURES}


# --- The coverage table -----------------------------------------------------------------------------------

_GATED_KIND = re.compile(r"\((\w+(?:/\w+)*) (?:packed )?gated kernel")
_FOLDED_KIND = re.compile(r"Folded\w*\((\w+)")  # FoldedBias(gelu, ...), FoldedXIELU(xielu, ...)


def _counted(counter: Counter) -> str:
    return ", ".join(f"{count} {label}" if count > 1 else label for label, count in counter.items()) or "-"


def coverage_row(architecture: Architecture, report) -> list:
    """The table's cells for one patched model: fused gated MLPs and experts, MLPs on lean blocks, folded
    biases, swapped activations, modules left (with why), activations called as functions (where)."""
    changes = report.changes
    gated = Counter(
        _GATED_KIND.search(c.after).group(1)
        + (" packed" if "halves" in c.after else "")
        + (" scaled" if "gate scale" in c.after else "")
        + (" + biases" if "folded" in c.after else "")
        for c in changes
        if c.action == "gated_mlp"
    )
    experts = Counter(_GATED_KIND.search(c.after).group(1) for c in changes if c.action == "experts")
    lean = Counter(
        "two-layer" if c.action == "lean_mlp" else "gated packed" if "halves" in c.after else "gated"
        for c in changes
        if c.action == "lean_mlp" or (c.action == "gated_mlp" and "lean block" in c.after)
    )
    folded = Counter(_FOLDED_KIND.search(c.after).group(1) for c in changes if c.action == "fold_bias")
    swapped = Counter(re.sub(r"^fusedact\.|\(.*$", "", c.after) for c in changes if c.action == "replace")
    left = Counter(
        f"{item.module} ({item.reason.split(' (')[0].replace('not an activation fusedact recognizes', 'unknown')})"
        for item in report.left
    )
    calls = Counter(
        f"{call.kind} in {call.function if call.function != 'forward' else call.module}" for call in report.calls
    )
    return [
        architecture.name,
        _counted(gated),
        _counted(experts),
        _counted(lean),
        _counted(folded),
        _counted(swapped),
        _counted(left),
        _counted(calls),
    ]


HEADER = [
    "architecture (2 layers, tiny)",
    "gated MLPs on the gated kernel",
    "MoE experts on the packed kernel",
    "MLPs on the lean block",
    "biases folded into",
    "activation modules swapped",
    "activation-like modules left (why)",
    "activations called as functions (where; not swappable)",
]


def coverage_table(architectures=ARCHITECTURES) -> str:
    import fusedact

    rows = [HEADER, ["---"] * len(HEADER)]
    for architecture in architectures:
        model = architecture.build()
        rows.append(coverage_row(architecture, fusedact.patch(model)))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


def readme_table(readme: str) -> str:
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    table = coverage_table()
    if "--write" in sys.argv:
        import os

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        readme = open(path).read()
        before, rest = readme.split(START, 1)
        after = rest.split(END, 1)[1]
        open(path, "w").write(f"{before}{START}\n{table}\n{END}{after}")
    print(table)
