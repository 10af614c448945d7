"""Lean MLP blocks: the whole MLP as one autograd unit that keeps half of eager's activation memory.

In a transformer's MLP with ``T`` tokens, hidden ``H`` and intermediate ``F``, the activations kept for the
backward pass are, beside the block's input ``x`` [T, H] (weights not counted):

====================================  =======================  ===================  ==========
block                                 eager PyTorch            ``fusedact.patch``   lean block
====================================  =======================  ===================  ==========
gated ``down(act(gate(x)) * up(x))``  gate, up, act(gate), h   gate, up, h          gate, up
two-layer ``fc2(act(fc1(x)))``        z, act(z)                z, act(z)            z
====================================  =======================  ===================  ==========

``h = act(gate) * up`` (or ``act(z)``) is the last projection's input, kept only because that projection's
weight gradient ``grad_W = grad_out^T h`` needs it. The fused activation backward already
reads everything that recomputes it (``gate`` and ``up`` or ``z``, and the incoming gradient), so it
writes ``h`` beside the input gradients (``output=`` of the launchers in ``_triton``: one extra write, no
extra read) just before that weight gradient is computed. A gated block then keeps 2 x [T, F] (eager 4,
patch 3) and a two-layer block 1 x [T, F] (eager 2, patch 2), and no GEMM is recomputed (activation
checkpointing recomputes all of them). Gradients are bitwise those of the fused path
(``F.linear`` -> ``fusedact.gated`` / ``fusedact.bias_act`` -> ``F.linear``):

- the GEMMs stay PyTorch's and are the calls autograd makes for ``F.linear``: forward ``addmm``/``mm`` on
  the rows ``x.reshape(-1, H)``; backward ``mm_mat1_backward``/``mm_mat2_backward`` (whose transposes
  depend on each operand's layout), a bias gradient summed as ``at::sum_to`` sums it;
- the activation and its backward are the fused path's own kernels (or fallback), and the recomputed ``h``
  is computed as the forward computed it.

Two-layer blocks whose activation's backward reads its output (relu, leaky_relu with a slope >= 0, sigmoid,
tanh: ``ops.saves_output``) gain nothing: eager's activation and second projection already share that one
tensor, so ``mlp`` runs the plain fused path for them. Under ``no_grad`` nothing is saved; double backward
(``create_graph=True``) differentiates the block recomputed in PyTorch ops (exact, not the kernels).

The ``*_of`` entries take the layers (``nn.Linear``, transformers' ``Conv1D``, and the bias-skipping layers
``fusedact.patch`` makes) and run the lean block only where it computes everything the layers would: see
``lean_layer``. Elsewhere (hooks, a LoRA-style wrapper, a ``DTensor`` weight under tensor parallelism), and
without grad (nothing to keep), they call the layers themselves, which is the fused path. ``fusedact.patch``
makes the MLPs it proves call them (``patching.gated_mlp``, ``patching.lean_mlp``). Under tensor
parallelism a folded bias that is a ``DTensor`` reaches the kernel as its local shard (``local_bias``), and
``register_dtensor_sharding`` (which fusedact's ops call when they first meet a DTensor) lets them take
DTensor activations.

    >>> x = torch.randn(4, 16, 32, requires_grad=True)
    >>> gate_w, up_w, down_w = torch.randn(88, 32), torch.randn(88, 32), torch.randn(32, 88)
    >>> out = fusedact.mlp.gated_mlp(x, gate_w, up_w, down_w)  # down(silu(gate(x)) * up(x)): SwiGLU
    >>> out = fusedact.mlp.mlp(x, torch.randn(128, 32), torch.randn(32, 128), torch.zeros(128), None, "gelu")
"""

import typing
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

from . import _fallback, functional, ops
from .patching import layers as patched_layers
from .patching.layers import local_bias  # noqa: F401  (public here: fusedact.mlp.local_bias)

_PLAIN_TENSORS = (Tensor, nn.Parameter)
# Which gradients a backward op computes: typing.List, which torch 2.5's custom-op schema inference takes
# (it refuses list[bool]).
Flags = typing.List[bool]  # noqa: UP006
_CONV1D = "transformers.pytorch_utils.Conv1D"


# ---------------------------------------------------------------------------------------------------
# Projections as autograd runs F.linear (and transformers' Conv1D): one GEMM over the rows of x. A
# projection is given as its [in, out] matrix M: ``weight.t()`` for nn.Linear (the view F.linear itself
# makes, so the gradient reaches the weight through the same transpose), ``weight`` for Conv1D.


def _rows(t: Tensor) -> Tensor:
    """``t`` as the [rows, features] matrix the GEMM sees: itself if 2-D, else ``reshape(-1, features)``
    (a view where the leading dimensions allow one, else a copy, as ``F.linear``'s folding makes it)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _project(x: Tensor, matrix: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ matrix + bias`` as ``F.linear`` computes it (``addmm`` with a bias, else ``mm``), shaped like
    ``x`` with the last dimension ``matrix.shape[1]``. An ``x`` with a bias is 2-D or contiguous here (then
    ``F.linear`` makes this one ``addmm`` too)."""
    x2 = _rows(x)
    out = x2.mm(matrix) if bias is None else torch.addmm(bias, x2, matrix)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], matrix.shape[1])


def _column_major(t: Tensor) -> bool:
    """The layout test of autograd's ``mm_mat1_backward``/``mm_mat2_backward``: a transposed matrix."""
    return t.stride(0) == 1 and t.stride(1) == t.shape[0]


def _grad_input(grad2: Tensor, matrix: Tensor, x2: Tensor) -> Tensor:
    """Gradient of ``x2`` in ``x2 @ matrix`` (autograd's ``mm_mat1_backward``; only ``x2``'s layout is read)."""
    return matrix.mm(grad2.t()).t() if _column_major(x2) else grad2.mm(matrix.t())


def _grad_matrix(grad2: Tensor, x2: Tensor, matrix: Tensor) -> Tensor:
    """Gradient of ``matrix`` in ``x2 @ matrix`` (autograd's ``mm_mat2_backward``): laid out as the matrix
    when it is a transpose (nn.Linear's ``weight.t()``), so ``weight.grad`` comes out contiguous."""
    return grad2.t().mm(x2).t() if _column_major(matrix) else x2.t().mm(grad2)


def _grad_matrix_like(matrix: Tensor) -> Tensor:
    """An uninitialised tensor laid out as ``_grad_matrix`` lays out its result (for the fake impls)."""
    return matrix.new_empty(matrix.shape[::-1]).t() if _column_major(matrix) else matrix.new_empty(matrix.shape)


def _sum_to(grad2: Tensor, bias: Tensor) -> Tensor:
    """A GEMM bias's gradient as autograd reduces a broadcast input's (``at::sum_to``): the sum over the
    rows kept as a [1, N] row, viewed as the bias."""
    return grad2.sum(0, keepdim=True).view(bias.shape)


