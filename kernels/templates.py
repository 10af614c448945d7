"""Kernel templates: one for single-input activations, one for the gated (GLU) family.

Every tensor is seen as a 2-D ``[M, N]`` matrix (``N`` = the last dimension, ``M`` = all leading
dimensions). The activation is a ``tl.constexpr``: each one compiles to its own specialised code. Two ways
of addressing it, chosen by the host per call (``FLAT``):

- **Flat**: every activation tensor of the call is contiguous, so the matrix is one run of ``M * N``
  elements and a program takes ``BLOCK_M * BLOCK_N`` consecutive ones, whatever ``N`` is. Loads and stores
  are 16 bytes wide at any width (760, 1128, 11007 columns alike); only the last program is masked (a
  full block takes a branch without a mask, so its accesses stay vectorised). The bias (or slope) of each
  element is gathered by its channel, which ``_flat_channels`` derives without a per-element division.
- **Rows**: a tile of ``BLOCK_M`` rows by ``BLOCK_N`` columns, addressed through each tensor's row and
  column strides, so slices, transposes, broadcast gradients and the two halves of a packed ``[..., 2N]``
  tensor are read in place. ``VECTOR`` is the widest run of elements (up to 16 bytes) that the column count
  and every row stride of the call are multiples of (the host computes it): rewriting each as
  ``n // VECTOR * VECTOR`` tells the compiler so, and the accesses are ``VECTOR`` elements wide. (Triton
  itself only marks integers divisible by 16: at 760 columns it would fall back to 2-byte accesses.) Nor
  does it mark a pointer that is not 16-byte aligned, such as the up half of a packed ``[..., 2N]`` whose
  ``N`` is not a multiple of 16 bytes, or a column slice: the kernels take each input addressed by rows
  as an aligned pointer plus an element offset that is a multiple of ``VECTOR`` (the host's
  ``aligned_start``; the outputs are allocated, so aligned).

The single-input template also takes its bias (and the activation's learned parameters, per channel or
one shared by all: PReLU's slope, xIELU's alpha_p and alpha_n) along the rows instead of the columns: a
contiguous NCHW tensor is the matrix ``[N * C, H * W]`` whose row ``r`` belongs to channel ``r % C``, so a
bias on conv channels is read in place too. Every kernel takes the activation's two float parameters
(``param``, ``param2``); the gated one also a scale on the gate (``act(s (gate + gate_bias))``, Falcon-H1's
``gate_multiplier``) under ``SCALED_GATE``.

Forward reads each input once and writes ``y`` once. Backward reads ``grad_y`` and the saved tensor(s)
and writes the input gradient(s); optionally (``output_ptr``) it also writes the forward output again,
recomputed from what it already read, for a caller that did not keep it (the lean MLP blocks). With a bias
gradient, backward addresses rows: a program owns a fixed group of rows of one column block, adds its
gradient tile into an fp32 accumulator tile at every step and reduces that over the rows once, at the
end, into one row of a ``[row_groups, N]`` partial-sum buffer that the host reduces in a fixed order: two
backward passes are bitwise identical, with no atomics, and there is one cross-warp reduction per program,
not one per step. The learned parameters' gradients (one or two) are accumulated the same way, each in a
tile of its own.

Every result is computed in fp32 and rounded once, to nearest even, on store (``round_to``).
Program ids are int64 before any address arithmetic: tensors may exceed 2^31 elements.
"""

import triton
import triton.language as tl

from .activations import activation_backward, activation_forward, activation_param_backward
from .rounding import round_to, to_fp32

# Elements one program handles (a flat block, or a tile): enough to keep loads wide and the grid short,
# small enough to stay in registers with the fp32 copies of two or three operands and the accumulators.
TILE_ELEMENTS = 4096
# The row-addressed backward kernels hold three or four fp32 operands and one or two fp32 accumulator
# tiles per element: half a tile (8 elements per thread with 8 warps) keeps the gated one under 128
# registers with no spill (bench/NOTES.md, entry 7, has the numbers and the latency arithmetic).
BACKWARD_TILE_ELEMENTS = 2048
MAX_BLOCK_N = 1024
# A column block at least this narrow would split rows into many programs for little gain.
MIN_BLOCK_N = 16


