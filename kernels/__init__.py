"""fusedact.kernels: the pure-Triton layer (activation math and kernel templates); no PyTorch here."""

from .activations import ACTIVATIONS, activation_backward, activation_forward
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
    "bias_act_bwd_kernel",
    "bias_act_fwd_kernel",
    "block_shape",
    "gated_bwd_kernel",
    "gated_fwd_kernel",
    "num_warps_for",
]