def _project_backward(
    grad2: Tensor, x2: Tensor, matrix: Tensor, need_input: bool, need_matrix: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return (
        _grad_input(grad2, matrix, x2) if need_input else None,
        _grad_matrix(grad2, x2, matrix) if need_matrix else None,
    )


def _input_grad(grad_x2: Tensor, x: Tensor) -> Tensor:
    """The block input's gradient from its rows' gradient, contiguous (a transposed ``x`` would give a
    transposed one; the fake implementations promise one layout)."""
    return grad_x2.reshape(x.shape).contiguous()


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op returns tensors only: an empty one stands for a gradient not computed."""
    return like.new_empty(0) if t is None else t


def _empty(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _projected_shape(x: Tensor, matrix: Tensor) -> tuple[int, ...]:
    return (*x.shape[:-1], matrix.shape[1])


# ---------------------------------------------------------------------------------------------------
# The activation and its backward as the fused ops compute them, the forward output written again.


def _gated_forward(gate, up, gate_bias, up_bias, activation: str, param: float, param2: float) -> Tensor:
    """``ops.gated``'s forward: act(gate + gate_bias) * (up + up_bias), contiguous."""
    if gate.numel() == 0:
        return _empty(gate.shape, gate)
    return ops._backend(gate).gated(gate, up, gate_bias, up_bias, activation, param, param2, 1.0).contiguous()


def _bias_grads(sums, gate_bias, up_bias, compute: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gate and up bias gradients from the kernel's fp32 sums ([2, N], or None for no rows), rounded once."""
    grads = []
    for index, bias in enumerate((gate_bias, up_bias)):
        if bias is None or not compute:
            grads.append(None)
        elif sums is None:
            grads.append(torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device))
        else:
            grads.append(sums[index].to(bias.dtype, copy=True))
    return grads[0], grads[1]


def _gated_backward_recompute(
    grad_h: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    compute_grad_bias: bool,
    grad_gate: Tensor,
    grad_up: Tensor,
    h: Tensor,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``ops.gated_backward`` into ``grad_gate``/``grad_up`` (two buffers, or the halves of one packed
    buffer), with ``h = act(gate) * up`` written again into ``h`` (contiguous): by the kernel beside the
    gradients, or on the fallback by the fallback's own forward (the function the forward pass ran, so ``h``
    is bitwise the forward's). Returns (grad_gate_bias, grad_up_bias), None where not computed."""
    if gate.numel() == 0:
        return _bias_grads(None, gate_bias, up_bias, compute_grad_bias)
    backend = ops._backend(gate)
    if backend is _fallback:
        gradients = _fallback.gated_backward(
            grad_h, gate, up, gate_bias, up_bias, activation, param, param2, 1.0, compute_grad_bias
        )
        grad_gate.copy_(gradients[0])
        grad_up.copy_(gradients[1])
        h.copy_(_fallback.gated(gate, up, gate_bias, up_bias, activation, param, param2, 1.0))
        return tuple(
            grad if (bias is not None and compute_grad_bias) else None
            for grad, bias in zip(gradients[2:], (gate_bias, up_bias), strict=True)
        )
    sums = backend.gated_backward_into(
        backend.as_matrix(grad_gate), backend.as_matrix(grad_up), grad_h, gate, up, gate_bias, up_bias,
        activation, param, param2, 1.0, compute_grad_bias, output=h,
    )  # fmt: skip
    return _bias_grads(sums, gate_bias, up_bias, compute_grad_bias)


def _single_forward(z: Tensor, bias: Optional[Tensor], activation: str, param: float, param2: float) -> Tensor:
    """``ops.bias_act``'s forward with the bias on the last dimension: act(z + bias), contiguous."""
    if z.numel() == 0:
        return _empty(z.shape, z)
    return ops._backend(z).bias_act(z, bias, None, None, activation, param, param2, z.dim() - 1).contiguous()


def _single_backward_recompute(
    grad_a: Tensor,
    z: Tensor,
    bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    compute: bool,
    a: Tensor,
) -> tuple[Tensor, Optional[Tensor]]:
    """``ops.bias_act_backward`` for a saved input ``z`` (bias on the last dimension), with ``a = act(z +
    bias)`` written again into ``a``, by the kernel or by the fallback's own forward. Returns (grad_z,
    grad_bias or None)."""
    compute = compute and bias is not None
    if z.numel() == 0:
        zero = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if compute else None
        return _empty(z.shape, z), zero
    backend, dim = ops._backend(z), z.dim() - 1
    if backend is _fallback:
        grad_z, grad_bias, _, _ = _fallback.bias_act_backward(
            grad_a, z, bias, None, None, activation, param, param2, dim, False, compute, False
        )
        a.copy_(_fallback.bias_act(z, bias, None, None, activation, param, param2, dim))
    else:
        grad_z, grad_bias, _, _ = backend.bias_act_backward(
            grad_a, z, bias, None, None, activation, param, param2, dim, False, compute, False, output=a
        )
    return grad_z.contiguous(), (grad_bias if compute else None)


# ---------------------------------------------------------------------------------------------------
# What every block shares: setup, double backward, fake gradients.


def _prepare_backward(ctx, output: tuple, *saved: Optional[Tensor]) -> None:
    """A block returns its saved intermediates beside its output (a custom op saves only inputs and
    outputs); no gradient flows into them, autograd allocates no zero gradient for them, and ``saved`` is
    all that is kept."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*ops._for_backward(*saved))


def _differentiable(reference, grad_out: Tensor, inputs: Sequence[Optional[Tensor]], rest: tuple, needs) -> tuple:
    """A block's gradients, themselves differentiable (grad mode is on: create_graph=True): autograd through
    ``reference``, the block in PyTorch ops recomputed from the saved inputs, so the second derivatives are
    PyTorch's own."""
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs, strict=True)) if need and t is not None]
    with torch.enable_grad():
        out = reference(*inputs, *rest)
        grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    by_index = dict(zip(wanted, grads, strict=True))
    result = []
    for index, t in enumerate(inputs):
        if index not in by_index:
            result.append(inputs[0].new_empty(0))
        else:  # None: the output does not depend on it (no rows)
            result.append(torch.zeros_like(t) if by_index[index] is None else by_index[index])
    return tuple(result)


def _fake_grads(needs: Sequence[bool], inputs: Sequence[Optional[Tensor]]) -> tuple[Tensor, ...]:
    """Fake gradients laid out as the implementations lay them out: the block input contiguous, matrices as
    ``_grad_matrix``, biases contiguous, an empty tensor where not asked for."""
    grads = []
    for index, (need, t) in enumerate(zip(needs, inputs, strict=True)):
        if not need or t is None:
            grads.append(inputs[0].new_empty(0))
        elif index == 0 or t.dim() != 2:
            grads.append(_empty(t.shape, t))
        else:
            grads.append(_grad_matrix_like(t))
    return tuple(grads)


def _grads_for(needs: Sequence[bool], grads: Sequence[Tensor], num_inputs: int) -> tuple:
    """The formula's result: the gradient of each tensor input that needs one, None for the rest."""
    tensor_grads = tuple(g if need else None for g, need in zip(grads, needs, strict=True))
    return (*tensor_grads, *(None,) * (num_inputs - len(tensor_grads)))


