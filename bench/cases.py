"""What the benchmark measures: ops, the providers that compute them, shapes, byte counts, the reference.

An *op* is one fused call of the library next to the same computation written in eager PyTorch the way a
user writes it (``F.gelu(x + b)``, ``F.silu(g) * u``). A *provider* is one way to compute it: fusedact,
eager, ``torch.compile`` of the eager code (default mode and ``max-autotune-no-cudagraphs``), or Liger
Kernel where it has the op. Every provider of an op takes the same *leaves*: the inputs ([rows, cols],
or [rows, 2 cols] for a packed op) followed by their biases ([cols], or [2 cols]).

Minimal bytes, from the leaves and the output (``output`` elements = rows x cols):

    fwd       read every leaf once, write the output                    sum(leaves) + output
    bwd       read grad_out and, per leaf, one saved tensor of its size  output + 2 sum(leaves)
              (the input or the output, and the bias); write one gradient per leaf
    fwd+bwd   the sum of the two

Anything an implementation moves beyond that (eager writes ``x + b`` and reads it back; its bias gradient
is a second pass) shows up as a lower GB/s for the same work.

Errors: every provider's output and gradients against the eager formula evaluated in float64 on the same
inputs. The reference is computed in row chunks, so a 4 GB fp32 tensor never needs a 30 GB float64 graph;
the bias gradient, a sum over rows, adds up the chunks' contributions in float64.
"""

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedact

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------------
# Ops


@dataclass(frozen=True)
class Op:
    """One fused op and its eager twin, both called as ``function(*leaves)``.

    ``layout`` says what the leaves are: ``"bias"`` (x, bias), ``"gated"`` (gate, up),
    ``"gated_bias"`` (gate, up, gate_bias, up_bias) or ``"packed"`` (one [rows, 2 cols] tensor ``[gate | up]``).
    """

    name: str
    eager_text: str  # the eager formula as a user writes it, for tables
    layout: str
    fused: Callable[..., Tensor]
    eager: Callable[..., Tensor]
    requires: str  # the fusedact function the op needs (the library grows; older versions lack some)
    liger: Optional[str] = None  # "swiglu" or "geglu" where Liger Kernel has the same op without bias


