"""``nn.Module``s: drop-in twins of ``torch.nn`` activations, plus modules that own a fused bias.

``ReLU``, ``LeakyReLU``, ``GELU``, ``SiLU``, ``Sigmoid``, ``Tanh``, ``ELU``, ``SELU``, ``CELU``, ``Mish``,
``GLU``, ``PReLU``, ``ReLU6``, ``Hardtanh``, ``Hardswish``, ``Hardsigmoid``, ``Softplus``, ``Softmax`` and
``LogSoftmax`` subclass their ``torch.nn`` twins: same constructor arguments, ``extra_repr``, ``state_dict``
(empty, or PReLU's ``weight``) and ``isinstance`` checks; only ``forward`` runs the fused kernel. ``XIELU``
mirrors transformers' ``XIELUActivation`` (Apertus): same constructor, parameters and buffers, so a
``state_dict`` loads either way. ``Swish``, ``ReLUSquared``, ``QuickGELU``, ``Heaviside``, ``SwiGLU``,
``GeGLU`` and ``ReGLU`` have no ``torch.nn`` twin; ``BiasAct`` owns a bias. ``inplace=True`` is accepted
for compatibility but the result is always a new tensor (the fused kernel writes its own output), so code
that uses the returned value behaves the same.

Example::

    >>> import torch, fusedact
    >>> block = torch.nn.Sequential(torch.nn.Linear(16, 64), fusedact.nn.GELU(approximate="tanh"))
    >>> block(torch.randn(2, 16)).shape
    torch.Size([2, 64])
"""

from typing import Optional

import torch
from torch import Tensor

from . import functional as F


class ReLU(torch.nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input)


class LeakyReLU(torch.nn.LeakyReLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, negative_slope=self.negative_slope)


class GELU(torch.nn.GELU):
    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class ELU(torch.nn.ELU):
    def forward(self, input: Tensor) -> Tensor:
        return F.elu(input, alpha=self.alpha)


class SELU(torch.nn.SELU):
    def forward(self, input: Tensor) -> Tensor:
        return F.selu(input)


class CELU(torch.nn.CELU):
    def forward(self, input: Tensor) -> Tensor:
        return F.celu(input, alpha=self.alpha)


class Mish(torch.nn.Mish):
    def forward(self, input: Tensor) -> Tensor:
        return F.mish(input)


class ReLU6(torch.nn.ReLU6):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu6(input)


class Hardtanh(torch.nn.Hardtanh):
    def forward(self, input: Tensor) -> Tensor:
        return F.hardtanh(input, min_val=self.min_val, max_val=self.max_val)


class Hardswish(torch.nn.Hardswish):
    def forward(self, input: Tensor) -> Tensor:
        return F.hardswish(input)


class Hardsigmoid(torch.nn.Hardsigmoid):
    def forward(self, input: Tensor) -> Tensor:
        return F.hardsigmoid(input)


class Softplus(torch.nn.Softplus):
    def forward(self, input: Tensor) -> Tensor:
        return F.softplus(input, beta=self.beta, threshold=self.threshold)


