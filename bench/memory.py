"""Training memory and step time of two MLP blocks, each written three ways with the same weights.

- ``linear-gelu-linear``: ``x -> Linear(D, F) -> GELU -> Linear(F, D)``. Eager as a user writes it
  (``F.linear(x, w1, b1)``, whose bias goes into the GEMM, then ``F.gelu``); fusedact with a bias-free
  first GEMM and the bias fused into the activation (``fusedact.gelu(F.linear(x, w1), b1)``).
- ``swiglu-mlp``: Llama's ``down(silu(gate(x)) * up(x))`` without biases; fusedact replaces
  ``F.silu(g) * u`` by ``fusedact.swiglu(g, u)``.

``torch.compile`` (default mode, when it is among the providers) compiles the eager block. Peak memory is
``torch.cuda.max_memory_allocated`` over one forward + backward (gradients of the input and of every
weight, into fresh tensors), after a warm-up step; "extra" is that peak minus what was allocated before
the step (weights, input, grad_out). On the CPU no allocator statistics exist: memory is reported as not
measured, and only the time is given.
Every block's output is also compared with the eager block's, to show that all compute the same thing.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedact

from .cases import COMPILE_MODES, DTYPES, forward_backward
from .sweep import first_line, release_memory
from .timing import time_ms


def gelu_block_eager(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def gelu_block_fused(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    return F.linear(fusedact.gelu(F.linear(x, w1), b1), w2, b2)


def swiglu_block_eager(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def swiglu_block_fused(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    return F.linear(fusedact.swiglu(F.linear(x, w_gate), F.linear(x, w_up)), w_down)


@dataclass(frozen=True)
class Block:
    name: str
    eager: Callable[..., Tensor]
    fused: Callable[..., Tensor]
    weight_shapes: Callable[[int, int], list[tuple[int, ...]]]  # (model dim D, hidden F) -> shapes


BLOCKS = (
    Block("linear-gelu-linear", gelu_block_eager, gelu_block_fused, lambda d, f: [(f, d), (f,), (d, f), (d,)]),
    Block("swiglu-mlp", swiglu_block_eager, swiglu_block_fused, lambda d, f: [(f, d), (f, d), (d, f)]),
)
# tokens, model dim D, hidden F: Llama-2-7B's MLP on 8192 tokens; a small stand-in on the CPU.
BLOCK_SIZES = {"cuda": (8192, 4096, 11008), "cpu": (256, 256, 1024)}
QUICK_BLOCK_SIZES = {"cuda": (1024, 1024, 2816), "cpu": (32, 64, 256)}


def block_function(block: Block, provider: str) -> Callable[..., Tensor]:
    if provider == "fusedact":
        return block.fused
    if provider == "eager":
        return block.eager
    return torch.compile(block.eager, mode=COMPILE_MODES[provider], dynamic=False)


def make_block_leaves(
    block: Block, sizes: tuple[int, int, int], dtype: torch.dtype, device: torch.device
) -> list[Tensor]:
    """The input x [tokens, D] and the weights, scaled like a trained layer (unit-variance activations)."""
    tokens, model_dim, hidden = sizes
    x = torch.randn(tokens, model_dim, dtype=dtype, device=device)
    weights = [
        torch.randn(shape, dtype=dtype, device=device) / (shape[-1] ** 0.5 if len(shape) == 2 else 1.0)
        for shape in block.weight_shapes(model_dim, hidden)
    ]
    return [t.requires_grad_() for t in [x, *weights]]


def peak_step_memory(function: Callable[..., Tensor], leaves: Sequence[Tensor], grad_out: Tensor) -> dict:
    """Peak bytes allocated during one forward + backward, total and above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward(function, leaves, grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "extra_bytes": peak - before}


def measure_block(
    block: Block, providers: Sequence[str], dtype_name: str, device: torch.device, rep_ms: float, quick: bool = False
) -> list[dict]:
    """One record per provider: peak memory (GPU), step time, and the max difference from eager's output."""
    sizes, dtype = (QUICK_BLOCK_SIZES if quick else BLOCK_SIZES)[device.type], DTYPES[dtype_name]
    leaves = make_block_leaves(block, sizes, dtype, device)
    grad_out = torch.randn(sizes[0], sizes[1], dtype=dtype, device=device)
    with torch.no_grad():
        eager_output = block.eager(*leaves)
    records = []
    for provider in providers:
        record = {"block": block.name, "tokens": sizes[0], "model_dim": sizes[1], "hidden": sizes[2]}
        record.update(provider=provider, dtype=dtype_name)
        if provider in COMPILE_MODES:
            torch._dynamo.reset()
        try:
            function = block_function(block, provider)
            output, _ = forward_backward(function, leaves, grad_out)  # warm-up (and compile)
            record["max_abs_diff_vs_eager"] = (output.detach().double() - eager_output.double()).abs().max().item()
            del output
            if device.type == "cuda":
                record.update(peak_step_memory(function, leaves, grad_out))
            record["ms"] = time_ms(functools.partial(forward_backward, function, leaves, grad_out), device, rep_ms)
        except Exception as error:  # recorded, as in the sweep
            record["failed"] = first_line(error)
        release_memory(device)
        records.append(record)
    return records


def measure_blocks(
    providers: Sequence[str], dtype_name: str, device: torch.device, rep_ms: float, quick: bool = False
) -> list[dict]:
    """``measure_block`` for every block: fusedact, eager, and torch.compile's default mode if selected."""
    block_providers = [p for p in providers if p in ("fusedact", "eager", "compile")]
    records = []
    for block in BLOCKS:
        records += measure_block(block, block_providers, dtype_name, device, rep_ms, quick)
    return records
