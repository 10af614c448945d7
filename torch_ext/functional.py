"""Functional API: mirrors ``torch.nn.functional`` with an optional ``bias`` fused into the activation.

``bias`` has length ``x.shape[-1]`` and broadcasts over every leading dimension; its gradient is summed
over all of them. Math is fp32 with one rounding to ``x.dtype`` (fp16, bf16, fp32; fp64 stays fp64).

Example::

    >>> import torch, fusedact
    >>> x, b = torch.randn(8, 16), torch.zeros(16)
    >>> torch.equal(fusedact.gelu(x, b), torch.nn.functional.gelu(x))
    True
"""

from typing import Optional

import torch
from torch import Tensor

from . import ops
from . import softmax as softmax_ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_input(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def _check_bias(
    bias: Optional[Tensor], x: Tensor, width: int, name: str, input_name: str, along: object = "shape[-1]"
) -> None:
    """A bias is 1-D of length ``width`` (``x.<along>``; an int ``along`` is a dimension of ``x``) with the
    dtype and device of ``x``. (The checks run on every call: the common case costs a few comparisons and
    builds no message.)"""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() == 1 and bias.shape[0] == width and bias.dtype == x.dtype and bias.device == x.device and x.dim():
        return
    along = f"shape[{along}]" if isinstance(along, int) else along
    if x.dim() == 0:
        raise ValueError(f"{input_name} is 0-D: a {name} needs a dimension to run along")
    if bias.dim() != 1 or bias.shape[0] != width:
        raise ValueError(f"{name} must have shape ({width},) to match {input_name}.{along}, got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} dtype {bias.dtype} does not match {input_name} dtype {x.dtype}")
    raise ValueError(f"{name} is on {bias.device} but {input_name} is on {x.device}")


def _channel_dim(x: Tensor, dim: int) -> int:
    """``dim`` as an index of ``x``'s dimensions (0 for a 0-D ``x``), or a clear error."""
    if type(dim) is not int:  # (bool is an int subclass: refused too)
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    ndim = x.dim() or 1
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D x")
    return dim % ndim


def _single(
    x: Tensor, bias: Optional[Tensor], activation: str, param: float = 0.0, param2: float = 0.0, dim: int = -1
) -> Tensor:
    _check_input(x, "x")
    dim = _channel_dim(x, dim)
    _check_bias(bias, x, x.shape[dim] if x.dim() else 1, "bias", "x", dim)
    return ops.run_bias_act(x, bias, None, None, activation, float(param), float(param2), dim)


def relu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """max(x + bias, 0). Example: ``fusedact.relu(torch.randn(4, 8), torch.zeros(8))``."""
    return _single(x, bias, "relu", 0.0)


def leaky_relu(x: Tensor, bias: Optional[Tensor] = None, negative_slope: float = 0.01) -> Tensor:
    """z if z > 0 else negative_slope * z, z = x + bias. Example: ``fusedact.leaky_relu(x, b, 0.2)``."""
    return _single(x, bias, "leaky_relu", negative_slope)


def prelu(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.prelu`` with a fused bias: z if z > 0 else weight * z, z = x + bias, with a learned slope.

    As ``F.prelu``, the channels are dimension 1 (dimension 0 of a 1-D ``x`` has one channel): ``weight``
    holds one slope per channel or one shared by all, and ``bias`` (optional) runs along the same channel
    dimension, so ``Conv2d -> bias -> PReLU`` fuses on NCHW. The slope's gradient is reduced in the same
    backward pass as the bias gradient.

        >>> x, w = torch.randn(2, 3, 4, 4), torch.full((3,), 0.25)
        >>> torch.equal(fusedact.prelu(x, w), torch.nn.functional.prelu(x, w))
        True
    """
    _check_input(x, "x")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    dim = 1 if x.dim() >= 2 else 0
    channels = x.shape[1] if x.dim() >= 2 else 1
    if weight.dim() > 1 or weight.numel() not in (1, channels):
        raise ValueError(
            f"weight must hold 1 or {channels} slopes (x.shape[1], the channel dimension), "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    width = x.shape[dim] if x.dim() else 1
    _check_bias(bias, x, width, "bias", "x", dim)
    return ops.run_bias_act(x, bias, weight.reshape(-1), None, "prelu", 0.0, 0.0, dim)


def gelu(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """z * Phi(z), z = x + bias; ``approximate="tanh"`` for the tanh form. Example: ``fusedact.gelu(x, b)``."""
    return _single(x, bias, _approximate_to_activation(approximate), 0.0)


def silu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z * sigmoid(z), z = x + bias. Example: ``fusedact.silu(x, b)``."""
    return _single(x, bias, "swish", 1.0)


def swish(x: Tensor, bias: Optional[Tensor] = None, beta: float = 1.0) -> Tensor:
    """z * sigmoid(beta * z), z = x + bias; beta = 1 is SiLU. Example: ``fusedact.swish(x, b, beta=1.702)``."""
    return _single(x, bias, "swish", beta)


def _approximate_to_activation(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


def sigmoid(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """1 / (1 + exp(-z)), z = x + bias: the classifier's output, the LSTM's gates."""
    return _single(x, bias, "sigmoid", 0.0)


def tanh(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """tanh(x + bias): the LSTM's cell activation."""
    return _single(x, bias, "tanh", 0.0)


def elu(x: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """z if z > 0 else alpha (exp(z) - 1), z = x + bias (``F.elu``)."""
    return _single(x, bias, "elu", alpha)


def selu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """scale * elu(z, alpha) with PyTorch's self-normalising constants (``F.selu``)."""
    return _single(x, bias, "selu", 0.0)


def celu(x: Tensor, bias: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """z if z > 0 else alpha (exp(z / alpha) - 1), z = x + bias (``F.celu``)."""
    if alpha == 0:
        raise ValueError("alpha must not be 0 for celu")
    return _single(x, bias, "celu", alpha)


def relu_squared(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """max(x + bias, 0)^2, the squared ReLU of Primer."""
    return _single(x, bias, "relu_squared", 0.0)


def quick_gelu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z * sigmoid(1.702 z), z = x + bias: CLIP's fast GELU approximation (swish with beta = 1.702)."""
    return _single(x, bias, "swish", 1.702)


def mish(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z * tanh(softplus(z)), z = x + bias (``F.mish``)."""
    return _single(x, bias, "mish", 0.0)


def hardtanh(x: Tensor, bias: Optional[Tensor] = None, min_val: float = -1.0, max_val: float = 1.0) -> Tensor:
    """clamp(x + bias, min_val, max_val) (``F.hardtanh``); its gradient is 0 outside (min_val, max_val).

    >>> x = torch.tensor([-2.0, 0.5, 3.0])
    >>> fusedact.hardtanh(x, min_val=-1.0, max_val=2.0)
    tensor([-1.0000,  0.5000,  2.0000])
    """
    if not min_val <= max_val:
        raise ValueError(f"min_val ({min_val}) must not be greater than max_val ({max_val})")
    return _single(x, bias, "hardtanh", min_val, max_val)


def relu6(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """min(max(x + bias, 0), 6) (``F.relu6``: MobileNet v1/v2, EfficientNet-lite): ``hardtanh(x, bias, 0, 6)``."""
    return _single(x, bias, "hardtanh", 0.0, 6.0)


def hardswish(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z * relu6(z + 3) / 6, z = x + bias (``F.hardswish``: MobileNetV3, LeViT).

    Example: ``fusedact.hardswish(x, b)``."""
    return _single(x, bias, "hardswish")


def hardsigmoid(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """relu6(z + 3) / 6, z = x + bias (``F.hardsigmoid``: MobileNetV3's squeeze-excite gate)."""
    return _single(x, bias, "hardsigmoid")


def softplus(x: Tensor, bias: Optional[Tensor] = None, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + exp(beta z)) / beta, z = x + bias, and z itself where beta z > threshold (``F.softplus``,
    Mamba's dt). Example: ``fusedact.softplus(x, b, beta=2.0)``."""
    if beta == 0:
        raise ValueError("beta must not be 0 for softplus")
    return _single(x, bias, "softplus", beta, threshold)


def _xielu_parameter(value, name: str, x: Tensor, width: int) -> Tensor:
    """A learned xIELU coefficient as the kernels read it: a tensor of 1 or ``width`` elements on x's device
    (a float becomes one element in the compute dtype; a tensor keeps its dtype and its autograd graph)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor or a float, got {value.dtype}")
        if value.numel() not in (1, width) or value.dim() > 1:
            raise ValueError(f"{name} must hold 1 or {width} values (x.shape[-1]), got shape {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        return value.reshape(-1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((1,), float(value), dtype=dtype, device=x.device)


def xielu(
    x: Tensor,
    bias: Optional[Tensor] = None,
    alpha_p: Tensor | float = 0.8,
    alpha_n: Tensor | float = 0.8,
    beta: float = 0.5,
    eps: float = -1e-6,
) -> Tensor:
    """xIELU (Apertus; arXiv:2411.13010), z = x + bias: ``alpha_p z^2 + beta z`` for z > 0, else
    ``alpha_n (expm1(min(z, eps)) - z) + beta z``.

    ``alpha_p``/``alpha_n`` are the coefficients themselves (transformers' ``XIELUActivation`` learns them
    as ``softplus(raw)`` and ``beta + softplus(raw)``: ``fusedact.nn.XIELU`` does that): floats, or tensors
    of one value or one per channel of the last dimension, any floating dtype, whose gradients the backward
    kernel reduces with the bias gradient.

        >>> x = torch.tensor([-2.0, 0.0, 1.5])
        >>> y = fusedact.xielu(x, alpha_p=torch.tensor([0.8], requires_grad=True))
    """
    _check_input(x, "x")
    width = x.shape[-1] if x.dim() else 1
    _check_bias(bias, x, width, "bias", "x")
    weights = [_xielu_parameter(value, name, x, width) for value, name in ((alpha_p, "alpha_p"), (alpha_n, "alpha_n"))]
    if weights[0].numel() != weights[1].numel():  # the kernels lay both out alike: one per channel each
        # The shared one is widened first to the compute dtype (exact): its per-channel gradients then come
        # back unrounded and autograd sums them there, rounding once to its dtype (not C roundings, then a
        # sum in bf16).
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        weights = [
            w if w.numel() == width else w.to(torch.promote_types(w.dtype, compute)).expand(width) for w in weights
        ]
    # beta and eps as the kernels hold them: fp32 numbers (the negative side sums in fp64 with beta in it)
    beta, eps = float(beta), float(eps)
    if x.dtype != torch.float64:
        beta, eps = (float(torch.tensor(value, dtype=torch.float32)) for value in (beta, eps))
    return ops.run_bias_act(x, bias, *weights, "xielu", beta, eps, x.dim() - 1 if x.dim() else 0)


def heaviside(x: Tensor, bias: Optional[Tensor] = None, value: float = 0.0, straight_through: bool = False) -> Tensor:
    """The step: 1 where x + bias > 0, ``value`` where it is 0, else 0 (a NaN gives 0, as ``torch.heaviside``).

    The step's derivative is 0 everywhere it exists, so no gradient reaches anything before it: that is why
    networks of step units (the perceptron) cannot be trained by backpropagation. ``straight_through=True``
    passes the gradient through unchanged instead (the straight-through estimator, used for binarised
    networks): a deliberate approximation, never the default.
    """
    return _single(x, bias, "heaviside_ste" if straight_through else "heaviside", value)


def _softmax(x: Tensor, bias: Optional[Tensor], dim: int, log: bool) -> Tensor:
    _check_input(x, "x")
    if x.device.type == "cuda" and x.dtype != torch.float64 and torch.is_autocast_enabled("cuda"):
        # CUDA autocast runs softmax and log_softmax in float32 (its fp32 op list), so under AMP they return
        # float32; the same here, so a model does not change its dtypes when fusedact.patch swaps a Softmax.
        x = x.float()
        bias = bias.float() if bias is not None and bias.is_floating_point() else bias
    dim = _channel_dim(x, dim)
    _check_bias(bias, x, x.shape[dim] if x.dim() else 1, "bias", "x", dim)
    return softmax_ops.run_softmax(x, bias, dim, log)


def softmax(x: Tensor, bias: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """exp(z - max z) / sum(exp(z - max z)) along ``dim``, z = x + bias (``torch.softmax``).

    Unlike the elementwise activations, each output depends on its whole row: ``bias`` has length
    ``x.shape[dim]`` and broadcasts over every other dimension. The backward needs only the output.

        >>> x, b = torch.randn(4, 10), torch.zeros(10)
        >>> torch.allclose(fusedact.softmax(x, b), torch.softmax(x, dim=-1))
        True
    """
    return _softmax(x, bias, dim, False)


def log_softmax(x: Tensor, bias: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """(z - max z) - log(sum(exp(z - max z))) along ``dim``, z = x + bias (``torch.log_softmax``): the
    log-probabilities a cross-entropy loss reads. Example: ``fusedact.log_softmax(logits, vocab_bias)``."""
    return _softmax(x, bias, dim, True)


def _check_gated(gate: Tensor, up: Tensor, gate_bias: Optional[Tensor], up_bias: Optional[Tensor]) -> None:
    _check_input(gate, "gate")
    _check_input(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise TypeError(f"gate ({gate.dtype}, {gate.device}) and up ({up.dtype}, {up.device}) must match")
    width = gate.shape[-1] if gate.dim() else 1
    _check_bias(gate_bias, gate, width, "gate_bias", "gate")
    _check_bias(up_bias, up, width, "up_bias", "up")


def _check_packed(x: Tensor, bias: Optional[Tensor]) -> None:
    _check_input(x, "x")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (two packed halves), got shape {tuple(x.shape)}")
    _check_bias(bias, x, x.shape[-1], "bias", "x")


def _gate_scale(gate_scale) -> float:
    if isinstance(gate_scale, bool) or not isinstance(gate_scale, (int, float)):
        raise TypeError(f"gate_scale must be a float, got {type(gate_scale).__name__}")
    return float(gate_scale)


def gated(
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
    activation: str = "silu",
    gate_scale: float = 1.0,
    **params,
) -> Tensor:
    """act(s (gate + gate_bias)) * (up + up_bias) for any single-input activation: the GLU family.

    ``gated(g, u)`` is SwiGLU, ``activation="gelu"`` GeGLU, ``"relu"`` ReGLU, ``"sigmoid"`` the original GLU.
    ``gate_scale`` (s) multiplies the gate before the activation, in the kernel (Falcon-H1's
    ``act(gate_proj(x) * gate_multiplier)``); its gradients are s act'(s z) up and act(s z).
    Example: ``fusedact.gated(gate, up, activation="gelu", approximate="tanh")``.
    """
    _check_gated(gate, up, gate_bias, up_bias)
    kernel_activation, param, param2 = _resolve(activation, params, gated=True)
    return ops.run_gated(gate, up, gate_bias, up_bias, kernel_activation, param, param2, _gate_scale(gate_scale))


def gated_packed(
    x: Tensor,
    bias: Optional[Tensor] = None,
    activation: str = "silu",
    gate_first: bool = True,
    gate_scale: float = 1.0,
    **params,
) -> Tensor:
    """``gated`` on the two halves of ``x`` along the last dimension (width 2H -> H), read in place.

    ``gate_first=True``: ``x = [gate | up]`` (a fused gate_up projection); ``False``: ``[up | gate]``, the
    layout of ``F.glu``. ``bias`` has length 2H and is split the same way; ``gate_scale`` as in ``gated``.
    """
    _check_packed(x, bias)
    kernel_activation, param, param2 = _resolve(activation, params, gated=True)
    scale = _gate_scale(gate_scale)
    return ops.run_gated_packed(x, bias, kernel_activation, param, param2, scale, gate_first)


def swiglu(gate: Tensor, up: Tensor, gate_bias: Optional[Tensor] = None, up_bias: Optional[Tensor] = None) -> Tensor:
    """silu(gate + gate_bias) * (up + up_bias), the gated MLP of Llama-style models.

    Example: ``fusedact.swiglu(gate_proj(x), up_proj(x))``.
    """
    return gated(gate, up, gate_bias, up_bias, "silu")


def swiglu_packed(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """swiglu of the two halves of ``x = [gate | up]`` along the last dimension (width 2H -> H).

    ``bias`` has length 2H (``[gate_bias | up_bias]``). The halves are read in place.
    Example: ``fusedact.swiglu_packed(gate_up_proj(x))``.
    """
    return gated_packed(x, bias, "silu")


def geglu(
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
    approximate: str = "none",
) -> Tensor:
    """gelu(gate + gate_bias) * (up + up_bias) (GeGLU; ``approximate="tanh"`` for the tanh GELU)."""
    return gated(gate, up, gate_bias, up_bias, "gelu", approximate=approximate)


def geglu_packed(x: Tensor, bias: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """geglu of the halves of ``x = [gate | up]``."""
    return gated_packed(x, bias, "gelu", approximate=approximate)


def reglu(gate: Tensor, up: Tensor, gate_bias: Optional[Tensor] = None, up_bias: Optional[Tensor] = None) -> Tensor:
    """relu(gate + gate_bias) * (up + up_bias) (ReGLU)."""
    return gated(gate, up, gate_bias, up_bias, "relu")


def reglu_packed(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """reglu of the halves of ``x = [gate | up]``."""
    return gated_packed(x, bias, "relu")


def glu(x: Tensor, bias: Optional[Tensor] = None, dim: int = -1) -> Tensor:
    """``F.glu``: ``a * sigmoid(b)`` for ``x = [a | b]`` split along the last dimension, bias of length 2H.

    Only the last dimension can be split (``dim=-1`` or its positive index). For two separate tensors use
    ``gated(gate, up, activation="sigmoid")``.
    """
    _check_input(x, "x")
    if dim not in (-1, x.dim() - 1):
        raise ValueError(f"glu splits the last dimension only, got dim={dim} for a {x.dim()}-D x")
    return gated_packed(x, bias, "sigmoid", gate_first=False)


# Public name -> (kernel activation, function of the keyword parameters -> the kernel's (param, param2))
_SINGLE_INPUT = {
    "relu": ("relu", lambda: (0.0, 0.0)),
    "leaky_relu": ("leaky_relu", lambda negative_slope=0.01: (negative_slope, 0.0)),
    "gelu": (None, None),  # resolved by `approximate`
    "silu": ("swish", lambda: (1.0, 0.0)),
    "swish": ("swish", lambda beta=1.0: (beta, 0.0)),
    "quick_gelu": ("swish", lambda: (1.702, 0.0)),
    "sigmoid": ("sigmoid", lambda: (0.0, 0.0)),
    "tanh": ("tanh", lambda: (0.0, 0.0)),
    "elu": ("elu", lambda alpha=1.0: (alpha, 0.0)),
    "selu": ("selu", lambda: (0.0, 0.0)),
    "celu": ("celu", lambda alpha=1.0: (alpha, 0.0)),
    "relu_squared": ("relu_squared", lambda: (0.0, 0.0)),
    "mish": ("mish", lambda: (0.0, 0.0)),
    "heaviside": (None, None),  # resolved by `straight_through`
    "relu6": ("hardtanh", lambda: (0.0, 6.0)),
    "hardtanh": ("hardtanh", lambda min_val=-1.0, max_val=1.0: (min_val, max_val)),
    "hardswish": ("hardswish", lambda: (0.0, 0.0)),
    "hardsigmoid": ("hardsigmoid", lambda: (0.0, 0.0)),
    "softplus": ("softplus", lambda beta=1.0, threshold=20.0: (beta, threshold)),
    "xielu": (None, None),  # learned parameters: fusedact.xielu (bias_act) and never a gate
}
_GATED_PACKED = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu", "glu": "sigmoid"}
ACTIVATIONS = tuple(_SINGLE_INPUT) + tuple(_GATED_PACKED)
# Activations with learned parameters (tensors among their keywords): single-input only.
LEARNED = frozenset({"xielu"})


def _resolve(activation: str, params: dict, gated: bool = False) -> tuple[str, float, float]:
    """Public activation name and keyword parameters -> (kernel activation, its two float parameters).
    ``gated``: for a gate (an activation with learned parameters is not one)."""
    if activation not in _SINGLE_INPUT or (gated and activation in LEARNED):
        names = tuple(name for name in _SINGLE_INPUT if not (gated and name in LEARNED))
        kind = "gate activation" if activation in _SINGLE_INPUT else "activation"
        raise ValueError(f"unknown {kind} {activation!r}; expected one of {names}")
    if activation in LEARNED:
        raise ValueError(f"{activation} has learned parameters: call fusedact.{activation} or fusedact.bias_act")
    try:
        if activation == "gelu":
            return _approximate_to_activation(_only(params, "approximate", "none")), 0.0, 0.0
        if activation == "heaviside":
            straight_through = _only(params, "straight_through", False, also=("value",))
            return ("heaviside_ste" if straight_through else "heaviside"), float(params.get("value", 0.0)), 0.0
        kernel_activation, parameters = _SINGLE_INPUT[activation]
        param, param2 = (float(value) for value in parameters(**params))
    except TypeError as error:
        raise TypeError(f"{activation}: {error}") from None
    if activation == "celu" and param == 0:
        raise ValueError("alpha must not be 0 for celu")
    if activation == "softplus" and param == 0:
        raise ValueError("beta must not be 0 for softplus")
    if activation == "hardtanh" and not param <= param2:
        raise ValueError(f"min_val ({param}) must not be greater than max_val ({param2})")
    return kernel_activation, param, param2


def _only(params: dict, name: str, default, also: tuple = ()):
    unexpected = set(params) - {name, *also}
    if unexpected:
        raise TypeError(f"unexpected keyword arguments {sorted(unexpected)}")
    return params.get(name, default)


def bias_act(x: Tensor, bias: Optional[Tensor], activation: str, dim: int = -1, **params) -> Tensor:
    """Generic entry point: ``bias_act(x, b, "gelu", approximate="tanh")``.

    ``activation`` is one of ``fusedact.functional.ACTIVATIONS``; the gated ones (``"swiglu"``, ``"geglu"``,
    ``"reglu"``, ``"glu"``) take a packed ``x`` (``[gate | up]``; ``[up | gate]`` for ``"glu"``, as ``F.glu``).

    ``dim`` is the dimension the bias runs along: the last by default (after a Linear), ``dim=1`` for the
    channels of an NCHW conv output (contiguous or ``torch.channels_last``, read in place either way)::

        >>> conv = torch.nn.Conv2d(3, 8, 3, bias=False)
        >>> b = torch.zeros(8)
        >>> y = fusedact.bias_act(conv(torch.randn(2, 3, 16, 16)), b, "relu", dim=1)  # = relu(conv + b[:, None, None])
    """
    if activation in _GATED_PACKED:
        if dim not in (-1, x.dim() - 1):
            raise ValueError(f"gated activations split and bias the last dimension only, got dim={dim}")
        gate_first = activation != "glu"
        return gated_packed(x, bias, _GATED_PACKED[activation], gate_first=gate_first, **params)
    if activation == "xielu":
        if dim not in (-1, x.dim() - 1):
            raise ValueError(f"xielu's bias and parameters run along the last dimension only, got dim={dim}")
        try:
            return xielu(x, bias, **params)
        except TypeError as error:
            raise TypeError(f"xielu: {error}") from None
    kernel_activation, param, param2 = _resolve(activation, params)
    return _single(x, bias, kernel_activation, param, param2, dim)