# ---------------------------------------------------------------------------------------------------
# Gated block: down(act(x @ Mg + bg) * (x @ Mu + bu)) + bd. Saves x, gate, up.


def _gated_mlp_impl(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    down_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, gate, up) for [in, out] projection matrices (``weight.t()`` of an nn.Linear); ``gate`` and
    ``up`` are for the backward pass (the public functions return ``out`` only)."""
    gate, up = _project(x, w_gate), _project(x, w_up)
    h = _gated_forward(gate, up, gate_bias, up_bias, activation, param, param2)
    return _project(h, w_down, down_bias), gate, up


gated_mlp_op = torch.library.custom_op("fusedact::lean_gated_mlp", _gated_mlp_impl, mutates_args=())


@gated_mlp_op.register_fake
def _(x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation, param, param2):
    inner = _projected_shape(x, w_gate)
    return _empty(_projected_shape(x, w_down), x), _empty(inner, x), _empty(inner, x)


def _gated_mlp_backward_impl(
    grad_out: Tensor,
    x: Tensor,
    gate: Tensor,
    up: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    gate_bias: Optional[Tensor],
    up_bias: Optional[Tensor],
    down_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    needs: Flags,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias) where ``needs`` asks for them.
    In the fused path's order: the down projection's input gradient, the activation backward (which also
    writes h), the down weight and bias gradients (h is freed after), the gate and up projections."""
    need_x, need_gate_w, need_up_w, need_down_w, need_gate_b, need_up_b, need_down_b = needs
    grad2 = _rows(grad_out)
    h = _empty(gate.shape, gate)  # the forward's h, written by the activation backward
    grad_h = _grad_input(grad2, w_down, _rows(h)).reshape(gate.shape)
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    compute_bias = (need_gate_b and gate_bias is not None) or (need_up_b and up_bias is not None)
    grad_gate_bias, grad_up_bias = _gated_backward_recompute(
        grad_h, gate, up, gate_bias, up_bias, activation, param, param2, compute_bias, grad_gate, grad_up, h
    )
    del grad_h
    grad_w_down = _grad_matrix(grad2, _rows(h), w_down) if need_down_w else None
    del h
    grad_down_bias = _sum_to(grad2, down_bias) if need_down_b and down_bias is not None else None
    x2 = _rows(x)
    grad_x_gate, grad_w_gate = _project_backward(_rows(grad_gate), x2, w_gate, need_x, need_gate_w)
    grad_x_up, grad_w_up = _project_backward(_rows(grad_up), x2, w_up, need_x, need_up_w)
    # x fed both projections: autograd adds the two contributions (in either order, a + b == b + a)
    grad_x = _input_grad(grad_x_gate + grad_x_up, x) if need_x else None
    grads = (grad_x, grad_w_gate, grad_w_up, grad_w_down, grad_gate_bias, grad_up_bias, grad_down_bias)
    return tuple(_or_empty(g if need else None, x) for g, need in zip(grads, needs, strict=True))


gated_mlp_backward_op = torch.library.custom_op(
    "fusedact::lean_gated_mlp_backward", _gated_mlp_backward_impl, mutates_args=()
)


@gated_mlp_backward_op.register_fake
def _(grad_out, x, gate, up, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation, param, param2, needs):
    return _fake_grads(needs, (x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias))


def _gated_mlp_reference(x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation, param, param2) -> Tensor:
    """The gated block in differentiable PyTorch ops (the fallback's activation), for double backward."""
    gate, up = _project(x, w_gate), _project(x, w_up)
    h = _fallback.gated(gate, up, gate_bias, up_bias, activation, param, param2, 1.0).contiguous()
    return _project(h, w_down, down_bias)


def _gated_mlp_backward_differentiable(
    grad_out, x, gate, up, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation, param, param2, needs
):
    inputs = (x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias)
    return _differentiable(_gated_mlp_reference, grad_out, inputs, (activation, param, param2), needs)


def _gated_mlp_setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation, param, param2 = inputs
    ctx.activation, ctx.param, ctx.param2 = activation, param, param2
    _prepare_backward(ctx, output, x, output[1], output[2], w_gate, w_up, w_down, gate_bias, up_bias, down_bias)


def _gated_mlp_grad(ctx, grad_out, _grad_gate, _grad_up, backward):
    x, gate, up, w_gate, w_up, w_down, gate_bias, up_bias, down_bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])
    if grad_out is None:
        return (None,) * 10
    grads = backward(
        grad_out,
        x,
        gate,
        up,
        w_gate,
        w_up,
        w_down,
        gate_bias,
        up_bias,
        down_bias,
        ctx.activation,
        ctx.param,
        ctx.param2,
        needs,
    )
    return _grads_for(needs, grads, 10)


