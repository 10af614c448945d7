"""The PyTorch fallback, for tensors the Triton kernels do not run on (CPU, fp64).

Evaluated in fp32 (fp64 for fp64 tensors) with one rounding to the output dtype at the end, like the
kernels, in cache-sized pieces of large tensors (``CHUNK_ELEMENTS``: the fp32 temporaries stay in the L2
cache, so only the inputs' reads and the outputs' writes reach memory; those outputs ask for transparent huge
pages, ``_huge_page_empty_like``). Two paths, and a third for gelu:

- Fast path: PyTorch's own fused ops (``F.gelu``, ``aten.gelu_backward``, ``F.silu``...; for the tanh form of
  GELU, a few in-place ops around ``torch.sigmoid``, twice as fast as its ``F.gelu`` and accurate over more of
  the range), for the elements inside the range where that op meets fusedact's accuracy (``FAST_RANGE``:
  bf16/fp16 within 1 ULP and fp32 within a few ULPs of the exact value). relu, leaky_relu, prelu, tanh, the
  ELU family's forward, hardtanh, hardsigmoid and heaviside always take it: their PyTorch ops are accurate
  over the whole range and have exactly the kernels' semantics (hardswish's backward is written as the
  kernels' select, and so are hardtanh's, hardsigmoid's and the ELU family's backward for a tensor that holds
  a NaN: PyTorch's CPU kernels treat a NaN input one way when vectorized and another way element by element;
  hardswish's forward is PyTorch's unless a tensor holds -inf or a value past finfo.max / 6; on PyTorch 2.5,
  whose ELU computes ``exp(z) - 1``, the ELU family's forward is written with ``expm1``). Outside those ranges
  PyTorch's fp32 ops cancel (``1 + erf`` below z = -1.8, ``1 + tanh`` below -2.3, ``1 - sigmoid`` past 7) or
  overflow (``1 / (1 + exp(-x))`` below -88), and give NaN at +-inf where the function has a limit. Where the
  result is rounded to bf16 or fp16 the fast ops cover more (``FAST_RANGE_ROUNDED``: F.gelu down to z = -3.6
  in bf16, except a window around the zero of gelu' for its backward, ``FAST_EXCLUDED``). One min/max pass
  over a piece decides: every element inside, the fast op alone; else blocks of ``CHECK_BLOCK`` elements are
  checked, and where few hold an element outside, the fast op runs on everything and those blocks alone are
  gathered, recomputed and scattered back; else every element in ``MIDDLE_RANGE`` (gelu: its erfc formulas,
  accurate down to z = -12.8) takes those few ops; otherwise both paths run on every element and a select
  picks (a boolean gather and scatter of single elements costs more than the careful formula itself).
- Careful path: the twin of ``kernels/activations.py``, line for line (same formulas, same scaling of
  exponentials by 2^64 in the tails, same limits at +-inf; see that module's docstring), for the elements
  outside ``FAST_RANGE`` (tails, NaN, inf, huge values), and for every element when a backward must itself be
  differentiable (grad mode on and an input requiring grad: double backward) and the fast op has no derivative
  (``aten.silu_backward``, ``aten.mish_backward``, the tanh form's in-place ops). Where the kernels evaluate
  erfc with their own fit of erfcx (Triton's interpreter has no libdevice), the twin calls
  ``torch.special.erfc`` (within an fp32 ULP above the tail, and ~20x cheaper than PyTorch's erfcx) and, in
  the tail, ``torch.special.erfcx`` times the scaled gaussian, accurate in fp64 too (compiled by inductor,
  ``_compiled.py``, it evaluates the kernels' fit, which fuses into one loop), and where they evaluate
  log1p by its series, ``torch.log1p``. Every constant of the twin (clamps, scaling thresholds) holds in fp64
  as well. xIELU's negative side is summed in fp64, as in the kernels (its two terms cancel where it crosses
  0).

The ELU family's gradient at a NaN input is NaN (PyTorch's ``elu_backward`` gives NaN on its vectorized
CPU path and ``grad * scale`` on its scalar and CUDA paths). The tests hold both paths, and the kernels,
to float64 references over every finite bf16 and fp16 value (tests/test_numerics.py).
"""

import ctypes
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _compiled
from ._channels import channel_shape, reduce_to_channels

_LOG2E = 1.4426950408889634
_HALF_LOG2E = 0.7213475204444817
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_TAIL_EXPONENT = -118.0
_TAIL_SCALE = 2.0**-64
_TAIL_HALF_SCALE = 2.0**-32
_LOGISTIC_TAIL = -82.0
_LOGISTIC_CLAMP = 800.0
_GELU_TANH_A = 1.5957691216057308
_GELU_TANH_B = 0.07135481627260025
_GELU_TANH_3B = 0.21406444881780076
_GELU_TANH_CLAMP = 40.0
_GELU_CLAMP = 40.0
_GELU_TAIL = -12.8
# The kernels' fit: erfcx(a) (1 + 2a) = P((a - 2) / (a + 2)) on a in [0, 15 / sqrt 2], constant term first.
_ERFCX_CLAMP = 15.0
_ERFCX_K = 2.0
_ERFCX_P = (
    1.2769783735275269,
    -0.0927640050649643,
    -0.166031613945961,
    0.164055734872818,
    -0.05420215427875519,
    -0.008061137981712818,
    0.008623635396361351,
    0.001312265289016068,
    -0.0012203205842524767,
    -0.00039490338531322777,
)
_SELU_ALPHA = 1.6732632423543772
_SELU_SCALE = 1.0507009873554805
_SELU_NEGATIVE = 1.7580993408473766
_MISH_CLAMP = 20.0
_MISH_LOW_CLAMP = -800.0

