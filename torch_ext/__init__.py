"""fusedact: fused bias + activation kernels for PyTorch, written in Triton.

    >>> import torch, fusedact
    >>> x, b = torch.randn(4, 8), torch.randn(8)
    >>> y = fusedact.gelu(x, bias=b)          # one read of x, one write of y
    >>> layer = fusedact.nn.BiasAct(8, "silu")  # owns its bias
    >>> report = fusedact.patch(model)          # an existing model's activations, fused in place
    >>> out = fusedact.mlp.mlp(x, w1, w2, b1, b2, "gelu")  # a whole MLP keeping half of eager's activations

CUDA tensors run the Triton kernels; CPU tensors run a PyTorch fallback with the same numerics.
"""

import warnings

# Without numpy (not a dependency), `import torch` itself warns "Failed to initialize NumPy" (pytorch#115638),
# once per process; nothing in fusedact uses numpy. Importing torch here first keeps `import fusedact` quiet.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from . import _hub_kernels, differences, functional, mlp, nn, ops
from .functional import (
    bias_act,
    celu,
    elu,
    gated,
    gated_packed,
    geglu,
    geglu_packed,
    gelu,
    glu,
    hardsigmoid,
    hardswish,
    hardtanh,
    heaviside,
    leaky_relu,
    log_softmax,
    mish,
    prelu,
    quick_gelu,
    reglu,
    reglu_packed,
    relu,
    relu6,
    relu_squared,
    selu,
    sigmoid,
    silu,
    softmax,
    softplus,
    swiglu,
    swiglu_packed,
    swish,
    tanh,
    xielu,
)
from .ops import get_cpu_backend, set_cpu_backend
from .patching import patch, unpatch

_hub_kernels.import_installed_kernels()  # (before anything imports transformers: see that module)

__version__ = "0.1.0"

__all__ = [
    "bias_act",
    "celu",
    "differences",
    "elu",
    "functional",
    "gated",
    "gated_packed",
    "geglu",
    "geglu_packed",
    "gelu",
    "get_cpu_backend",
    "glu",
    "hardsigmoid",
    "hardswish",
    "hardtanh",
    "heaviside",
    "leaky_relu",
    "log_softmax",
    "mish",
    "mlp",
    "nn",
    "ops",
    "patch",
    "prelu",
    "quick_gelu",
    "reglu",
    "reglu_packed",
    "relu",
    "relu6",
    "relu_squared",
    "selu",
    "set_cpu_backend",
    "sigmoid",
    "silu",
    "softmax",
    "softplus",
    "swiglu",
    "swiglu_packed",
    "swish",
    "tanh",
    "unpatch",
    "xielu",
]
