"""Registered ops: ``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``.

Layering (one per op): kernel (``fusedact.kernels``) -> launcher (``_triton.py``) or fallback
(``_fallback.py``) -> registered op here (allocates, dispatches) -> autograd here -> public function
(``functional.py``) -> module (``nn.py``).

Dispatch: CUDA tensors run the Triton kernels; fp64 tensors run the fallback; CPU tensors run the
fallback, or the Triton kernels through Triton's interpreter when ``TRITON_INTERPRET=1`` was set before
fusedact was imported (see ``set_cpu_backend``). Both paths return contiguous outputs.

Ops take the kernel-level activation names of ``fusedact.kernels.ACTIVATIONS``, the activation's two float
parameters (``param``, ``param2``: every op takes both, used or not), the single-input ops its learned ones
(``weight``, ``weight2``: PReLU's slope, xIELU's alpha_p and alpha_n) and the gated ops a scale on the gate
(``gate_scale``); ``functional.py`` validates user input and maps the public API onto them.
"""

import functools
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import _channels, _compiled, _fallback

try:
    from . import _triton
except ImportError:  # no Triton: CPU fallback only
    _triton = None

_KERNELS_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


@functools.cache
def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run fusedact's kernels here, or None. Its numpy evaluation breaks
    with newer numpy releases: Triton 3.1's loses its stores silently with numpy 2 (outputs come back
    unwritten), and before Triton 3.7 it fails on numpy 2.4's scalar conversion."""
    if _triton is None:
        return "Triton is not installed"
    import numpy
    import triton

    triton_release, numpy_release = _release(triton.__version__), _release(numpy.__version__)
    if triton_release < (3, 2) and numpy_release >= (2, 0):
        return f"Triton {triton.__version__}'s interpreter loses its stores with numpy {numpy.__version__}: use numpy<2"
    if triton_release < (3, 7) and numpy_release >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__}: use numpy<2.4"
    return None


_cpu_backend = "triton" if (_triton is not None and _KERNELS_INTERPRETED and not interpreter_problem()) else "torch"


def set_cpu_backend(backend: str) -> None:
    """Choose what runs CPU tensors: ``"torch"`` (the fallback), ``"compiled"`` (the fallback, with the large
    bias_act calls of GELU, Mish and softplus compiled by TorchInductor into fused loops: faster, needs a C++
    compiler, compiles on first use; see torch_ext/_compiled.py) or ``"triton"`` (the kernels, interpreted).

    ``"triton"`` needs ``TRITON_INTERPRET=1`` in the environment before fusedact is first imported.

    >>> fusedact.set_cpu_backend("compiled")
    >>> fusedact.get_cpu_backend()
    'compiled'
    >>> fusedact.set_cpu_backend("torch")
    """
    global _cpu_backend
    if backend not in ("torch", "compiled", "triton"):
        raise ValueError(f"backend must be 'torch', 'compiled' or 'triton', got {backend!r}")
    if backend == "triton" and (_triton is None or not _KERNELS_INTERPRETED):
        raise RuntimeError("the 'triton' CPU backend needs triton and TRITON_INTERPRET=1 set before import")
    if backend == "triton" and interpreter_problem():
        raise RuntimeError(f"the 'triton' CPU backend cannot run here: {interpreter_problem()}")
    if backend == "compiled" and _compiled.problem():
        raise RuntimeError(f"the 'compiled' CPU backend cannot run here: {_compiled.problem()}")
    _compiled.enable(backend == "compiled")
    _cpu_backend = backend


def get_cpu_backend() -> str:
    return _cpu_backend


def _backend(t: Tensor) -> ModuleType:
    if _triton is not None and t.dtype is not torch.float64:
        if t.is_cuda or (_cpu_backend == "triton" and t.device.type == "cpu"):
            return _triton
    return _fallback


# Activations whose derivative is written in terms of their output: they keep the output for backward
# (for relu the next layer keeps it anyway); the others keep their input (before the bias) and recompute.
_SAVES_OUTPUT = frozenset({"relu", "leaky_relu", "sigmoid", "tanh"})