run_gated_mlp = ops._entry(
    gated_mlp_op, _gated_mlp_impl, _gated_mlp_setup_context, _gated_mlp_grad,
    gated_mlp_backward_op, _gated_mlp_backward_impl, _gated_mlp_backward_differentiable,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Gated block with one packed projection: x @ M + b = [gate | up] (gate_first; else [up | gate]), read in
# place by the kernels. Saves x and the packed [T, 2F] (the same 2 x [T, F]).


def _halves(t: Tensor, gate_first: bool) -> tuple[Tensor, Tensor]:
    half = t.shape[-1] // 2
    first, second = t[..., :half], t[..., half:]
    return (first, second) if gate_first else (second, first)


def _bias_halves(bias: Optional[Tensor], gate_first: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    return (None, None) if bias is None else _halves(bias, gate_first)


def _gated_mlp_packed_impl(
    x: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up_bias: Optional[Tensor],
    down_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_first: bool,
) -> tuple[Tensor, Tensor]:
    """(out, gate_up): ``ops.gated_packed`` between the projections; ``gate_up`` for the backward pass."""
    gate_up = _project(x, w_gate_up)
    h = _gated_forward(
        *_halves(gate_up, gate_first), *_bias_halves(gate_up_bias, gate_first), activation, param, param2
    )
    return _project(h, w_down, down_bias), gate_up


gated_mlp_packed_op = torch.library.custom_op(
    "fusedact::lean_gated_mlp_packed", _gated_mlp_packed_impl, mutates_args=()
)


@gated_mlp_packed_op.register_fake
def _(x, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first):
    return _empty(_projected_shape(x, w_down), x), _empty(_projected_shape(x, w_gate_up), x)


def _gated_mlp_packed_backward_impl(
    grad_out: Tensor,
    x: Tensor,
    gate_up: Tensor,
    w_gate_up: Tensor,
    w_down: Tensor,
    gate_up_bias: Optional[Tensor],
    down_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    gate_first: bool,
    needs: Flags,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, w_gate_up, w_down, gate_up_bias, down_bias) where ``needs`` asks for them; the
    activation backward writes both halves of the packed gradient in place, as ``ops.gated_packed``'s."""
    need_x, need_gate_up_w, need_down_w, need_gate_up_b, need_down_b = needs
    gate, up = _halves(gate_up, gate_first)
    gate_bias, up_bias = _bias_halves(gate_up_bias, gate_first)
    grad2 = _rows(grad_out)
    h = _empty(gate.shape, gate)
    grad_h = _grad_input(grad2, w_down, _rows(h)).reshape(gate.shape)
    grad_gate_up = torch.empty_like(gate_up)
    compute_bias = need_gate_up_b and gate_up_bias is not None
    grad_gate_bias, grad_up_bias = _gated_backward_recompute(
        grad_h,
        gate,
        up,
        gate_bias,
        up_bias,
        activation,
        param,
        param2,
        compute_bias,
        *_halves(grad_gate_up, gate_first),
        h,
    )
    del grad_h
    grad_w_down = _grad_matrix(grad2, _rows(h), w_down) if need_down_w else None
    del h
    grad_down_bias = _sum_to(grad2, down_bias) if need_down_b and down_bias is not None else None
    grad_gate_up_bias = None
    if compute_bias:
        grad_gate_up_bias = torch.cat([grad_gate_bias, grad_up_bias] if gate_first else [grad_up_bias, grad_gate_bias])
    grad_x2, grad_w_gate_up = _project_backward(_rows(grad_gate_up), _rows(x), w_gate_up, need_x, need_gate_up_w)
    grad_x = _input_grad(grad_x2, x) if need_x else None
    grads = (grad_x, grad_w_gate_up, grad_w_down, grad_gate_up_bias, grad_down_bias)
    return tuple(_or_empty(g, x) for g in grads)


gated_mlp_packed_backward_op = torch.library.custom_op(
    "fusedact::lean_gated_mlp_packed_backward", _gated_mlp_packed_backward_impl, mutates_args=()
)


@gated_mlp_packed_backward_op.register_fake
def _(grad_out, x, gate_up, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first, needs):
    return _fake_grads(needs, (x, w_gate_up, w_down, gate_up_bias, down_bias))


def _gated_mlp_packed_reference(x, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first):
    gate, up = _halves(_project(x, w_gate_up), gate_first)
    h = _fallback.gated(gate, up, *_bias_halves(gate_up_bias, gate_first), activation, param, param2, 1.0).contiguous()
    return _project(h, w_down, down_bias)


def _gated_mlp_packed_backward_differentiable(
    grad_out, x, gate_up, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first, needs
):
    inputs = (x, w_gate_up, w_down, gate_up_bias, down_bias)
    return _differentiable(
        _gated_mlp_packed_reference, grad_out, inputs, (activation, param, param2, gate_first), needs
    )


def _gated_mlp_packed_setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first = inputs
    ctx.activation, ctx.param, ctx.param2, ctx.gate_first = activation, param, param2, gate_first
    _prepare_backward(ctx, output, x, output[1], w_gate_up, w_down, gate_up_bias, down_bias)


def _gated_mlp_packed_grad(ctx, grad_out, _grad_gate_up, backward):
    x, gate_up, w_gate_up, w_down, gate_up_bias, down_bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if grad_out is None:
        return (None,) * 9
    grads = backward(
        grad_out, x, gate_up, w_gate_up, w_down, gate_up_bias, down_bias,
        ctx.activation, ctx.param, ctx.param2, ctx.gate_first, needs,
    )  # fmt: skip
    return _grads_for(needs, grads, 9)


run_gated_mlp_packed = ops._entry(
    gated_mlp_packed_op, _gated_mlp_packed_impl, _gated_mlp_packed_setup_context, _gated_mlp_packed_grad,
    gated_mlp_packed_backward_op, _gated_mlp_packed_backward_impl, _gated_mlp_packed_backward_differentiable,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Two-layer block: act(x @ M1 + b1) @ M2 + b2, the first bias added in the activation's kernel. Saves x, z.


def _mlp_impl(
    x: Tensor,
    w_first: Tensor,
    w_second: Tensor,
    first_bias: Optional[Tensor],
    second_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
) -> tuple[Tensor, Tensor]:
    """(out, z) with ``z = x @ M1`` (before the first bias), for the backward pass."""
    z = _project(x, w_first)
    a = _single_forward(z, first_bias, activation, param, param2)
    return _project(a, w_second, second_bias), z


mlp_op = torch.library.custom_op("fusedact::lean_mlp", _mlp_impl, mutates_args=())


@mlp_op.register_fake
def _(x, w_first, w_second, first_bias, second_bias, activation, param, param2):
    return _empty(_projected_shape(x, w_second), x), _empty(_projected_shape(x, w_first), x)


def _mlp_backward_impl(
    grad_out: Tensor,
    x: Tensor,
    z: Tensor,
    w_first: Tensor,
    w_second: Tensor,
    first_bias: Optional[Tensor],
    second_bias: Optional[Tensor],
    activation: str,
    param: float,
    param2: float,
    needs: Flags,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, w_first, w_second, first_bias, second_bias) where ``needs`` asks for them."""
    need_x, need_first_w, need_second_w, need_first_b, need_second_b = needs
    grad2 = _rows(grad_out)
    a = _empty(z.shape, z)  # the forward's act(z + b1), written by the activation backward
    grad_a = _grad_input(grad2, w_second, _rows(a)).reshape(z.shape)
    grad_z, grad_first_bias = _single_backward_recompute(
        grad_a, z, first_bias, activation, param, param2, need_first_b, a
    )
    del grad_a
    grad_w_second = _grad_matrix(grad2, _rows(a), w_second) if need_second_w else None
    del a
    grad_second_bias = _sum_to(grad2, second_bias) if need_second_b and second_bias is not None else None
    grad_x2, grad_w_first = _project_backward(_rows(grad_z), _rows(x), w_first, need_x, need_first_w)
    grad_x = _input_grad(grad_x2, x) if need_x else None
    grads = (grad_x, grad_w_first, grad_w_second, grad_first_bias, grad_second_bias)
    return tuple(_or_empty(g, x) for g in grads)


mlp_backward_op = torch.library.custom_op("fusedact::lean_mlp_backward", _mlp_backward_impl, mutates_args=())


@mlp_backward_op.register_fake
def _(grad_out, x, z, w_first, w_second, first_bias, second_bias, activation, param, param2, needs):
    return _fake_grads(needs, (x, w_first, w_second, first_bias, second_bias))


def _mlp_reference(x, w_first, w_second, first_bias, second_bias, activation, param, param2) -> Tensor:
    z = _project(x, w_first)
    a = _fallback.bias_act(z, first_bias, None, None, activation, param, param2, z.dim() - 1).contiguous()
    return _project(a, w_second, second_bias)


def _mlp_backward_differentiable(
    grad_out, x, z, w_first, w_second, first_bias, second_bias, activation, param, param2, needs
):
    inputs = (x, w_first, w_second, first_bias, second_bias)
    return _differentiable(_mlp_reference, grad_out, inputs, (activation, param, param2), needs)


def _mlp_setup_context(ctx, inputs, output):
    x, w_first, w_second, first_bias, second_bias, activation, param, param2 = inputs
    ctx.activation, ctx.param, ctx.param2 = activation, param, param2
    _prepare_backward(ctx, output, x, output[1], w_first, w_second, first_bias, second_bias)


def _mlp_grad(ctx, grad_out, _grad_z, backward):
    x, z, w_first, w_second, first_bias, second_bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if grad_out is None:
        return (None,) * 8
    grads = backward(
        grad_out, x, z, w_first, w_second, first_bias, second_bias, ctx.activation, ctx.param, ctx.param2, needs
    )
    return _grads_for(needs, grads, 8)


run_mlp = ops._entry(
    mlp_op, _mlp_impl, _mlp_setup_context, _mlp_grad, mlp_backward_op, _mlp_backward_impl,
    _mlp_backward_differentiable,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Public functions: weights as nn.Linear holds them ([out, in]).


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives a GEMM on ``x``'s device, or None (the device types autocast has: asking
    another, or ``torch.amp.is_autocast_available``, which torch 2.5's compiler cannot trace, is avoided)."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """What autocast makes of a GEMM operand: floating tensors other than float64 in the autocast dtype.
    Under autocast every projection is such a GEMM, and a folded bias takes the GEMM output's dtype (as
    ``fusedact.patch`` casts it), so the whole block runs in that dtype."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _check_weight(weight, name: str, shape: tuple[int, int], x: Tensor, along: str) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or tuple(weight.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({along}), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name} dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device} but x is on {x.device}")


def _check_bias(bias, name: str, width: int, x: Tensor, along: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() != 1 or bias.shape[0] != width:
        raise ValueError(f"{name} must have shape ({width},) ({along}), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype:
        raise TypeError(f"{name} dtype {bias.dtype} does not match x dtype {x.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{name} is on {bias.device} but x is on {x.device}")


def _check_x(x) -> None:
    functional._check_input(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (its last is the features)")


def _plain(*tensors: Optional[Tensor]) -> bool:
    """Every tensor a plain one (no DTensor or other subclass, whose dispatch the lean block would skip)."""
    return all(type(t) in _PLAIN_TENSORS for t in tensors if t is not None)


def _folds(x: Tensor, *weights: Tensor) -> bool:
    """Whether ``F.linear(x, w)`` is one GEMM over ``x``'s rows for each of ``weights``, as the lean block
    computes it. It is for 2-D ``x``; for more dimensions ``F.linear`` folds the rows when the weight
    requires grad (training) or when the rows are packed (``matmul``'s ``should_fold``); otherwise it runs a
    batched GEMM, and the lean block leaves such calls to the plain path."""
    if x.dim() <= 2 or x.numel() == 0:
        return True
    if torch.is_grad_enabled() and all(w.requires_grad for w in weights):
        return True
    strides, shape = x.stride(), x.shape
    return all(strides[i] == strides[i + 1] * shape[i + 1] for i in range(x.dim() - 1))


def _squeezed(run, x: Tensor, *rest) -> Tensor:
    """``run`` on a 2-D view of a 1-D ``x`` (as ``F.linear`` does: ``unsqueeze(0)``, one GEMM row)."""
    if x.dim() == 1:
        return run(x.unsqueeze(0), *rest)[0].squeeze(0)
    return run(x, *rest)[0]


def gated_mlp(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    activation: str = "silu",
    **params,
) -> Tensor:
    """``F.linear(act(x W_g^T + b_g) * (x W_u^T + b_u), W_d, b_d)``, keeping x, gate and up for backward.

    The Llama-style MLP (SwiGLU: ``"silu"``; GeGLU: ``"gelu"``, ``approximate=...``; ReGLU: ``"relu"``; any
    single-input activation of ``fusedact.functional.ACTIVATIONS``). Weights as ``nn.Linear`` holds them:
    ``gate_weight``/``up_weight`` [F, H], ``down_weight`` [H_out, F]; the gate/up biases are added in the
    activation's kernel, the down bias in its GEMM. Same values and gradients as ``F.linear`` ->
    ``fusedact.gated`` -> ``F.linear``, with one [T, F] tensor fewer kept for backward.

        >>> mlp = transformers_llama_model.model.layers[0].mlp
        >>> out = fusedact.mlp.gated_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    """
    _check_x(x)
    kernel_activation, param, param2 = functional._resolve(activation, params)
    dtype = _autocast_dtype(x)
    x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias = (
        _cast(t, dtype) for t in (x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    )
    hidden = x.shape[-1]
    if not isinstance(gate_weight, Tensor) or gate_weight.dim() != 2:
        _check_weight(gate_weight, "gate_weight", (-1, hidden), x, "[intermediate, x.shape[-1]]")
    intermediate = gate_weight.shape[0]
    _check_weight(gate_weight, "gate_weight", (intermediate, hidden), x, "[intermediate, x.shape[-1]]")
    _check_weight(up_weight, "up_weight", (intermediate, hidden), x, "like gate_weight")
    if not isinstance(down_weight, Tensor) or down_weight.dim() != 2:
        _check_weight(down_weight, "down_weight", (-1, intermediate), x, "[out, gate_weight.shape[0]]")
    _check_weight(down_weight, "down_weight", (down_weight.shape[0], intermediate), x, "[out, gate_weight.shape[0]]")
    _check_bias(gate_bias, "gate_bias", intermediate, x, "gate_weight.shape[0]")
    _check_bias(up_bias, "up_bias", intermediate, x, "gate_weight.shape[0]")
    _check_bias(down_bias, "down_bias", down_weight.shape[0], x, "down_weight.shape[0]")
    return _gated_mlp(
        x,
        gate_weight.t(),
        up_weight.t(),
        down_weight.t(),
        gate_bias,
        up_bias,
        down_bias,
        kernel_activation,
        param,
        param2,
    )


def _gated_mlp(
    x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias, activation: str, param: float, param2: float
) -> Tensor:
    """The checked gated block on [in, out] matrices: lean, or the plain fused path where it cannot be."""
    tensors = (x, w_gate, w_up, w_down, gate_bias, up_bias, down_bias)
    if _plain(*tensors) and _folds(x, w_gate, w_up):
        return _squeezed(run_gated_mlp, *tensors, activation, param, param2)
    # A DTensor (tensor parallelism) or other subclass: its own dispatch runs each op.
    h = ops.run_gated(x @ w_gate, x @ w_up, gate_bias, up_bias, activation, param, param2, 1.0)
    return F.linear(h, w_down.t(), down_bias)


def gated_mlp_packed(
    x: Tensor,
    gate_up_weight: Tensor,
    down_weight: Tensor,
    gate_up_bias: Optional[Tensor] = None,
    down_bias: Optional[Tensor] = None,
    activation: str = "silu",
    gate_first: bool = True,
    **params,
) -> Tensor:
    """``gated_mlp`` with one packed gate/up projection: ``gate_up_weight`` [2F, H] (Phi-3's
    ``gate_up_proj``), its output ``[gate | up]`` (``gate_first=False``: ``[up | gate]``), its bias of length
    2F split the same way. Keeps x and the packed [T, 2F] for backward.

        >>> out = fusedact.mlp.gated_mlp_packed(x, mlp.gate_up_proj.weight, mlp.down_proj.weight)
    """
    _check_x(x)
    kernel_activation, param, param2 = functional._resolve(activation, params)
    dtype = _autocast_dtype(x)
    x, gate_up_weight, down_weight, gate_up_bias, down_bias = (
        _cast(t, dtype) for t in (x, gate_up_weight, down_weight, gate_up_bias, down_bias)
    )
    hidden = x.shape[-1]
    if not isinstance(gate_up_weight, Tensor) or gate_up_weight.dim() != 2 or gate_up_weight.shape[0] % 2:
        shape = tuple(gate_up_weight.shape) if isinstance(gate_up_weight, Tensor) else None
        raise ValueError(f"gate_up_weight must have shape [2 * intermediate, x.shape[-1]], got {shape}")
    width = gate_up_weight.shape[0]
    _check_weight(gate_up_weight, "gate_up_weight", (width, hidden), x, "[2 * intermediate, x.shape[-1]]")
    if not isinstance(down_weight, Tensor) or down_weight.dim() != 2:
        _check_weight(down_weight, "down_weight", (-1, width // 2), x, "[out, intermediate]")
    _check_weight(down_weight, "down_weight", (down_weight.shape[0], width // 2), x, "[out, intermediate]")
    _check_bias(gate_up_bias, "gate_up_bias", width, x, "gate_up_weight.shape[0]")
    _check_bias(down_bias, "down_bias", down_weight.shape[0], x, "down_weight.shape[0]")
    return _gated_mlp_packed(
        x,
        gate_up_weight.t(),
        down_weight.t(),
        gate_up_bias,
        down_bias,
        kernel_activation,
        param,
        param2,
        bool(gate_first),
    )


def _gated_mlp_packed(x, w_gate_up, w_down, gate_up_bias, down_bias, activation, param, param2, gate_first) -> Tensor:
    tensors = (x, w_gate_up, w_down, gate_up_bias, down_bias)
    if _plain(*tensors) and _folds(x, w_gate_up):
        return _squeezed(run_gated_mlp_packed, *tensors, activation, param, param2, gate_first)
    h = ops.run_gated_packed(x @ w_gate_up, gate_up_bias, activation, param, param2, 1.0, gate_first)
    return F.linear(h, w_down.t(), down_bias)


def mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    fc1_bias: Optional[Tensor] = None,
    fc2_bias: Optional[Tensor] = None,
    activation: str = "gelu",
    **params,
) -> Tensor:
    """``F.linear(act(x W_1^T + b_1), W_2, b_2)``, keeping x and ``x W_1^T`` for backward.

    The GPT-2/BERT/ViT MLP with any single-input activation of ``fusedact.functional.ACTIVATIONS``
    (``approximate=``, ``negative_slope=``... as keywords); ``fc1_bias`` is added in the activation's
    kernel, ``fc2_bias`` in the GEMM. Same values and gradients as ``F.linear`` -> ``fusedact.bias_act`` ->
    ``F.linear``. For relu, leaky_relu (slope >= 0), sigmoid and tanh, whose backward reads their output,
    that plain fused path is what runs: it keeps x and one [T, F] tensor already.

        >>> out = fusedact.mlp.mlp(x, fc1.weight, fc2.weight, fc1.bias, fc2.bias, "gelu", approximate="tanh")
    """
    _check_x(x)
    kernel_activation, param, param2 = functional._resolve(activation, params)
    dtype = _autocast_dtype(x)
    x, fc1_weight, fc2_weight, fc1_bias, fc2_bias = (
        _cast(t, dtype) for t in (x, fc1_weight, fc2_weight, fc1_bias, fc2_bias)
    )
    hidden = x.shape[-1]
    if not isinstance(fc1_weight, Tensor) or fc1_weight.dim() != 2:
        _check_weight(fc1_weight, "fc1_weight", (-1, hidden), x, "[intermediate, x.shape[-1]]")
    intermediate = fc1_weight.shape[0]
    _check_weight(fc1_weight, "fc1_weight", (intermediate, hidden), x, "[intermediate, x.shape[-1]]")
    if not isinstance(fc2_weight, Tensor) or fc2_weight.dim() != 2:
        _check_weight(fc2_weight, "fc2_weight", (-1, intermediate), x, "[out, fc1_weight.shape[0]]")
    _check_weight(fc2_weight, "fc2_weight", (fc2_weight.shape[0], intermediate), x, "[out, fc1_weight.shape[0]]")
    _check_bias(fc1_bias, "fc1_bias", intermediate, x, "fc1_weight.shape[0]")
    _check_bias(fc2_bias, "fc2_bias", fc2_weight.shape[0], x, "fc2_weight.shape[0]")
    return _mlp(x, fc1_weight.t(), fc2_weight.t(), fc1_bias, fc2_bias, kernel_activation, param, param2)


def _mlp(x, w_first, w_second, first_bias, second_bias, activation: str, param: float, param2: float) -> Tensor:
    tensors = (x, w_first, w_second, first_bias, second_bias)
    if not ops.saves_output(activation, param) and _plain(*tensors) and _folds(x, w_first):
        return _squeezed(run_mlp, *tensors, activation, param, param2)
    z = x @ w_first
    return F.linear(
        ops.run_bias_act(z, first_bias, None, None, activation, param, param2, z.dim() - 1), w_second.t(), second_bias
    )


# ---------------------------------------------------------------------------------------------------
# Layers: the lean block where it computes everything the layers would, else the layers themselves.


def _runs_its_class_code(layer: nn.Module) -> bool:
    """Calling ``layer`` runs its class's ``forward`` and nothing else: no module hooks (forward, backward,
    their pre-hooks) of its own or global, no forward set on the instance."""
    return not (
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or "forward" in layer.__dict__
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
    )


def _class_key(cls: type) -> str:
    return patched_layers.class_key(cls)


def _skips_its_bias(cls: type) -> bool:
    """A layer class ``fusedact.patch`` made to leave its bias to the kernel after it."""
    if cls is patched_layers.LinearBiasInActivation:
        return True
    bases = cls.__bases__
    return len(bases) == 1 and _class_key(bases[0]) == _CONV1D and patched_layers._hf_conv1d_class(bases[0]) is cls


def _matrix(layer: nn.Module) -> Tensor:
    """The [in, out] matrix of a Linear-like layer: ``weight.t()`` (nn.Linear), ``weight`` (Conv1D)."""
    return layer.weight.t() if isinstance(layer, nn.Linear) else layer.weight


def lean_layer(layer: nn.Module, bias_of: Optional[nn.Module], first: bool) -> bool:
    """Whether the lean block computes exactly what calling ``layer`` computes, and so may run in its place.

    ``layer`` is ``nn.Linear`` or transformers' ``Conv1D`` by class (not a subclass, whose forward may
    differ: LoRA-style wrappers, quantized layers, FSDP's per-layer classes), runs nothing but its class's
    forward (``_runs_its_class_code``) and holds plain tensors (a ``DTensor`` weight means tensor
    parallelism, whose hooks and collectives run in the layers' calls). A first projection's bias is the
    kernel's: either ``layer`` is the layer ``bias_of`` that ``fusedact.patch`` made skip its bias, or it has
    none; the last projection adds its own bias in its GEMM, as its forward does."""
    if not isinstance(layer, nn.Module) or not _runs_its_class_code(layer):
        return False
    cls = type(layer)
    if first and bias_of is not None:
        known = bias_of is layer and _skips_its_bias(cls)
    else:
        known = (cls is nn.Linear or _class_key(cls) == _CONV1D) and (not first or layer.bias is None)
    return known and _plain(layer.weight, layer.bias)


def _saves() -> bool:
    """Whether this call may keep tensors for backward, so that the lean block's saving matters. Without grad
    (inference, decoding: ``no_grad``, ``inference_mode``) nothing is kept either way, and the layers called
    (the fused path, the same numbers) skip the lean block's checks: its host time stays today's."""
    return torch.is_grad_enabled()


def _kernel_bias(bias_of: Optional[nn.Module], like: Tensor) -> Optional[Tensor]:
    """The bias of the layer ``bias_of`` as the activation after it adds it: in ``like``'s dtype (under
    autocast, as the layer would have cast it) and, under tensor parallelism, its local shard."""
    return None if bias_of is None else patched_layers.bias_like(bias_of, like)


def gated_mlp_of(
    x: Tensor,
    gate_proj: nn.Module,
    up_proj: nn.Module,
    down_proj: nn.Module,
    activation: str = "silu",
    gate_bias_of: Optional[nn.Module] = None,
    up_bias_of: Optional[nn.Module] = None,
    **params,
) -> Tensor:
    """``down_proj(act(gate_proj(x) + b_g) * (up_proj(x) + b_u))`` with the lean gated block where the
    layers allow it (``lean_layer``), else by calling them (the fused path: hooks, wrappers and tensor
    parallelism see their layers called). ``gate_bias_of``/``up_bias_of``: the layer whose bias the kernel
    adds (one ``fusedact.patch`` made skip it; it stays the same layer when a wrapper is put around it later).

        >>> out = fusedact.mlp.gated_mlp_of(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, "silu")
    """
    layers = (gate_proj, up_proj, down_proj)
    if _saves() and lean_layer(gate_proj, gate_bias_of, True) and lean_layer(up_proj, up_bias_of, True):
        biases = (None if gate_bias_of is None else gate_bias_of.bias, None if up_bias_of is None else up_bias_of.bias)
        lean = _lean_call(x, layers, biases)
        if lean is not None:
            kernel_activation, param, param2 = functional._resolve(activation, params)
            return _gated_mlp(*lean, kernel_activation, param, param2)
    gate, up = gate_proj(x), up_proj(x)
    h = functional.gated(gate, up, _kernel_bias(gate_bias_of, gate), _kernel_bias(up_bias_of, up), activation, **params)
    return down_proj(h)


def _lean_call(
    x, layers: Sequence[nn.Module], first_biases: Sequence[Optional[Tensor]], packed: bool = False
) -> Optional[tuple]:
    """(x, the layers' [in, out] matrices, the first layers' kernel biases, the last layer's bias), cast as
    autocast casts a GEMM's operands, when the lean block computes exactly what calling the layers would
    (the first layers already passed ``lean_layer``); None where the layers must be called (the last one is
    not a plain layer, a tensor subclass, shapes or dtypes the layers would reject: they raise the error)."""
    *first, last = layers
    if not lean_layer(last, None, False) or not isinstance(x, Tensor) or not _plain(x) or x.dim() == 0:
        return None
    if x.dtype not in functional.SUPPORTED_DTYPES:
        return None
    if not all(layer.weight.dim() == 2 for layer in layers) or not _folds(x, *(layer.weight for layer in first)):
        return None
    dtype = _autocast_dtype(x)
    matrices = [_cast(_matrix(layer), dtype) for layer in layers]
    x, last_bias = _cast(x, dtype), _cast(last.bias, dtype)
    biases = [_cast(b, dtype) for b in first_biases]
    width = matrices[0].shape[1]  # the first projections' output width: F, or 2F packed
    if packed and width % 2:
        return None
    shapes_fit = (
        all(m.shape[0] == x.shape[-1] for m in matrices[:-1])
        and all(m.shape == matrices[0].shape for m in matrices[:-1])
        and matrices[-1].shape[0] == (width // 2 if packed else width)
        and all(b is None or tuple(b.shape) == (m.shape[1],) for b, m in zip(biases, matrices[:-1], strict=True))
        and (last_bias is None or tuple(last_bias.shape) == (matrices[-1].shape[1],))
    )
    tensors = (*matrices, *biases, last_bias)
    if not shapes_fit or any(t is not None and (t.dtype != x.dtype or t.device != x.device) for t in tensors):
        return None
    return (x, *matrices, *biases, last_bias)


def gated_mlp_packed_of(
    x: Tensor,
    gate_up_proj: nn.Module,
    down_proj: nn.Module,
    activation: str = "silu",
    gate_first: bool = True,
    bias_of: Optional[nn.Module] = None,
    **params,
) -> Tensor:
    """``gated_mlp_of`` with one packed ``gate_up_proj`` (output ``[gate | up]``; ``gate_first=False``:
    ``[up | gate]``), e.g. Phi-3's; ``bias_of``: the layer whose (packed) bias the kernel adds.

        >>> out = fusedact.mlp.gated_mlp_packed_of(x, mlp.gate_up_proj, mlp.down_proj, "silu")
    """
    if _saves() and lean_layer(gate_up_proj, bias_of, True):
        lean = _lean_call(x, (gate_up_proj, down_proj), (None if bias_of is None else bias_of.bias,), packed=True)
        if lean is not None:
            kernel_activation, param, param2 = functional._resolve(activation, params)
            return _gated_mlp_packed(*lean, kernel_activation, param, param2, bool(gate_first))
    packed = gate_up_proj(x)
    h = functional.gated_packed(packed, _kernel_bias(bias_of, packed), activation, gate_first, **params)
    return down_proj(h)


def mlp_of(
    x: Tensor,
    fc1: nn.Module,
    fc2: nn.Module,
    activation: str = "gelu",
    bias_of: Optional[nn.Module] = None,
    **params,
) -> Tensor:
    """``fc2(act(fc1(x) + b))`` with the lean two-layer block where the layers allow it (``lean_layer``) and
    the activation's backward reads its input; else by calling the layers (the fused path). ``bias_of``:
    the layer whose bias the kernel adds (``fc1`` after ``fusedact.patch`` folded it; None: ``fc1`` adds its
    own, or has none). ``fc1``/``fc2``: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2).

        >>> out = fusedact.mlp.mlp_of(x, block.c_fc, block.c_proj, "gelu", bias_of=block.c_fc, approximate="tanh")
    """
    kernel_activation, param, param2 = functional._resolve(activation, params)
    if _saves() and not ops.saves_output(kernel_activation, param) and lean_layer(fc1, bias_of, True):
        lean = _lean_call(x, (fc1, fc2), (None if bias_of is None else bias_of.bias,))
        if lean is not None:
            return _mlp(*lean, kernel_activation, param, param2)
    z = fc1(x)
    return fc2(functional.bias_act(z, _kernel_bias(bias_of, z), activation, **params))


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism with DTensor activations: how fusedact's per-element ops shard.
#
# With ColwiseParallel's default (local outputs) the activations are plain tensors and only a folded bias
# is a DTensor (``local_bias``). With ``use_local_output=False`` (or SequenceParallel plans) the activation
# itself is a DTensor and fusedact's custom ops need sharding strategies: this registers them. ops.py calls
# it the first time an op meets a DTensor (``ops._register_dtensor_sharding``).


def _per_element_strategies(args: tuple, roles: Sequence[str], outputs: Sequence[str], channel_dim: int, splittable):
    """Acceptable (output placements, input placements) of a per-element op with per-channel vectors.

    ``roles`` per argument: ``"x"`` (shaped like the activation), ``"channel"`` (a per-channel vector along
    ``channel_dim``, or one value shared by every channel: PReLU's single slope), anything else (not a
    tensor). ``outputs`` per result: ``"x"``, or ``"channel"`` (the gradient of the next per-channel input,
    in order). Everything replicated; or every ``"x"`` sharded along one dimension ``d`` (only where
    ``splittable(d)``: a packed [gate | up] split along its last dimension would mix the halves), the
    vectors sharded with their channels (``Shard(0)``) when ``d`` is the channel dimension, else replicated,
    and a replicated vector's gradient (a sum over the elements of every shard) a partial sum."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    x = args[list(roles).index("x")]
    vectors = [a for a, role in zip(args, roles, strict=True) if role == "channel"]

    def strategy(d: Optional[int]) -> tuple[list, list]:
        def vector(a):
            if d is None:
                return Replicate()
            shared = a.shape[0] == 1 and x.shape[channel_dim] != 1
            return Shard(0) if d == channel_dim and not shared else Replicate()

        def gradient(a):
            if a is None or d is None:  # no such input: an empty placeholder
                return Replicate()
            placement = vector(a)
            return placement if placement.is_shard() else Partial()

        sharded = Replicate() if d is None else Shard(d)
        inputs = [
            sharded if role == "x" else vector(a) if role == "channel" and a is not None else None
            for a, role in zip(args, roles, strict=True)
        ]
        gradients = iter(vectors)
        return [sharded if kind == "x" else gradient(next(gradients)) for kind in outputs], inputs

    return [strategy(None)] + [strategy(d) for d in range(x.ndim) if splittable(d)]


def register_dtensor_sharding() -> None:
    """Register how ``fusedact::bias_act``, ``gated``, ``gated_packed``, ``softmax`` and their backward ops
    shard, so they take DTensor activations (tensor parallelism with DTensor outputs): per element, a bias
    sharded with its channels; softmax never along its own dim. fusedact's ops call this themselves the
    first time one of them sees a DTensor (never at import: torch.distributed.tensor costs 0.6 s to import).
    Idempotent (a second call registers the same strategies again).

        >>> fusedact.mlp.register_dtensor_sharding()
        >>> y = fusedact.gelu(dtensor_x, dtensor_bias)   # each rank runs the kernel on its shard
    """
    from torch.distributed.tensor import Partial, Replicate
    from torch.distributed.tensor.experimental import register_sharding

    aten = torch.ops.fusedact

    @register_sharding(aten.bias_act.default)
    def _(x, bias, weight, weight2, activation, param, param2, dim):
        args = (x, bias, weight, weight2, activation, param, param2, dim)
        return _per_element_strategies(args, ("x", "channel", "channel", "channel", "", "", "", ""), ("x",), dim, bool)

    @register_sharding(aten.bias_act_backward.default)
    def _(grad_y, saved, bias, weight, weight2, activation, param, param2, dim, saved_is_output, compute_bias,
          compute_weight):  # fmt: skip
        args = (grad_y, saved, bias, weight, weight2, activation, param, param2, dim, saved_is_output, compute_bias,
                compute_weight)  # fmt: skip
        roles = ("x", "x", "channel", "channel", "channel", "", "", "", "", "", "", "")
        return _per_element_strategies(args, roles, ("x", "channel", "channel", "channel"), dim, bool)

    def last(t):
        return t.ndim - 1

    @register_sharding(aten.gated.default)
    def _(gate, up, gate_bias, up_bias, activation, param, param2, gate_scale):
        args = (gate, up, gate_bias, up_bias, activation, param, param2, gate_scale)
        roles = ("x", "x", "channel", "channel", "", "", "", "")
        return _per_element_strategies(args, roles, ("x",), last(gate), bool)

    @register_sharding(aten.gated_backward.default)
    def _(grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_bias):
        args = (grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_bias)
        roles = ("x", "x", "x", "channel", "channel", "", "", "", "", "")
        return _per_element_strategies(args, roles, ("x", "x", "channel", "channel"), last(gate), bool)

    # Packed [gate | up]: a shard of the last dimension is not [gate shard | up shard], so not there.
    @register_sharding(aten.gated_packed.default)
    def _(x, bias, activation, param, param2, gate_scale, gate_first):
        args = (x, bias, activation, param, param2, gate_scale, gate_first)
        roles = ("x", "channel", "", "", "", "", "")
        return _per_element_strategies(args, roles, ("x",), last(x), lambda d: d != last(x))

    @register_sharding(aten.gated_packed_backward.default)
    def _(grad_y, x, bias, activation, param, param2, gate_scale, gate_first, compute_bias):
        args = (grad_y, x, bias, activation, param, param2, gate_scale, gate_first, compute_bias)
        roles = ("x", "x", "channel", "", "", "", "", "", "")
        return _per_element_strategies(args, roles, ("x", "channel"), last(x), lambda d: d != last(x))

    # Softmax: per row along its own dim, which is never split (a shard would normalize over part of the
    # row); its bias runs along that dim, so it is whole on every rank and its gradient a partial sum.
    @register_sharding(aten.softmax.default)
    def _(x, bias, dim, log):
        own = dim % x.ndim
        return _per_element_strategies((x, bias, dim, log), ("x", "channel", "", ""), ("x",), own, lambda d: d != own)

    @register_sharding(aten.softmax_backward.default)
    def _(grad_y, y, dim, log, compute_grad_bias):
        own = dim % y.ndim
        # No bias among the inputs: ``y`` stands in for it so the bias gradient gets a placement (a partial
        # sum where the rows are sharded; an empty placeholder when it is not computed).
        strategies = _per_element_strategies(
            (grad_y, y, dim, log, compute_grad_bias), ("x", "x", "", "", ""), ("x",), own, lambda d: d != own
        )
        return [
            ([*outputs, Partial() if compute_grad_bias and outputs[0].is_shard() else Replicate()], inputs)
            for outputs, inputs in strategies
        ]
