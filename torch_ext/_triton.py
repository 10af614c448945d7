"""Launchers for the Triton kernel templates: view tensors as [M, N] matrices, pick block shapes, launch.

Same signatures as the fallback in ``_fallback.py``; ``ops.py`` chooses between the two per call.
Empty tensors never reach this module.

Two rules every launcher here (and softmax's) follows, each in one helper:

- ``vector_argument``: a per-channel tensor (bias, PReLU's slope, a gate or up bias, a half of a packed
  bias) reaches a kernel contiguous. The kernels index those by channel, as dense vectors; a strided or
  expanded one is copied once here (they are small), never read as if it were dense.
- ``launch``: every kernel launch runs under the device of its tensors. Triton launches on the current
  CUDA device and that device's current stream; a model split over two GPUs calls with cuda:1's tensors
  while cuda:0 is current, so the guard makes the tensors' device current for the launch (its current
  stream with it) and restores the previous one after.

``launch`` also keeps its own cache of compiled kernels (``LaunchCache``), so a repeated call skips
Triton's per-call argument binding, specialisation and cache-key work (the approach of FlagGems'
``LibEntry`` and IBM's triton-dejavu, used by vLLM): the first call of each specialisation goes through
``kernel[grid](...)``, which compiles (or loads) and launches it, and the ``CompiledKernel`` it returns is
kept under a key at least as fine as Triton's own specialisation; later calls with that key launch it
directly with exactly the arguments Triton's ``JITFunction.run`` would pass it. ``bench.ptx_report
--check-launch-cache`` (run by tests/test_ptx.py) checks both halves of that claim against Triton's own
binder for every kernel, case and layout. ``FUSEDACT_LAUNCH_CACHE=0`` turns it off.
"""

import contextlib
import functools
import inspect
import os

import torch
import triton
from torch import Tensor

from fusedact.kernels import (
    ACTIVATIONS,
    BACKWARD_TILE_ELEMENTS,
    TILE_ELEMENTS,
    bias_act_bwd_kernel,
    bias_act_fwd_kernel,
    block_shape,
    gated_bwd_kernel,
    gated_fwd_kernel,
    num_warps_for,
    vector_width,
)

from ._channels import channel_matrix, channels_along_rows, empty_output

# Backward programs per SM: enough to hide memory latency, few enough that the partial bias sums stay
# small next to the tensors themselves.
PROGRAMS_PER_SM = 4
# Under the interpreter each program is a Python loop: fewer, longer programs are faster.
INTERPRETER_PROGRAMS = 8
# The launch configuration of a flat (contiguous) call: one block shape whatever the width, so one
# compiled variant per activation and dtype serves every shape.
FLAT_BLOCK = (1, TILE_ELEMENTS)


@functools.cache
def _several_gpus() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 1