def _packed_swiglu_eager(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _relu_squared_eager(x: Tensor, b: Tensor) -> Tensor:
    return torch.square(F.relu(x + b))


# The fused side calls fusedact by name at call time (never ``fusedact.geglu`` at import), so that an op
# whose function this version of the library lacks is left out by ``available_ops`` instead of failing.
ALL_OPS = [
    Op("relu", "F.relu(x + b)", "bias", lambda x, b: fusedact.relu(x, b), lambda x, b: F.relu(x + b), "relu"),
    Op(
        "leaky_relu",
        "F.leaky_relu(x + b, 0.01)",
        "bias",
        lambda x, b: fusedact.leaky_relu(x, b, 0.01),
        lambda x, b: F.leaky_relu(x + b, 0.01),
        "leaky_relu",
    ),
    Op("gelu", "F.gelu(x + b)", "bias", lambda x, b: fusedact.gelu(x, b), lambda x, b: F.gelu(x + b), "gelu"),
    Op(
        "gelu_tanh",
        "F.gelu(x + b, approximate='tanh')",
        "bias",
        lambda x, b: fusedact.gelu(x, b, approximate="tanh"),
        lambda x, b: F.gelu(x + b, approximate="tanh"),
        "gelu",
    ),
    Op("silu", "F.silu(x + b)", "bias", lambda x, b: fusedact.silu(x, b), lambda x, b: F.silu(x + b), "silu"),
    Op(
        "swiglu",
        "F.silu(g) * u",
        "gated",
        lambda g, u: fusedact.swiglu(g, u),
        lambda g, u: F.silu(g) * u,
        "swiglu",
        liger="swiglu",
    ),
    Op(
        "swiglu_bias",
        "F.silu(g + bg) * (u + bu)",
        "gated_bias",
        lambda g, u, bg, bu: fusedact.swiglu(g, u, bg, bu),
        lambda g, u, bg, bu: F.silu(g + bg) * (u + bu),
        "swiglu",
    ),
    Op(
        "swiglu_packed",
        "g, u = x.chunk(2, -1); F.silu(g) * u",
        "packed",
        lambda x: fusedact.swiglu_packed(x),
        _packed_swiglu_eager,
        "swiglu_packed",
    ),
    Op(
        "geglu",
        "F.gelu(g, approximate='tanh') * u",
        "gated",
        lambda g, u: fusedact.geglu(g, u, approximate="tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u,
        "geglu",
        liger="geglu",
    ),
    # The rest of the library: the same two kernel templates with other math (``--ops all``).
    Op(
        "quick_gelu",
        "z = x + b; z * torch.sigmoid(1.702 * z)",
        "bias",
        lambda x, b: fusedact.quick_gelu(x, b),
        lambda x, b: (x + b) * torch.sigmoid(1.702 * (x + b)),
        "quick_gelu",
    ),
    Op(
        "sigmoid",
        "torch.sigmoid(x + b)",
        "bias",
        lambda x, b: fusedact.sigmoid(x, b),
        lambda x, b: torch.sigmoid(x + b),
        "sigmoid",
    ),
    Op("tanh", "torch.tanh(x + b)", "bias", lambda x, b: fusedact.tanh(x, b), lambda x, b: torch.tanh(x + b), "tanh"),
    Op("elu", "F.elu(x + b)", "bias", lambda x, b: fusedact.elu(x, b), lambda x, b: F.elu(x + b), "elu"),
    Op("selu", "F.selu(x + b)", "bias", lambda x, b: fusedact.selu(x, b), lambda x, b: F.selu(x + b), "selu"),
    Op("celu", "F.celu(x + b)", "bias", lambda x, b: fusedact.celu(x, b), lambda x, b: F.celu(x + b), "celu"),
    Op("mish", "F.mish(x + b)", "bias", lambda x, b: fusedact.mish(x, b), lambda x, b: F.mish(x + b), "mish"),
    Op(
        "relu_squared",
        "torch.square(F.relu(x + b))",
        "bias",
        lambda x, b: fusedact.relu_squared(x, b),
        _relu_squared_eager,
        "relu_squared",
    ),
    # PReLU's slope plays the bias's part: one per column (channel), read once, its gradient reduced.
    Op("prelu", "F.prelu(x, w)", "bias", lambda x, w: fusedact.prelu(x, w), lambda x, w: F.prelu(x, w), "prelu"),
    Op("reglu", "F.relu(g) * u", "gated", lambda g, u: fusedact.reglu(g, u), lambda g, u: F.relu(g) * u, "reglu"),
    Op("glu", "F.glu(x + b)", "packed_bias", lambda x, b: fusedact.glu(x, b), lambda x, b: F.glu(x + b), "glu"),
    # Row-wise: one read of each row and one write while a row fits a block (MAX_BLOCK_N), as counted here;
    # longer rows read x twice (online softmax), so their GB/s from these bytes is below what moves.
    Op(
        "softmax",
        "torch.softmax(x + b, -1)",
        "bias",
        lambda x, b: fusedact.softmax(x, b),
        lambda x, b: torch.softmax(x + b, -1),
        "softmax",
    ),
    Op(
        "log_softmax",
        "torch.log_softmax(x + b, -1)",
        "bias",
        lambda x, b: fusedact.log_softmax(x, b),
        lambda x, b: torch.log_softmax(x + b, -1),
        "log_softmax",
    ),
]
# The default sweep: the ops the targets are about, each kernel path once.
DEFAULT_OPS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "swiglu_bias", "swiglu_packed", "geglu")


def available_ops() -> dict[str, Op]:
    """The ops of ``ALL_OPS`` whose fusedact function this installed version of the library has."""
    return {op.name: op for op in ALL_OPS if hasattr(fusedact, op.requires)}


# ---------------------------------------------------------------------------------------------------
# Providers


PROVIDERS = ("fusedact", "eager", "compile", "compile-max-autotune", "liger")
COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}


def liger_function(op: Op) -> Optional[Callable[..., Tensor]]:
    """Liger Kernel's version of ``op`` when ``liger_kernel`` imports and has it, else None."""
    if op.liger is None:
        return None
    try:
        if op.liger == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as function
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as function
    except ImportError:
        return None
    return function.apply


def provider_function(op: Op, provider: str) -> Optional[Callable[..., Tensor]]:
    """``op`` as computed by ``provider``, or None where that provider has no such op.

    The compiled providers are static-shape (``dynamic=False``): each shape gets the code a training loop
    with a fixed shape gets. The caller resets dynamo between cases so that no cache limit is reached.
    """
    if provider == "fusedact":
        return op.fused
    if provider == "eager":
        return op.eager
    if provider in COMPILE_MODES:
        return torch.compile(op.eager, mode=COMPILE_MODES[provider], dynamic=False)
    if provider == "liger":
        return liger_function(op)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ---------------------------------------------------------------------------------------------------
# Shapes