def saves_output(activation: str, param: float) -> bool:
    """Whether ``activation``'s backward (in ``bias_act``) reads its output (else its input). A negative leaky
    slope makes the output's sign ambiguous, so leaky_relu then keeps its input. (The gated ops keep their
    inputs whatever the activation.)"""
    if activation == "leaky_relu":
        return param >= 0
    return activation in _SAVES_OUTPUT


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _bias_grad_like(bias: Optional[Tensor], compute: bool, like: Tensor) -> Tensor:
    """Shape of a bias gradient output: the bias's when computed, else an empty placeholder."""
    return _empty_like(bias) if (bias is not None and compute) else like.new_empty(0)


# ---------------------------------------------------------------------------------------------------
# Two ways into one implementation. Under torch.compile (and export) the public functions call the
# registered op, which the compiler traces as one node with its fake and autograd formulas. In eager mode
# they call an autograd.Function over the same implementation and the same autograd formulas: custom-op
# dispatch costs ~30 us of host time per call with autograd (measured on CPU for a [1, 4096] relu with a
# bias: 52 us through the op, 21 us through the Function, 4.6 us for eager's add + relu), more than a
# small kernel takes on a GPU, so latency-bound decoding would pay for it.


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def differentiating_backward(*args) -> bool:
    """Whether a backward called with ``args`` must itself be differentiable: grad mode is on inside the
    backward (``create_graph=True``: a gradient penalty, meta-learning, a Hessian-vector product) and one
    of its tensors (the upstream gradient, a saved input or output, a bias, a weight) requires grad.

    Ordinary training runs its backward with grad mode off, so this is False there and the kernels run."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _for_backward(*tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``tensors`` as ``ctx.save_for_backward`` can keep them. A tensor made under ``torch.inference_mode``
    and used later beside one that requires grad cannot be saved; eager PyTorch never has to, because its
    ``x + bias`` makes a new tensor and that is what its activation saves. So keep a copy of it (the size
    of the ``z`` eager would keep)."""
    if torch.is_inference_mode_enabled():
        return tensors
    for t in tensors:  # (the common case, none of them: no new tuple)
        if t is not None and t.is_inference():
            return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)
    return tensors


_dtensor_sharding = False  # registered with DTensor yet (the first call that sees a DTensor does it)


def _register_dtensor_sharding() -> None:
    """Tell DTensor how fusedact's ops shard (``fusedact.mlp.register_dtensor_sharding``), once, when an op
    first meets a DTensor: importing torch.distributed.tensor costs 0.6 s, which plain tensors never pay."""
    global _dtensor_sharding
    from . import mlp

    mlp.register_dtensor_sharding()
    _dtensor_sharding = True


