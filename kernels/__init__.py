"""fusedact.kernels: the pure-Triton layer (activation math, kernel templates, softmax); no PyTorch here."""

from .activations import ACTIVATIONS, activation_backward, activation_forward, activation_param_backward
from .softmax import (
    softmax_block_shape,
    softmax_bwd_kernel,
    softmax_bwd_row_sums_kernel,
    softmax_fwd_kernel,
    softmax_num_warps,
)
from .templates import (
    bias_act_bwd_kernel,
    bias_act_fwd_kernel,
    block_shape,
    gated_bwd_kernel,
    gated_fwd_kernel,
    num_warps_for,
)

__all__ = [
    "ACTIVATIONS",
    "activation_backward",
    "activation_forward",
    "activation_param_backward",
    "bias_act_bwd_kernel",
    "bias_act_fwd_kernel",
    "block_shape",
    "gated_bwd_kernel",
    "gated_fwd_kernel",
    "num_warps_for",
    "softmax_block_shape",
    "softmax_bwd_kernel",
    "softmax_bwd_row_sums_kernel",
    "softmax_fwd_kernel",
    "softmax_num_warps",
]
