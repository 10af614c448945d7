"""Activation memory of training, MLP block by block and model by model: the bytes autograd saves.

    python -m bench.saved_memory              # CPU: blocks of T=512 tokens, small models; GPU: bf16, bigger
    python -m bench.saved_memory --quick      # CPU, seconds (CI): T=64 blocks, the tiny test models
    python -m bench.saved_memory --json out.json

Four variants, with the same weights and inputs:

- ``eager``: PyTorch as the model is written;
- ``fused``: ``fusedact.patch(model, lean_mlp=False)`` (gated kernel, biases folded into activations);
- ``lean``: ``fusedact.patch(model)``, whose MLPs run ``fusedact.mlp``'s lean blocks (checked: every MLP
  of the three models and both blocks is one ``patch`` proves);
- ``checkpoint``: eager, with each MLP under ``torch.utils.checkpoint`` (``use_reentrant=False``), which
  recomputes the MLP's GEMMs in backward.

**Saved bytes** (device independent: the same on CPU and GPU for one dtype): every tensor autograd saves
during the forward pass (``torch.autograd.graph.saved_tensors_hooks``), counted once per storage (a view
and its base, or a tensor saved twice, are one), parameters excluded (they are not activations; a view of
a weight, ``W.t()``, is the weight). For a block the bytes are also given in units of one [T, F] tensor
beside the input ``x``: the issue's targets are 4 / 3 / 2 for the gated block (eager / fused / lean) and
2 / 2 / 1 for the GELU block. ``checkpoint`` keeps x only (its inputs, saved by
``torch.utils.checkpoint``'s own node): 0.

On a GPU, also the **peak** memory a training step allocates above what was allocated before it
(``torch.cuda.max_memory_allocated``) and the **step time** (forward + backward, median of ``--steps``).
Models: transformers' Llama, GPT-2 and ViT (random weights, nothing downloaded, dropout 0), a
training step with the model's own loss (``labels=``); each variant's loss is compared with eager's.
"""

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import fusedact

VARIANTS = ("eager", "fused", "lean", "checkpoint")


@dataclass(frozen=True)
class Sizes:
    tokens: int  # T of a block
    hidden: int  # H
    gated_intermediate: int  # F of the gated block (3.5 H, as Llama-3's 14336 / 4096)
    gelu_intermediate: int  # F of the GELU block (4 H)
    model: dict  # transformers config settings shared by the three models (hidden, layers, heads, ...)
    sequences: int
    sequence_length: int
    image_size: int


# One [T, F] tensor: 64 x 168 x 4 B = 43 kB in --quick; the blocks' H and F match Llama-3-8B's ratio.
QUICK = Sizes(64, 48, 168, 192, dict(hidden=32, intermediate=64, layers=2, heads=4), 2, 12, 32)
CPU = Sizes(512, 256, 896, 1024, dict(hidden=256, intermediate=688, layers=4, heads=4), 4, 128, 64)
GPU = Sizes(8192, 4096, 14336, 16384, dict(hidden=1024, intermediate=2816, layers=8, heads=16), 8, 1024, 224)


# ---------------------------------------------------------------------------------------------------
# Counting what autograd saves


@dataclass
class Saved:
    """What one forward pass saved for backward: bytes per distinct storage (parameters excluded)."""

    storages: dict = field(default_factory=dict)  # storage data_ptr -> bytes

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def saved_for_backward(forward: Callable[[], Tensor], model: Optional[nn.Module] = None) -> tuple[Tensor, Saved]:
    """Run ``forward()`` under saved-tensor hooks; returns its output and what autograd saved, each storage
    once, without ``model``'s parameters. The tensors are kept as autograd would keep them (the hooks pass
    them through), so a backward pass after this is an ordinary one."""
    parameters = set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = Saved()

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.nbytes():
            saved.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    return output, saved


# ---------------------------------------------------------------------------------------------------
# MLP blocks


class GatedMLP(nn.Module):
    """Llama's MLP, as transformers writes it (``fusedact.patch`` proves it from this forward)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def gelu_mlp(hidden: int, intermediate: int) -> nn.Module:
    """BERT/ViT's MLP: Linear -> GELU -> Linear, biases on (patch folds the first into the GELU)."""
    return nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))


def _set_forward(module: nn.Module, forward: Callable) -> None:
    module.forward = forward  # on the instance: the bench's own wiring, never patched or saved


