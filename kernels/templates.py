"""Kernel templates: one for single-input activations, one for the gated (GLU) family.

Every tensor is addressed as a 2-D ``[M, N]`` matrix (``N`` = the last dimension, ``M`` = all leading
dimensions) through a row and a column stride, so slices, transposes and the two halves of a packed
``[..., 2N]`` tensor are read in place. Outputs and gradients are written contiguous. The activation is a
``tl.constexpr``: each one compiles to its own specialised code.

The single-input template also takes its bias (and a per-channel activation parameter, PReLU's slope)
along the rows instead of the columns: a contiguous NCHW tensor is the matrix ``[N * C, H * W]`` whose
row ``r`` belongs to channel ``r % C``, so a bias on conv channels is read in place too.

Forward reads each input once and writes ``y`` once. Backward reads ``grad_y`` and the saved tensor(s),
writes the input gradient(s) and, in the same pass, sums the bias gradient over the rows it owns in
fp32; a program owns a fixed group of rows, so the partial sums (``[row_groups, N]``) are reduced in a
fixed order by the host: two backward passes are bitwise identical, with no atomics.

Program ids and row indices are int64 before any address arithmetic: tensors may exceed 2^31 elements.
"""

import triton
import triton.language as tl

from .activations import activation_backward, activation_forward, activation_param_backward

# Elements one program handles per tile: enough to keep loads wide and the grid short, small enough to
# stay in registers with the fp32 copies of two or three operands.
TILE_ELEMENTS = 4096
MAX_BLOCK_N = 1024


def block_shape(num_cols: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): whole rows up to MAX_BLOCK_N columns, then enough rows to fill a tile."""
    block_n = min(triton.next_power_of_2(max(num_cols, 1)), MAX_BLOCK_N)
    return max(1, TILE_ELEMENTS // block_n), block_n


def num_warps_for(block_m: int, block_n: int) -> int:
    return 8 if block_m * block_n >= 4096 else 4


@triton.jit
def _tile(pid, num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (row-block, column-block) of a flat program id; a flat grid has no 65535 limit on columns."""
    num_col_blocks = tl.cdiv(num_cols, BLOCK_N)
    pid_m = pid // num_col_blocks
    pid_n = pid % num_col_blocks
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, cols