def parse_shape(text: str) -> tuple[int, int]:
    """``"8192x4096"`` -> (8192, 4096): rows (tokens) x cols (the activation's width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"a shape is ROWSxCOLS, like 8192x4096; got {text!r}")
    rows, cols = (int(part) for part in parts)
    if rows < 1 or cols < 1:
        raise ValueError(f"a shape needs rows and cols >= 1; got {text!r}")
    return rows, cols


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(size) for size in shape)


# Transformer MLP activations: tokens x hidden (4096: a 4096-wide layer; 11008: Llama-2-7B's MLP;
# 14336: Llama-3-8B's; 28672: Llama-3-70B's), then sizes no power of two divides: a width of 760, and an
# odd width (11007) that no vector load can cover.
TOKENS = (1, 128, 2048, 8192, 32768)
HIDDEN = (4096, 11008, 14336, 28672)
ODD_SHAPES = ((77, 760), (1000, 1128), (4095, 11007))
GPU_SHAPES = tuple(itertools.product(TOKENS, HIDDEN)) + ODD_SHAPES
GPU_QUICK_SHAPES = ((8192, 4096),)
# torch.compile costs seconds per shape, op, dtype and graph: on the default GPU sweep it runs at one
# shape where the targets are judged (tensors of 64 MiB and more), Llama-2-7B's MLP width, in bf16.
GPU_COMPILE_SHAPES = ((8192, 11008),)
# The CPU sweep measures the fallback against eager where it matters (issue 14): a large tensor, beyond
# the caches, in a few ops (each kernel path's fallback: erf, sigmoid, gated); the quick run is tiny.
CPU_SHAPES = ((8192, 4096),)
CPU_DEFAULT_OPS = ("gelu", "silu", "swiglu")
CPU_DEFAULT_MODES = ("fwd", "fwd+bwd")
CPU_QUICK_SHAPES = ((256, 1024),)


# ---------------------------------------------------------------------------------------------------
# Inputs and byte counts


@dataclass(frozen=True)
class InputSet:
    """One set of random inputs: the leaves (requiring grad), their detached twins for forward-only calls,
    and a random ``grad_out`` for the backward pass."""

    leaves: tuple[Tensor, ...]
    detached: tuple[Tensor, ...]
    grad_out: Tensor


# Rows of the inputs on which the CPU sweep measures errors (all of them when fewer).
CPU_ERROR_ROWS = 512


def error_input_set(inputs: InputSet, rows: int) -> InputSet:
    """The first ``rows`` rows of ``inputs`` (biases whole), as fresh leaves; ``inputs`` itself when it has
    no more rows than that."""
    if inputs.grad_out.shape[0] <= rows:
        return inputs
    leaves = tuple((t.detach()[:rows] if t.dim() == 2 else t.detach()).clone().requires_grad_() for t in inputs.leaves)
    return InputSet(leaves, tuple(t.detach() for t in leaves), inputs.grad_out[:rows].clone())


def leaf_shapes(layout: str, rows: int, cols: int) -> list[tuple[int, ...]]:
    """Shapes of an op's leaves (inputs first, then biases) for an output of [rows, cols]."""
    if layout == "bias":
        return [(rows, cols), (cols,)]
    if layout == "gated":
        return [(rows, cols), (rows, cols)]
    if layout == "gated_bias":
        return [(rows, cols), (rows, cols), (cols,), (cols,)]
    if layout == "packed":
        return [(rows, 2 * cols)]
    if layout == "packed_bias":
        return [(rows, 2 * cols), (2 * cols,)]
    raise ValueError(f"unknown layout {layout!r}")


def has_bias(op: Op) -> bool:
    return any(len(shape) == 1 for shape in leaf_shapes(op.layout, 1, 1))


def make_input_set(op: Op, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> InputSet:
    """``torch.randn`` leaves and grad_out (never zeros: zeros can run faster than real data)."""
    leaves = tuple(
        torch.randn(shape, dtype=dtype, device=device).requires_grad_() for shape in leaf_shapes(op.layout, rows, cols)
    )
    grad_out = torch.randn(rows, cols, dtype=dtype, device=device)
    return InputSet(leaves, tuple(t.detach() for t in leaves), grad_out)


def minimal_bytes(mode: str, leaf_elements: Sequence[int], output_elements: int, itemsize: int) -> int:
    """Bytes a perfect implementation moves in ``mode`` (see the module docstring)."""
    forward = sum(leaf_elements) + output_elements
    backward = output_elements + 2 * sum(leaf_elements)
    elements = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]
    return elements * itemsize


def case_bytes(op: Op, mode: str, rows: int, cols: int, itemsize: int) -> int:
    """``minimal_bytes`` for ``op`` at an output of [rows, cols]."""
    leaf_elements = [rows_times_cols(shape) for shape in leaf_shapes(op.layout, rows, cols)]
    return minimal_bytes(mode, leaf_elements, rows * cols, itemsize)