def _patch(module: nn.Module, variant: str, mlps: int = 1) -> None:
    """``fusedact.patch``: the lean blocks for ``lean`` (on all ``mlps`` MLPs), the fused path for ``fused``."""
    report = fusedact.patch(module, lean_mlp=variant == "lean")
    lean = [c for c in report.changes if c.action == "lean_mlp" or "lean block" in c.after]
    assert len(lean) == (mlps if variant == "lean" else 0), f"MLPs on lean blocks: {len(lean)}\n{report}"


def _checkpointed(module: nn.Module, forward: Optional[Callable] = None) -> None:
    run = forward or module.forward
    _set_forward(module, lambda x: checkpoint(run, x, use_reentrant=False))


def make_block(kind: str, variant: str, sizes: Sizes, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gated":
        block = GatedMLP(sizes.hidden, sizes.gated_intermediate)
    else:
        block = gelu_mlp(sizes.hidden, sizes.gelu_intermediate)
    block = block.to(device=device, dtype=dtype)
    if variant in ("fused", "lean"):
        _patch(block, variant)
    if variant == "checkpoint":
        _checkpointed(block)
    return block


BLOCKS = ("gated", "gelu")


def measure_block(kind: str, variant: str, sizes: Sizes, dtype: torch.dtype, device: str, steps: int) -> dict:
    block = make_block(kind, variant, sizes, dtype, device)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(sizes.tokens, sizes.hidden, device=device, dtype=dtype, generator=generator, requires_grad=True)
    grad = torch.randn(sizes.tokens, sizes.hidden, device=device, dtype=dtype, generator=generator)
    out, saved = saved_for_backward(lambda: block(x), block)
    out.backward(grad)
    intermediate = sizes.gated_intermediate if kind == "gated" else sizes.gelu_intermediate
    element = torch.finfo(dtype).bits // 8
    input_bytes = saved.storages.get(x.untyped_storage().data_ptr(), 0)
    record = {
        "block": kind,
        "variant": variant,
        "tokens": sizes.tokens,
        "hidden": sizes.hidden,
        "intermediate": intermediate,
        "dtype": str(dtype).removeprefix("torch."),
        "saved_bytes": saved.total,
        "input_bytes": input_bytes,
        # beside x, in units of one [T, F] tensor
        "intermediate_tensors": (saved.total - input_bytes) / (sizes.tokens * intermediate * element),
        "output_sum": out.detach().double().sum().item(),
    }
    if device == "cuda":
        record.update(_gpu_step(lambda: block(x).backward(grad), steps))
    return record


# ---------------------------------------------------------------------------------------------------
# Models


def _transformers():
    import transformers

    return transformers


def _config(name: str, sizes: Sizes):
    transformers, m = _transformers(), sizes.model
    common = dict(num_hidden_layers=m["layers"], num_attention_heads=m["heads"], hidden_size=m["hidden"])
    if name == "llama":
        return transformers.LlamaConfig(
            vocab_size=128, intermediate_size=m["intermediate"], num_key_value_heads=max(1, m["heads"] // 2),
            max_position_embeddings=sizes.sequence_length, **common,
        )  # fmt: skip
    if name == "gpt2":
        return transformers.GPT2Config(
            vocab_size=128, n_embd=m["hidden"], n_layer=m["layers"], n_head=m["heads"],
            n_positions=sizes.sequence_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    return transformers.ViTConfig(
        image_size=sizes.image_size, patch_size=8, intermediate_size=4 * m["hidden"], num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
    )  # fmt: skip


MODELS = ("llama", "gpt2", "vit")


def _mlps(model: nn.Module, name: str) -> list:
    if name == "llama":
        return [layer.mlp for layer in model.model.layers]
    if name == "gpt2":
        return [block.mlp for block in model.transformer.h]
    return [layer.mlp for layer in model.vit.layers]


def _wire(model: nn.Module, name: str) -> None:
    for mlp in _mlps(model, name):
        _checkpointed(mlp)


def make_model(
    name: str, variant: str, sizes: Sizes, dtype: torch.dtype, device: str, attention: str = "eager"
) -> nn.Module:
    transformers = _transformers()
    torch.manual_seed(0)
    config = _config(name, sizes)
    # "eager" attention saves the same tensors on every device; "sdpa" saves what its kernel keeps (flash
    # attention: the output and the log-sum-exp), which depends on the device.
    config._attn_implementation = attention
    if name == "vit":
        model = transformers.ViTForImageClassification(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(device=device, dtype=dtype).train()
    if variant in ("fused", "lean"):
        _patch(model, variant, len(_mlps(model, name)))
    if variant == "checkpoint":
        _wire(model, name)
    return model


def model_batch(name: str, sizes: Sizes, dtype: torch.dtype, device: str) -> dict:
    generator = torch.Generator().manual_seed(2)
    if name == "vit":
        pixels = torch.randn(sizes.sequences, 3, sizes.image_size, sizes.image_size, generator=generator)
        labels = torch.randint(0, 10, (sizes.sequences,), generator=generator)
        return {"pixel_values": pixels.to(device=device, dtype=dtype), "labels": labels.to(device)}
    ids = torch.randint(0, 128, (sizes.sequences, sizes.sequence_length), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids}


def measure_model(
    name: str, variant: str, sizes: Sizes, dtype: torch.dtype, device: str, steps: int, attention: str = "eager"
) -> dict:
    model = make_model(name, variant, sizes, dtype, device, attention)
    batch = model_batch(name, sizes, dtype, device)
    loss, saved = saved_for_backward(lambda: model(**batch).loss, model)
    loss.backward()
    record = {
        "model": name,
        "variant": variant,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
        "saved_bytes": saved.total,
        "loss": loss.item(),
    }
    if device == "cuda":
        record.update(_gpu_step(lambda: model(**batch).loss.backward(), steps))
    return record


# ---------------------------------------------------------------------------------------------------
# GPU: peak memory and time of a step


def _gpu_step(step: Callable[[], None], steps: int) -> dict:
    step()  # warm-up: kernels compiled, gradients allocated
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "step_ms": 1e3 * statistics.median(times)}


# ---------------------------------------------------------------------------------------------------
# Report


def _with_ratios(records: list, key: str) -> list:
    eager = {r[key]: r for r in records if r["variant"] == "eager"}
    for record in records:
        base = eager[record[key]]
        record["ratio_to_eager"] = record["saved_bytes"] / base["saved_bytes"]
        if "loss" in record:
            record["loss_minus_eager"] = record["loss"] - base["loss"]
        if "peak_bytes" in record:
            record["peak_ratio_to_eager"] = record["peak_bytes"] / base["peak_bytes"]
    return records


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def markdown(result: dict) -> str:
    gpu = result["device"] == "cuda"
    extra_head = " | peak | peak / eager | step ms" if gpu else ""
    lines = [
        f"Saved for backward, {result['device']}, {result['dtype']}, {result['attention']} attention "
        "(parameters excluded, each storage once)",
        "",
        "| block | T x H -> F | variant | saved | [T, F] tensors beside x | saved / eager" + extra_head + " |",
        "|---|---|---|---|---|---" + ("|---|---|---" if gpu else "") + "|",
    ]
    for r in result["blocks"]:
        extra = f" | {_mib(r['peak_bytes'])} | {r['peak_ratio_to_eager']:.3f} | {r['step_ms']:.2f}" if gpu else ""
        lines.append(
            f"| {r['block']} | {r['tokens']} x {r['hidden']} -> {r['intermediate']} | {r['variant']} | "
            f"{_mib(r['saved_bytes'])} | {r['intermediate_tensors']:g} | {r['ratio_to_eager']:.3f}{extra} |"
        )
    lines += [
        "",
        "| model | variant | saved | saved / eager | loss - eager's" + extra_head + " |",
        "|---|---|---|---|---" + ("|---|---|---" if gpu else "") + "|",
    ]
    for r in result["models"]:
        extra = f" | {_mib(r['peak_bytes'])} | {r['peak_ratio_to_eager']:.3f} | {r['step_ms']:.2f}" if gpu else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {_mib(r['saved_bytes'])} | {r['ratio_to_eager']:.3f} | "
            f"{r['loss_minus_eager']:.2e}{extra} |"
        )
    return "\n".join(lines)


def run(quick: bool, device: str, dtype: torch.dtype, steps: int, models=MODELS, attention: str = "eager") -> dict:
    sizes = QUICK if quick else (GPU if device == "cuda" else CPU)
    blocks = [measure_block(k, v, sizes, dtype, device, steps) for k in BLOCKS for v in VARIANTS]
    measured = [measure_model(m, v, sizes, dtype, device, steps, attention) for m in models for v in VARIANTS]
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
        "sizes": asdict(sizes),
        "blocks": _with_ratios(blocks, "block"),
        "models": _with_ratios(measured, "model"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.saved_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny sizes: seconds (CI)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant on a GPU")
    parser.add_argument("--attention", choices=("eager", "sdpa"), default="eager",
                        help="the models' attention (eager: device independent)")  # fmt: skip
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    result = run(args.quick, device, dtype, args.steps, attention=args.attention)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
