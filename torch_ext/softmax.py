"""softmax and log_softmax with a fused bias: launchers, fallback, registered ops and their autograd.

Same layering and dispatch as ``ops.py`` (whose ``_entry`` and ``_backend`` this module uses): CUDA tensors
run the kernels of ``fusedact.kernels.softmax``; fp64 tensors, and CPU tensors unless the CPU backend is
``"triton"`` (the interpreter), run the PyTorch fallback, with the same numerics (fp32 math, one rounding).

Ops (``dim`` is a non-negative index; ``functional.softmax`` / ``log_softmax`` validate user input):

- ``fusedact::softmax(x, bias, dim, log) -> y``: ``softmax(x + bias)`` along ``dim`` (``log_softmax`` when
  ``log``), ``bias`` of length ``x.shape[dim]`` broadcast over every other dimension. ``y`` is contiguous.
- ``fusedact::softmax_backward(grad_y, y, dim, log, compute_grad_bias) -> (grad_x, grad_bias)``: from the
  saved output alone; ``grad_bias`` (``grad_x`` summed over every dimension but ``dim``, in fp32, in a fixed
  order) is empty unless asked for.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from . import _fallback, ops
from ._channels import channel_shape, reduce_to_channels

try:
    import triton

    from fusedact.kernels.softmax import (
        softmax_block_shape,
        softmax_bwd_kernel,
        softmax_bwd_row_sums_kernel,
        softmax_fwd_kernel,
        softmax_num_warps,
    )
except ImportError:  # no Triton: ops._backend always picks the fallback
    triton = None


def _width(t: Tensor, dim: int) -> int:
    return t.shape[dim] if t.dim() else 1


def _uses_kernels(t: Tensor) -> bool:
    return triton is not None and ops._backend(t) is not _fallback


# ---------------------------------------------------------------------------------------------------
# Triton launchers


def _rows(t: Tensor, dim: int) -> Tensor:
    """``t`` as the ``[outer, N, inner]`` view the kernels address (N = ``t.shape[dim]``), with whatever
    strides it has; one copy when the dimensions before or after ``dim`` cannot be merged into one stride."""
    if t.dim() == 0:
        return t.view(1, 1, 1)
    shape = (math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1 :]))
    try:
        return t.view(shape)
    except RuntimeError:
        return t.reshape(shape)


def _launch_shape(t3: Tensor) -> tuple[int, int, int, int, int]:
    """(num_rows, num_cols, inner, BLOCK_M, BLOCK_N) of an ``[outer, N, inner]`` view."""
    outer, num_cols, inner = t3.shape
    num_rows = outer * inner
    block_m, block_n = softmax_block_shape(num_rows, num_cols, rows_adjacent=inner > 1)
    return num_rows, num_cols, inner, block_m, block_n


def _vector(element_size: int, *tensors3: Tensor) -> int:
    """``VECTOR`` for rows along the last dimension (see ``kernels.vector_width``): the column count and
    every tensor's row stride are multiples of it. A softmax over another dimension reads its columns
    ``inner`` apart: 1."""
    outer, num_cols, inner = tensors3[0].shape
    if inner != 1:
        return 1
    return ops._triton.vector_width(element_size, num_cols, *(t.stride(0) for t in tensors3))


def _softmax_triton(x: Tensor, bias: Optional[Tensor], dim: int, log: bool) -> Tensor:
    x3 = _rows(x, dim)
    num_rows, num_cols, inner, block_m, block_n = _launch_shape(x3)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ops._triton.launch(
        softmax_fwd_kernel, (triton.cdiv(num_rows, block_m),), x.device,
        x3, ops._triton.vector_argument(bias), y, num_rows, num_cols, inner, x3.stride(0), x3.stride(1), x3.stride(2),
        LOG=log, SINGLE_BLOCK=num_cols <= block_n, VECTOR=_vector(x.element_size(), x3),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=softmax_num_warps(block_m, block_n),
    )  # fmt: skip
    return y


def _softmax_backward_triton(
    grad_y: Tensor, y: Tensor, dim: int, log: bool, compute_grad_bias: bool
) -> tuple[Tensor, Tensor]:
    grad_y3, y3 = _rows(grad_y, dim), _rows(y, dim)
    num_rows, num_cols, inner, block_m, block_n = _launch_shape(y3)
    strides = (*grad_y3.stride(), *y3.stride())
    vector = _vector(y.element_size(), y3, grad_y3)
    num_warps = softmax_num_warps(block_m, block_n)
    if num_cols > block_n and vector == 1:
        # Long rows that cannot be read 16 bytes at a time (an odd width): half a block over as many
        # warps keeps the backward's element-wise operands in registers (a full one spills); the row sums
        # are computed first either way, so the smaller block reads nothing twice.
        block_n //= 2
    row_sums = None
    if num_cols > block_n:  # long rows: their sums first, then a grid over row groups and column blocks
        row_sums = torch.empty(num_rows, dtype=torch.float32, device=y.device)
        ops._triton.launch(
            softmax_bwd_row_sums_kernel, (triton.cdiv(num_rows, block_m),), y.device,
            grad_y3, y3, row_sums, num_rows, num_cols, inner, *strides,
            LOG=log, VECTOR=vector, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )  # fmt: skip
    if compute_grad_bias:
        row_groups, rows_per_program = ops._triton.row_groups(num_rows, num_cols, block_m, block_n, y.device)
        partial = torch.empty((row_groups, num_cols), dtype=torch.float32, device=y.device)
    else:
        row_groups, rows_per_program, partial = triton.cdiv(num_rows, block_m), block_m, None
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    ops._triton.launch(
        softmax_bwd_kernel, (row_groups * triton.cdiv(num_cols, block_n),), y.device,
        grad_y3, y3, row_sums, grad_x, partial, num_rows, num_cols, inner, *strides, rows_per_program,
        LOG=log, COMPUTE_GRAD_BIAS=compute_grad_bias, VECTOR=vector, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )  # fmt: skip
    # The partial sums, reduced in a fixed order and rounded once: bitwise the same on every run.
    grad_bias = partial.sum(0).to(y.dtype) if compute_grad_bias else y.new_empty(0)
    return grad_x, grad_bias


# ---------------------------------------------------------------------------------------------------
# PyTorch fallback: PyTorch's own softmax kernels in fp32 (fp64 for fp64), one rounding at the end.


def _softmax_torch(x: Tensor, bias: Optional[Tensor], dim: int, log: bool) -> Tensor:
    dtype = _fallback.compute_dtype(x.dtype)
    z = x.to(dtype) if bias is None else torch.add(x, bias.view(channel_shape(x, dim)).to(dtype))
    y = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    return y.to(x.dtype).contiguous()


def _softmax_backward_torch(
    grad_y: Tensor, y: Tensor, dim: int, log: bool, compute_grad_bias: bool
) -> tuple[Tensor, Tensor]:
    dtype = _fallback.compute_dtype(y.dtype)
    backward = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    grad_x = backward(grad_y.to(dtype), y.to(dtype), dim, dtype)
    grad_bias = reduce_to_channels(grad_x, dim).to(y.dtype) if compute_grad_bias else y.new_empty(0)
    return grad_x.to(y.dtype).contiguous(), grad_bias


# ---------------------------------------------------------------------------------------------------
# Registered ops and autograd


def _softmax_impl(x: Tensor, bias: Optional[Tensor], dim: int, log: bool) -> Tensor:
    """softmax (or log_softmax) of ``x + bias`` along ``dim``; contiguous."""
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if _uses_kernels(x):
        return _softmax_triton(x, bias, dim, log)
    return _softmax_torch(x, bias, dim, log)


softmax = torch.library.custom_op("fusedact::softmax", _softmax_impl, mutates_args=())


@softmax.register_fake
def _(x, bias, dim, log):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _softmax_backward_impl(
    grad_y: Tensor, y: Tensor, dim: int, log: bool, compute_grad_bias: bool
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias) from the saved output ``y``; grad_bias is empty unless ``compute_grad_bias``."""
    if y.numel() == 0:
        grad_bias = y.new_zeros(_width(y, dim) if compute_grad_bias else 0)
        return torch.empty(y.shape, dtype=y.dtype, device=y.device), grad_bias
    if _uses_kernels(y):
        return _softmax_backward_triton(grad_y, y, dim, log, compute_grad_bias)
    return _softmax_backward_torch(grad_y, y, dim, log, compute_grad_bias)


softmax_backward = torch.library.custom_op("fusedact::softmax_backward", _softmax_backward_impl, mutates_args=())


@softmax_backward.register_fake
def _(grad_y, y, dim, log, compute_grad_bias):
    grad_x = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    return grad_x, y.new_empty(_width(y, dim) if compute_grad_bias else 0)


def _softmax_setup_context(ctx, inputs, output):
    x, bias, dim, log = inputs
    ctx.dim, ctx.log, ctx.has_bias = dim, log, bias is not None
    ctx.save_for_backward(output)  # both derivatives are written in the output: x is not kept


def _softmax_grad(ctx, grad_y, backward):
    (y,) = ctx.saved_tensors
    compute_grad_bias = ctx.has_bias and ctx.needs_input_grad[1]
    grad_x, grad_bias = backward(grad_y, y, ctx.dim, ctx.log, compute_grad_bias)
    return grad_x, (grad_bias if compute_grad_bias else None), None, None


run_softmax = ops._entry(
    softmax, _softmax_impl, _softmax_setup_context, _softmax_grad, softmax_backward, _softmax_backward_impl,
    _softmax_backward_torch,  # differentiable PyTorch ops: double backward
)  # fmt: skip
