"""Row-wise softmax and log-softmax with an optional fused bias, forward and backward.

A tensor is addressed as ``[outer, N, inner]`` (``N`` = the softmax dimension, ``outer`` / ``inner`` = the
products of the dimensions before / after it), through three strides. A *row* is one ``(outer, inner)``
position: ``num_rows = outer * inner`` rows of ``N`` elements, ``stride_col`` apart. The last dimension is
``inner = 1``; any other dimension is read in place, with consecutive rows adjacent in memory (a program
then takes a block of rows, so its loads are still coalesced, across rows instead of along them).

=============  ================================================  ============================================
op             forward, z = x + bias, m = max(z), s = sum(exp(z - m))  backward from the saved output y
=============  ================================================  ============================================
softmax        y = exp(z - m) / s                                grad_z = y * (g - sum(g * y))
log_softmax    y = (z - m) - log(s)                              grad_z = g - exp(y) * sum(g)
=============  ================================================  ============================================

``grad_bias = sum over rows of grad_z``. Subtracting the row maximum keeps ``exp`` in (0, 1]: logits of
1e4 neither overflow nor lose the row. Everything is fp32 and rounded once on store.

Rows of up to ``MAX_BLOCK_N`` elements are loaded once and kept in registers (``SINGLE_BLOCK``). Longer
rows run the online softmax: one pass keeps a running maximum and a sum rescaled to it,
``s <- s * exp(m_old - m_new) + sum(exp(z - m_new))``, a second pass writes. The backward of a long row
takes its per-row sum (``sum(g * y)`` or ``sum(g)``) from ``softmax_bwd_row_sums_kernel`` first.

Edges follow PyTorch: a NaN anywhere makes its row NaN; a row with +inf is NaN (``inf - inf``); a row of
only -inf is NaN (``-inf - (-inf)``); -inf next to finite values gives 0 (log: -inf). The online pass
shifts by 0 while its running maximum is still -inf, so a long row that starts with -inf stays exact.

The bias gradient is reduced without atomics, in a fixed order: a program owns a group of rows and one
block of columns and writes its fp32 column sums to one row of a ``[row_groups, N]`` buffer, which the
host sums. Program ids and row indices are int64 before any address arithmetic.
"""

import triton
import triton.language as tl

from .rounding import round_to, to_fp32

# A row of up to this many elements stays in registers (16 fp32 values per thread with 16 warps; the
# backward holds two such tiles). Longer rows take the online loop, in blocks of this size.
MAX_BLOCK_N = 8192
# Elements of one tile when several short rows share a program: wide loads, a short grid.
TILE_ELEMENTS = 4096
# Rows per program when rows, not columns, are adjacent in memory (softmax over a dimension other than the
# last): 16 adjacent rows make a 64-byte fp32 (32-byte bf16) segment per column.
MIN_BLOCK_M_STRIDED = 16


