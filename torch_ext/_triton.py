"""Launchers for the Triton kernel templates: view tensors as [M, N] matrices, pick block shapes, launch.

Same signatures as the fallback in ``_fallback.py``; ``ops.py`` chooses between the two per call.
Empty tensors never reach this module.
"""

import functools

import torch
import triton
from torch import Tensor

from fusedact.kernels import (
    ACTIVATIONS,
    bias_act_bwd_kernel,
    bias_act_fwd_kernel,
    block_shape,
    gated_bwd_kernel,
    gated_fwd_kernel,
    num_warps_for,
)

from ._channels import channel_matrix, channels_along_rows, empty_output

# Backward programs per SM: enough to hide memory latency, few enough that the partial bias sums stay
# small next to the tensors themselves.
PROGRAMS_PER_SM = 4
# Under the interpreter each program is a Python loop: fewer, longer programs are faster.
INTERPRETER_PROGRAMS = 8


def as_matrix(t: Tensor) -> Tensor:
    """``t`` as an [M, N] view (N = last dim) with whatever strides it has, or one copy if no view exists."""
    num_cols = t.shape[-1] if t.dim() > 0 else 1
    try:
        return t.view(-1, num_cols)
    except RuntimeError:  # leading dimensions that no single row stride can address
        return t.reshape(-1, num_cols)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _backward_grid(
    num_rows: int, num_cols: int, compute_grad_bias: bool, device: torch.device
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, row_groups, rows_per_program) for a backward pass. With a bias gradient the rows
    are split into groups so the grid fills the GPU and each group's partial sum is one row of a small
    [row_groups, N] buffer; without one, each program takes one tile."""
    block_m, block_n = block_shape(num_cols)
    if not compute_grad_bias:
        return block_m, block_n, triton.cdiv(num_rows, block_m), block_m
    return block_m, block_n, *row_groups(num_rows, num_cols, block_m, block_n, device)


def row_groups(num_rows: int, num_cols: int, block_m: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(row_groups, rows_per_program) of a backward with a bias gradient: enough programs to fill the GPU,
    each summing its group's rows into one row of the [row_groups, N] partial buffer (also softmax's)."""
    row_blocks = triton.cdiv(num_rows, block_m)
    col_blocks = triton.cdiv(num_cols, block_n)
    groups = max(1, min(row_blocks, triton.cdiv(_target_programs(device), col_blocks)))
    blocks_per_group = triton.cdiv(row_blocks, groups)
    return triton.cdiv(row_blocks, blocks_per_group), blocks_per_group * block_m


def _activation_id(activation: str) -> int:
    return ACTIVATIONS[activation]