def rows_times_cols(shape: Sequence[int]) -> int:
    elements = 1
    for size in shape:
        elements *= size
    return elements


def input_tensor_bytes(op: Op, rows: int, cols: int, itemsize: int) -> int:
    """Size of the op's largest input tensor: the issue's targets apply from 64 MiB."""
    return max(rows_times_cols(shape) for shape in leaf_shapes(op.layout, rows, cols)) * itemsize


# ---------------------------------------------------------------------------------------------------
# Calls, the float64 reference, errors


def forward_backward(
    function: Callable[..., Tensor], leaves: Sequence[Tensor], grad_out: Tensor, retain_graph: bool = False
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The output and the gradients of all leaves, as a training step computes them (into fresh tensors:
    nothing accumulates into ``.grad``, which would add a pass over every gradient)."""
    output = function(*leaves)
    return output, torch.autograd.grad(output, leaves, grad_out, retain_graph=retain_graph)


# float64 elements per chunk of the reference: a few hundred MB per tensor at most.
REFERENCE_CHUNK_ELEMENTS = 2**24


def reference_chunks(
    op: Op, inputs: InputSet, chunk_elements: int = REFERENCE_CHUNK_ELEMENTS
) -> Iterator[tuple[slice, Tensor, tuple[Tensor, ...]]]:
    """The eager formula in float64, over slices of rows: (rows, output, gradients of every leaf). For a
    row slice, the inputs' gradients are those rows' and the biases' gradients those rows' contribution."""
    rows = inputs.grad_out.shape[0]
    row_elements = max(leaf[0].numel() for leaf in inputs.leaves if leaf.dim() == 2)
    step = max(1, chunk_elements // max(row_elements, 1))
    for start in range(0, rows, step):
        rows_slice = slice(start, min(start + step, rows))
        leaves = [(t[rows_slice] if t.dim() == 2 else t).detach().double().requires_grad_() for t in inputs.leaves]
        output, grads = forward_backward(op.eager, leaves, inputs.grad_out[rows_slice].double())
        yield rows_slice, output.detach(), grads


def max_abs_error(result: Tensor, reference: Tensor) -> float:
    """max |result - reference| in float64; NaN if either holds a NaN."""
    if result.numel() == 0:
        return 0.0
    return (result.double() - reference).abs().max().item()


def worst(first: float, second: float) -> float:
    """The larger error, NaN if either is NaN (Python's ``max`` would drop a NaN that comes second)."""
    if math.isnan(first) or math.isnan(second):
        return math.nan
    return max(first, second)


def reference_errors(
    op: Op,
    inputs: InputSet,
    output: Tensor,
    grads: Sequence[Tensor],
    chunk_elements: int = REFERENCE_CHUNK_ELEMENTS,
) -> dict[str, float]:
    """Max abs error of ``output`` and ``grads`` (one per leaf) against the float64 reference.

    Keys: ``output``, ``input_grad`` (over every input) and, for ops with a bias, ``bias_grad``.
    """
    is_input = [leaf.dim() == 2 for leaf in inputs.leaves]
    errors = {"output": 0.0, "input_grad": 0.0}
    bias_sums = [None if row_leaf else 0.0 for row_leaf in is_input]
    for rows_slice, reference_output, reference_grads in reference_chunks(op, inputs, chunk_elements):
        errors["output"] = worst(errors["output"], max_abs_error(output[rows_slice], reference_output))
        for index, reference_grad in enumerate(reference_grads):
            if is_input[index]:
                error = max_abs_error(grads[index][rows_slice], reference_grad)
                errors["input_grad"] = worst(errors["input_grad"], error)
            else:
                bias_sums[index] = bias_sums[index] + reference_grad
    bias_errors = [max_abs_error(grads[i], bias_sums[i]) for i in range(len(is_input)) if not is_input[i]]
    if bias_errors:
        errors["bias_grad"] = functools.reduce(worst, bias_errors)
    return errors


def measure_errors(op: Op, function: Callable[..., Tensor], inputs: InputSet) -> dict[str, float]:
    """``reference_errors`` of ``function``: the output of a forward-only call (the code ``fwd`` times),
    the gradients of a forward + backward call. (No ``torch.no_grad()``: the detached inputs already keep
    autograd out, and a compiled provider would compile once more for a different grad mode.)"""
    output = function(*inputs.detached)
    _, grads = forward_backward(function, inputs.leaves, inputs.grad_out)
    return reference_errors(op, inputs, output, grads)
