"""Benchmark: fusedact's fused bias + activation against the same op written in eager PyTorch.

For each op x dtype x shape x mode (``fwd``, ``fwd+bwd``) one markdown row gives the median time of
fusedact and of eager PyTorch written the way a user writes it (``F.gelu(x + b)``,
``F.silu(g + bg) * (u + bu)``), the bandwidth each achieves against the *minimal* byte count, the
speedup, and each one's max abs error against a float64 reference.

Minimal bytes, for N = rows x cols elements of x (of each of gate and up for swiglu) and k inputs
(1, or 2 for swiglu), each input with a bias of cols elements:

    fwd       read k inputs and k biases, write the output                    (k N + k cols + N) * itemsize
    backward  read grad_out and one saved tensor per input (x or y; gate, up),
              write k input gradients and k bias gradients                    (N + 2 k N + k cols) * itemsize
    fwd+bwd   the sum of the two

Eager PyTorch moves more bytes than that (``x + b`` is written and read back, the bias gradient is a
separate reduction), so its GB/s is the bandwidth it delivers *effectively* for the same work.

Reference: the eager formula evaluated in float64 on the same inputs, float64 autograd for the gradients.
The table's error is max |result - reference| of the output (fwd) or of the input gradients (fwd+bwd);
``--json`` also records the bias gradients' errors.

Timing: on a GPU ``triton.testing.do_bench`` (it flushes L2 before each call), and where one set of
inputs fits in L2 the calls also rotate among several sets. On the CPU, wall-clock time of single calls
after warm-up. Inputs are ``torch.randn``, never zeros (zeros can run faster than real data).

    python -m bench                                     # the GPU if there is one, else the CPU fallback
    python -m bench --ops gelu swiglu --dtypes bf16 --json results.json
    python -m bench --quick --device cpu
"""

import argparse
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedact

try:
    import triton
    import triton.testing
except ImportError:  # a CPU-only install may have no Triton; only the GPU path needs it
    triton = None


@dataclass(frozen=True)
class Op:
    """One op, two ways. Both take ``(*inputs, *biases)``: ``(x, b)``, or ``(gate, up, gate_bias, up_bias)``."""

    fused: Callable[..., Tensor]
    eager: Callable[..., Tensor]
    num_inputs: int = 1  # tensors of shape [rows, cols], each with its own bias of length cols


OPS = {
    "relu": Op(fusedact.relu, lambda x, b: F.relu(x + b)),
    "leaky_relu": Op(lambda x, b: fusedact.leaky_relu(x, b, 0.01), lambda x, b: F.leaky_relu(x + b, 0.01)),
    "gelu": Op(fusedact.gelu, lambda x, b: F.gelu(x + b)),
    "gelu_tanh": Op(
        lambda x, b: fusedact.gelu(x, b, approximate="tanh"), lambda x, b: F.gelu(x + b, approximate="tanh")
    ),
    "silu": Op(fusedact.silu, lambda x, b: F.silu(x + b)),
    "swiglu": Op(fusedact.swiglu, lambda g, u, bg, bu: F.silu(g + bg) * (u + bu), num_inputs=2),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)  # median first, then the 20-80 % range

# (rows, cols) = tokens x hidden. GPU: a 4096-wide layer, and Llama-2-7B's MLP width.
SHAPES = {"cuda": [(4096, 4096), (8192, 11008)], "cpu": [(256, 1024), (1024, 4096)]}
DEFAULT_DTYPES = {"cuda": ["bf16", "fp16", "fp32"], "cpu": ["fp32", "bf16"]}


# ---------------------------------------------------------------------------------------------------
# Byte counts


def forward_bytes(op: Op, rows: int, cols: int, itemsize: int) -> int:
    """Minimal forward traffic: each input and bias read once, the output written once."""
    elements = rows * cols
    return itemsize * (op.num_inputs * (elements + cols) + elements)


def backward_bytes(op: Op, rows: int, cols: int, itemsize: int) -> int:
    """Minimal backward traffic: grad_out and one saved tensor per input read, every gradient written once."""
    elements = rows * cols
    return itemsize * (elements + op.num_inputs * (2 * elements + cols))


def minimal_bytes(op: Op, mode: str, rows: int, cols: int, itemsize: int) -> int:
    """Bytes a perfect implementation moves in ``mode``; GB/s of both implementations is measured against it."""
    forward = forward_bytes(op, rows, cols, itemsize)
    return forward if mode == "fwd" else forward + backward_bytes(op, rows, cols, itemsize)


# ---------------------------------------------------------------------------------------------------
# Inputs, the float64 reference, errors