def block_shape(num_cols: int, tile_elements: int = TILE_ELEMENTS) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for rows of ``num_cols`` elements: the widest power-of-two column block up to
    ``MAX_BLOCK_N`` unless a narrower one wastes less of each row on masked lanes (760 columns: 256 x 3 =
    768, not 1024), then enough rows to fill a tile of ``tile_elements``."""
    widest = min(triton.next_power_of_2(max(num_cols, 1)), MAX_BLOCK_N)
    candidates = [widest]
    while candidates[-1] > max(MIN_BLOCK_N, widest // 16):
        candidates.append(candidates[-1] // 2)
    tolerated = num_cols // 16  # masked lanes that cost nothing worth another program

    def waste(block_n: int) -> int:
        return max(triton.cdiv(num_cols, block_n) * block_n - num_cols, tolerated)

    block_n = min(candidates, key=lambda b: (waste(b), -b))
    return max(1, tile_elements // block_n), block_n


def num_warps_for(block_m: int, block_n: int) -> int:
    """8 warps for a whole tile (8 or 16 elements per thread), 4 for a small one."""
    return 8 if block_m * block_n >= BACKWARD_TILE_ELEMENTS else 4


def vector_width(element_size: int, *multiples: int) -> int:
    """The widest run of elements, at most 16 bytes, that every number in ``multiples`` (the column count
    and the row strides of every tensor a launch addresses by rows) is a multiple of: the ``VECTOR`` the
    row-addressed kernels may assume."""
    vector = max(1, 16 // element_size)
    while vector > 1 and any(m % vector for m in multiples):
        vector //= 2
    return vector


@triton.jit
def _quotient(local, divisor, BLOCK: tl.constexpr):
    """``local // divisor`` for ``0 <= local < divisor + BLOCK``, without an integer division per element.

    A divisor of at least BLOCK leaves a quotient of 0 or 1: one comparison. A smaller one leaves
    ``local < 2 * BLOCK``: then ``(local + 0.5) / divisor`` is at least ``0.5 / divisor`` away from an
    integer, far more than fp32's error on a product below 2^13 (~2^-10 / divisor), so truncating the
    fp32 product is exact."""
    small = ((local.to(tl.float32) + 0.5) * (1.0 / divisor.to(tl.float32))).to(tl.int64)
    return tl.where(divisor >= BLOCK, (local >= divisor).to(tl.int64), small)


@triton.jit
def _flat_channels(start, num_cols, num_channels, CHANNELS_ALONG_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The channel of each element of the flat block ``[start, start + BLOCK)`` of a contiguous [M, N]
    matrix: its column, or its row modulo ``num_channels`` (NCHW rows)."""
    first_row = start // num_cols  # one scalar division per program
    local = (start - first_row * num_cols) + tl.arange(0, BLOCK)  # offset from the start of first_row
    row_step = _quotient(local, num_cols, BLOCK)
    if CHANNELS_ALONG_ROWS:
        channels = first_row % num_channels + row_step  # < num_channels + BLOCK
        channels = channels - _quotient(channels, num_channels, BLOCK) * num_channels
    else:
        channels = local - row_step * num_cols
    return channels


@triton.jit
def _tile(pid, num_cols, BLOCK_N: tl.constexpr):
    """The (row-block, column-block, columns) of a flat program id; a flat grid has no 65535 limit."""
    num_col_blocks = tl.cdiv(num_cols, BLOCK_N)
    pid_m = pid // num_col_blocks
    pid_n = pid % num_col_blocks
    return pid_m, pid_n, pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _load_channel(ptr, channels, mask, stride, HAS: tl.constexpr):
    """fp32 values of a per-channel vector (bias, slope) at ``channels``, or 0 when there is none."""
    if HAS:
        values = to_fp32(tl.load(ptr + channels * stride, mask=mask))
    else:
        values = tl.zeros_like(channels).to(tl.float32)
    return values


