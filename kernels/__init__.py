"""fusedact.kernels: the pure-Triton layer (activation math, kernel templates, softmax); no PyTorch here."""

from .activations import (
    ACTIVATIONS,
    LEARNED_PARAMETERS,
    activation_backward,
    activation_forward,
    activation_param_backward,
)
from .rounding import round_to, to_fp32
from .softmax import (
    softmax_block_shape,
    softmax_bwd_kernel,
    softmax_bwd_row_sums_kernel,
    softmax_fwd_kernel,
    softmax_num_warps,
)
from .templates import (
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

__all__ = [
    "ACTIVATIONS",
    "BACKWARD_TILE_ELEMENTS",
    "LEARNED_PARAMETERS",
    "TILE_ELEMENTS",
    "activation_backward",
    "activation_forward",
    "activation_param_backward",
    "bias_act_bwd_kernel",
    "bias_act_fwd_kernel",
    "block_shape",
    "gated_bwd_kernel",
    "gated_fwd_kernel",
    "num_warps_for",
    "round_to",
    "softmax_block_shape",
    "softmax_bwd_kernel",
    "softmax_bwd_row_sums_kernel",
    "softmax_fwd_kernel",
    "softmax_num_warps",
    "to_fp32",
    "vector_width",
]