class XIELU(torch.nn.Module):
    """xIELU with learned ``alpha_p``, ``alpha_n``, as transformers' ``XIELUActivation`` (Apertus): the same
    constructor, ``Parameter``s ``alpha_p``, ``alpha_n`` (raw: the coefficients are ``softplus(alpha_p)``
    and ``beta + softplus(alpha_n)``) and buffers ``beta``, ``eps``, so its ``state_dict`` loads into either
    class. The coefficients are computed in PyTorch (two elements, differentiable); the kernel adds their
    gradients up in the same backward pass as the input's.

    ``beta`` and ``eps`` are fixed, as in transformers, whose CUDA path keeps them as Python floats too:
    their values (the buffers', rounded to the buffers' dtype as transformers' Python path uses them) are
    read when the module is built, loads a ``state_dict`` or changes dtype, never per call (no host sync).

        >>> act = fusedact.nn.XIELU(dtype=torch.float32)
        >>> y = act(torch.randn(4, 8))  # act.alpha_p.grad, act.alpha_n.grad after backward
    """

    def __init__(
        self,
        alpha_p_init: float = 0.8,
        alpha_n_init: float = 0.8,
        beta: float = 0.5,
        eps: float = -1e-6,
        dtype: Optional[torch.dtype] = torch.bfloat16,
        with_vector_loads: bool = False,
    ) -> None:
        super().__init__()
        self.alpha_p = torch.nn.Parameter(torch.log(torch.expm1(torch.tensor(alpha_p_init, dtype=dtype))).unsqueeze(0))
        self.alpha_n = torch.nn.Parameter(
            torch.log(torch.expm1(torch.tensor(alpha_n_init - beta, dtype=dtype))).unsqueeze(0)
        )
        self.register_buffer("beta", torch.tensor(beta, dtype=dtype))
        self.register_buffer("eps", torch.tensor(eps, dtype=dtype))
        self.with_vector_loads = with_vector_loads
        # The buffers' values as floats, rounded to their dtype on the CPU (whatever the default device).
        self._beta_scalar, self._eps_scalar = (float(torch.tensor(v, dtype=dtype, device="cpu")) for v in (beta, eps))

    def _refresh_scalars(self, beta: Tensor, eps: Tensor) -> None:
        if not (beta.is_meta or eps.is_meta):
            self._beta_scalar, self._eps_scalar = float(beta), float(eps)

    def _apply(self, fn, *args, **kwargs):
        # A dtype change rounds the buffers: the floats follow, computed on the CPU (no device read).
        before = (self._beta_scalar, self._eps_scalar)
        module = super()._apply(fn, *args, **kwargs)
        self._beta_scalar, self._eps_scalar = (
            float(torch.tensor(value, dtype=buffer.dtype))
            for value, buffer in zip(before, (self.beta, self.eps), strict=True)
        )
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_scalars(self.beta, self.eps)  # one read per load, of the loaded (fixed) values

    @classmethod
    def sharing(cls, module: torch.nn.Module) -> "XIELU":
        """An ``XIELU`` on ``module``'s own ``alpha_p``, ``alpha_n`` ``Parameter``s and ``beta``, ``eps``
        buffers (the same objects: the same ``state_dict`` keys and values, one optimizer state), computing
        what ``module`` computes: ``module`` is transformers' ``XIELUActivation`` or an ``XIELU``.

            >>> act = fusedact.nn.XIELU.sharing(transformers_model.model.layers[0].mlp.act_fn)
        """
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.alpha_p, new.alpha_n = module.alpha_p, module.alpha_n
        for name in ("beta", "eps"):
            new.register_buffer(name, getattr(module, name), persistent=name not in module._non_persistent_buffers_set)
        new.with_vector_loads = getattr(module, "with_vector_loads", False)
        # The floats the buffers hold (transformers' Python path computes with the buffers); on meta
        # buffers, the module's own floats rounded to the buffers' dtype.
        new._beta_scalar, new._eps_scalar = (
            float(torch.tensor(getattr(module, f"_{name}_scalar"), dtype=getattr(module, name).dtype))
            for name in ("beta", "eps")
        )
        new._refresh_scalars(new.beta, new.eps)
        new.train(module.training)
        return new

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """(alpha_p, alpha_n) = (softplus(self.alpha_p), beta + softplus(self.alpha_n)), as transformers."""
        softplus = torch.nn.functional.softplus
        return softplus(self.alpha_p), self.beta + softplus(self.alpha_n)

    def forward(self, input: Tensor) -> Tensor:
        return self.with_bias(input, None)

    def with_bias(self, input: Tensor, bias: Optional[Tensor]) -> Tensor:
        """xIELU of ``input + bias`` with this module's coefficients, the bias added in the kernel."""
        alpha_p, alpha_n = self.coefficients()
        return F.xielu(input, bias, alpha_p=alpha_p, alpha_n=alpha_n, beta=self._beta_scalar, eps=self._eps_scalar)


class GLU(torch.nn.GLU):
    """``torch.nn.GLU``: ``a * sigmoid(b)`` for ``[a | b]``; only the last dimension can be split."""

    def forward(self, input: Tensor) -> Tensor:
        return F.glu(input, dim=self.dim)


