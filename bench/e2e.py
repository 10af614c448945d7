"""End to end: one training step of a small Llama-style model and of a ViT, unpatched vs ``fusedact.patch``
vs ``torch.compile`` (and both together): step time, throughput, peak memory, and the loss each computes.

Variants: ``eager`` (unpatched), ``fusedact`` (``fusedact.patch(model)``: the MLPs on the lean blocks, one
[tokens, intermediate] tensor less kept per MLP), ``fusedact-nolean`` (``fusedact.patch(model,
lean_mlp=False)``: the fused path, the same numbers), and each of them under ``torch.compile`` (``compile``,
``fusedact+compile``, ``fusedact-nolean+compile``).

    python -m bench.e2e                                  # GPU if present (bf16), else a tiny CPU run
    python -m bench.e2e --out bench/results              # ... and write JSON + markdown there
    python -m bench.e2e --device cpu --quick             # seconds: checks the harness itself

Models (random weights, nothing downloaded; the same initial weights and batch for every variant):
- ``llama``: transformers ``LlamaForCausalLM``, SwiGLU MLPs (patched: the gated kernel, lean), SDPA attention.
  GPU: hidden 1024, intermediate 2816, 8 layers, 16 heads, vocab 32000, batch 8 x 1024 tokens.
- ``vit``: timm ``vit_small_patch16_224`` (GELU MLPs; patched: fc1's bias folded into the GELU kernel, lean),
  batch 64 at 224 px; transformers' ViT of the same size where timm is not installed.

A step is forward, loss, backward and an AdamW update (fused where the device has it), all timed together:
``--steps`` steps after ``--warmup`` (which also absorbs compilation), median and p20/p80 wall-clock time
with the device synchronized. Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps
minus what was allocated before them (weights, optimizer state, batch): the activations a step keeps.
The first step's loss of every variant is compared with the unpatched eager model's: same function.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import fusedact

from .report import environment

VARIANTS = ("eager", "fusedact", "fusedact-nolean", "compile", "fusedact+compile", "fusedact-nolean+compile")
MODELS = ("llama", "vit")


@dataclass(frozen=True)
class Size:
    llama: dict
    llama_batch: tuple[int, int]  # sequences, tokens each
    vit: dict
    vit_batch: int


GPU_SIZE = Size(
    llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000),
    llama_batch=(8, 1024),
    vit=dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    vit_batch=64,
)
CPU_SIZE = Size(
    llama=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024),
    llama_batch=(2, 64),
    vit=dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3),
    vit_batch=8,
)
QUICK_SIZE = Size(
    llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
    llama_batch=(2, 8),
    vit=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2),
    vit_batch=2,
)


def build_llama(size: Size) -> tuple[nn.Module, Callable[[nn.Module, dict], torch.Tensor], dict]:
    import transformers

    config = transformers.LlamaConfig(max_position_embeddings=max(2048, size.llama_batch[1]), **size.llama)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    sequences, tokens = size.llama_batch
    ids = torch.randint(0, config.vocab_size, (sequences, tokens), generator=torch.Generator().manual_seed(0))

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["ids"], labels=batch["ids"]).loss

    return model, loss, {"ids": ids, "items": sequences * tokens, "unit": "tokens"}


def build_vit(size: Size) -> tuple[nn.Module, Callable[[nn.Module, dict], torch.Tensor], dict]:
    vit = size.vit
    try:
        import timm

        model = timm.create_model(
            "vit_small_patch16_224",
            pretrained=False,
            num_classes=1000,
            img_size=vit["img_size"],
            patch_size=vit["patch_size"],
            embed_dim=vit["embed_dim"],
            depth=vit["depth"],
            num_heads=vit["num_heads"],
        )
        source = "timm"
    except ImportError:
        import transformers

        config = transformers.ViTConfig(
            image_size=vit["img_size"],
            patch_size=vit["patch_size"],
            hidden_size=vit["embed_dim"],
            num_hidden_layers=vit["depth"],
            num_attention_heads=vit["num_heads"],
            intermediate_size=4 * vit["embed_dim"],
            num_labels=1000,
        )
        model = transformers.ViTForImageClassification(config)
        source = "transformers"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(size.vit_batch, 3, vit["img_size"], vit["img_size"], generator=generator)
    labels = torch.randint(0, 1000, (size.vit_batch,), generator=generator)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        out = model(batch["images"])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        return nn.functional.cross_entropy(logits.float(), batch["labels"])

    return (
        model,
        loss,
        {"images": images, "labels": labels, "items": size.vit_batch, "unit": "images", "source": source},
    )


BUILDERS = {"llama": build_llama, "vit": build_vit}


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            moved[key] = value.to(dtype) if value.is_floating_point() else value
        else:
            moved[key] = value
    return moved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_variant(
    base: nn.Module,
    loss_fn,
    batch: dict,
    variant: str,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
) -> dict:
    """Train a copy of ``base`` made ``variant`` for ``warmup + steps`` steps; time and memory of the last."""
    model = copy.deepcopy(base).to(device=device, dtype=dtype).train()
    report = fusedact.patch(model, lean_mlp="nolean" not in variant) if "fusedact" in variant else None
    step_model = torch.compile(model) if "compile" in variant else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = _to(batch, device, dtype)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(step_model, batch)
        loss.backward()
        optimizer.step()
        return loss

    first_loss = None
    for index in range(warmup):
        loss = step()
        if index == 0:
            first_loss = loss.item()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - begin) * 1e3)
    result = {
        "variant": variant,
        "first_loss": first_loss,
        "median_ms": statistics.median(times),
        "p20_ms": _quantile(times, 0.2),
        "p80_ms": _quantile(times, 0.8),
        "throughput": batch["items"] / (statistics.median(times) / 1e3),
        "unit": batch["unit"] + "/s",
        "peak_extra_mib": None,
        "patched": None if report is None else _patched(report),
    }
    if device.type == "cuda":
        result["peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - baseline) / 2**20, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _patched(report) -> dict:
    lean = [c for c in report.changes if c.action == "lean_mlp" or "lean block" in c.after]
    return {"changes": len(report.changes), "left": len(report.left), "lean_mlps": len(lean)}


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(
    models: Sequence[str],
    variants: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    size: Size,
    warmup: int,
    steps: int,
    print_row=print,
    rows: Optional[list] = None,
    save: Callable[[list], None] = lambda rows: None,
) -> list[dict]:
    """Every model x variant; each row is printed and ``save(rows)`` called as it comes (into ``rows``
    when given, so that a caller interrupted mid-run keeps the rows done)."""
    rows = [] if rows is None else rows
    for name in models:
        torch.manual_seed(0)
        base, loss_fn, batch = BUILDERS[name](size)
        parameters = sum(p.numel() for p in base.parameters())
        eager_loss = None
        for variant in variants:
            try:
                result = measure_variant(base, loss_fn, batch, variant, device, dtype, warmup, steps)
            except Exception as error:  # one variant failing (e.g. compile on a CPU without a compiler)
                result = {"variant": variant, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            result.update(model=name, parameters=parameters, source=batch.get("source", "transformers"))
            if variant == "eager" and "first_loss" in result:
                eager_loss = result["first_loss"]
            if eager_loss is not None and result.get("first_loss") is not None:
                result["loss_vs_eager"] = abs(result["first_loss"] - eager_loss) / max(abs(eager_loss), 1e-12)
            rows.append(result)
            print_row(format_row(result, rows))
            add_speedups(rows)
            save(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each row's ``speedup_vs_eager``: the eager variant's median step time of its model over its own."""
    for row in rows:
        eager = next(
            (r for r in rows if r["model"] == row["model"] and r["variant"] == "eager" and "median_ms" in r), None
        )
        if eager is not None and "median_ms" in row:
            row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]