def softmax_block_shape(num_rows: int, num_cols: int, rows_adjacent: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows up to ``MAX_BLOCK_N`` (fewer for adjacent rows, which need a block of
    rows for coalescing), then as many rows as fill a tile, but no more rows than there are."""
    min_block_m = MIN_BLOCK_M_STRIDED if rows_adjacent else 1
    block_n = min(triton.next_power_of_2(max(num_cols, 1)), MAX_BLOCK_N // min_block_m)
    block_m = max(min_block_m, TILE_ELEMENTS // block_n)
    return min(block_m, triton.next_power_of_2(max(num_rows, 1))), block_n


def softmax_num_warps(block_m: int, block_n: int) -> int:
    """4 warps up to 2048 elements, then one warp per 512 (16 fp32 registers per tile), at most 16."""
    return min(16, max(4, block_m * block_n // 512))


@triton.jit
def _row_offsets(rows, inner_size, stride_outer, stride_inner):
    """Offset of the first element of each row: rows are (outer, inner) positions, row = outer * inner_size
    + inner. (With inner_size == 1, which Triton specialises, the division folds away.)"""
    return (rows // inner_size) * stride_outer + (rows % inner_size) * stride_inner


@triton.jit
def _contiguous_row_offsets(rows, inner_size, num_cols):
    """Row offsets in a contiguous [outer, N, inner] tensor (the outputs); int64 like ``rows``."""
    return (rows // inner_size) * num_cols * inner_size + rows % inner_size


@triton.jit
def _load_logits(x_ptr, bias_ptr, x_rows, cols, stride_x_col, mask, col_mask, HAS_BIAS: tl.constexpr):
    """z = x + bias in fp32 for one tile; -inf outside the tile, which neither wins the max nor adds to the sum."""
    z = to_fp32(tl.load(x_ptr + x_rows[:, None] + cols[None, :] * stride_x_col, mask=mask, other=float("-inf")))
    if HAS_BIAS:
        z += to_fp32(tl.load(bias_ptr + cols, mask=col_mask, other=0.0))[None, :]
    return z


@triton.jit
def _normalise(z, row_max, row_sum, LOG: tl.constexpr):
    """softmax (exp(z - m) / s) or log_softmax ((z - m) - log(s)) from a row's maximum and sum."""
    shifted = z - row_max[:, None]
    if LOG:
        y = shifted - tl.log(row_sum)[:, None]
    else:
        y = tl.exp(shifted) * (1.0 / row_sum)[:, None]
    return y


@triton.heuristics({"HAS_BIAS": lambda args: args["bias_ptr"] is not None})
@triton.jit
def softmax_fwd_kernel(
    x_ptr,  # input, [outer, N, inner], any strides
    bias_ptr,  # bias, [N], contiguous, or None
    y_ptr,  # output, [outer, N, inner] contiguous
    num_rows,  # outer * inner
    num_cols,  # N
    inner_size,  # inner: 1 when N is the last dimension
    stride_x_outer,
    stride_x_col,
    stride_x_inner,
    LOG: tl.constexpr,  # log_softmax instead of softmax
    HAS_BIAS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # num_cols <= BLOCK_N: one read of each row
    VECTOR: tl.constexpr,  # num_cols and the row strides are multiples of it (see kernels.templates)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    num_cols = num_cols // VECTOR * VECTOR
    stride_x_outer = stride_x_outer // VECTOR * VECTOR
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    x_rows = _row_offsets(rows, inner_size, stride_x_outer, stride_x_inner)
    y_rows = _contiguous_row_offsets(rows, inner_size, num_cols)
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < num_cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = _load_logits(x_ptr, bias_ptr, x_rows, cols, stride_x_col, mask, col_mask, HAS_BIAS)
        row_max = tl.max(z, axis=1)
        row_sum = tl.sum(tl.where(mask, tl.exp(z - row_max[:, None]), 0.0), axis=1)
        y = _normalise(z, row_max, row_sum, LOG)
        tl.store(y_ptr + y_rows[:, None] + cols[None, :] * inner_size, round_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start in range(0, num_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < num_cols
            mask = row_mask[:, None] & col_mask[None, :]
            z = _load_logits(x_ptr, bias_ptr, x_rows, cols, stride_x_col, mask, col_mask, HAS_BIAS)
            new_max = tl.maximum(row_max, tl.max(z, axis=1))
            # While the maximum is still -inf, shift by 0: exp(-inf - (-inf)) would be NaN for a row that
            # merely starts with -inf. A row of only -inf still ends NaN, in the write pass below.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            chunk_sum = tl.sum(tl.where(mask, tl.exp(z - shift[:, None]), 0.0), axis=1)
            row_sum = row_sum * tl.exp(row_max - shift) + chunk_sum
            row_max = new_max
        for start in range(0, num_cols, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < num_cols
            mask = row_mask[:, None] & col_mask[None, :]
            z = _load_logits(x_ptr, bias_ptr, x_rows, cols, stride_x_col, mask, col_mask, HAS_BIAS)
            y = _normalise(z, row_max, row_sum, LOG)
            tl.store(
                y_ptr + y_rows[:, None] + cols[None, :] * inner_size, round_to(y, y_ptr.dtype.element_ty), mask=mask
            )


@triton.jit
def _load_grad_and_output(
    grad_y_ptr, y_ptr, grad_y_rows, y_rows, cols, stride_grad_y_col, stride_y_col, mask, LOG: tl.constexpr
):
    """(g, y) of one tile in fp32; outside the tile g = 0 and y = 0 (log: -inf), so exp(y) and g * y are 0."""
    grad_y = tl.load(grad_y_ptr + grad_y_rows[:, None] + cols[None, :] * stride_grad_y_col, mask=mask, other=0.0)
    y_pointers = y_ptr + y_rows[:, None] + cols[None, :] * stride_y_col
    if LOG:
        y = tl.load(y_pointers, mask=mask, other=float("-inf"))
    else:
        y = tl.load(y_pointers, mask=mask, other=0.0)
    return to_fp32(grad_y), to_fp32(y)


@triton.jit
def _row_reduction(grad_y, y, LOG: tl.constexpr):
    """The per-row sum the backward needs: sum(g) for log_softmax, sum(g * y) for softmax."""
    if LOG:
        total = tl.sum(grad_y, axis=1)
    else:
        total = tl.sum(grad_y * y, axis=1)
    return total


@triton.jit
def softmax_bwd_row_sums_kernel(
    grad_y_ptr,  # gradient of the output, [outer, N, inner], any strides
    y_ptr,  # saved output, [outer, N, inner], any strides
    row_sums_ptr,  # fp32 [num_rows]: sum(g * y) (softmax) or sum(g) (log_softmax) of each row
    num_rows,
    num_cols,
    inner_size,
    stride_grad_y_outer,
    stride_grad_y_col,
    stride_grad_y_inner,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    LOG: tl.constexpr,
    VECTOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """First pass of the backward of rows longer than one block: one program per block of rows."""
    num_cols = num_cols // VECTOR * VECTOR
    stride_grad_y_outer = stride_grad_y_outer // VECTOR * VECTOR
    stride_y_outer = stride_y_outer // VECTOR * VECTOR
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    grad_y_rows = _row_offsets(rows, inner_size, stride_grad_y_outer, stride_grad_y_inner)
    y_rows = _row_offsets(rows, inner_size, stride_y_outer, stride_y_inner)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        mask = row_mask[:, None] & (cols < num_cols)[None, :]
        grad_y, y = _load_grad_and_output(
            grad_y_ptr, y_ptr, grad_y_rows, y_rows, cols, stride_grad_y_col, stride_y_col, mask, LOG
        )
        total += _row_reduction(grad_y, y, LOG)
    tl.store(row_sums_ptr + rows, total, mask=row_mask)


@triton.heuristics({"HAS_ROW_SUMS": lambda args: args["row_sums_ptr"] is not None})
@triton.jit
def softmax_bwd_kernel(
    grad_y_ptr,  # gradient of the output, [outer, N, inner], any strides
    y_ptr,  # saved output (softmax: probabilities; log_softmax: log-probabilities), any strides
    row_sums_ptr,  # fp32 [num_rows] from softmax_bwd_row_sums_kernel, or None: whole rows, reduced here
    grad_x_ptr,  # gradient of the input, [outer, N, inner] contiguous
    partial_grad_bias_ptr,  # fp32 [row_groups, N]: column sums of grad_x per row group (if COMPUTE_GRAD_BIAS)
    num_rows,  # outer * inner
    num_cols,  # N
    inner_size,
    stride_grad_y_outer,
    stride_grad_y_col,
    stride_grad_y_inner,
    stride_y_outer,
    stride_y_col,
    stride_y_inner,
    rows_per_program,  # a multiple of BLOCK_M
    LOG: tl.constexpr,
    HAS_ROW_SUMS: tl.constexpr,  # else BLOCK_N covers the row
    COMPUTE_GRAD_BIAS: tl.constexpr,
    VECTOR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A program owns ``rows_per_program`` rows and one block of columns (the whole row without
    HAS_ROW_SUMS); the flat grid is row_groups x column_blocks."""
    num_cols = num_cols // VECTOR * VECTOR
    stride_grad_y_outer = stride_grad_y_outer // VECTOR * VECTOR
    stride_y_outer = stride_y_outer // VECTOR * VECTOR
    pid = tl.program_id(0).to(tl.int64)
    num_col_blocks = tl.cdiv(num_cols, BLOCK_N)
    row_group = pid // num_col_blocks
    cols = (pid % num_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < num_cols
    first_row = row_group * rows_per_program
    # The bias gradient tile summed over the row steps; reduced over the rows once, after the loop.
    grad_bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for row_offset in range(0, rows_per_program, BLOCK_M):
        rows = first_row + row_offset + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        mask = row_mask[:, None] & col_mask[None, :]
        grad_y_rows = _row_offsets(rows, inner_size, stride_grad_y_outer, stride_grad_y_inner)
        y_rows = _row_offsets(rows, inner_size, stride_y_outer, stride_y_inner)
        grad_y, y = _load_grad_and_output(
            grad_y_ptr, y_ptr, grad_y_rows, y_rows, cols, stride_grad_y_col, stride_y_col, mask, LOG
        )
        if HAS_ROW_SUMS:
            total = tl.load(row_sums_ptr + rows, mask=row_mask, other=0.0)
        else:
            total = _row_reduction(grad_y, y, LOG)
        if LOG:
            grad_x = grad_y - tl.exp(y) * total[:, None]
        else:
            grad_x = y * (grad_y - total[:, None])
        grad_x_rows = _contiguous_row_offsets(rows, inner_size, num_cols)
        tl.store(
            grad_x_ptr + grad_x_rows[:, None] + cols[None, :] * inner_size,
            round_to(grad_x, grad_x_ptr.dtype.element_ty),
            mask=mask,
        )
        if COMPUTE_GRAD_BIAS:
            grad_bias += tl.where(mask, grad_x, 0.0)
    if COMPUTE_GRAD_BIAS:
        tl.store(partial_grad_bias_ptr + row_group * num_cols + cols, tl.sum(grad_bias, axis=0), mask=col_mask)