def _softmax_dim(name: str, dim: Optional[int], input: Tensor) -> int:
    """``dim``, or for ``dim=None`` torch.nn's legacy choice (0 for 0-, 1- and 3-D input, else 1) with its
    deprecation warning, as ``torch.nn.Softmax(dim=None)`` does."""
    if dim is None:
        return torch.nn.functional._get_softmax_dim(name, input.dim(), stacklevel=4)
    return dim


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax``: the softmax along ``dim`` (same constructor, repr and empty state_dict)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.softmax(input, dim=_softmax_dim("softmax", self.dim, input))


class LogSoftmax(torch.nn.LogSoftmax):
    """``torch.nn.LogSoftmax``: log-probabilities along ``dim``."""

    def forward(self, input: Tensor) -> Tensor:
        return F.log_softmax(input, dim=_softmax_dim("log_softmax", self.dim, input))


class ReLUSquared(torch.nn.Module):
    """max(x, 0)^2 (Primer)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu_squared(input)


class QuickGELU(torch.nn.Module):
    """x * sigmoid(1.702 x) (CLIP)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.quick_gelu(input)


class Heaviside(torch.nn.Module):
    """The step function; no gradient unless ``straight_through=True`` (see ``fusedact.heaviside``)."""

    def __init__(self, value: float = 0.0, straight_through: bool = False) -> None:
        super().__init__()
        self.value = value
        self.straight_through = straight_through

    def forward(self, input: Tensor) -> Tensor:
        return F.heaviside(input, value=self.value, straight_through=self.straight_through)

    def extra_repr(self) -> str:
        return f"value={self.value}, straight_through={self.straight_through}"


class Swish(torch.nn.Module):
    """x * sigmoid(beta * x); ``Swish(1.0)`` is SiLU."""

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, input: Tensor) -> Tensor:
        return F.swish(input, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SwiGLU(torch.nn.Module):
    """silu(gate) * up: ``SwiGLU()(gate, up)``, or ``SwiGLU()(x)`` for a packed ``x = [gate | up]``."""

    def forward(self, gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
        return F.swiglu_packed(gate) if up is None else F.swiglu(gate, up)


class GeGLU(torch.nn.Module):
    """gelu(gate) * up: ``GeGLU()(gate, up)``, or ``GeGLU()(x)`` for a packed ``x = [gate | up]``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
        if up is None:
            return F.geglu_packed(gate, approximate=self.approximate)
        return F.geglu(gate, up, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReGLU(torch.nn.Module):
    """relu(gate) * up: ``ReGLU()(gate, up)``, or ``ReGLU()(x)`` for a packed ``x = [gate | up]``."""

    def forward(self, gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
        return F.reglu_packed(gate) if up is None else F.reglu(gate, up)


class PReLU(torch.nn.PReLU):
    """``torch.nn.PReLU`` (same ``num_parameters``, ``init``, ``weight`` Parameter and state_dict key) on
    the fused kernel: the slope's gradient is reduced in the same backward pass."""

    def forward(self, input: Tensor) -> Tensor:
        return F.prelu(input, self.weight)


class BiasAct(torch.nn.Module):
    """An activation with its own bias ``Parameter`` of ``num_features``, added before the activation.

    ``activation`` is one of ``fusedact.functional.ACTIVATIONS`` with its keyword parameters; for
    ``"swiglu"`` the input is packed ``[gate | up]`` of width ``num_features`` (the output has half).
    The bias starts at zero, so a fresh ``BiasAct`` computes exactly the bare activation. ``dim`` is the
    dimension the bias runs along: the last (after a Linear), or 1 for the channels of a conv output.

    Example: ``BiasAct(64, "leaky_relu", negative_slope=0.2)(torch.randn(8, 64))``;
    ``BiasAct(16, "relu", dim=1)(torch.randn(2, 16, 8, 8))`` for ``Conv2d(..., 16, bias=False)``.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        dim: int = -1,
        **params,
    ) -> None:
        super().__init__()
        if activation not in F.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {F.ACTIVATIONS}")
        self.num_features = num_features
        self.activation = activation
        self.dim = dim
        self.params = params
        self.bias = torch.nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        return F.bias_act(input, self.bias, self.activation, dim=self.dim, **self.params)

    def extra_repr(self) -> str:
        params = "".join(f", {key}={value!r}" for key, value in self.params.items())
        dim = "" if self.dim == -1 else f", dim={self.dim}"
        return f"{self.num_features}, activation={self.activation!r}{dim}{params}"