HEADER = (
    "| model | variant | step ms (p20-p80) | throughput | peak extra MiB | first loss | vs eager |\n"
    "|---|---|---|---|---|---|---|"
)


def format_row(row: dict, rows: Optional[list] = None) -> str:
    if "error" in row:
        return f"| {row['model']} | {row['variant']} | failed: {row['error']} | | | | |"
    memory = "n/a (CPU)" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:,.1f}"
    relative = row.get("loss_vs_eager")
    return (
        f"| {row['model']} | {row['variant']} | {row['median_ms']:.2f} ({row['p20_ms']:.2f}-{row['p80_ms']:.2f}) | "
        f"{row['throughput']:,.0f} {row['unit']} | {memory} | {row['first_loss']:.5f} | "
        f"{'-' if relative is None else f'{relative:.1e}'} |"
    )


def write_files(stem: Path, metadata: dict, rows: Sequence[dict]) -> None:
    """``stem``.json (environment and rows) and ``stem``.md (the table), each replaced whole."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# End-to-end training step, {metadata['device']}, {metadata['date']}", "", HEADER]
    lines += [format_row(row) for row in rows]
    texts = {".json": json.dumps({"environment": metadata, "rows": list(rows)}, indent=1)}
    texts[".md"] = "\n".join(lines) + "\n"
    for suffix, text in texts.items():
        partial = stem.with_suffix(suffix + ".partial")
        partial.write_text(text)
        partial.replace(stem.with_suffix(suffix))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=None, help="default: all on GPU; eager, fusedact on CPU"
    )
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 5 GPU, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny models: seconds, to check the harness")
    parser.add_argument("--out", type=Path, default=None, help="directory for e2e-<device>.json and .md")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")
    ]
    size = QUICK_SIZE if args.quick else (GPU_SIZE if gpu else CPU_SIZE)
    variants = args.variants or (list(VARIANTS) if gpu else ["eager", "fusedact"])
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    steps = args.steps if args.steps is not None else (20 if gpu else 3)
    metadata = environment(device, ["e2e", *argv])
    metadata["command"] = " ".join(["python -m bench.e2e", *argv])
    print(f"# End-to-end training step on {metadata['device']}, {str(dtype).removeprefix('torch.')}")
    if not gpu:
        print("CPU: fusedact's PyTorch fallback, not the Triton kernels; a check of the harness, not a measurement.")
    print(HEADER)
    stem = None if args.out is None else args.out / f"e2e-{'gpu' if gpu else 'cpu'}"

    def save(rows: list) -> None:
        if stem is not None:
            write_files(stem, metadata, rows)

    rows: list = []
    try:
        run(args.models, variants, device, dtype, size, warmup, steps, rows=rows, save=save)
    except KeyboardInterrupt:  # SIGINT (bench.gpu_run's time box): the rows done are already written
        print("interrupted: the rows above are written", flush=True)
    if stem is not None:
        save(rows)
        print(f"wrote {stem}.json and {stem}.md")
    return 1 if any("error" in row for row in rows if row["variant"] in ("eager", "fusedact")) else 0


if __name__ == "__main__":
    sys.exit(main())