@dataclass(frozen=True)
class InputSet:
    """One set of random inputs: the leaves (inputs then biases, requiring grad), their detached twins
    for forward-only calls, and a random grad_out for the backward pass."""

    leaves: tuple[Tensor, ...]
    detached: tuple[Tensor, ...]
    grad_out: Tensor


def make_input_set(op: Op, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> InputSet:
    """``torch.randn`` inputs [rows, cols], biases [cols] and grad_out [rows, cols]."""
    inputs = [torch.randn(rows, cols, dtype=dtype, device=device) for _ in range(op.num_inputs)]
    biases = [torch.randn(cols, dtype=dtype, device=device) for _ in range(op.num_inputs)]
    leaves = tuple(t.requires_grad_() for t in inputs + biases)
    grad_out = torch.randn(rows, cols, dtype=dtype, device=device)
    return InputSet(leaves, tuple(t.detach() for t in leaves), grad_out)


def rotation_count(device: torch.device, set_bytes: int) -> int:
    """How many input sets to cycle through so that no timed call finds its inputs in the GPU's L2.

    ``do_bench`` already flushes L2 before each call; rotating keeps the numbers honest without relying on
    that. On the CPU one set is used: its caches are part of what a CPU user gets.
    """
    if device.type != "cuda":
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    if set_bytes >= l2_bytes:
        return 1
    return min(64, math.ceil(4 * l2_bytes / set_bytes))  # the sets together span 4x the L2


def forward_backward(
    function: Callable[..., Tensor], leaves: Sequence[Tensor], grad_out: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The output and the gradients of all leaves, as a training step computes them (nothing accumulates
    into ``.grad``, which would add a pass over every gradient)."""
    output = function(*leaves)
    return output, torch.autograd.grad(output, leaves, grad_out)


def float64_reference(op: Op, inputs: InputSet) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The eager formula in float64 on the same inputs: the output and the gradients of inputs and biases."""
    leaves = [t.detach().double().requires_grad_() for t in inputs.leaves]
    output, grads = forward_backward(op.eager, leaves, inputs.grad_out.double())
    return output.detach(), grads


def max_abs_error(results: Sequence[Tensor], references: Sequence[Tensor]) -> float:
    """max |result - reference| over all the pairs, in float64."""
    return max((r.double() - ref).abs().max().item() for r, ref in zip(results, references, strict=True))


def measure_errors(
    op: Op, function: Callable[..., Tensor], inputs: InputSet, reference: tuple[Tensor, tuple[Tensor, ...]]
) -> dict[str, float]:
    """Max abs error against the float64 reference: of the output, the input gradients, the bias gradients."""
    output, grads = forward_backward(function, inputs.leaves, inputs.grad_out)
    reference_output, reference_grads = reference
    k = op.num_inputs
    return {
        "output": max_abs_error([output.detach()], [reference_output]),
        "input_grad": max_abs_error(grads[:k], reference_grads[:k]),
        "bias_grad": max_abs_error(grads[k:], reference_grads[k:]),
    }


# ---------------------------------------------------------------------------------------------------
# Timing


def cpu_time_ms(call: Callable[[], object], budget_s: float, warmup: int = 2, min_repeats: int = 5) -> list[float]:
    """Quantiles (``QUANTILES``) in ms of the wall-clock times of single calls, timeit-style, after warm-up."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 1000):
        begin = time.perf_counter()
        call()
        times.append((time.perf_counter() - begin) * 1e3)
    return torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def time_ms(call: Callable[[], object], device: torch.device, quick: bool) -> list[float]:
    """[median, 20th, 80th percentile] of ``call``'s run time in ms."""
    if device.type == "cuda":
        warmup, rep = (10, 30) if quick else (25, 100)
        return triton.testing.do_bench(call, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    return cpu_time_ms(call, budget_s=0.02 if quick else 0.1)


def timed_call(function: Callable[..., Tensor], input_sets: Sequence[InputSet], mode: str) -> Callable[[], object]:
    """A no-argument call of ``function`` in ``mode`` for the timer, taking the next input set each time."""
    rotation = itertools.cycle(input_sets)
    if mode == "fwd":
        return lambda: function(*next(rotation).detached)

    def call() -> object:
        inputs = next(rotation)
        return forward_backward(function, inputs.leaves, inputs.grad_out)

    return call


# ---------------------------------------------------------------------------------------------------
# One case, the table, the command line


def bench_case(op_name: str, dtype_name: str, shape: tuple[int, int], device: torch.device, quick: bool) -> list[dict]:
    """Both modes of one op x dtype x shape: a result dict per mode."""
    op, dtype = OPS[op_name], DTYPES[dtype_name]
    rows, cols = shape
    first = make_input_set(op, rows, cols, dtype, device)
    count = rotation_count(device, sum(t.nbytes for t in first.leaves))
    input_sets = [first] + [make_input_set(op, rows, cols, dtype, device) for _ in range(count - 1)]
    implementations = {"fusedact": op.fused, "eager": op.eager}

    reference = float64_reference(op, first)
    errors = {name: measure_errors(op, function, first, reference) for name, function in implementations.items()}
    del reference

    results = []
    for mode in MODES:
        nbytes = minimal_bytes(op, mode, rows, cols, dtype.itemsize)
        result = {"op": op_name, "dtype": dtype_name, "shape": [rows, cols], "mode": mode, "bytes": nbytes}
        for name, function in implementations.items():
            ms = time_ms(timed_call(function, input_sets, mode), device, quick)
            result[name] = {"ms": ms, "gbps": nbytes / (ms[0] * 1e-3) / 1e9, "max_abs_error": errors[name]}
        result["speedup"] = result["eager"]["ms"][0] / result["fusedact"]["ms"][0]
        result["input_sets"] = count
        results.append(result)
    return results


TABLE_HEADER = (
    "| op | dtype | shape | mode | fusedact ms | eager ms | speedup | fusedact GB/s | eager GB/s "
    "| fusedact max err | eager max err |\n"
    "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"
)


def table_row(result: dict) -> str:
    """One markdown row; the error shown is the output's (fwd) or the input gradients' (fwd+bwd)."""
    error_key = "output" if result["mode"] == "fwd" else "input_grad"
    fused, eager = result["fusedact"], result["eager"]
    cells = [
        result["op"],
        result["dtype"],
        "x".join(map(str, result["shape"])),
        result["mode"],
        f"{fused['ms'][0]:.3f}",
        f"{eager['ms'][0]:.3f}",
        f"{result['speedup']:.2f}x",
        f"{fused['gbps']:.1f}",
        f"{eager['gbps']:.1f}",
        f"{fused['max_abs_error'][error_key]:.2e}",
        f"{eager['max_abs_error'][error_key]:.2e}",
    ]
    return "| " + " | ".join(cells) + " |"


def describe_environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        timing = "triton.testing.do_bench median (L2 flushed before each call)"
    else:
        name = f"CPU (PyTorch fallback, not the Triton kernels), {torch.get_num_threads()} threads"
        timing = "median wall-clock time of single calls after warm-up"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__ if triton is not None else "not installed",
        "fusedact": fusedact.__version__,
        "timing": timing,
    }


LEGEND = """\
GB/s: the minimal bytes (inputs read once, output written once; fwd+bwd adds grad_out and the saved tensor
read and the input gradient written) over the median time, for both columns; eager moves more than that.
shape: rows x cols of x (of each of gate and up for swiglu); every input has a bias of length cols.
max err: max |result - float64 reference| of the output (fwd) or the input gradient(s) (fwd+bwd); the
reference is the eager formula in float64 on the same inputs."""


def parse_args(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="fusedact vs eager PyTorch: time, GB/s, error vs float64."
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=list(OPS),
        default=list(OPS),
        metavar="OP",
        help=f"any of {' '.join(OPS)} (default: all)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        metavar="DTYPE",
        help=f"any of {' '.join(DTYPES)} (default: bf16 fp16 fp32 on a GPU, fp32 bf16 on the CPU)",
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if available")
    parser.add_argument("--quick", action="store_true", help="the smallest shape only, shorter timing")
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    args = parser.parse_args(argv)

    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if device_type == "cuda" and triton is None:
        parser.error("--device cuda: triton is not installed")
    return args, torch.device(device_type)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; print a markdown table, and write JSON if ``--json`` is given. Returns 0."""
    args, device = parse_args(argv)
    dtype_names = args.dtypes or DEFAULT_DTYPES[device.type]
    shapes = SHAPES[device.type][:1] if args.quick else SHAPES[device.type]
    environment = describe_environment(device)

    print("# fusedact benchmark\n")
    print(" | ".join(f"{key}: {value}" for key, value in environment.items() if key != "timing"))
    print(f"timing: {environment['timing']}\n")
    print(TABLE_HEADER, flush=True)

    torch.manual_seed(0)
    previous_cpu_backend = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")  # what the header promises, even if TRITON_INTERPRET=1 is set
    results = []
    try:
        for op_name, dtype_name, shape in itertools.product(args.ops, dtype_names, shapes):
            for result in bench_case(op_name, dtype_name, shape, device, args.quick):
                print(table_row(result), flush=True)
                results.append(result)
    finally:
        fusedact.set_cpu_backend(previous_cpu_backend)
    print("\n" + LEGEND)

    if args.json:
        with open(args.json, "w") as file:
            json.dump({**environment, "results": results}, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