def device_guard(device: torch.device):
    """A context that makes ``device`` the current CUDA device (and so its current stream Triton's), or
    nothing when it already is (one visible GPU, or CPU tensors under the interpreter)."""
    if device.type != "cuda" or not _several_gpus() or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` under ``device`` (see ``device_guard``): the only place a kernel runs.
    ``args`` are the kernel's runtime arguments in order, ``meta`` its constexprs and launch options."""
    with device_guard(device):
        if device.type != "cuda" or not LAUNCH_CACHE.enabled:
            kernel[grid](*args, **meta)
            return
        key = LAUNCH_CACHE.key(kernel, device, args, meta)
        entry = LAUNCH_CACHE.entries.get(key)
        if entry is None:  # first call of this specialisation: Triton compiles (or loads) and launches it
            LAUNCH_CACHE.entries[key] = LAUNCH_CACHE.entry(kernel, kernel[grid](*args, **meta), args, meta)
        elif entry is LAUNCH_CACHE.UNCACHED:
            kernel[grid](*args, **meta)
        else:
            compiled, constexprs = entry
            compiled[grid](*args, *constexprs)


def _jit_function(kernel) -> tuple[object, dict]:
    """The JITFunction under ``@triton.heuristics`` wrappers, and the heuristics' rules by name."""
    rules = {}
    while hasattr(kernel, "fn") and not hasattr(kernel, "params"):
        rules.update(getattr(kernel, "values", {}))
        kernel = kernel.fn
    return kernel, rules


def _specialisation(arg) -> object:
    """What Triton specialises a runtime argument on, or finer: a tensor's dtype and 16-byte alignment; an
    int's width, divisibility by 16 and equality to 1; None; any other value itself."""
    if isinstance(arg, Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    if type(arg) is float:
        return float
    return type(arg), arg


class LaunchCache:
    """Compiled kernels by specialisation, for ``launch``."""

    UNCACHED = object()  # a specialisation this cache does not take (always launched through Triton)

    def __init__(self) -> None:
        self.entries: dict = {}
        self.enabled = os.environ.get("FUSEDACT_LAUNCH_CACHE", "1") != "0" and self.launcher_takes_bound_args()

    @staticmethod
    def launcher_takes_bound_args() -> bool:
        """Whether this Triton launches a compiled kernel with every bound argument, constexprs included
        (``kernel.run(..., *bound_args.values())`` in ``JITFunction.run``: Triton 3.3 and later), which is
        how ``CompiledKernel[grid](*args)`` is called here. Older Triton passes only the runtime
        arguments: no cache then, every call goes through Triton."""
        try:
            from triton.runtime.jit import JITFunction

            source = inspect.getsource(JITFunction.run)
        except (ImportError, OSError, TypeError):
            return False
        return "kernel.run(" in source and "*bound_args.values())" in source

    @staticmethod
    def key(kernel, device: torch.device, args: tuple, meta: dict) -> tuple:
        return (kernel, device.index, *map(_specialisation, args), *meta.items())

    def entry(self, kernel, compiled, args: tuple, meta: dict):
        """(compiled kernel, the constexpr values that follow ``args`` in its signature), or UNCACHED."""
        constexprs = self.constexpr_values(kernel, args, meta)
        signature = getattr(getattr(compiled, "src", None), "signature", None)
        if constexprs is None or signature is None or len(signature) != len(args) + len(constexprs):
            return self.UNCACHED
        return compiled, constexprs

    @staticmethod
    def constexpr_values(kernel, args: tuple, meta: dict) -> tuple | None:
        """The values of the kernel's parameters after ``args`` (all constexprs, in signature order: from
        ``meta``, the heuristics or their defaults), or None if the signature is not runtime arguments
        followed by constexprs. Our heuristics read only which pointers are None, which the key holds."""
        function, rules = _jit_function(kernel)
        params = function.params
        if len(args) > len(params) or any(p.is_constexpr for p in params[: len(args)]):
            return None
        named = dict(zip(function.arg_names, args, strict=False)) | meta
        values = []
        for param in params[len(args) :]:
            if not param.is_constexpr:
                return None
            if param.name in meta:
                values.append(meta[param.name])
            elif param.name in rules:
                values.append(rules[param.name](named))
            elif param.default is not inspect.Parameter.empty:
                values.append(param.default)
            else:
                return None
        return tuple(values)


LAUNCH_CACHE = LaunchCache()


def vector_argument(t: Tensor | None) -> Tensor | None:
    """A per-channel tensor as the kernels read it: contiguous (a copy only if it is not already)."""
    return None if t is None else t.contiguous()


def as_matrix(t: Tensor) -> Tensor:
    """``t`` as an [M, N] view (N = last dim) with whatever strides it has, or one copy if no view exists."""
    num_cols = t.shape[-1] if t.dim() > 0 else 1
    try:
        return t.view(-1, num_cols)
    except RuntimeError:  # leading dimensions that no single row stride can address
        return t.reshape(-1, num_cols)


def _row_vector(element_size: int, num_cols: int, *matrices: Tensor) -> int:
    """``VECTOR`` for a row-addressed launch over ``matrices`` (see ``kernels.vector_width``): the column
    count, every row stride and every start's distance in elements from a 16-byte boundary (which
    ``aligned_start`` hands the kernel) are multiples of it. (A start between two elements' bytes does
    not count: no offset can align it, the compiler sees that pointer as unaligned.)"""
    starts = ((m.data_ptr() % 16) // element_size for m in matrices)
    return vector_width(element_size, num_cols, *(m.stride(0) for m in matrices), *starts)


def aligned_start(t: Tensor, vector: int) -> tuple[Tensor, int]:
    """``(view, offset)``: ``view`` shaped and strided as ``t`` but ``offset`` elements earlier in its
    storage, at a 16-byte aligned address, where ``t`` starts a multiple of ``vector`` elements past one
    (``_row_vector`` makes it so); else ``(t, 0)``. Triton marks only 16-byte aligned pointers, so a
    row-addressed kernel adding ``offset // VECTOR * VECTOR`` to the view's pointer addresses ``t`` with
    ``vector``-wide accesses (the up half of a packed [gate | up] of 4100 bf16 columns: 8-byte loads, not
    2-byte ones). The view reaches back no further than ``t``'s storage, and the kernel reads nothing
    before ``t``'s first element."""
    misaligned = t.data_ptr() % 16
    shift = misaligned // t.element_size()
    if not misaligned or misaligned % (vector * t.element_size()) or t.storage_offset() < shift:
        return t, 0
    return t.as_strided(t.shape, t.stride(), t.storage_offset() - shift), shift


def _flat_grid(num_elements: int) -> tuple[int]:
    return (triton.cdiv(num_elements, FLAT_BLOCK[0] * FLAT_BLOCK[1]),)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _backward_grid(
    num_rows: int, num_cols: int, reduce: bool, along_rows: bool, device: torch.device
) -> tuple[int, int, int, int, tuple[int]]:
    """(BLOCK_M, BLOCK_N, groups, tiles_per_program, grid) of a row-addressed backward pass.

    With a parameter gradient, a program takes ``tiles_per_program`` tiles in a line along the dimension
    the gradient is summed over (down the rows for a bias per column, along each row for a bias per row)
    and writes one partial sum per channel: the lines are split into ``groups`` so the grid fills the GPU,
    and the partial buffer is ``[groups, N]`` (``[groups, M]`` by rows). Without one, one tile each."""
    block_m, block_n = block_shape(num_cols, BACKWARD_TILE_ELEMENTS)
    row_blocks, col_blocks = triton.cdiv(num_rows, block_m), triton.cdiv(num_cols, block_n)
    lines, length = (row_blocks, col_blocks) if along_rows else (col_blocks, row_blocks)
    if not reduce:
        return block_m, block_n, length, 1, (row_blocks * col_blocks,)
    groups = max(1, min(length, triton.cdiv(_target_programs(device), lines)))
    tiles_per_program = triton.cdiv(length, groups)
    groups = triton.cdiv(length, tiles_per_program)
    return block_m, block_n, groups, tiles_per_program, (groups * lines,)


def row_groups(num_rows: int, num_cols: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(row_groups, rows_per_program) of softmax's backward with a bias gradient: enough programs to fill
    the GPU, each summing its group's rows into one row of the [row_groups, N] partial buffer."""
    row_blocks = triton.cdiv(num_rows, block_m)
    col_blocks = triton.cdiv(num_cols, block_n)
    groups = max(1, min(row_blocks, triton.cdiv(_target_programs(device), col_blocks)))
    blocks_per_group = triton.cdiv(row_blocks, groups)
    return triton.cdiv(row_blocks, blocks_per_group), blocks_per_group * block_m


def _activation_id(activation: str) -> int:
    return ACTIVATIONS[activation]


def bias_act(
    x: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    weight2: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    dim: int,
) -> Tensor:
    along_rows = channels_along_rows(x, dim)
    x2 = channel_matrix(x, dim, along_rows)
    num_rows, num_cols = x2.shape
    y = empty_output(x, dim)
    flat = x2.is_contiguous()
    if flat:
        (block_m, block_n), grid, vector = FLAT_BLOCK, _flat_grid(x2.numel()), 1
    else:
        block_m, block_n = block_shape(num_cols)
        grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n),)
        vector = _row_vector(x.element_size(), num_cols, x2)
    x2, x_offset = (x2, 0) if flat else aligned_start(x2, vector)
    launch(
        bias_act_fwd_kernel, grid, x.device,
        x2, vector_argument(bias), vector_argument(weight), vector_argument(weight2),
        channel_matrix(y, dim, along_rows), num_rows, num_cols, x2.stride(0), x2.stride(1), x_offset,
        _num_channels(x, dim),
        _weight_stride(weight), param, param2,
        ACTIVATION=_activation_id(activation), CHANNELS_ALONG_ROWS=along_rows, FLAT=flat, VECTOR=vector,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    return y


def _num_channels(x: Tensor, dim: int) -> int:
    return x.shape[dim] if x.dim() else 1


def _weight_stride(weight: Tensor | None) -> int:
    """1 for a learned parameter per channel, 0 for one shared by all of them (a second one, xIELU's
    alpha_n, is laid out as the first)."""
    return 0 if weight is None or weight.numel() == 1 else 1


def _channel_sums(partial: Tensor, along_rows: bool, num_channels: int, like: Tensor) -> Tensor:
    """Finish a bias/weight gradient from the kernel's fp32 partial sums, in a fixed order: over row
    groups (channels in columns), or over column blocks and then over the rows of each channel. Rounded
    once to ``like``'s dtype; a parameter shared by every channel (one element) takes the sum of all."""
    sums = partial.sum(0)
    if along_rows:
        sums = sums.view(-1, num_channels).sum(0)
    if like.numel() == 1 and num_channels != 1:
        sums = sums.sum().reshape(1)
    return sums.to(like.dtype)


def bias_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    weight2: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
    compute_grad_weight: bool,
    output: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_bias, grad_weight, grad_weight2); ``compute_grad_weight`` asks for the gradient of every
    learned parameter given. ``output``: a tensor laid out like ``grad_x`` that also receives the forward
    output, recomputed from the saved input (not with ``saved_is_output``)."""
    along_rows = channels_along_rows(saved, dim)
    grad_y2, saved2 = channel_matrix(grad_y, dim, along_rows), channel_matrix(saved, dim, along_rows)
    num_rows, num_cols = saved2.shape
    grad_x = empty_output(saved, dim)
    compute_grad_bias = compute_grad_bias and bias is not None
    compute_grad_weight = compute_grad_weight and weight is not None
    reduce = compute_grad_bias or compute_grad_weight
    flat = not reduce and grad_y2.is_contiguous() and saved2.is_contiguous()
    if flat:
        (block_m, block_n), grid, vector, groups, tiles_per_program = FLAT_BLOCK, _flat_grid(saved2.numel()), 1, 1, 1
    else:
        block_m, block_n, groups, tiles_per_program, grid = _backward_grid(
            num_rows, num_cols, reduce, along_rows, saved.device
        )
        vector = _row_vector(saved.element_size(), num_cols, grad_y2, saved2)
    grad_y2, grad_y_offset = (grad_y2, 0) if flat else aligned_start(grad_y2, vector)
    saved2, saved_offset = (saved2, 0) if flat else aligned_start(saved2, vector)
    # Partial sums: one row per group of rows (channels in columns) or of columns (channels in rows).
    partial_shape = (groups, num_rows if along_rows else num_cols)

    def partial_buffer(compute: bool) -> Tensor | None:
        return torch.empty(partial_shape, dtype=torch.float32, device=saved.device) if compute else None

    partial_bias, partial_weight = partial_buffer(compute_grad_bias), partial_buffer(compute_grad_weight)
    partial_weight2 = partial_buffer(compute_grad_weight and weight2 is not None)
    output2 = None if output is None else channel_matrix(output, dim, along_rows)
    launch(
        bias_act_bwd_kernel, grid, saved.device,
        grad_y2, saved2, vector_argument(bias), vector_argument(weight), vector_argument(weight2),
        channel_matrix(grad_x, dim, along_rows), output2, partial_bias, partial_weight, partial_weight2,
        num_rows, num_cols, grad_y2.stride(0), grad_y2.stride(1), saved2.stride(0), saved2.stride(1),
        grad_y_offset, saved_offset, _num_channels(saved, dim), _weight_stride(weight), tiles_per_program,
        param, param2,
        ACTIVATION=_activation_id(activation), CHANNELS_ALONG_ROWS=along_rows, SAVED_IS_OUTPUT=saved_is_output,
        COMPUTE_GRAD_BIAS=compute_grad_bias, COMPUTE_GRAD_WEIGHT=compute_grad_weight, FLAT=flat, VECTOR=vector,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    num_channels = _num_channels(saved, dim)
    # (two distinct empty tensors: a custom op's outputs must not alias each other)
    grad_bias = _channel_sums(partial_bias, along_rows, num_channels, bias) if compute_grad_bias else saved.new_empty(0)
    grad_weight, grad_weight2 = (
        _channel_sums(partial, along_rows, num_channels, like) if partial is not None else saved.new_empty(0)
        for partial, like in ((partial_weight, weight), (partial_weight2, weight2))
    )
    return grad_x, grad_bias, grad_weight, grad_weight2


def gated(
    gate: Tensor,
    up: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
) -> Tensor:
    gate2, up2 = as_matrix(gate), as_matrix(up)
    num_rows, num_cols = gate2.shape
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    flat = gate2.is_contiguous() and up2.is_contiguous()
    if flat:
        (block_m, block_n), grid, vector = FLAT_BLOCK, _flat_grid(gate2.numel()), 1
    else:
        block_m, block_n = block_shape(num_cols)
        grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n),)
        vector = _row_vector(gate.element_size(), num_cols, gate2, up2)
    (gate2, gate_offset), (up2, up_offset) = ((t, 0) if flat else aligned_start(t, vector) for t in (gate2, up2))
    launch(
        gated_fwd_kernel, grid, gate.device,
        gate2, up2, vector_argument(gate_bias), vector_argument(up_bias), y, num_rows, num_cols,
        gate2.stride(0), gate2.stride(1), up2.stride(0), up2.stride(1), gate_offset, up_offset,
        param, param2, gate_scale,
        ACTIVATION=_activation_id(activation), SCALED_GATE=gate_scale != 1.0, FLAT=flat, VECTOR=vector,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    return y


def gated_backward_into(
    grad_gate: Tensor,
    grad_up: Tensor,
    grad_y: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    compute_grad_bias: bool,
    output: Tensor | None = None,
) -> Tensor | None:
    """Write gate/up gradients into ``grad_gate``/``grad_up`` ([M, N] views with column stride 1 and one
    shared row stride: two separate buffers, or the halves of one packed buffer), and the recomputed
    forward output into ``output`` (contiguous, like ``gate``) when given. Returns the fp32 partial
    bias-gradient sums ``[2, N]`` (gate, up) when asked for, else None."""
    grad_y2, gate2, up2 = as_matrix(grad_y), as_matrix(gate), as_matrix(up)
    num_rows, num_cols = gate2.shape
    compute_grad_bias = compute_grad_bias and (gate_bias is not None or up_bias is not None)
    flat = not compute_grad_bias and all(t.is_contiguous() for t in (grad_y2, gate2, up2, grad_gate, grad_up))
    if flat:
        (block_m, block_n), grid, vector, groups, tiles_per_program = FLAT_BLOCK, _flat_grid(gate2.numel()), 1, 1, 1
    else:
        block_m, block_n, groups, tiles_per_program, grid = _backward_grid(
            num_rows, num_cols, compute_grad_bias, False, gate.device
        )
        vector = _row_vector(gate.element_size(), num_cols, grad_y2, gate2, up2, grad_gate, grad_up)
    (grad_y2, grad_y_offset), (gate2, gate_offset), (up2, up_offset), (grad_up, grad_up_offset) = (
        (t, 0) if flat else aligned_start(t, vector) for t in (grad_y2, gate2, up2, grad_up)
    )
    partial = partial_gate = partial_up = None
    if compute_grad_bias:  # one buffer: the gate and up sums of a row group side by side
        partial = torch.empty((groups, 2, num_cols), dtype=torch.float32, device=gate.device)
        partial_gate, partial_up = partial[:, 0], partial[:, 1]
    launch(
        gated_bwd_kernel, grid, gate.device,
        grad_y2, gate2, up2, vector_argument(gate_bias), vector_argument(up_bias), grad_gate, grad_up,
        None if output is None else as_matrix(output), partial_gate, partial_up,
        num_rows, num_cols, grad_y2.stride(0), grad_y2.stride(1), gate2.stride(0), gate2.stride(1),
        up2.stride(0), up2.stride(1), grad_gate.stride(0), 2 * num_cols,
        grad_y_offset, gate_offset, up_offset, grad_up_offset, tiles_per_program,
        param, param2, gate_scale,
        ACTIVATION=_activation_id(activation), SCALED_GATE=gate_scale != 1.0, COMPUTE_GRAD_BIAS=compute_grad_bias,
        FLAT=flat, VECTOR=vector, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    return partial.sum(0) if compute_grad_bias else None