@triton.jit
def _channels(rows, cols, num_rows, num_cols, num_channels, CHANNELS_ALONG_ROWS: tl.constexpr):
    """Channel index of each element of a tile, and its mask, as a broadcastable 2-D block: the column
    (bias along the last dimension), or row % num_channels (a [outer * C, inner] view of NCHW)."""
    if CHANNELS_ALONG_ROWS:  # (one return statement: the compiler wants one return type)
        channels = (rows % num_channels)[:, None]
        channel_mask = (rows < num_rows)[:, None]
    else:
        channels = cols[None, :]
        channel_mask = (cols < num_cols)[None, :]
    return channels, channel_mask


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_WEIGHT": lambda args: args["weight_ptr"] is not None,
    }
)
@triton.jit
def bias_act_fwd_kernel(
    x_ptr,  # input, [M, N], any strides
    bias_ptr,  # bias, one per channel, contiguous, or None
    weight_ptr,  # the activation's parameter per channel (PReLU's slope), or None to use `param`
    y_ptr,  # output, [M, N] contiguous
    num_rows,  # M
    num_cols,  # N
    stride_x_row,
    stride_x_col,
    num_channels,  # length of bias (and weight) when CHANNELS_ALONG_ROWS
    stride_weight,  # 1, or 0 for one parameter shared by every channel
    param,  # activation parameter (leaky slope, swish beta, elu alpha) when there is no weight
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHANNELS_ALONG_ROWS: tl.constexpr,  # bias[row % num_channels] instead of bias[col]
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, cols = _tile(pid, num_rows, num_cols, BLOCK_M, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
    z = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=mask)
    z = z.to(tl.float32)
    channels, channel_mask = _channels(rows, cols, num_rows, num_cols, num_channels, CHANNELS_ALONG_ROWS)
    if HAS_BIAS:
        z += tl.load(bias_ptr + channels, mask=channel_mask).to(tl.float32)
    if HAS_WEIGHT:
        slope = tl.load(weight_ptr + channels * stride_weight, mask=channel_mask).to(tl.float32)
        y = activation_forward(z, ACTIVATION, slope)
    else:
        y = activation_forward(z, ACTIVATION, param)
    tl.store(y_ptr + rows[:, None] * num_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_WEIGHT": lambda args: args["weight_ptr"] is not None,
    }
)
@triton.jit
def bias_act_bwd_kernel(
    grad_y_ptr,  # gradient of the output, [M, N], any strides
    saved_ptr,  # what forward saved (input before bias, or output), [M, N], any strides
    bias_ptr,  # bias, one per channel, or None
    weight_ptr,  # the activation's parameter per channel, or None
    grad_x_ptr,  # gradient of the input, [M, N] contiguous
    # fp32 partial sums of the bias and weight gradients (unused unless asked for): [row_groups, N] for
    # channels along the columns; [column_blocks, M], one sum per row, for channels along the rows
    partial_grad_bias_ptr,
    partial_grad_weight_ptr,
    num_rows,  # M
    num_cols,  # N
    stride_grad_y_row,
    stride_grad_y_col,
    stride_saved_row,
    stride_saved_col,
    num_channels,
    stride_weight,
    rows_per_program,  # a multiple of BLOCK_M
    param,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    CHANNELS_ALONG_ROWS: tl.constexpr,
    SAVED_IS_OUTPUT: tl.constexpr,
    COMPUTE_GRAD_BIAS: tl.constexpr,
    COMPUTE_GRAD_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_group, cols = _tile(pid, num_rows, num_cols, BLOCK_M, BLOCK_N)
    col_block = pid % tl.cdiv(num_cols, BLOCK_N)
    col_mask = cols < num_cols
    first_row = row_group * rows_per_program
    if not CHANNELS_ALONG_ROWS:  # one bias/weight vector for every row of this program: load it once
        channels, channel_mask = _channels(first_row, cols, num_rows, num_cols, num_channels, False)
        if HAS_BIAS and not SAVED_IS_OUTPUT:  # the saved input needs its bias
            bias = tl.load(bias_ptr + channels, mask=channel_mask).to(tl.float32)
        if HAS_WEIGHT:
            slope = tl.load(weight_ptr + channels * stride_weight, mask=channel_mask).to(tl.float32)
    grad_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    grad_weight = tl.zeros([BLOCK_N], dtype=tl.float32)
    for row_offset in range(0, rows_per_program, BLOCK_M):
        rows = first_row + row_offset + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        mask = row_mask[:, None] & col_mask[None, :]
        if CHANNELS_ALONG_ROWS:
            channels, channel_mask = _channels(rows, cols, num_rows, num_cols, num_channels, True)
            if HAS_BIAS and not SAVED_IS_OUTPUT:
                bias = tl.load(bias_ptr + channels, mask=channel_mask).to(tl.float32)
            if HAS_WEIGHT:
                slope = tl.load(weight_ptr + channels * stride_weight, mask=channel_mask).to(tl.float32)
        grad_y = tl.load(
            grad_y_ptr + rows[:, None] * stride_grad_y_row + cols[None, :] * stride_grad_y_col, mask=mask
        ).to(tl.float32)
        saved = tl.load(saved_ptr + rows[:, None] * stride_saved_row + cols[None, :] * stride_saved_col, mask=mask).to(
            tl.float32
        )
        if HAS_BIAS and not SAVED_IS_OUTPUT:
            saved += bias
        if HAS_WEIGHT:
            grad_x = activation_backward(grad_y, saved, ACTIVATION, slope)
        else:
            grad_x = activation_backward(grad_y, saved, ACTIVATION, param)
        tl.store(
            grad_x_ptr + rows[:, None] * num_cols + cols[None, :],
            grad_x.to(grad_x_ptr.dtype.element_ty),
            mask=mask,
        )
        grad_x = tl.where(mask, grad_x, 0.0)
        if COMPUTE_GRAD_WEIGHT:
            grad_slope = tl.where(mask, activation_param_backward(grad_y, saved, ACTIVATION), 0.0)
        if CHANNELS_ALONG_ROWS:  # each row is one channel: its sum is final for this column block
            partial_offsets = col_block * num_rows + rows
            if COMPUTE_GRAD_BIAS:
                tl.store(partial_grad_bias_ptr + partial_offsets, tl.sum(grad_x, axis=1), mask=row_mask)
            if COMPUTE_GRAD_WEIGHT:
                tl.store(partial_grad_weight_ptr + partial_offsets, tl.sum(grad_slope, axis=1), mask=row_mask)
        else:
            if COMPUTE_GRAD_BIAS:
                grad_bias += tl.sum(grad_x, axis=0)
            if COMPUTE_GRAD_WEIGHT:
                grad_weight += tl.sum(grad_slope, axis=0)
    if not CHANNELS_ALONG_ROWS:
        if COMPUTE_GRAD_BIAS:
            tl.store(partial_grad_bias_ptr + row_group * num_cols + cols, grad_bias, mask=col_mask)
        if COMPUTE_GRAD_WEIGHT:
            tl.store(partial_grad_weight_ptr + row_group * num_cols + cols, grad_weight, mask=col_mask)


@triton.heuristics(
    {
        "HAS_GATE_BIAS": lambda args: args["gate_bias_ptr"] is not None,
        "HAS_UP_BIAS": lambda args: args["up_bias_ptr"] is not None,
    }
)
@triton.jit
def gated_fwd_kernel(
    gate_ptr,  # gate input, [M, N], any strides (may be the first half of a packed [M, 2N])
    up_ptr,  # up input, [M, N], any strides (may be the second half of a packed [M, 2N])
    gate_bias_ptr,  # [N] or None
    up_bias_ptr,  # [N] or None
    y_ptr,  # output act(gate + gate_bias) * (up + up_bias), [M, N] contiguous
    num_rows,  # M
    num_cols,  # N
    stride_gate_row,
    stride_gate_col,
    stride_up_row,
    stride_up_col,
    param,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m, cols = _tile(pid, num_rows, num_cols, BLOCK_M, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < num_cols
    mask = (rows < num_rows)[:, None] & col_mask[None, :]
    gate = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :] * stride_gate_col, mask=mask)
    up = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :] * stride_up_col, mask=mask)
    gate = gate.to(tl.float32)
    up = up.to(tl.float32)
    if HAS_GATE_BIAS:
        gate += tl.load(gate_bias_ptr + cols, mask=col_mask).to(tl.float32)[None, :]
    if HAS_UP_BIAS:
        up += tl.load(up_bias_ptr + cols, mask=col_mask).to(tl.float32)[None, :]
    y = activation_forward(gate, ACTIVATION, param) * up
    tl.store(y_ptr + rows[:, None] * num_cols + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.heuristics(
    {
        "HAS_GATE_BIAS": lambda args: args["gate_bias_ptr"] is not None,
        "HAS_UP_BIAS": lambda args: args["up_bias_ptr"] is not None,
    }
)
@triton.jit
def gated_bwd_kernel(
    grad_y_ptr,  # gradient of the output, [M, N], any strides
    gate_ptr,  # gate input (before bias), [M, N], any strides
    up_ptr,  # up input (before bias), [M, N], any strides
    gate_bias_ptr,  # [N] or None
    up_bias_ptr,  # [N] or None
    grad_gate_ptr,  # [M, N], row stride stride_grad_row, column stride 1 (may be half of a packed buffer)
    grad_up_ptr,  # [M, N], likewise
    partial_grad_gate_bias_ptr,  # fp32 [row_groups, N], row stride stride_partial_row (if COMPUTE_GRAD_BIAS)
    partial_grad_up_bias_ptr,  # likewise
    num_rows,  # M
    num_cols,  # N
    stride_grad_y_row,
    stride_grad_y_col,
    stride_gate_row,
    stride_gate_col,
    stride_up_row,
    stride_up_col,
    stride_grad_row,
    stride_partial_row,
    rows_per_program,  # a multiple of BLOCK_M
    param,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    SAVED_IS_OUTPUT: tl.constexpr,  # the activation's derivative is written in terms of its output
    COMPUTE_GRAD_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_group, cols = _tile(pid, num_rows, num_cols, BLOCK_M, BLOCK_N)
    col_mask = cols < num_cols
    if HAS_GATE_BIAS:
        gate_bias = tl.load(gate_bias_ptr + cols, mask=col_mask).to(tl.float32)
    if HAS_UP_BIAS:
        up_bias = tl.load(up_bias_ptr + cols, mask=col_mask).to(tl.float32)
    grad_gate_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    grad_up_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = row_group * rows_per_program
    for row_offset in range(0, rows_per_program, BLOCK_M):
        rows = first_row + row_offset + tl.arange(0, BLOCK_M)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        grad_y = tl.load(
            grad_y_ptr + rows[:, None] * stride_grad_y_row + cols[None, :] * stride_grad_y_col, mask=mask
        ).to(tl.float32)
        gate = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :] * stride_gate_col, mask=mask).to(
            tl.float32
        )
        up = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :] * stride_up_col, mask=mask)
        up = up.to(tl.float32)
        if HAS_GATE_BIAS:
            gate += gate_bias[None, :]
        if HAS_UP_BIAS:
            up += up_bias[None, :]
        activated = activation_forward(gate, ACTIVATION, param)
        if SAVED_IS_OUTPUT:  # sigmoid/tanh/relu gates: their derivative reads the output
            grad_gate = activation_backward(grad_y * up, activated, ACTIVATION, param)
        else:
            grad_gate = activation_backward(grad_y * up, gate, ACTIVATION, param)
        grad_up = grad_y * activated
        out_offsets = rows[:, None] * stride_grad_row + cols[None, :]
        tl.store(grad_gate_ptr + out_offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_up_ptr + out_offsets, grad_up.to(grad_up_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_GRAD_BIAS:
            grad_gate_bias += tl.sum(tl.where(mask, grad_gate, 0.0), axis=0)
            grad_up_bias += tl.sum(tl.where(mask, grad_up, 0.0), axis=0)
    if COMPUTE_GRAD_BIAS:
        partial_offsets = row_group * stride_partial_row + cols
        tl.store(partial_grad_gate_bias_ptr + partial_offsets, grad_gate_bias, mask=col_mask)
        tl.store(partial_grad_up_bias_ptr + partial_offsets, grad_up_bias, mask=col_mask)
