"""Bias in the GEMM: the eager baseline a real model runs, beside the sweep's ``act(x + b)``.

A Linear layer followed by an activation is, in eager PyTorch, ``act(F.linear(a, W, b))``: the bias rides
in the GEMM (``addmm``; on a GPU cuBLAS adds it in its epilogue), so eager's activation is one read and one
write and there is no separate bias add. The sweep's eager baseline ``act(x + b)`` pays for an add that
such a layer does not. Here both are measured after the same GEMM, per op, shape and mode:

    gemm           F.linear(a, W)                      the bias-free GEMM: the part common to all
    eager-linear   act(F.linear(a, W, b))              the bias in the GEMM (nn.Linear, then the activation)
    eager-add      act(F.linear(a, W) + b)             the sweep's eager baseline, after the GEMM
    fusedact       fusedact.act(F.linear(a, W), b)     the bias-free GEMM, the bias fused into the activation

What is compared: the whole layer's time (GEMM + bias + activation) each way, and that time minus the
bias-free GEMM's, "beyond the GEMM": what the bias and the activation cost on top of the matrix product.
fusedact's speedup over eager-linear is given on both. The GEMM is the same product in every variant (with
or without a bias epilogue), so the difference of totals is the fair comparison of the rest; it carries the
GEMM's own timing spread, shown as its p20-p80 range. In fwd+bwd the two backward GEMMs are common too;
eager-linear's bias gradient is a separate sum over the rows (``addmm``'s backward), fusedact's comes out
of its backward kernel.

A is [tokens, K], W is [N, K], the output [tokens, N]; the inputs and weights need gradients in fwd+bwd
(gradients of a, W and b, into fresh tensors, as in the sweep). Timed like the sweep: the GPU timer, or
on the CPU all variants together in rounds.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedact

from .cases import DTYPES
from .sweep import first_line, release_memory
from .timing import paired_cpu_ms, quantiles, time_ms

# The activation alone (eager-linear applies it to the GEMM's output) and fusedact's fused twin.
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    "relu": (F.relu, lambda z, b: fusedact.relu(z, b)),
    "gelu": (F.gelu, lambda z, b: fusedact.gelu(z, b)),
    "silu": (F.silu, lambda z, b: fusedact.silu(z, b)),
}
VARIANTS = ("gemm", "eager-linear", "eager-add", "fusedact")
LINEAR_MODES = ("fwd", "fwd+bwd")
# (tokens, K, N): a 4096-wide model's up-projections (N = 4 x 4096 would be GPT-style; 11008 is Llama-2-7B's),
# on 8192 tokens; on the CPU a small GEMM, so that the part beyond it is not lost in the GEMM's spread.
LINEAR_SHAPES = {"cuda": ((8192, 4096, 4096), (8192, 4096, 11008)), "cpu": ((1024, 256, 4096),)}
# On the CPU one op: its point costs ~8 s there, and the CPU's GEMM says nothing of cuBLAS's bias epilogue.
LINEAR_OPS = {"cuda": tuple(ACTIVATIONS), "cpu": ("gelu",)}
LINEAR_QUICK_SHAPES = {"cuda": ((2048, 1024, 4096),), "cpu": ((64, 32, 256),)}


def variant_functions(op_name: str) -> dict[str, Callable[..., Tensor]]:
    """``VARIANTS`` of ``op_name``, each called as ``function(a, W, b)``."""
    activation, fused = ACTIVATIONS[op_name]
    return {
        "gemm": lambda a, w, b: F.linear(a, w),
        "eager-linear": lambda a, w, b: activation(F.linear(a, w, b)),
        "eager-add": lambda a, w, b: activation(F.linear(a, w) + b),
        "fusedact": lambda a, w, b: fused(F.linear(a, w), b),
    }


def variant_call(name: str, function: Callable[..., Tensor], leaves: Sequence[Tensor], grad_out: Tensor, mode: str):
    """The timed call: the forward on inputs without grad (``fwd``), or forward + the gradients of every
    leaf it uses (the bias-free GEMM: of a and W only)."""
    detached = [t.detach() for t in leaves]
    if mode == "fwd":
        return lambda: function(*detached)
    if mode == "fwd+bwd":
        used = leaves[:2] if name == "gemm" else leaves

        def step() -> object:
            return torch.autograd.grad(function(*leaves), used, grad_out)

        return step
    raise ValueError(f"unknown mode {mode!r}; expected one of {LINEAR_MODES}")


def measure_linear_point(
    op_name: str, sizes: tuple[int, int, int], dtype_name: str, device: torch.device, rep_ms: float
) -> list[dict]:
    """One record per mode: every variant's ms (median, p20, p80), the time beyond the GEMM, fusedact's
    speedups, and fusedact's max difference from eager-linear's output."""
    tokens, k, n = sizes
    dtype = DTYPES[dtype_name]
    a = torch.randn(tokens, k, dtype=dtype, device=device)
    w = torch.randn(n, k, dtype=dtype, device=device) / k**0.5  # unit-variance outputs, like a trained layer
    b = torch.randn(n, dtype=dtype, device=device)
    leaves = [t.requires_grad_() for t in (a, w, b)]
    grad_out = torch.randn(tokens, n, dtype=dtype, device=device)
    functions = variant_functions(op_name)
    base = {"op": op_name, "tokens": tokens, "k": k, "n": n, "dtype": dtype_name}
    records = []
    try:
        with torch.no_grad():
            reference = functions["eager-linear"](*leaves).double()
            difference = (functions["fusedact"](*leaves).double() - reference).abs().max().item()
        for mode in LINEAR_MODES:
            calls = {name: variant_call(name, f, leaves, grad_out, mode) for name, f in functions.items()}
            if device.type == "cuda":
                ms = {name: time_ms(call, device, rep_ms) for name, call in calls.items()}
            else:
                for call in calls.values():
                    call()  # the warm-up paired_cpu_ms expects
                ms = {name: quantiles(t) for name, t in paired_cpu_ms(calls, budget_s=rep_ms / 1e3).items()}
            records.append({**base, "mode": mode, **linear_summary(ms), "max_abs_diff_vs_eager_linear": difference})
    except Exception as error:  # recorded, as in the sweep
        records.append({**base, "mode": "all", "failed": first_line(error)})
    release_memory(device)
    return records


def linear_summary(ms: dict[str, list[float]]) -> dict:
    """Times, the part beyond the GEMM (each variant's median minus the GEMM's), and fusedact's speedups
    over eager-linear and eager-add on the whole layer and beyond the GEMM."""
    gemm = ms["gemm"][0]
    beyond = {name: ms[name][0] - gemm for name in VARIANTS if name != "gemm"}
    whole = {f"vs {name}": ms[name][0] / ms["fusedact"][0] for name in ("eager-linear", "eager-add")}
    part = {
        f"vs {name}": (beyond[name] / beyond["fusedact"]) if beyond["fusedact"] > 0 else None
        for name in ("eager-linear", "eager-add")
    }
    return {"ms": ms, "beyond_gemm_ms": beyond, "speedup_layer": whole, "speedup_beyond_gemm": part}


def measure_linear(device: torch.device, dtype_name: str, rep_ms: float, quick: bool) -> list[dict]:
    """``measure_linear_point`` at every op (``LINEAR_OPS``) and shape of the device."""
    shapes = (LINEAR_QUICK_SHAPES if quick else LINEAR_SHAPES)[device.type]
    points = [(op, sizes) for op in LINEAR_OPS[device.type] for sizes in shapes]
    return [record for op, sizes in points for record in measure_linear_point(op, sizes, dtype_name, device, rep_ms)]


def linear_table(records: Sequence[dict]) -> str:
    """Markdown: per op, shape and mode, the totals, the part beyond the GEMM and fusedact's speedups."""
    lines = [
        "| op | tokens x K -> N | dtype | mode | gemm ms [p20, p80] | eager-linear ms | eager-add ms | fusedact ms "
        "| beyond GEMM: eager-linear / eager-add / fusedact ms | fusedact vs eager-linear: layer, beyond GEMM |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for record in records:
        size = f"{record['tokens']}x{record['k']} -> {record['n']}"
        cells = [record["op"], size, record["dtype"], record["mode"]]
        if "failed" in record:
            lines.append("| " + " | ".join(cells + [record["failed"]] + [""] * 5) + " |")
            continue
        ms, beyond = record["ms"], record["beyond_gemm_ms"]
        gemm = ms["gemm"]
        cells.append(f"{gemm[0]:.3f} [{gemm[1]:.3f}, {gemm[2]:.3f}]")
        cells += [f"{ms[name][0]:.3f}" for name in ("eager-linear", "eager-add", "fusedact")]
        cells.append(" / ".join(f"{beyond[name]:.3f}" for name in ("eager-linear", "eager-add", "fusedact")))
        part = record["speedup_beyond_gemm"]["vs eager-linear"]
        part_cell = "–" if part is None else f"{part:.2f}x"
        cells.append(f"{record['speedup_layer']['vs eager-linear']:.2f}x, {part_cell}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LINEAR_LEGEND = """\
The same GEMM in every column: eager-linear is act(F.linear(a, W, b)), the bias in the GEMM as nn.Linear
runs it; eager-add is act(F.linear(a, W) + b); fusedact is fusedact.act(F.linear(a, W), b). beyond GEMM:
each median minus the bias-free GEMM's (what bias + activation add to the layer; it carries the GEMM's
spread). fusedact vs eager-linear: eager-linear's time over fusedact's, on the layer and beyond the GEMM."""