@triton.jit
def _bias_act_forward(z, bias, weight, weight2, param, param2, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        z += bias
    return activation_forward(z, ACTIVATION, param, param2, weight, weight2)


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_WEIGHT": lambda args: args["weight_ptr"] is not None,
        "HAS_WEIGHT2": lambda args: args["weight2_ptr"] is not None,
    }
)
@triton.jit
def bias_act_fwd_kernel(
    x_ptr,  # input, [M, N], any strides (contiguous when FLAT)
    bias_ptr,  # bias, one per channel, contiguous, or None
    weight_ptr,  # the activation's learned parameter (PReLU's slope, xIELU's alpha_p), contiguous, or None
    weight2_ptr,  # its second one (xIELU's alpha_n), laid out as weight, or None
    y_ptr,  # output, [M, N] contiguous
    num_rows,  # M
    num_cols,  # N
    stride_x_row,
    stride_x_col,
    x_offset,  # (rows) x's first element is x_ptr + x_offset, a multiple of VECTOR (see aligned_start)
    num_channels,  # length of bias (and weight) when CHANNELS_ALONG_ROWS
    stride_weight,  # 1, or 0 for parameters shared by every channel (weight and weight2 alike)
    param,  # the activation's float parameters (leaky slope, swish beta, hardtanh's min and max, ...)
    param2,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_WEIGHT2: tl.constexpr,
    CHANNELS_ALONG_ROWS: tl.constexpr,  # bias[row % num_channels] instead of bias[col]
    FLAT: tl.constexpr,  # x is contiguous: address the M * N elements as one run
    VECTOR: tl.constexpr,  # (rows) num_cols and stride_x_row are multiples of it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if FLAT:
        BLOCK: tl.constexpr = BLOCK_M * BLOCK_N
        start = pid * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        num_elements = num_rows.to(tl.int64) * num_cols
        channels = _flat_channels(start, num_cols, num_channels, CHANNELS_ALONG_ROWS, BLOCK)
        bias = _load_channel(bias_ptr, channels, None, 1, HAS_BIAS)
        weight = _load_channel(weight_ptr, channels, None, stride_weight, HAS_WEIGHT)
        weight2 = _load_channel(weight2_ptr, channels, None, stride_weight, HAS_WEIGHT2)
        if start + BLOCK <= num_elements:  # a full block: no mask, so the accesses stay vectorised
            z = to_fp32(tl.load(x_ptr + offsets))
            y = _bias_act_forward(z, bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS)
            tl.store(y_ptr + offsets, round_to(y, y_ptr.dtype.element_ty))
        else:
            mask = offsets < num_elements
            z = to_fp32(tl.load(x_ptr + offsets, mask=mask))
            y = _bias_act_forward(z, bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS)
            tl.store(y_ptr + offsets, round_to(y, y_ptr.dtype.element_ty), mask=mask)
    else:
        num_cols = num_cols // VECTOR * VECTOR
        stride_x_row = stride_x_row // VECTOR * VECTOR
        x_ptr += x_offset // VECTOR * VECTOR
        pid_m, _, cols = _tile(pid, num_cols, BLOCK_N)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_rows
        col_mask = cols < num_cols
        mask = row_mask[:, None] & col_mask[None, :]
        z = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=mask)
        if CHANNELS_ALONG_ROWS:
            channels, channel_mask = rows % num_channels, row_mask
        else:
            channels, channel_mask = cols, col_mask
        bias = _load_channel(bias_ptr, channels, channel_mask, 1, HAS_BIAS)
        weight = _load_channel(weight_ptr, channels, channel_mask, stride_weight, HAS_WEIGHT)
        weight2 = _load_channel(weight2_ptr, channels, channel_mask, stride_weight, HAS_WEIGHT2)
        if CHANNELS_ALONG_ROWS:
            bias, weight, weight2 = bias[:, None], weight[:, None], weight2[:, None]
        else:
            bias, weight, weight2 = bias[None, :], weight[None, :], weight2[None, :]
        y = _bias_act_forward(to_fp32(z), bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS)
        tl.store(y_ptr + rows[:, None] * num_cols + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_backward(
    grad_y,
    saved,
    bias,
    weight,
    weight2,
    param,
    param2,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVED_IS_OUTPUT: tl.constexpr,
):
    """(grad_z, z or the saved output) in fp32 for one block."""
    if HAS_BIAS and not SAVED_IS_OUTPUT:  # the saved input needs its bias
        saved += bias
    grad_z = activation_backward(grad_y, saved, ACTIVATION, param, param2, weight, weight2, SAVED_IS_OUTPUT)
    return grad_z, saved


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_WEIGHT": lambda args: args["weight_ptr"] is not None,
        "HAS_WEIGHT2": lambda args: args["weight2_ptr"] is not None,
        "HAS_OUTPUT": lambda args: args["output_ptr"] is not None,
    }
)
@triton.jit
def bias_act_bwd_kernel(
    grad_y_ptr,  # gradient of the output, [M, N], any strides (contiguous when FLAT)
    saved_ptr,  # what forward saved (input before bias, or output), [M, N], any strides (contiguous when FLAT)
    bias_ptr,  # bias, one per channel, contiguous, or None
    weight_ptr,  # the activation's learned parameter per channel (or shared), contiguous, or None
    weight2_ptr,  # its second one, laid out as weight, or None
    grad_x_ptr,  # gradient of the input, [M, N] contiguous
    output_ptr,  # the forward output recomputed, [M, N] contiguous, or None (needs the saved input)
    # fp32 partial sums of the bias and weight gradients (unused unless asked for): [row_groups, N] for
    # channels along the columns; [column_groups, M], one sum per row, for channels along the rows
    partial_grad_bias_ptr,
    partial_grad_weight_ptr,
    partial_grad_weight2_ptr,
    num_rows,  # M
    num_cols,  # N
    stride_grad_y_row,
    stride_grad_y_col,
    stride_saved_row,
    stride_saved_col,
    grad_y_offset,  # (rows) grad_y's first element is grad_y_ptr + grad_y_offset, a multiple of VECTOR
    saved_offset,  # (rows) likewise for saved
    num_channels,
    stride_weight,
    tiles_per_program,  # (rows) tiles down the rows (bias per column) or along them (bias per row)
    param,
    param2,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_WEIGHT2: tl.constexpr,
    HAS_OUTPUT: tl.constexpr,
    CHANNELS_ALONG_ROWS: tl.constexpr,
    SAVED_IS_OUTPUT: tl.constexpr,
    COMPUTE_GRAD_BIAS: tl.constexpr,
    COMPUTE_GRAD_WEIGHT: tl.constexpr,  # the gradients of weight (and of weight2, where there is one)
    FLAT: tl.constexpr,  # grad_y and saved contiguous and no parameter gradient: one run of M * N
    VECTOR: tl.constexpr,  # (rows) num_cols and both row strides are multiples of it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    dtype = grad_x_ptr.dtype.element_ty
    if FLAT:
        tl.static_assert(not (COMPUTE_GRAD_BIAS or COMPUTE_GRAD_WEIGHT), "parameter gradients need rows")
        BLOCK: tl.constexpr = BLOCK_M * BLOCK_N
        start = pid * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        num_elements = num_rows.to(tl.int64) * num_cols
        channels = _flat_channels(start, num_cols, num_channels, CHANNELS_ALONG_ROWS, BLOCK)
        bias = _load_channel(bias_ptr, channels, None, 1, HAS_BIAS and not SAVED_IS_OUTPUT)
        weight = _load_channel(weight_ptr, channels, None, stride_weight, HAS_WEIGHT)
        weight2 = _load_channel(weight2_ptr, channels, None, stride_weight, HAS_WEIGHT2)
        if start + BLOCK <= num_elements:  # a full block: no mask, so the accesses stay vectorised
            grad_y = to_fp32(tl.load(grad_y_ptr + offsets))
            saved = to_fp32(tl.load(saved_ptr + offsets))
            grad_x, z = _bias_act_backward(
                grad_y, saved, bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS, SAVED_IS_OUTPUT
            )
            tl.store(grad_x_ptr + offsets, round_to(grad_x, dtype))
            if HAS_OUTPUT:
                y = activation_forward(z, ACTIVATION, param, param2, weight, weight2)
                tl.store(output_ptr + offsets, round_to(y, dtype))
        else:
            mask = offsets < num_elements
            grad_y = to_fp32(tl.load(grad_y_ptr + offsets, mask=mask))
            saved = to_fp32(tl.load(saved_ptr + offsets, mask=mask))
            grad_x, z = _bias_act_backward(
                grad_y, saved, bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS, SAVED_IS_OUTPUT
            )
            tl.store(grad_x_ptr + offsets, round_to(grad_x, dtype), mask=mask)
            if HAS_OUTPUT:
                y = activation_forward(z, ACTIVATION, param, param2, weight, weight2)
                tl.store(output_ptr + offsets, round_to(y, dtype), mask=mask)
    else:
        num_cols = num_cols // VECTOR * VECTOR
        stride_grad_y_row = stride_grad_y_row // VECTOR * VECTOR
        stride_saved_row = stride_saved_row // VECTOR * VECTOR
        grad_y_ptr += grad_y_offset // VECTOR * VECTOR
        saved_ptr += saved_offset // VECTOR * VECTOR
        # A program owns `tiles_per_program` tiles in a line along the dimension its channels are summed
        # over (down the rows for a bias per column, along the row for a bias per row), so its bias and
        # weights are vectors, loaded once, and its parameter gradients tiles, reduced once at the end.
        if CHANNELS_ALONG_ROWS:
            num_col_groups = tl.cdiv(tl.cdiv(num_cols, BLOCK_N), tiles_per_program)
            group, line = pid % num_col_groups, pid // num_col_groups
            first_rows = line * BLOCK_M + tl.arange(0, BLOCK_M)
            first_cols = group * tiles_per_program * BLOCK_N + tl.arange(0, BLOCK_N)
            line_mask = first_rows < num_rows
            channels = first_rows % num_channels
            ROW_STEP: tl.constexpr = 0
            COL_STEP: tl.constexpr = BLOCK_N
        else:
            group, line, first_cols = _tile(pid, num_cols, BLOCK_N)
            first_rows = group * tiles_per_program * BLOCK_M + tl.arange(0, BLOCK_M)
            line_mask = first_cols < num_cols
            channels = first_cols
            ROW_STEP: tl.constexpr = BLOCK_M
            COL_STEP: tl.constexpr = 0
        bias = _load_channel(bias_ptr, channels, line_mask, 1, HAS_BIAS and not SAVED_IS_OUTPUT)
        weight = _load_channel(weight_ptr, channels, line_mask, stride_weight, HAS_WEIGHT)
        weight2 = _load_channel(weight2_ptr, channels, line_mask, stride_weight, HAS_WEIGHT2)
        if CHANNELS_ALONG_ROWS:
            bias, weight, weight2 = bias[:, None], weight[:, None], weight2[:, None]
        else:
            bias, weight, weight2 = bias[None, :], weight[None, :], weight2[None, :]
        grad_bias_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        grad_weight_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        grad_weight2_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(0, tiles_per_program):
            rows = first_rows + tile * ROW_STEP
            cols = first_cols + tile * COL_STEP
            mask = (rows < num_rows)[:, None] & (cols < num_cols)[None, :]
            grad_y = to_fp32(
                tl.load(grad_y_ptr + rows[:, None] * stride_grad_y_row + cols[None, :] * stride_grad_y_col, mask=mask)
            )
            saved = to_fp32(
                tl.load(saved_ptr + rows[:, None] * stride_saved_row + cols[None, :] * stride_saved_col, mask=mask)
            )
            grad_x, z = _bias_act_backward(
                grad_y, saved, bias, weight, weight2, param, param2, ACTIVATION, HAS_BIAS, SAVED_IS_OUTPUT
            )
            out_offsets = rows[:, None] * num_cols + cols[None, :]
            tl.store(grad_x_ptr + out_offsets, round_to(grad_x, dtype), mask=mask)
            if HAS_OUTPUT:
                y = activation_forward(z, ACTIVATION, param, param2, weight, weight2)
                tl.store(output_ptr + out_offsets, round_to(y, dtype), mask=mask)
            if COMPUTE_GRAD_BIAS:
                grad_bias_tile += tl.where(mask, grad_x, 0.0)
            if COMPUTE_GRAD_WEIGHT:
                grad_weight, grad_weight2 = activation_param_backward(
                    grad_y, z, ACTIVATION, param, param2, weight, weight2
                )
                grad_weight_tile += tl.where(mask, grad_weight, 0.0)
                if HAS_WEIGHT2:
                    grad_weight2_tile += tl.where(mask, grad_weight2, 0.0)
        # One partial sum per channel line and group: [groups, N] by columns, [column groups, M] by rows.
        if CHANNELS_ALONG_ROWS:
            partial_offsets = group * num_rows + first_rows
            if COMPUTE_GRAD_BIAS:
                tl.store(partial_grad_bias_ptr + partial_offsets, tl.sum(grad_bias_tile, axis=1), mask=line_mask)
            if COMPUTE_GRAD_WEIGHT:
                tl.store(partial_grad_weight_ptr + partial_offsets, tl.sum(grad_weight_tile, axis=1), mask=line_mask)
            if COMPUTE_GRAD_WEIGHT and HAS_WEIGHT2:
                tl.store(partial_grad_weight2_ptr + partial_offsets, tl.sum(grad_weight2_tile, axis=1), mask=line_mask)
        else:
            partial_offsets = group * num_cols + first_cols
            if COMPUTE_GRAD_BIAS:
                tl.store(partial_grad_bias_ptr + partial_offsets, tl.sum(grad_bias_tile, axis=0), mask=line_mask)
            if COMPUTE_GRAD_WEIGHT:
                tl.store(partial_grad_weight_ptr + partial_offsets, tl.sum(grad_weight_tile, axis=0), mask=line_mask)
            if COMPUTE_GRAD_WEIGHT and HAS_WEIGHT2:
                tl.store(partial_grad_weight2_ptr + partial_offsets, tl.sum(grad_weight2_tile, axis=0), mask=line_mask)


@triton.jit
def _gate_and_up(
    gate,
    up,
    gate_bias,
    up_bias,
    gate_scale,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    SCALED_GATE: tl.constexpr,
):
    """The activation's input s (gate + gate_bias) and up + up_bias, in fp32."""
    if HAS_GATE_BIAS:
        gate += gate_bias
    if SCALED_GATE:
        gate *= gate_scale
    if HAS_UP_BIAS:
        up += up_bias
    return gate, up


@triton.jit
def _gated_forward(
    gate,
    up,
    gate_bias,
    up_bias,
    param,
    param2,
    gate_scale,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    SCALED_GATE: tl.constexpr,
):
    gate, up = _gate_and_up(gate, up, gate_bias, up_bias, gate_scale, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE)
    return activation_forward(gate, ACTIVATION, param, param2, 0.0, 0.0) * up


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
    gate_bias_ptr,  # [N] contiguous, or None
    up_bias_ptr,  # [N] contiguous, or None
    y_ptr,  # output act(s (gate + gate_bias)) * (up + up_bias), [M, N] contiguous
    num_rows,  # M
    num_cols,  # N
    stride_gate_row,
    stride_gate_col,
    stride_up_row,
    stride_up_col,
    gate_offset,  # (rows) gate's first element is gate_ptr + gate_offset, a multiple of VECTOR (aligned_start)
    up_offset,  # (rows) likewise for up
    param,
    param2,
    gate_scale,  # s (used where SCALED_GATE)
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    SCALED_GATE: tl.constexpr,  # s != 1
    FLAT: tl.constexpr,  # gate and up are each contiguous
    VECTOR: tl.constexpr,  # (rows) num_cols and both row strides are multiples of it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    dtype = y_ptr.dtype.element_ty
    if FLAT:
        BLOCK: tl.constexpr = BLOCK_M * BLOCK_N
        start = pid * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        num_elements = num_rows.to(tl.int64) * num_cols
        cols = _flat_channels(start, num_cols, 1, False, BLOCK)
        gate_bias = _load_channel(gate_bias_ptr, cols, None, 1, HAS_GATE_BIAS)
        up_bias = _load_channel(up_bias_ptr, cols, None, 1, HAS_UP_BIAS)
        if start + BLOCK <= num_elements:  # a full block: no mask, so the accesses stay vectorised
            gate = to_fp32(tl.load(gate_ptr + offsets))
            up = to_fp32(tl.load(up_ptr + offsets))
            y = _gated_forward(
                gate, up, gate_bias, up_bias, param, param2, gate_scale,
                ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
            )  # fmt: skip
            tl.store(y_ptr + offsets, round_to(y, dtype))
        else:
            mask = offsets < num_elements
            gate = to_fp32(tl.load(gate_ptr + offsets, mask=mask))
            up = to_fp32(tl.load(up_ptr + offsets, mask=mask))
            y = _gated_forward(
                gate, up, gate_bias, up_bias, param, param2, gate_scale,
                ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
            )  # fmt: skip
            tl.store(y_ptr + offsets, round_to(y, dtype), mask=mask)
    else:
        num_cols = num_cols // VECTOR * VECTOR
        stride_gate_row = stride_gate_row // VECTOR * VECTOR
        stride_up_row = stride_up_row // VECTOR * VECTOR
        gate_ptr += gate_offset // VECTOR * VECTOR
        up_ptr += up_offset // VECTOR * VECTOR
        pid_m, _, cols = _tile(pid, num_cols, BLOCK_N)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        col_mask = cols < num_cols
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        gate = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :] * stride_gate_col, mask=mask)
        up = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :] * stride_up_col, mask=mask)
        gate_bias = _load_channel(gate_bias_ptr, cols, col_mask, 1, HAS_GATE_BIAS)[None, :]
        up_bias = _load_channel(up_bias_ptr, cols, col_mask, 1, HAS_UP_BIAS)[None, :]
        y = _gated_forward(
            to_fp32(gate), to_fp32(up), gate_bias, up_bias, param, param2, gate_scale,
            ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
        )  # fmt: skip
        tl.store(y_ptr + rows[:, None] * num_cols + cols[None, :], round_to(y, dtype), mask=mask)