# Below this magnitude gelu-tanh's z^3 and its derivative's z^2 stay finite in fp32 (PyTorch's
# gelu_backward turns 0 * inf into NaN beyond ~1e19); beyond it every smooth activation takes the careful path.
TAME_LIMIT = 1e12
# (activation, "forward" | "backward") -> [low, high] of the pre-activation (swish: of beta * z) where
# PyTorch's own fp32 op is within ~4 fp32 ULPs plus the condition number's share (measured over a dense
# fp32 grid of the whole range), so within 1 ULP in bf16/fp16. NaN is never inside.
FAST_RANGE: dict[tuple[str, str], tuple[float, float]] = {
    ("gelu", "forward"): (-1.5, TAME_LIMIT),  # 1 + erf cancels below
    ("gelu", "backward"): (0.0, TAME_LIMIT),  # aten.gelu_backward is 8 fp32 ULPs off already at -0.4
    # the tanh form from PyTorch's sigmoid, not its gelu (whose 1 + tanh cancels below z = -2, its backward's
    # 1 - tanh^2 above 4.5, and which costs 3.5 sigmoids): accurate while the logit x >= -80
    ("gelu_tanh", "forward"): (-9.6, TAME_LIMIT),
    ("gelu_tanh", "backward"): (-9.6, TAME_LIMIT),
    ("swish", "forward"): (-80.0, TAME_LIMIT),  # 1 / (1 + exp(-x)) underflows below -88
    ("swish", "backward"): (-80.0, 7.0),  # and 1 - sigmoid cancels above
    ("sigmoid", "forward"): (-80.0, math.inf),
    ("mish", "forward"): (-80.0, TAME_LIMIT),
    ("mish", "backward"): (-80.0, 7.0),
    # softplus, of t = beta * z: PyTorch's exp(t) underflows below -88 (the careful path scales it)
    # (above 80 its exp(t) would overflow where a threshold past 88 asks for log1p(exp(t)))
    ("softplus", "forward"): (-80.0, 80.0),
    ("softplus", "backward"): (-80.0, 80.0),
    # sigmoid's and tanh's derivatives from their input (the gated ops): 1 - s cancels above 7, 1 - t^2
    # above 4.5 (and below their negatives for tanh)
    ("sigmoid", "backward"): (-80.0, 7.0),
    ("tanh", "backward"): (-4.5, 4.5),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _elu_params(activation: str, param: float) -> tuple[float, float, float]:
    """(alpha, scale, input_scale) of PyTorch's ELU family: elu(alpha), selu, celu(alpha)."""
    if activation == "elu":
        return param, 1.0, 1.0
    if activation == "selu":
        return _SELU_ALPHA, _SELU_SCALE, 1.0
    return param, 1.0, 1.0 / param  # celu


_ATEN_ELU_EXPM1: dict[str, bool] = {}  # device type -> whether PyTorch's ELU there evaluates expm1


def _aten_elu_uses_expm1(device: torch.device) -> bool:
    """Whether PyTorch's ELU on ``device``'s type evaluates ``expm1``: PyTorch 2.5's CPU ELU computes
    ``exp(z) - 1``, which is 1.3% off at z = -1e-6 in fp32 and gives +0.0 for -0.0 and for tiny negative z
    (probed once per device type, on a vectorized run and a scalar tail)."""
    if device.type not in _ATEN_ELU_EXPM1:
        probe = torch.full((65,), -1e-30, dtype=torch.float32, device=device)
        _ATEN_ELU_EXPM1[device.type] = bool((torch.ops.aten.elu(probe, 1.0, 1.0, 1.0) != 0).all())
    return _ATEN_ELU_EXPM1[device.type]


def _elu(z: Tensor, alpha: float, scale: float, input_scale: float) -> Tensor:
    if _aten_elu_uses_expm1(z.device):
        return torch.ops.aten.elu(z, alpha, scale, input_scale)
    # PyTorch's formula with expm1 (z <= 0, NaN included, takes the exponential side, as in aten's select)
    return torch.where(z > 0, z * scale, torch.expm1(z * input_scale) * (alpha * scale))


# (activation, direction) -> [low, high] where a formula of PyTorch ops of its own (``middle``, below) is
# accurate: gelu's z erfc(-z / sqrt 2) / 2 and derivative erfc(-z / sqrt 2) / 2 + z exp(-z^2 / 2) / sqrt(2 pi),
# from PyTorch's erfc (within an fp32 ULP until it leaves the normal range below z = -13). A few ops, where
# the careful twin takes ~25: used on a whole piece whose elements all lie in this range but not all in
# FAST_RANGE (gelu's backward's fast range is z >= 0: half of every ordinary tensor).
MIDDLE_RANGE: dict[tuple[str, str], tuple[float, float]] = {
    ("gelu", "forward"): (_GELU_TAIL, TAME_LIMIT),
    ("gelu", "backward"): (_GELU_TAIL, TAME_LIMIT),
}


# Where the result is rounded to bf16 or fp16, PyTorch's fp32 op is accurate over a wider range than fp32
# asks for: (activation, direction, dtype) -> [low, high], measured over dense fp32 grids (4 million points
# of [-9, 0] or [-10, 100]) against float64, with a margin (the worst error inside, in ULPs of the dtype:
# F.gelu 0.75 in bf16 and 0.73 in fp16, of the forward's 1 ULP; aten.gelu_backward 0.51 and 0.61, of the
# backward's 2, outside ``FAST_EXCLUDED``; aten.silu_backward 0.52 over [-80, 100]). tests/test_numerics.py
# checks each range over a grid of its own (test_fast_range_rounded).
FAST_RANGE_ROUNDED: dict[tuple[str, str, torch.dtype], tuple[float, float]] = {
    ("gelu", "forward", torch.bfloat16): (-3.6, TAME_LIMIT),
    ("gelu", "forward", torch.float16): (-3.0, TAME_LIMIT),
    ("gelu", "backward", torch.bfloat16): (-4.0, TAME_LIMIT),
    ("gelu", "backward", torch.float16): (-4.0, TAME_LIMIT),
    # silu' = s (1 + z (1 - s)): fp32's 1 - s cancels above 7, by less than 1e-6 absolute (0.52 ULP)
    ("swish", "backward", torch.bfloat16): (-80.0, TAME_LIMIT),
    ("swish", "backward", torch.float16): (-80.0, TAME_LIMIT),
}
# (activation, direction, dtype) -> (centre, half-width) of a window inside FAST_RANGE_ROUNDED where the fast
# op is not accurate: gelu' = Phi(z) + z phi(z) crosses 0 at z = -0.75179, where aten.gelu_backward's two
# terms cancel (18 bf16 ULPs, 2.7 fp16 ULPs; more than 1 ULP within 1.1e-4 and 9.1e-4 of the zero).
FAST_EXCLUDED: dict[tuple[str, str, torch.dtype], tuple[float, float]] = {
    ("gelu", "backward", torch.bfloat16): (-0.7517915, 3e-4),
    ("gelu", "backward", torch.float16): (-0.7517915, 2e-3),
}


def _gelu_erfc(z: Tensor) -> Tensor:  # (no in-place ops: a double backward differentiates these)
    return torch.special.erfc(z * -_SQRT_HALF) * (0.5 * z)


def _gelu_erfc_backward(grad: Tensor, z: Tensor) -> Tensor:
    """grad (erfc(-z / sqrt 2) + 2 z exp(-z^2 / 2) / sqrt(2 pi)) / 2, in six passes (addcmul folds a
    multiply into the add and the final halving into the product with grad: each pass ~25 us a piece)."""
    gaussian = torch.exp((z * z) * -0.5)
    twice = torch.addcmul(torch.special.erfc(z * -_SQRT_HALF), gaussian, z, value=2.0 * _INV_SQRT_2PI)
    return torch.addcmul(z.new_zeros(()), twice, grad, value=0.5)


def _gelu_tanh_sigmoid(z: Tensor) -> Tensor:
    """The tanh form z (1 + tanh(y)) / 2 = z s(x), x = 2y = z (a + b z^2) its logit and s the logistic
    function, from PyTorch's sigmoid (FAST_RANGE). In place on its own temporaries (188 us a piece of 2^18
    fp32 elements, 338 with each result allocated): no derivative, so a backward autograd records takes the
    careful twin instead."""
    logit = torch.mul(z, z).mul_(_GELU_TANH_B).add_(_GELU_TANH_A).mul_(z)
    return logit.sigmoid_().mul_(z)


def _gelu_tanh_sigmoid_slope(z: Tensor) -> tuple[Tensor, Tensor]:
    """(s(x), s(x) + z x' s(x) s(-x)), x' = a + 3 b z^2: the tanh form's z s(x) but its last multiply, and
    its derivative, in place as ``_gelu_tanh_sigmoid`` (the gated backward takes both from one logit and
    its sigmoid): s(x) s(-x), not s (1 - s), which cancels where s nears 1 (and no select on z's sign:
    torch.where costs 7 sigmoids)."""
    squared = torch.mul(z, z)
    logit = torch.mul(squared, _GELU_TANH_B).add_(_GELU_TANH_A).mul_(z)
    z_logit_derivative = squared.mul_(_GELU_TANH_3B).add_(_GELU_TANH_A).mul_(z)
    p = torch.sigmoid(logit)
    slope = logit.neg_().sigmoid_().mul_(p)
    return p, z_logit_derivative.mul_(slope).add_(p)


def _gelu_tanh_sigmoid_backward(grad: Tensor, z: Tensor) -> Tensor:
    return _gelu_tanh_sigmoid_slope(z)[1].mul_(grad)


# Elements are checked in blocks of this many: a block's min and max take one vectorized pass (PyTorch's
# amin over rows of 64 runs at aminmax's speed, of 32 at 1.5x it, of 8 or 16 at 8-12x), and the few blocks
# with an element outside the fast range are gathered, recomputed and scattered back as whole rows. (32:
# a bf16 gelu piece of the benchmark's inputs, z ~ N(0, 2), 372 us a forward against 421 with 64 and 557
# with 128; fewer elements are recomputed.)
CHECK_BLOCK = 32
# Smaller tensors skip the block check: its ten-odd small ops cost more there (~30 us) than the careful or
# middle formula on every element.
BLOCK_CHECK_FROM = 1 << 15


def _fast_where_accurate(
    key: tuple[str, str], x: Tensor, tensors: tuple[Tensor, ...], fast, careful, middle=None, rounding_to=None
) -> Tensor:
    """``fast(*tensors)`` where ``x`` (the tensor the ranges are of, shaped like them) lies in the fast range
    of ``key`` (``FAST_RANGE``, or ``FAST_RANGE_ROUNDED`` for a result rounded to ``rounding_to``),
    ``careful(*tensors)`` elsewhere; ``middle(*tensors)`` instead where every element lies in
    ``MIDDLE_RANGE[key]``. One min/max pass decides the common case, every element inside (a NaN makes
    both NaN: not inside); then the blocks (``CHECK_BLOCK``) with an element outside: where they are few,
    the fast op runs on everything and those blocks alone are recomputed. Otherwise every element takes
    the middle formula, or the fast and careful ones and a select (a boolean gather and scatter of single
    elements costs more per element of the whole tensor than the careful formula itself)."""
    low, high = FAST_RANGE_ROUNDED.get((*key, rounding_to), FAST_RANGE[key])
    excluded = FAST_EXCLUDED.get((*key, rounding_to))
    if x.numel() == 0:
        return fast(*tensors)
    smallest, largest = _extremes(x)
    below, above = not smallest >= low, not largest <= high  # (NaN: both)
    if not (below or above or excluded):
        return fast(*tensors)
    blocks = _outside_blocks(x, tensors, low, high, below, above, excluded)
    if blocks is not None:
        if blocks.numel() == 0:
            return fast(*tensors)
        if 2 * blocks.numel() <= x.numel() // CHECK_BLOCK:  # few: recompute those alone
            result = fast(*tensors)
            rows = tuple(t.reshape(-1, CHECK_BLOCK).index_select(0, blocks) for t in tensors)
            x_rows = next((r for t, r in zip(tensors, rows, strict=True) if t is x), None)
            x_rows = x.reshape(-1, CHECK_BLOCK).index_select(0, blocks) if x_rows is None else x_rows
            fixed = _select_accurate(key, x_rows, rows, fast, careful, middle, low, high, excluded)
            return result.view(-1, CHECK_BLOCK).index_copy_(0, blocks, fixed).view(result.shape)
    return _select_accurate(key, x, tensors, fast, careful, middle, low, high, excluded, (smallest, largest))


def _outside_blocks(x, tensors, low, high, below, above, excluded) -> Tensor | None:
    """Indices of the ``CHECK_BLOCK``-element blocks of ``x`` with an element outside [low, high] (or NaN)
    or in the ``excluded`` window; None where most are (judged from the first eighth), where the tensors
    are small (``BLOCK_CHECK_FROM``) or where they cannot be viewed as blocks (strided, broadcast, a size
    not a multiple of the block, or recorded by autograd: the fix is written in place)."""
    if x.numel() < BLOCK_CHECK_FROM or x.numel() % CHECK_BLOCK or _needs_derivative(x, *tensors):
        return None
    if not all(t.is_contiguous() and t.shape == x.shape for t in (x, *tensors)):
        return None

    def flagged(rows: Tensor) -> Tensor:
        marks = None
        if below:
            marks = ~(rows.amin(1) >= low)
        if above:
            outside = ~(rows.amax(1) <= high)
            marks = outside if marks is None else marks | outside
        if excluded is not None:
            centre, half_width = excluded
            near = (rows - centre).abs_().amin(1) < half_width
            marks = near if marks is None else marks | near
        return marks

    rows = x.view(-1, CHECK_BLOCK)
    # The first eighth first: where most of its blocks hold an element outside (fp32 gelu: z < -1.5 in
    # almost every block), the rest is not checked (every element takes the middle or careful formula).
    sample = flagged(rows[: max(1, rows.shape[0] // 8)])
    if 2 * int(sample.sum()) > sample.numel():
        return None
    return flagged(rows).nonzero().squeeze(1)


def _select_accurate(key, x, tensors, fast, careful, middle, low, high, excluded, extremes=None) -> Tensor:
    """Every element by an accurate formula for it: the middle formula on all of them where all lie in
    ``MIDDLE_RANGE`` (``extremes``: x's min and max, if known), else the fast formula inside [low, high] but
    outside the ``excluded`` window and the careful one elsewhere, and a select."""
    if middle is not None:
        middle_low, middle_high = MIDDLE_RANGE[key]
        smallest, largest = _extremes(x) if extremes is None else extremes
        if smallest >= middle_low and largest <= middle_high:
            return middle(*tensors)
    inside = (x >= low) & (x <= high)  # False for NaN
    if excluded is not None:
        centre, half_width = excluded
        inside &= (x - centre).abs() >= half_width
    if not bool(inside.any()):
        return careful(*tensors)
    return torch.where(inside, fast(*tensors), careful(*tensors))


def _within(t: Tensor, low: float = -math.inf, high: float = math.inf) -> bool:
    """Whether every element of ``t`` lies in [low, high], NaN never (one min/max pass): the hard family's
    and the ELU family's PyTorch ops have the kernels' semantics except at NaN, +-inf or near overflow, and
    the select that fixes those elements reads a boolean mask, which PyTorch's CPU ops read at ~1/20 of a
    float's speed (torch.where: 450 us a piece of 2^18 elements, a multiply 21 us)."""
    if t.numel() == 0:
        return True
    smallest, largest = _extremes(t)
    return smallest >= low and largest <= high


def _extremes(t: Tensor) -> tuple[float, float]:
    """The min and max of a non-empty ``t`` as Python floats (NaN where it holds one): one pass, and the
    comparisons that follow cost no tensor ops (each small op costs ~5-10 us of dispatch here)."""
    smallest, largest = torch.aminmax(t)
    return smallest.item(), largest.item()


def _needs_derivative(*tensors: Tensor) -> bool:
    """Whether autograd records this backward (double backward): then no op without a derivative."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def activation_forward(
    z: Tensor,
    activation: str,
    param: float,
    param2: float = 0.0,
    weight: Tensor | None = None,
    weight2: Tensor | None = None,
    rounding_to: torch.dtype | None = None,
) -> Tensor:
    """f(z): ``param``/``param2`` the activation's float parameters, ``weight``/``weight2`` its learned ones
    (PReLU's slope; xIELU's alpha_p, alpha_n), shaped to broadcast with ``z`` (see kernels/activations.py).
    ``rounding_to``: the dtype the caller rounds the result to, where that lets a fast op cover more
    (``FAST_RANGE_ROUNDED``)."""
    # Activations whose PyTorch op has the kernels' semantics and accuracy for every input.
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, param)
    if activation == "prelu":  # PyTorch's elementwise prelu
        return torch.ops.aten._prelu_kernel(z, weight)
    if activation == "hardtanh":
        return F.hardtanh(z, param, param2)
    if activation == "hardsigmoid":
        return F.hardsigmoid(z)
    if activation == "hardswish":  # F.hardswish(-inf) is -inf * 0 = NaN: the limit -0.0 instead
        largest = torch.finfo(z.dtype).max
        # (F.hardswish computes z * 6 / 6 above 3; its derivative differs at the kinks)
        if not _needs_derivative(z) and _within(z, -largest, largest / 6.0):
            return F.hardswish(z)
        return _times_gate(z, (z + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0))
    if activation == "xielu":
        return _xielu(z, weight, weight2, param, param2)
    if activation == "tanh":
        return torch.tanh(z)
    if activation in ("elu", "selu", "celu"):
        alpha, scale, input_scale = _elu_params(activation, param)
        return _elu(z, alpha, scale, input_scale)
    if activation == "relu_squared":
        return torch.relu(z).square()
    if activation in ("heaviside", "heaviside_ste"):
        return torch.heaviside(z, z.new_tensor(param))

    def careful(z):
        return _careful_forward(z, activation, param, param2)

    # The smooth ones: PyTorch's ops where they are accurate, the careful twin elsewhere.
    def accurate(key, fast, middle=None, x=z):
        return _fast_where_accurate(key, x, (z,), fast, careful, middle, rounding_to)

    if activation == "gelu":
        return accurate(("gelu", "forward"), F.gelu, _gelu_erfc)
    if activation == "gelu_tanh":
        if _needs_derivative(z):  # (a double backward: the fast formula works in place)
            return careful(z)
        return accurate(("gelu_tanh", "forward"), _gelu_tanh_sigmoid)
    if activation == "swish":  # the range is of x = beta z
        if param == 1.0:
            return accurate(("swish", "forward"), F.silu)
        return accurate(("swish", "forward"), lambda z: z * torch.sigmoid(param * z), x=param * z)
    if activation == "sigmoid":
        return accurate(("sigmoid", "forward"), torch.sigmoid)
    if activation == "mish":
        return accurate(("mish", "forward"), F.mish)
    if activation == "softplus":  # beta, threshold: the range is of t = beta z
        return accurate(("softplus", "forward"), lambda z: F.softplus(z, param, param2), x=param * z)
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(
    grad: Tensor,
    saved: Tensor,
    activation: str,
    param: float,
    param2: float = 0.0,
    weight: Tensor | None = None,
    weight2: Tensor | None = None,
    saved_is_output: bool = False,
    rounding_to: torch.dtype | None = None,
) -> Tensor:
    """grad * f'(z) from ``saved``: the output where ``saved_is_output`` (relu, leaky_relu with slope >= 0,
    sigmoid, tanh, as bias_act keeps them), else the input (for those too: the gated ops keep it).
    ``rounding_to``: as for ``activation_forward``."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, saved, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad, saved, param, False)
    if activation == "prelu":
        return torch.where(saved > 0, grad, grad * weight)
    if activation == "sigmoid" and saved_is_output:
        return torch.ops.aten.sigmoid_backward(grad, saved)
    if activation == "tanh" and saved_is_output:
        return torch.ops.aten.tanh_backward(grad, saved)
    if activation == "hardtanh":  # a NaN input passes the gradient (PyTorch's CUDA kernel; kernels/activations.py)
        if _within(saved):
            return torch.ops.aten.hardtanh_backward(grad, saved, param, param2)
        return torch.where((saved <= param) | (saved >= param2), 0.0, grad)
    if activation == "hardswish":
        inside = grad * ((2.0 * saved + 3.0) * (1.0 / 6.0))
        return torch.where(saved <= -3.0, 0.0, torch.where(saved < 3.0, inside, grad))
    if activation == "hardsigmoid":  # (PyTorch's fp64 kernel multiplies by an fp32 1/6; it has no derivative)
        if saved.dtype == torch.float32 and not _needs_derivative(grad, saved) and _within(saved):
            return torch.ops.aten.hardsigmoid_backward(grad, saved)
        return torch.where((saved > -3.0) & (saved < 3.0), grad * (1.0 / 6.0), 0.0)
    if activation == "xielu":
        return grad * _xielu_derivative(saved, weight, weight2, param, param2)
    if activation in ("elu", "selu", "celu"):
        alpha, scale, input_scale = _elu_params(activation, param)
        # NaN in, NaN out (PyTorch's elu_backward passes the gradient at NaN on some of its paths). Its
        # exp(z) keeps its bits in fp32's subnormals on CPU: no scaling needed (as the kernels' is).
        derivative = torch.ops.aten.elu_backward(grad, alpha, scale, input_scale, False, saved)
        return derivative if _within(saved) else torch.where(torch.isnan(saved), saved, derivative)
    if activation == "relu_squared":
        return torch.ops.aten.threshold_backward(2.0 * saved * grad, saved, 0)
    if activation == "heaviside":
        return torch.zeros_like(grad)
    if activation == "heaviside_ste":
        return grad.clone()

    def careful(grad, saved):
        return _careful_backward(grad, saved, activation, param, param2)

    if grad.shape != saved.shape:  # (a broadcast gradient: no element-wise split)
        grad = grad.expand_as(saved)

    def accurate(key, fast, middle=None, x=saved):
        return _fast_where_accurate(key, x, (grad, saved), fast, careful, middle, rounding_to)

    if activation == "gelu":
        return accurate(("gelu", "backward"), torch.ops.aten.gelu_backward, _gelu_erfc_backward)
    if activation == "gelu_tanh":
        if _needs_derivative(grad, saved):  # (as the forward)
            return careful(grad, saved)
        return accurate(("gelu_tanh", "backward"), _gelu_tanh_sigmoid_backward)
    if activation == "swish":  # the range is of x = beta z
        x = saved if param == 1.0 else param * saved
        if param == 1.0 and not _needs_derivative(grad, saved):  # aten.silu_backward has no derivative
            return accurate(("swish", "backward"), torch.ops.aten.silu_backward, x=x)
        return accurate(("swish", "backward"), lambda grad, saved: _swish_backward_plain(grad, saved, param), x=x)
    if activation == "mish":
        if _needs_derivative(grad, saved):  # aten.mish_backward has no derivative
            return careful(grad, saved)
        return accurate(("mish", "backward"), torch.ops.aten.mish_backward)
    if activation == "sigmoid":  # from the input
        return accurate(("sigmoid", "backward"), lambda g, z: torch.ops.aten.sigmoid_backward(g, torch.sigmoid(z)))
    if activation == "tanh":  # from the input
        return accurate(("tanh", "backward"), lambda g, z: torch.ops.aten.tanh_backward(g, torch.tanh(z)))
    if activation == "softplus":  # (aten.softplus_backward is differentiable)
        fast = lambda grad, saved: torch.ops.aten.softplus_backward(grad, saved, param, param2)  # noqa: E731
        return accurate(("softplus", "backward"), fast, x=param * saved)
    raise ValueError(f"unknown activation {activation!r}")


def _swish_backward_plain(grad: Tensor, z: Tensor, beta: float) -> Tensor:
    s = torch.sigmoid(beta * z)
    return grad * s * (1.0 + beta * z * (1.0 - s))


# ---------------------------------------------------------------------------------------------------
# The careful twin of kernels/activations.py


def _times_gate(z: Tensor, p: Tensor) -> Tensor:
    # where p = 0, +-inf * 0 -> a zero signed like z; elsewhere +-inf stays (the kernels' _times_gate)
    largest = torch.finfo(z.dtype).max
    return torch.where(p == 0.0, z.clamp(-largest, largest), z) * p


def _exp2_scaled(t: Tensor, tail: Tensor) -> Tensor:
    return torch.exp2(torch.where(tail, t + 64.0, t))


def _unscale(v: Tensor, tail: Tensor) -> Tensor:
    return torch.where(tail, v * _TAIL_SCALE, v)


def _grad_times(grad: Tensor, derivative: Tensor, tail: Tensor) -> Tensor:
    half = torch.where(tail, _TAIL_HALF_SCALE, 1.0).to(derivative.dtype)
    return (grad * half) * (derivative * half)


def _logistic(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = x * _LOG2E
    tail = x < _LOGISTIC_TAIL
    e = torch.exp2(torch.where(tail, t + 64.0, -t))
    reciprocal = 1.0 / (1.0 + e)
    return torch.where(tail, e, reciprocal), torch.where(tail, e, e * reciprocal * reciprocal), tail


def _gelu_tanh_logit(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    zc = z.clamp(-_GELU_TANH_CLAMP, _GELU_TANH_CLAMP)  # torch.clamp keeps NaN
    z_squared = zc * zc
    return zc, zc * (_GELU_TANH_A + _GELU_TANH_B * z_squared), _GELU_TANH_A + _GELU_TANH_3B * z_squared


def _gelu_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    tail = z < _GELU_TAIL
    gaussian = _exp2_scaled(-(z * z) * _HALF_LOG2E, tail)
    if torch.compiler.is_compiling() and z.dtype != torch.float64:  # (the compiled CPU path, _compiled.py)
        half_erfc = _half_erfc_fit(z, gaussian)
    else:
        # erfc(a) = exp(-a^2) erfcx(a): PyTorch's erfc above the tail (within an fp32 ULP until it leaves the
        # normal range at a = 9.2; one op where the kernels' fit takes twenty), and in the tail its erfcx times
        # the scaled gaussian, as the kernels.
        a = z.abs() * _SQRT_HALF
        erfc = torch.special.erfc(a)
        if bool(tail.any()):  # (rare: erfcx costs ~20 erfc, so it runs on the tail's elements alone)
            erfc = erfc.index_put((tail,), torch.special.erfcx(a[tail]) * gaussian[tail])
        half_erfc = 0.5 * erfc
    return torch.where(z < 0, half_erfc, 1.0 - half_erfc), _INV_SQRT_2PI * gaussian, tail


def _half_erfc_fit(z: Tensor, gaussian: Tensor) -> Tensor:
    """erfc(|z| / sqrt 2) / 2 (scaled as ``gaussian`` is, by 2^64 in the tail) by the kernels' fit of erfcx,
    line for line: branch-free, so inductor fuses it into one loop. In fp32 it is within the kernels'
    accuracy, which is the fallback's bound too (8 fp32 ULPs plus 3 times the condition number: an fp32
    z^2 moves exp(-z^2 / 2) by ~z^2 ULPs, where PyTorch's erfc is within one or two)."""
    a = torch.where(z.abs() < _ERFCX_CLAMP, z.abs(), _ERFCX_CLAMP) * _SQRT_HALF  # (NaN flows through exp)
    plus_k = a + _ERFCX_K
    one_plus_2a = 1.0 + 2.0 * a
    reciprocal = 1.0 / (plus_k * one_plus_2a)  # one division for both t and 1 / (1 + 2a)
    t = (a - _ERFCX_K) * one_plus_2a * reciprocal
    p = t * _ERFCX_P[-1] + _ERFCX_P[-2]
    for coefficient in reversed(_ERFCX_P[:-2]):
        p = p * t + coefficient
    return p * (0.5 * plus_k * reciprocal) * gaussian


def _mish_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t_exp = z.clamp(max=_MISH_CLAMP) * _LOG2E
    tail = t_exp < _TAIL_EXPONENT
    e = _exp2_scaled(t_exp, tail)
    n = e * (e + 2.0)
    reciprocal = 1.0 / (n + 2.0)
    return n * reciprocal, (4.0 * e) * (1.0 + e) * (reciprocal * reciprocal), tail


def _softplus_parts(z: Tensor, beta: float, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    t = beta * z
    u = -t.abs() * _LOG2E
    tail = (t < 0) & (u < _TAIL_EXPONENT)
    e = _exp2_scaled(u, tail)
    return t, (torch.where(t > 0, t, 0.0) + torch.log1p(e)) * (1.0 / beta), tail


# expm1(z) - z = z^2 sum_k z^k / (k + 2)!: the kernels' series stops at z^7 / 9! (2e-9 relative at |z| = 0.5,
# below fp32's rounding); in fp64 it runs to z^16 / 18! (3e-18).
_EXPM1_SERIES = tuple(1.0 / math.factorial(k + 2) for k in range(8))
_EXPM1_SERIES_FLOAT64 = tuple(1.0 / math.factorial(k + 2) for k in range(17))


def _expm1_minus_identity(z: Tensor) -> tuple[Tensor, Tensor]:
    """(expm1(z) - z, exp(z)): exp(z) - 1 - z where |z| >= 0.5; below, z^2 times the series the kernels
    evaluate (Horner's rule, as they do), longer in fp64."""
    coefficients = _EXPM1_SERIES_FLOAT64 if z.dtype == torch.float64 else _EXPM1_SERIES
    series = torch.full_like(z, coefficients[-1])
    for coefficient in reversed(coefficients[:-1]):
        series = series * z + coefficient
    exponential = torch.exp(z)
    return torch.where(z.abs() < 0.5, (z * z) * series, (exponential - 1.0) - z), exponential


def _xielu_negative(z: Tensor, alpha_n: Tensor, beta: float, eps: float) -> tuple[Tensor, ...]:
    """(f for z <= 0, expm1(m), exp(m), m) in fp64 (the first two), m = min(z, eps), as the kernels."""
    m = torch.where(z > eps, eps, z)
    e_minus_m, exponential = _expm1_minus_identity(m)
    m64 = m.double()
    expm1 = torch.where(m.abs() < 0.5, e_minus_m.double() + m64, exponential.double() - 1.0)
    alpha64 = alpha_n.double()
    slope = beta - alpha64
    linear = torch.where(slope == 0, 0.0, slope * z.double())
    return alpha64 * expm1 + linear, expm1, exponential, m


def _xielu(z: Tensor, alpha_p: Tensor, alpha_n: Tensor, beta: float, eps: float) -> Tensor:
    negative, _, _, _ = _xielu_negative(z, alpha_n, beta, eps)
    return torch.where(z > 0, z * (alpha_p * z + beta), negative.to(z.dtype))


def _xielu_derivative(z: Tensor, alpha_p: Tensor, alpha_n: Tensor, beta: float, eps: float) -> Tensor:
    _, expm1, exponential, _ = _xielu_negative(z, alpha_n, beta, eps)
    alpha64 = alpha_n.double()
    below = alpha64 * expm1 + beta
    tie = alpha64 * (0.5 * exponential.double() - 1.0) + beta  # PyTorch's minimum splits a tie's gradient
    negative = torch.where(z > eps, beta - alpha64, torch.where(z == eps, tie, below))
    return torch.where(z > 0, 2.0 * alpha_p * z + beta, negative.to(z.dtype))


def _xielu_parameter_gradients(grad: Tensor, z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per element: grad * d/dalpha_p (z^2 above 0) and grad * d/dalpha_n (expm1(min(z, eps)) - z below)."""
    m = torch.where(z > eps, eps, z)
    e_minus_m, _ = _expm1_minus_identity(m)
    contribution = grad * torch.where(z > 0, z * z, e_minus_m + torch.where(z > eps, eps - z, 0.0))
    return torch.where(z <= 0, 0.0, contribution), torch.where(z > 0, 0.0, contribution)  # (NaN: NaN to both)


def _careful_forward(z: Tensor, activation: str, param: float, param2: float = 0.0) -> Tensor:
    if activation == "gelu":
        cdf, _, tail = _gelu_parts(z)
        return _unscale(_times_gate(z, cdf), tail)
    if activation == "gelu_tanh":
        _, logit, _ = _gelu_tanh_logit(z)
        p, _, tail = _logistic(logit)
        return _unscale(_times_gate(z, p), tail)
    if activation == "swish":
        p, _, tail = _logistic(param * z)
        return _unscale(_times_gate(z, p), tail)
    if activation == "sigmoid":
        p, _, tail = _logistic(z)
        return _unscale(p, tail)
    if activation == "mish":
        t, _, tail = _mish_parts(z)
        return _unscale(_times_gate(z, t), tail)
    if activation == "softplus":
        t, value, tail = _softplus_parts(z, param, param2)
        return torch.where(t > param2, z, _unscale(value, tail))
    raise ValueError(f"unknown activation {activation!r}")


def _careful_backward(grad: Tensor, saved: Tensor, activation: str, param: float, param2: float = 0.0) -> Tensor:
    if activation == "gelu":
        cdf, pdf, tail = _gelu_parts(saved)
        return _grad_times(grad, cdf + saved.clamp(-_GELU_CLAMP, _GELU_CLAMP) * pdf, tail)
    if activation == "gelu_tanh":
        zc, logit, logit_derivative = _gelu_tanh_logit(saved)
        p, slope, tail = _logistic(logit)
        return _grad_times(grad, p + (zc * logit_derivative) * slope, tail)
    if activation == "swish":
        x = param * saved
        p, slope, tail = _logistic(x)
        return _grad_times(grad, p + x.clamp(-_LOGISTIC_CLAMP, _LOGISTIC_CLAMP) * slope, tail)
    if activation == "mish":
        t, slope, tail = _mish_parts(saved)
        # Past the clamp mish' is 1 - O(z exp(-2z)): 1 in fp32 and fp64, where t = n / (n + 2) may round low.
        derivative = t + saved.clamp(_MISH_LOW_CLAMP, _MISH_CLAMP) * slope
        return torch.where(saved > _MISH_CLAMP, grad, _grad_times(grad, derivative, tail))
    if activation == "sigmoid":  # from the input
        _, slope, tail = _logistic(saved)
        return _grad_times(grad, slope, tail)
    if activation == "tanh":  # from the input: 4 s(2z) (1 - s(2z))
        _, slope, tail = _logistic(2.0 * saved)
        return _grad_times(grad, 4.0 * slope, tail)
    if activation == "softplus":
        t = param * saved
        p, _, tail = _logistic(t)
        return torch.where(t > param2, grad, _grad_times(grad, p, tail))
    raise ValueError(f"unknown activation {activation!r}")


def _with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    """t + bias in the compute dtype: one pass (a bf16 t plus an fp32 bias adds in fp32, exactly as
    upcasting t first would)."""
    dtype = compute_dtype(t.dtype)
    if bias is None:
        return t if t.dtype == dtype else t.to(dtype)
    if bias.dtype != dtype:
        bias = bias.to(dtype)
    if t.dtype == dtype:
        return torch.add(t, bias)
    # Upcast first, then add in place: the same values as torch.add(t, bias) with type promotion (the bf16/fp16
    # to fp32 conversion is exact), whose mixed-dtype CPU loop is ~30x slower than the two vectorized passes.
    return t.to(dtype).add_(bias)


def _channel_sum(grad: Tensor, bias: Tensor | None, compute: bool, dim: int = -1) -> Tensor:
    """Sum over every dimension but ``dim`` in the compute dtype (the caller rounds once); empty when not
    asked for."""
    if bias is None or not compute:
        return grad.new_empty(0)
    return reduce_to_channels(grad, dim % max(grad.dim(), 1))


def _along(t: Tensor | None, x: Tensor, dim: int) -> Tensor | None:
    """A per-channel ``[C]`` tensor shaped to broadcast along ``dim`` of ``x`` (the last: as it is)."""
    if t is None or dim == -1:
        return t
    return t.view(channel_shape(x, dim))


# Cache-sized pieces. Each element-wise op here is one pass over whole tensors, with fp32 temporaries (a
# bf16 input's fp32 copy, z, the activation's intermediates): over a [8192, 4096] tensor every pass streams
# through memory, over a piece of 2^18 elements (1 MiB in fp32) they stay in the L2 cache and only the
# inputs' reads and the outputs' writes reach memory, as in a fused kernel. Each element's result is
# within its accuracy bound either way, though not always the same bits (a piece and the whole tensor may
# take different accurate formulas: the fast op, the middle or the careful one); the bias and learned
# parameters' gradients are summed per piece in the compute dtype and rounded once, at the end.
CHUNK_ELEMENTS = 1 << 18


# glibc's malloc serves a request at or above its mmap threshold (128 KiB at first) with a fresh mmap, and
# raises the threshold to a freed mmapped chunk's size, never past that size: so a piece's temporaries, all
# of one size (1 MiB in fp32), are mapped afresh on every allocation, and every page of them faults on its
# first touch (measured: 740-1250 page faults per fp32 gelu piece, 4x its time). Freeing one 16 MiB block
# once raises the threshold above them (and the heap's trim threshold to 32 MiB): the same state any program
# reaches by freeing a 16 MiB buffer, after which the pieces reuse the heap's memory. Elsewhere it is one
# harmless allocation.
_HEAP_THRESHOLD_BYTES = 16 << 20
_heap_threshold_raised = False


def _raise_heap_threshold() -> None:
    global _heap_threshold_raised
    if not _heap_threshold_raised:
        _heap_threshold_raised = True
        del_me = torch.empty(_HEAP_THRESHOLD_BYTES, dtype=torch.uint8)
        del del_me


# Transparent huge pages for the pieces' outputs. Each page of a fresh tensor faults on its first write
# (PyTorch's CPU allocator maps a large tensor anew, and the kernel zeroes the page then): ~1 us per 4 KiB
# page on this project's VMs, 41 ms for a 128 MiB tensor, a third of an fp32 gelu's whole forward at
# [8192, 4096], and eager's pays it once for each of its two results (x + b, then the activation). Asking
# the kernel for 2 MiB pages on the output's own range (madvise MADV_HUGEPAGE, Linux's default THP mode
# "madvise" honours it) makes that 11 ms. Only outputs the pieces write whole (so no page of them goes
# unused: no extra memory), and only their 2 MiB-aligned interior; the range is the tensor's own, freed
# with it (PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` does the same for every allocation of a process). Where
# madvise is missing or refuses (another OS, THP off), the output keeps the normal pages.
_HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # Linux's value
_madvise = None  # libc's madvise, resolved on first use; False where there is none


def _huge_page_empty_like(t: Tensor) -> Tensor:
    """``torch.empty_like(t)``, its memory asked to be backed by transparent huge pages where it is large
    enough to hold one (CPU, Linux)."""
    global _madvise
    out = torch.empty_like(t)
    storage = out.untyped_storage()
    if out.device.type != "cpu" or storage.nbytes() < 2 * _HUGE_PAGE_BYTES or _madvise is False:
        return out
    if _madvise is None:
        try:
            if not sys.platform.startswith("linux"):
                raise OSError("not Linux")
            _madvise = ctypes.CDLL(None, use_errno=True).madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _madvise = False
            return out
    start = -(-storage.data_ptr() // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    end = (storage.data_ptr() + storage.nbytes()) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)  # (a refusal leaves the normal pages)
    return out


def _pieces(x: Tensor, dim: int, *others: Tensor | None) -> list[slice] | None:
    """Row ranges (along dim 0) of cache-sized pieces of ``x`` and the same-shaped ``others`` (any strides:
    the outputs are ``empty_like``, the layout PyTorch's element-wise ops give), or None where the tensors
    are taken whole: small, with the channels along dim 0, or recorded by autograd (a differentiable
    backward writes no output in place)."""
    tensors = [x, *(t for t in others if t is not None)]
    if x.numel() < 2 * CHUNK_ELEMENTS or x.dim() < 2 or dim % x.dim() == 0:
        return None
    if any(t.shape != x.shape for t in tensors if t.dim() > 1) or _needs_derivative(*tensors):
        return None
    rows = max(1, CHUNK_ELEMENTS // (x.numel() // x.shape[0]))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


def _rounded(sums: list[Tensor], parameters: tuple[Tensor | None, ...]) -> list[Tensor]:
    """Each gradient sum rounded once to its parameter's dtype (an empty one, not asked for, as it is)."""
    return [s if p is None or not s.numel() else s.to(p.dtype) for s, p in zip(sums, parameters, strict=True)]


def _last_as_minus_one(dim: int, x: Tensor) -> int:
    """-1 for the last dimension (whatever view of ``x`` the pieces take), ``dim`` otherwise."""
    return -1 if x.dim() and dim % x.dim() == x.dim() - 1 else dim


def _whole(function, tensors: tuple, args: tuple, likes: tuple) -> tuple[list, list]:
    """``_piecewise`` on the whole tensors: one call, its outputs rounded to the dtypes of ``likes``."""
    results = function(*tensors, *args)
    results = results if isinstance(results, tuple) else (results,)
    outputs = len(likes)
    rounded = [
        r if r.dtype == like.dtype else r.to(like.dtype) for r, like in zip(results[:outputs], likes, strict=True)
    ]
    return rounded, list(results[outputs:])


def _piecewise(function, tensors: tuple, args: tuple, dim: int, likes: tuple) -> tuple[list, list]:
    """``function(*tensors, *args)`` on the whole tensors, or piece by piece (``_pieces`` of their rows) with
    its first ``len(likes)`` results (in the compute dtype) rounded once to the dtypes of ``likes``, into new
    tensors like them (a piece's result is converted as it is written: no rounded temporary), and the rest
    (gradient sums in the compute dtype) added up. Returns (the results, the sums)."""
    outputs = len(likes)
    if likes[0].numel() < 2 * CHUNK_ELEMENTS:  # (the common small call: no layout questions)
        return _whole(function, tensors, args, likes)
    last = likes[0].dim() - 1
    if last > 1 and dim % likes[0].dim() == last and all(t.is_contiguous() for t in (*tensors, *likes)):
        # [B, T, H] with the channels last: pieces of rows of the [B T, H] matrix, not of whole B
        shape, columns = likes[0].shape, likes[0].shape[-1]
        results, sums = _piecewise(
            function, tuple(t.view(-1, columns) for t in tensors), args, -1, tuple(t.view(-1, columns) for t in likes)
        )
        return [r.view(shape) for r in results], sums
    pieces = _pieces(likes[0], dim, *tensors)
    if pieces is None:
        return _whole(function, tensors, args, likes)
    _raise_heap_threshold()
    written, sums = [_huge_page_empty_like(t) for t in likes], None
    for rows in pieces:
        results = function(*(t[rows] for t in tensors), *args)
        results = results if isinstance(results, tuple) else (results,)
        for out, result in zip(written, results[:outputs], strict=True):
            out[rows] = result
        more = results[outputs:]
        sums = list(more) if sums is None else [t.add_(m) if t.numel() else t for t, m in zip(sums, more, strict=True)]
    return written, sums


def bias_act(
    x: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    weight2: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    dim: int,
) -> Tensor:
    compiled = _compiled.bias_act(x, bias, weight, weight2, activation, param, param2, dim)
    if compiled is not None:
        return compiled
    dim = _last_as_minus_one(dim, x)
    (y,), _ = _piecewise(_bias_act_whole, (x,), (bias, weight, weight2, activation, param, param2, dim), dim, (x,))
    return y


def _bias_act_whole(x, bias, weight, weight2, activation, param, param2, dim) -> Tensor:
    z = _with_bias(x, _along(bias, x, dim))
    weight, weight2 = (None if w is None else _along(w, x, dim).to(z.dtype) for w in (weight, weight2))
    return activation_forward(z, activation, param, param2, weight, weight2, x.dtype)


def _weight_sum(grad: Tensor, weight: Tensor | None, dim: int) -> Tensor:
    """A learned parameter's gradient from its per-element terms, in the compute dtype: summed over
    everything but its channels (or over everything, for one shared by all)."""
    if weight is None:
        return grad.new_empty(0)
    if weight.numel() == 1:
        return grad.sum().reshape(1)
    return _channel_sum(grad, weight, True, dim)


def bias_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    bias: Tensor | None,
    weight: Tensor | None,
    weight2: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
    compute_grad_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    compiled = _compiled.bias_act_backward(
        grad_y, saved, bias, weight, weight2, activation, param, param2, dim, saved_is_output, compute_grad_bias
    )
    if compiled is not None:
        grad_x, grad_bias = compiled
        return (grad_x, *_rounded([grad_bias], (bias,)), saved.new_empty(0), saved.new_empty(0))
    dim = _last_as_minus_one(dim, saved)
    args = (
        bias,
        weight,
        weight2,
        activation,
        param,
        param2,
        dim,
        saved_is_output,
        compute_grad_bias,
        compute_grad_weight,
    )
    (grad_x,), sums = _piecewise(_bias_act_backward_whole, (grad_y, saved), args, dim, (saved,))
    return (grad_x, *_rounded(sums, (bias, weight, weight2)))


def _bias_act_backward_whole(
    grad_y,
    saved,
    bias,
    weight,
    weight2,
    activation,
    param,
    param2,
    dim,
    saved_is_output,
    compute_grad_bias,
    compute_grad_weight,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_x, and the bias's and learned parameters' gradients, in the compute dtype (empty where not asked
    for)."""  # fmt: skip
    z = _with_bias(saved, None if saved_is_output else _along(bias, saved, dim))
    grad = grad_y.to(z.dtype)
    shaped = [None if w is None else _along(w, saved, dim).to(z.dtype) for w in (weight, weight2)]
    grad_weight, grad_weight2 = saved.new_empty(0), saved.new_empty(0)  # (outputs of an op never alias)
    if activation == "prelu":  # PyTorch's elementwise prelu backward: the slope's term is grad * z below 0
        grad_x, grad_slope = torch.ops.aten._prelu_kernel_backward(grad, z, shaped[0])
        if compute_grad_weight:
            grad_weight = _weight_sum(grad_slope, weight, dim)
    else:
        grad_x = activation_backward(grad, z, activation, param, param2, *shaped, saved_is_output, saved.dtype)
        if compute_grad_weight and activation == "xielu":
            terms = _xielu_parameter_gradients(grad, z, param2)
            grad_weight, grad_weight2 = (_weight_sum(t, w, dim) for t, w in zip(terms, (weight, weight2), strict=True))
    return grad_x, _channel_sum(grad_x, bias, compute_grad_bias, dim), grad_weight, grad_weight2


def _gate_and_up(
    gate: Tensor, up: Tensor, gate_bias: Tensor | None, up_bias: Tensor | None, gate_scale: float
) -> tuple[Tensor, Tensor]:
    """s (gate + gate_bias) and up + up_bias in the compute dtype (s = 1 multiplies nothing)."""
    z = _with_bias(gate, gate_bias)
    return (z if gate_scale == 1.0 else z * gate_scale), _with_bias(up, up_bias)


def gated(
    gate: Tensor,
    up: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
) -> Tensor:
    args = (gate_bias, up_bias, activation, param, param2, gate_scale)
    (y,), _ = _piecewise(_gated_whole, (gate, up), args, -1, (gate,))
    return y


def _gated_whole(gate, up, gate_bias, up_bias, activation, param, param2, gate_scale) -> Tensor:
    z, u = _gate_and_up(gate, up, gate_bias, up_bias, gate_scale)
    return activation_forward(z, activation, param, param2, rounding_to=gate.dtype) * u


def gated_backward(
    grad_y: Tensor,
    gate: Tensor,
    up: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    activation: str,
    param: float,
    param2: float,
    gate_scale: float,
    compute_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gate's derivative is taken at its input (as the kernels'): d/dgate = s act'(s z) u grad,
    d/dup = act(s z) grad."""
    args = (gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias)
    (grad_gate, grad_up), sums = _piecewise(_gated_backward_whole, (grad_y, gate, up), args, -1, (gate, up))
    return (grad_gate, grad_up, *_rounded(sums, (gate_bias, up_bias)))


def _gated_backward_whole(
    grad_y, gate, up, gate_bias, up_bias, activation, param, param2, gate_scale, compute_grad_bias
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_gate, grad_up and the biases' gradients in the compute dtype."""
    z, u = _gate_and_up(gate, up, gate_bias, up_bias, gate_scale)
    grad = grad_y.to(z.dtype)
    grad_activated = grad * u if gate_scale == 1.0 else (grad * u) * gate_scale
    tanh_form = activation == "gelu_tanh" and not _needs_derivative(grad, z, u)
    if tanh_form and _within(z, *FAST_RANGE[("gelu_tanh", "backward")]):
        # (its value and derivative from one logit and sigmoid: 15 passes, not 20; 1100 -> 760 us a bf16 piece)
        p, derivative = _gelu_tanh_sigmoid_slope(z)
        activated, grad_gate = p.mul_(z), derivative.mul_(grad_activated)
    else:
        activated = activation_forward(z, activation, param, param2, rounding_to=gate.dtype)
        grad_gate = activation_backward(grad_activated, z, activation, param, param2, rounding_to=gate.dtype)
    grad_up = grad * activated
    return (
        grad_gate,
        grad_up,
        _channel_sum(grad_gate, gate_bias, compute_grad_bias),
        _channel_sum(grad_up, up_bias, compute_grad_bias),
    )