def _entry(
    op, implementation, setup_context, formula, backward_op, backward_implementation, differentiable_backward=None
):
    """The public entry for ``op``: the op itself while compiling, exporting or tracing (fake or
    functional tensors) and for meta tensors, else an autograd.Function running ``implementation`` with
    the op's ``setup_context`` and its backward ``formula``, which then calls ``backward_implementation``
    where the registered op's formula calls ``backward_op``.

    Both formulas call ``differentiable_backward`` (same signature and results, written in differentiable
    PyTorch ops: the fallback's formulas) instead when the backward must itself be differentiable (see
    ``differentiating_backward``): autograd then differentiates the gradient again, through the saved
    tensors too. Without one, double backward raises. (``once_differentiable`` is not enough: it raises
    only when an upstream *gradient* requires grad; in ``y = f(x * w)``, ``grad(y.sum(), x,
    create_graph=True)`` the upstream gradient is a constant and only the saved ``x * w`` requires grad, so
    it would hand back f'(z) as a constant and the f'' term would be silently missing.)

    (The Function's forward takes ``ctx``: with a separate ``setup_context`` staticmethod, ``apply`` calls
    ``inspect.signature`` on every call, which costs as much as the dispatch saved.)"""
    name = implementation.__name__.strip("_").removesuffix("_impl")

    def choose(kernel_backward):
        def backward(*args):
            if not differentiating_backward(*args):
                return kernel_backward(*args)
            if differentiable_backward is None:
                raise RuntimeError(f"fusedact.{name}: double backward (create_graph=True) is not supported")
            return differentiable_backward(*args)

        return backward

    eager_backward, op_backward = choose(backward_implementation), choose(backward_op)

    def forward(ctx, *args):
        output = implementation(*args)
        setup_context(ctx, args, output)
        return output

    def backward(ctx, *grads):
        return formula(ctx, *grads, backward=eager_backward)

    function = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
    op.register_autograd(functools.partial(formula, backward=op_backward), setup_context=setup_context)

    def run(*args):
        # Meta tensors take the op, whose fake implementation gives meta outputs (shapes, no data).
        needs_grad = False
        for a in args:
            if isinstance(a, Tensor):
                if type(a) not in _PLAIN_TENSORS or a.is_meta:
                    if not _dtensor_sharding and type(a).__name__ == "DTensor":
                        _register_dtensor_sharding()
                    return op(*args)
                needs_grad = needs_grad or a.requires_grad
        if torch.compiler.is_compiling():
            return op(*args)
        if needs_grad and torch.is_grad_enabled():
            return function.apply(*args)
        # Nothing to differentiate (inference, decoding, no_grad): the implementation itself, without the
        # autograd.Function's own cost (~5 us a call), as eager's ops record nothing then either.
        return implementation(*args)

    return run


# ---------------------------------------------------------------------------------------------------
# Single-input activations


def _bias_act_impl(
    x: Tensor,
    bias: Optional[Tensor],
    weight: Optional[Tensor],
    weight2: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    dim: int,
) -> Tensor:
    """act(x + bias) with ``bias`` along dimension ``dim`` (``x.dim() - 1`` for a Linear, 1 for NCHW).
    ``weight``, ``weight2``: the activation's learned parameters along the same dimension (C of them, or
    one shared by all: PReLU's slope; xIELU's alpha_p and alpha_n), or None. The result is contiguous, or
    channels-last like ``x``."""
    if x.numel() == 0:
        return _channels.empty_output(x, dim)
    return _in_layout(_backend(x).bias_act(x, bias, weight, weight2, activation, param, param2, dim), x, dim)


def _in_layout(result: Tensor, x: Tensor, dim: int) -> Tensor:
    """``result`` in the layout ``empty_output(x, dim)`` promises (the fallback's may have other strides)."""
    if _channels.output_is_contiguous(x, dim):
        return result.contiguous()
    layout = _channels.empty_output(x, dim)
    return result if result.stride() == layout.stride() else layout.copy_(result)


bias_act = torch.library.custom_op("fusedact::bias_act", _bias_act_impl, mutates_args=())


@bias_act.register_fake
def _(x, bias, weight, weight2, activation, param, param2, dim):
    return _channels.empty_output(x, dim)