@triton.jit
def _gated_backward(
    grad_y,
    gate,
    up,
    gate_bias,
    up_bias,
    param,
    param2,
    gate_scale,
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    SCALED_GATE: tl.constexpr,
):
    """(grad_gate, grad_up, y) in fp32 for one block: y = act(s z) * up is the forward output, recomputed.
    The gate's derivative is taken at its input, for every activation (sigmoid's s (1 - s) from the fp32
    output would be 0 where s rounds to 1)."""
    gate, up = _gate_and_up(gate, up, gate_bias, up_bias, gate_scale, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE)
    activated = activation_forward(gate, ACTIVATION, param, param2, 0.0, 0.0)
    grad_activated = grad_y * up
    if SCALED_GATE:  # d/dz act(s z) = s act'(s z)
        grad_activated *= gate_scale
    grad_gate = activation_backward(grad_activated, gate, ACTIVATION, param, param2, 0.0, 0.0, False)
    return grad_gate, grad_y * activated, activated * up


@triton.heuristics(
    {
        "HAS_GATE_BIAS": lambda args: args["gate_bias_ptr"] is not None,
        "HAS_UP_BIAS": lambda args: args["up_bias_ptr"] is not None,
        "HAS_OUTPUT": lambda args: args["output_ptr"] is not None,
    }
)
@triton.jit
def gated_bwd_kernel(
    grad_y_ptr,  # gradient of the output, [M, N], any strides (contiguous when FLAT)
    gate_ptr,  # gate input (before bias), [M, N], any strides (contiguous when FLAT)
    up_ptr,  # up input (before bias), [M, N], any strides (contiguous when FLAT)
    gate_bias_ptr,  # [N] contiguous, or None
    up_bias_ptr,  # [N] contiguous, or None
    grad_gate_ptr,  # [M, N], row stride stride_grad_row, column stride 1 (may be half of a packed buffer)
    grad_up_ptr,  # [M, N], likewise
    output_ptr,  # the forward output act(gate) * up recomputed, [M, N] contiguous, or None
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
    grad_y_offset,  # (rows) grad_y's first element is grad_y_ptr + grad_y_offset, a multiple of VECTOR
    gate_offset,  # (rows) likewise for gate
    up_offset,  # (rows) likewise for up
    grad_up_offset,  # (rows) likewise for grad_up
    tiles_per_program,  # (rows) tiles down the rows
    param,
    param2,
    gate_scale,  # s (used where SCALED_GATE)
    ACTIVATION: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr,
    HAS_OUTPUT: tl.constexpr,
    SCALED_GATE: tl.constexpr,  # s != 1
    COMPUTE_GRAD_BIAS: tl.constexpr,
    FLAT: tl.constexpr,  # grad_y, gate, up contiguous, separate contiguous gradients, no bias gradient
    VECTOR: tl.constexpr,  # (rows) num_cols and every row stride are multiples of it
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    dtype = grad_gate_ptr.dtype.element_ty
    if FLAT:
        tl.static_assert(not COMPUTE_GRAD_BIAS, "bias gradients need rows")
        BLOCK: tl.constexpr = BLOCK_M * BLOCK_N
        start = pid * BLOCK
        offsets = start + tl.arange(0, BLOCK)
        num_elements = num_rows.to(tl.int64) * num_cols
        cols = _flat_channels(start, num_cols, 1, False, BLOCK)
        gate_bias = _load_channel(gate_bias_ptr, cols, None, 1, HAS_GATE_BIAS)
        up_bias = _load_channel(up_bias_ptr, cols, None, 1, HAS_UP_BIAS)
        if start + BLOCK <= num_elements:  # a full block: no mask, so the accesses stay vectorised
            grad_y = to_fp32(tl.load(grad_y_ptr + offsets))
            gate = to_fp32(tl.load(gate_ptr + offsets))
            up = to_fp32(tl.load(up_ptr + offsets))
            grad_gate, grad_up, y = _gated_backward(
                grad_y, gate, up, gate_bias, up_bias, param, param2, gate_scale,
                ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
            )  # fmt: skip
            tl.store(grad_gate_ptr + offsets, round_to(grad_gate, dtype))
            tl.store(grad_up_ptr + offsets, round_to(grad_up, dtype))
            if HAS_OUTPUT:
                tl.store(output_ptr + offsets, round_to(y, dtype))
        else:
            mask = offsets < num_elements
            grad_y = to_fp32(tl.load(grad_y_ptr + offsets, mask=mask))
            gate = to_fp32(tl.load(gate_ptr + offsets, mask=mask))
            up = to_fp32(tl.load(up_ptr + offsets, mask=mask))
            grad_gate, grad_up, y = _gated_backward(
                grad_y, gate, up, gate_bias, up_bias, param, param2, gate_scale,
                ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
            )  # fmt: skip
            tl.store(grad_gate_ptr + offsets, round_to(grad_gate, dtype), mask=mask)
            tl.store(grad_up_ptr + offsets, round_to(grad_up, dtype), mask=mask)
            if HAS_OUTPUT:
                tl.store(output_ptr + offsets, round_to(y, dtype), mask=mask)
    else:
        num_cols = num_cols // VECTOR * VECTOR
        stride_grad_y_row = stride_grad_y_row // VECTOR * VECTOR
        stride_gate_row = stride_gate_row // VECTOR * VECTOR
        stride_up_row = stride_up_row // VECTOR * VECTOR
        stride_grad_row = stride_grad_row // VECTOR * VECTOR
        grad_y_ptr += grad_y_offset // VECTOR * VECTOR
        gate_ptr += gate_offset // VECTOR * VECTOR
        up_ptr += up_offset // VECTOR * VECTOR
        grad_up_ptr += grad_up_offset // VECTOR * VECTOR
        row_group, _, cols = _tile(pid, num_cols, BLOCK_N)
        col_mask = cols < num_cols
        gate_bias = _load_channel(gate_bias_ptr, cols, col_mask, 1, HAS_GATE_BIAS)[None, :]
        up_bias = _load_channel(up_bias_ptr, cols, col_mask, 1, HAS_UP_BIAS)[None, :]
        # Gradient tiles summed over the program's row steps; reduced over the rows once, after the loop.
        grad_gate_bias_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        grad_up_bias_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        first_rows = row_group * tiles_per_program * BLOCK_M + tl.arange(0, BLOCK_M)
        for tile in range(0, tiles_per_program):
            rows = first_rows + tile * BLOCK_M
            mask = (rows < num_rows)[:, None] & col_mask[None, :]
            grad_y = to_fp32(
                tl.load(grad_y_ptr + rows[:, None] * stride_grad_y_row + cols[None, :] * stride_grad_y_col, mask=mask)
            )
            gate = tl.load(gate_ptr + rows[:, None] * stride_gate_row + cols[None, :] * stride_gate_col, mask=mask)
            up = tl.load(up_ptr + rows[:, None] * stride_up_row + cols[None, :] * stride_up_col, mask=mask)
            grad_gate, grad_up, y = _gated_backward(
                grad_y, to_fp32(gate), to_fp32(up), gate_bias, up_bias, param, param2, gate_scale,
                ACTIVATION, HAS_GATE_BIAS, HAS_UP_BIAS, SCALED_GATE,
            )  # fmt: skip
            out_offsets = rows[:, None] * stride_grad_row + cols[None, :]
            tl.store(grad_gate_ptr + out_offsets, round_to(grad_gate, dtype), mask=mask)
            tl.store(grad_up_ptr + out_offsets, round_to(grad_up, dtype), mask=mask)
            if HAS_OUTPUT:
                tl.store(output_ptr + rows[:, None] * num_cols + cols[None, :], round_to(y, dtype), mask=mask)
            if COMPUTE_GRAD_BIAS:
                grad_gate_bias_tile += tl.where(mask, grad_gate, 0.0)
                grad_up_bias_tile += tl.where(mask, grad_up, 0.0)
        if COMPUTE_GRAD_BIAS:
            partial_offsets = row_group * stride_partial_row + cols
            tl.store(partial_grad_gate_bias_ptr + partial_offsets, tl.sum(grad_gate_bias_tile, axis=0), mask=col_mask)
            tl.store(partial_grad_up_bias_ptr + partial_offsets, tl.sum(grad_up_bias_tile, axis=0), mask=col_mask)