def bias_act(x: Tensor, bias: Tensor | None, weight: Tensor | None, activation: str, param: float, dim: int) -> Tensor:
    along_rows = channels_along_rows(x, dim)
    x2 = channel_matrix(x, dim, along_rows)
    num_rows, num_cols = x2.shape
    y = empty_output(x, dim)
    block_m, block_n = block_shape(num_cols)
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n),)
    bias_act_fwd_kernel[grid](
        x2, bias, weight, channel_matrix(y, dim, along_rows), num_rows, num_cols, x2.stride(0), x2.stride(1),
        _num_channels(x, dim), _weight_stride(weight), param,
        ACTIVATION=_activation_id(activation), CHANNELS_ALONG_ROWS=along_rows, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    return y


def _num_channels(x: Tensor, dim: int) -> int:
    return x.shape[dim] if x.dim() else 1


def _weight_stride(weight: Tensor | None) -> int:
    """1 for a slope per channel, 0 for one slope shared by all of them."""
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
    activation: str,
    param: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    along_rows = channels_along_rows(saved, dim)
    grad_y2, saved2 = channel_matrix(grad_y, dim, along_rows), channel_matrix(saved, dim, along_rows)
    num_rows, num_cols = saved2.shape
    grad_x = empty_output(saved, dim)
    compute_grad_bias = compute_grad_bias and bias is not None
    compute_grad_weight = compute_grad_weight and weight is not None
    reduce = compute_grad_bias or compute_grad_weight
    block_m, block_n, row_groups, rows_per_program = _backward_grid(num_rows, num_cols, reduce, saved.device)
    # Partial sums: one [row_groups, N] row per row group (channels in columns), or one sum per row and
    # column block (channels in rows).
    partial_shape = (triton.cdiv(num_cols, block_n), num_rows) if along_rows else (row_groups, num_cols)

    def partial_buffer(compute: bool) -> Tensor | None:
        return torch.empty(partial_shape, dtype=torch.float32, device=saved.device) if compute else None

    partial_bias, partial_weight = partial_buffer(compute_grad_bias), partial_buffer(compute_grad_weight)
    grid = (row_groups * triton.cdiv(num_cols, block_n),)
    bias_act_bwd_kernel[grid](
        grad_y2, saved2, bias, weight, channel_matrix(grad_x, dim, along_rows), partial_bias, partial_weight,
        num_rows, num_cols, grad_y2.stride(0), grad_y2.stride(1), saved2.stride(0), saved2.stride(1),
        _num_channels(saved, dim), _weight_stride(weight), rows_per_program, param,
        ACTIVATION=_activation_id(activation), CHANNELS_ALONG_ROWS=along_rows, SAVED_IS_OUTPUT=saved_is_output,
        COMPUTE_GRAD_BIAS=compute_grad_bias, COMPUTE_GRAD_WEIGHT=compute_grad_weight,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    num_channels = _num_channels(saved, dim)
    # (two distinct empty tensors: a custom op's outputs must not alias each other)
    grad_bias = _channel_sums(partial_bias, along_rows, num_channels, bias) if compute_grad_bias else saved.new_empty(0)
    grad_weight = (
        _channel_sums(partial_weight, along_rows, num_channels, weight) if compute_grad_weight else saved.new_empty(0)
    )
    return grad_x, grad_bias, grad_weight


def gated(
    gate: Tensor, up: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None, activation: str, param: float
) -> Tensor:
    gate2, up2 = as_matrix(gate), as_matrix(up)
    num_rows, num_cols = gate2.shape
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block_m, block_n = block_shape(num_cols)
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n),)
    gated_fwd_kernel[grid](
        gate2, up2, gate_bias, up_bias, y, num_rows, num_cols,
        gate2.stride(0), gate2.stride(1), up2.stride(0), up2.stride(1), param,
        ACTIVATION=_activation_id(activation), BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps_for(block_m, block_n),
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
    saved_is_output: bool,
    compute_grad_bias: bool,
) -> Tensor | None:
    """Write gate/up gradients into ``grad_gate``/``grad_up`` ([M, N] views with column stride 1 and one
    shared row stride: two separate buffers, or the halves of one packed buffer). Returns the fp32 partial
    bias-gradient sums ``[2, N]`` (gate, up) when asked for, else None."""
    grad_y2, gate2, up2 = as_matrix(grad_y), as_matrix(gate), as_matrix(up)
    num_rows, num_cols = gate2.shape
    compute_grad_bias = compute_grad_bias and (gate_bias is not None or up_bias is not None)
    block_m, block_n, row_groups, rows_per_program = _backward_grid(num_rows, num_cols, compute_grad_bias, gate.device)
    partial = partial_gate = partial_up = None
    if compute_grad_bias:  # one buffer: the gate and up sums of a row group side by side
        partial = torch.empty((row_groups, 2, num_cols), dtype=torch.float32, device=gate.device)
        partial_gate, partial_up = partial[:, 0], partial[:, 1]
    grid = (row_groups * triton.cdiv(num_cols, block_n),)
    gated_bwd_kernel[grid](
        grad_y2, gate2, up2, gate_bias, up_bias, grad_gate, grad_up, partial_gate, partial_up,
        num_rows, num_cols, grad_y2.stride(0), grad_y2.stride(1), gate2.stride(0), gate2.stride(1),
        up2.stride(0), up2.stride(1), grad_gate.stride(0), 2 * num_cols, rows_per_program, param,
        ACTIVATION=_activation_id(activation), SAVED_IS_OUTPUT=saved_is_output, COMPUTE_GRAD_BIAS=compute_grad_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps_for(block_m, block_n),
    )  # fmt: skip
    return partial.sum(0) if compute_grad_bias else None