def _bias_act_backward_impl(
    grad_y: Tensor,
    saved: Tensor,
    bias: Optional[Tensor],
    weight: Optional[Tensor],
    weight2: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_bias, grad_weight, grad_weight2); a parameter's gradient is empty unless asked for and
    given (``compute_grad_weight`` asks for both learned parameters')."""
    if saved.numel() == 0:
        return (
            _channels.empty_output(saved, dim),
            _bias_grad_like(bias, compute_grad_bias, saved).zero_(),
            _bias_grad_like(weight, compute_grad_weight, saved).zero_(),
            _bias_grad_like(weight2, compute_grad_weight, saved).zero_(),
        )
    grad_x, grad_bias, grad_weight, grad_weight2 = _backend(saved).bias_act_backward(
        grad_y, saved, bias, weight, weight2, activation, param, param2, dim,
        saved_is_output, compute_grad_bias, compute_grad_weight,
    )  # fmt: skip
    return _in_layout(grad_x, saved, dim), grad_bias, grad_weight, grad_weight2


bias_act_backward = torch.library.custom_op("fusedact::bias_act_backward", _bias_act_backward_impl, mutates_args=())


@bias_act_backward.register_fake
def _(grad_y, saved, bias, weight, weight2, activation, param, param2, dim, saved_is_output, compute_grad_bias,
      compute_grad_weight):  # fmt: skip
    return (
        _channels.empty_output(saved, dim),
        _bias_grad_like(bias, compute_grad_bias, saved),
        _bias_grad_like(weight, compute_grad_weight, saved),
        _bias_grad_like(weight2, compute_grad_weight, saved),
    )


def _bias_act_setup_context(ctx, inputs, output):
    x, bias, weight, weight2, activation, param, param2, dim = inputs
    ctx.activation, ctx.param, ctx.param2, ctx.dim = activation, param, param2, dim
    ctx.saved_is_output = saves_output(activation, param)
    ctx.save_for_backward(*_for_backward(output if ctx.saved_is_output else x, bias, weight, weight2))


def _bias_act_grad(ctx, grad_y, backward):
    saved, bias, weight, weight2 = ctx.saved_tensors
    compute_grad_bias = bias is not None and ctx.needs_input_grad[1]
    wanted = [w is not None and needed for w, needed in zip((weight, weight2), ctx.needs_input_grad[2:4], strict=True)]
    grad_x, grad_bias, grad_weight, grad_weight2 = backward(
        grad_y, saved, bias, weight, weight2, ctx.activation, ctx.param, ctx.param2,
        ctx.dim, ctx.saved_is_output, compute_grad_bias, any(wanted),
    )  # fmt: skip
    return (
        grad_x,
        grad_bias if compute_grad_bias else None,
        grad_weight if wanted[0] else None,
        grad_weight2 if wanted[1] else None,
        None,
        None,
        None,
        None,
    )


run_bias_act = _entry(
    bias_act, _bias_act_impl, _bias_act_setup_context, _bias_act_grad, bias_act_backward, _bias_act_backward_impl,
    _fallback.bias_act_backward,  # same signature, differentiable PyTorch ops
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Gated (GLU) family: act(gate + gate_bias) * (up + up_bias)


def _gated_impl(
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
) -> Tensor:
    """act(s (gate + gate_bias)) * (up + up_bias) for two tensors of one shape, s = ``gate_scale``."""
    if gate.numel() == 0:
        return _empty_like(gate)
    return _backend(gate).gated(gate, up, gate_bias, up_bias, activation, param, param2, gate_scale).contiguous()


gated = torch.library.custom_op("fusedact::gated", _gated_impl, mutates_args=())


@gated.register_fake
def _(gate, up, gate_bias, up_bias, activation, param, param2, gate_scale):
    return _empty_like(gate)


def _gated_backward_triton(grad_gate, grad_up, grad_y, gate, up, gate_bias, up_bias, activation, param, param2,
                           gate_scale, compute):  # fmt: skip
    """Run the gated backward kernel into two [M, N] destinations; return (grad_gate_bias, grad_up_bias)
    fp32 sums, or (None, None)."""
    sums = _triton.gated_backward_into(
        _triton.as_matrix(grad_gate), _triton.as_matrix(grad_up), grad_y, gate, up,
        gate_bias, up_bias, activation, param, param2, gate_scale, compute,
    )  # fmt: skip
    return (None, None) if sums is None else (sums[0], sums[1])


def _cast_bias_grad(sums: Optional[Tensor], bias: Optional[Tensor], compute: bool, like: Tensor) -> Tensor:
    if bias is None or not compute or sums is None:
        return _bias_grad_like(bias, compute, like).zero_()
    return sums.to(bias.dtype, copy=True)  # the gate and up sums are views of one buffer: never alias


def _gated_backward_differentiable(
    grad_y: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_gated_backward_impl`` through the fallback, in differentiable PyTorch ops (also its double backward)."""
    return _fallback.gated_backward(
        grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias
    )


def _gated_backward_impl(
    grad_y: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_gate, grad_up, grad_gate_bias, grad_up_bias); a bias gradient is empty where not computed."""
    if gate.numel() == 0 or _backend(gate) is _fallback:
        if gate.numel() == 0:
            return (
                _empty_like(gate),
                _empty_like(up),
                _bias_grad_like(gate_bias, compute_grad_bias, gate).zero_(),
                _bias_grad_like(up_bias, compute_grad_bias, up).zero_(),
            )
        outputs = _gated_backward_differentiable(
            grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias
        )
        return tuple(t.contiguous() for t in outputs)
    grad_gate, grad_up = _empty_like(gate), _empty_like(up)
    gate_sums, up_sums = _gated_backward_triton(
        grad_gate,
        grad_up,
        grad_y,
        gate,
        up,
        gate_bias,
        up_bias,
        activation,
        param,
        param2,
        gate_scale,
        compute_grad_bias,
    )
    return (
        grad_gate,
        grad_up,
        _cast_bias_grad(gate_sums, gate_bias, compute_grad_bias, gate),
        _cast_bias_grad(up_sums, up_bias, compute_grad_bias, up),
    )


gated_backward = torch.library.custom_op("fusedact::gated_backward", _gated_backward_impl, mutates_args=())


@gated_backward.register_fake
def _(grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias):
    return (
        _empty_like(gate),
        _empty_like(up),
        _bias_grad_like(gate_bias, compute_grad_bias, gate),
        _bias_grad_like(up_bias, compute_grad_bias, up),
    )


def _gated_setup_context(ctx, inputs, output):
    gate, up, gate_bias, up_bias, activation, param, param2, gate_scale = inputs
    ctx.activation, ctx.param, ctx.param2, ctx.gate_scale = activation, param, param2, gate_scale
    ctx.save_for_backward(*_for_backward(gate, up, gate_bias, up_bias))


def _gated_grad(ctx, grad_y, backward):
    gate, up, gate_bias, up_bias = ctx.saved_tensors
    compute = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grad_gate, grad_up, grad_gate_bias, grad_up_bias = backward(
        grad_y, gate, up, gate_bias, up_bias, ctx.activation, ctx.param, ctx.param2, ctx.gate_scale, compute
    )
    return (
        grad_gate,
        grad_up,
        grad_gate_bias if (gate_bias is not None and compute) else None,
        grad_up_bias if (up_bias is not None and compute) else None,
        None,
        None,
        None,
        None,
    )


run_gated = _entry(
    gated, _gated_impl, _gated_setup_context, _gated_grad, gated_backward, _gated_backward_impl,
    _gated_backward_differentiable,
)  # fmt: skip


def _halves(t: Tensor, gate_first: bool) -> tuple[Tensor, Tensor]:
    """(gate, up) views of the two halves of a packed ``[..., 2N]`` tensor: read in place, never copied.
    ``gate_first``: ``[gate | up]`` (Llama's fused gate_up_proj); else ``[up | gate]`` (``F.glu``)."""
    half = t.shape[-1] // 2
    first, second = t[..., :half], t[..., half:]
    return (first, second) if gate_first else (second, first)


def _bias_halves(bias: Optional[Tensor], gate_first: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return (None, None) if bias is None else _halves(bias, gate_first)


def _gated_packed_impl(
    x: Tensor, bias: Optional[Tensor], activation: str, param: float, param2: float, gate_scale: float,
    gate_first: bool,
) -> Tensor:  # fmt: skip
    """act(s (gate + gate_bias)) * (up + up_bias) for the halves of a packed ``x`` of width 2N (see _halves)."""
    gate, up = _halves(x, gate_first)
    if gate.numel() == 0:
        return _empty_like(gate)
    gate_bias, up_bias = _bias_halves(bias, gate_first)
    return _backend(x).gated(gate, up, gate_bias, up_bias, activation, param, param2, gate_scale).contiguous()


gated_packed = torch.library.custom_op("fusedact::gated_packed", _gated_packed_impl, mutates_args=())


@gated_packed.register_fake
def _(x, bias, activation, param, param2, gate_scale, gate_first):
    return _empty_like(_halves(x, gate_first)[0])


def _gated_packed_backward_impl(
    grad_y: Tensor,
    x: Tensor,
    bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    gate_first: bool,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_bias) for ``gated_packed``; the kernel writes both halves of grad_x in place."""
    if x.numel() == 0 or _backend(x) is _fallback:
        return _packed_from_halves(
            _gated_backward_impl, grad_y, x, bias, activation, param, param2, gate_scale, gate_first,
            compute_grad_bias,
        )  # fmt: skip
    gate, up = _halves(x, gate_first)
    gate_bias, up_bias = _bias_halves(bias, gate_first)
    grad_x = _empty_like(x)
    grad_gate, grad_up = _halves(_triton.as_matrix(grad_x), gate_first)
    gate_sums, up_sums = _gated_backward_triton(
        grad_gate,
        grad_up,
        grad_y,
        gate,
        up,
        gate_bias,
        up_bias,
        activation,
        param,
        param2,
        gate_scale,
        compute_grad_bias,
    )
    if bias is None or not compute_grad_bias:
        return grad_x, x.new_empty(0)
    return grad_x, torch.cat(_halves_in_order(gate_sums, up_sums, gate_first)).to(bias.dtype)


def _halves_in_order(gate_part: Tensor, up_part: Tensor, gate_first: bool) -> list[Tensor]:
    return [gate_part, up_part] if gate_first else [up_part, gate_part]


def _packed_from_halves(
    gated_backward_fn,
    grad_y: Tensor,
    x: Tensor,
    bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    gate_first: bool,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor]:
    """The packed backward as ``gated_backward_fn`` (``_gated_backward_impl`` or its differentiable twin)
    on the two halves, its gradients concatenated back into the packed layout."""
    gate, up = _halves(x, gate_first)
    gate_bias, up_bias = _bias_halves(bias, gate_first)
    grad_gate, grad_up, grad_gate_bias, grad_up_bias = gated_backward_fn(
        grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias
    )
    grad_bias = _bias_grad_like(bias, compute_grad_bias, x)
    if grad_bias.numel():
        grad_bias = torch.cat(_halves_in_order(grad_gate_bias, grad_up_bias, gate_first))
    return torch.cat(_halves_in_order(grad_gate, grad_up, gate_first), dim=-1), grad_bias


def _gated_packed_backward_differentiable(
    grad_y, x, bias, activation, param, param2, gate_scale, gate_first, compute_grad_bias
):
    return _packed_from_halves(
        _gated_backward_differentiable, grad_y, x, bias, activation, param, param2, gate_scale, gate_first,
        compute_grad_bias,
    )  # fmt: skip


gated_packed_backward = torch.library.custom_op(
    "fusedact::gated_packed_backward", _gated_packed_backward_impl, mutates_args=()
)


@gated_packed_backward.register_fake
def _(grad_y, x, bias, activation, param, param2, gate_scale, gate_first, compute_grad_bias):
    return _empty_like(x), _bias_grad_like(bias, compute_grad_bias, x)


def _gated_packed_setup_context(ctx, inputs, output):
    x, bias, activation, param, param2, gate_scale, gate_first = inputs
    ctx.activation, ctx.param, ctx.param2, ctx.gate_scale, ctx.gate_first = (
        activation, param, param2, gate_scale, gate_first,
    )  # fmt: skip
    ctx.save_for_backward(*_for_backward(x, bias))


def _gated_packed_grad(ctx, grad_y, backward):
    x, bias = ctx.saved_tensors
    compute = bias is not None and ctx.needs_input_grad[1]
    grad_x, grad_bias = backward(
        grad_y, x, bias, ctx.activation, ctx.param, ctx.param2, ctx.gate_scale,
        ctx.gate_first, compute,
    )  # fmt: skip
    return grad_x, (grad_bias if compute else None), None, None, None, None, None


run_gated_packed = _entry(
    gated_packed, _gated_packed_impl, _gated_packed_setup_context, _gated_packed_grad,
    gated_packed_backward, _gated_packed_backward_impl, _gated_packed_backward_differentiable,
)  # fmt: skip
