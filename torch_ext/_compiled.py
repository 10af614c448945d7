"""The compiled CPU path: the fallback's careful formulas fused into one loop by TorchInductor (opt-in).

``fusedact.set_cpu_backend("compiled")`` turns it on. For a large CPU tensor (``MIN_ELEMENTS``) in fp32,
bf16 or fp16 and GELU (erf or tanh), Mish or softplus (``ACTIVATIONS``, bias_act), the forward
``f(x + bias)`` and the backward ``grad * f'(x + bias)`` with the bias gradient are the careful twin of
``kernels/activations.py`` (``_fallback._careful_forward`` / ``_careful_backward``, the same functions the
fallback runs on its tails) compiled by ``torch.compile``: inductor writes a vectorized C++ loop that reads
each input once, computes in fp32 and rounds once on store, as a Triton kernel does. PyTorch's eager
``F.gelu(x + b)`` makes two passes over memory and writes two tensors; the fallback makes one (cache-sized
pieces) but pays a pass over its L2-resident piece for every op of an accurate formula (PyTorch's CPU erfc:
four times F.gelu's cost). Measured in ``python -m bench --device cpu`` (bench/NOTES.md entry 15).

Costs: a C++ compiler at run time (inductor's), and a compilation per activation, direction and input
dtypes on first use (on a 2-core machine 7-23 s for a process's first, inductor's start-up included, 2-6 s
for later ones, under 1 s from inductor's cache on disk, which later processes reuse).
So the path is opt-in, and where compiling fails (no compiler) it warns once and the fallback runs instead.
Everything else (small tensors, fp64, a backward autograd records, the gated ops, the other activations:
SiLU's and sigmoid's PyTorch ops are faster still, the rest have no careful formula) takes the fallback,
whose results these match within the same accuracy bounds (tests/test_compiled.py). Inductor builds with
``-fno-signed-zeros``; the limits the careful formulas give at -0.0 and +-inf are checked there too.
"""

import contextlib
import functools
import types
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _fallback

# The activations whose fused careful formulas beat the fallback (bench/NOTES.md entry 15). SiLU/Swish and
# sigmoid have the careful formulas too, but PyTorch's own silu, sigmoid and their backward, which the
# fallback runs, are accurate there and faster (silu fp32 forward 0.37 of eager, 0.58 compiled); the rest
# have no careful formula (one exact PyTorch op, or xIELU's fp64 sums).
ACTIVATIONS = frozenset({"gelu", "gelu_tanh", "mish", "softplus"})
# Below this many elements the compiled call's overhead (dynamo's guards, the config patch: ~65 us more than
# the fallback's call for a gelu of 4,096 elements, one thread) costs more than the fusion saves; they break
# even near here (65,536: 190 us compiled, 227 the fallback).
MIN_ELEMENTS = 1 << 16
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_enabled = False
_failure: Optional[str] = None  # why compiling failed (then the fallback runs), once it has


@functools.cache
def problem() -> Optional[str]:
    """Why this PyTorch cannot run the compiled path, or None. Before its ``_get_ffast_math_flags`` (PyTorch
    2.5 and older), inductor built CPU code with ``-ffast-math``, whose runtime library sets flush-to-zero
    in the thread that loads it: subnormal results (GELU's and Mish's far tails, which the careful formulas
    keep) would become 0 there, and so would every later op of that thread."""
    try:
        from torch._inductor import cpp_builder
    except ImportError as error:
        return f"this PyTorch has no TorchInductor C++ backend ({error})"
    if not hasattr(cpp_builder, "_get_ffast_math_flags"):
        return (
            f"PyTorch {torch.__version__}'s inductor builds CPU code with -ffast-math, which flushes subnormals "
            "to zero in the calling thread; use the 'torch' backend, or a newer PyTorch"
        )
    return None


def enable(on: bool) -> None:
    """Turn the compiled path on or off (``set_cpu_backend("compiled")`` does)."""
    global _enabled
    _enabled = on


def failure() -> Optional[str]:
    """Why compiling failed in this process (the fallback runs instead), or None."""
    return _failure


def _applies(activation: str, tensors: tuple[Tensor, ...], weights: tuple[Optional[Tensor], ...]) -> bool:
    x = tensors[0]
    return (
        _enabled
        and _failure is None
        and activation in ACTIVATIONS
        and all(w is None for w in weights)
        and x.device.type == "cpu"
        and x.numel() >= MIN_ELEMENTS
        and all(t.dtype in _DTYPES for t in tensors if t is not None)
        and not _fallback._needs_derivative(*(t for t in tensors if t is not None))
        and not torch.compiler.is_compiling()
    )


def _forward(x: Tensor, bias: Optional[Tensor], activation: str, param: float, param2: float) -> Tensor:
    z = _fallback._with_bias(x, bias)
    return _fallback._careful_forward(z, activation, param, param2).to(x.dtype)


def _gradient(grad_y: Tensor, saved: Tensor, bias: Optional[Tensor], activation: str, param: float,
              param2: float) -> Tensor:  # fmt: skip
    """grad_y * f'(saved + bias), in fp32."""
    z = _fallback._with_bias(saved, bias)
    return _fallback._careful_backward(grad_y.to(z.dtype), z, activation, param, param2)


def _gradient_rounded(grad_y: Tensor, saved: Tensor, bias: Optional[Tensor], activation: str, param: float,
                      param2: float) -> Tensor:  # fmt: skip
    return _gradient(grad_y, saved, bias, activation, param, param2).to(saved.dtype)


@functools.cache
def _compiled(function, activation: str, dtypes: tuple):
    """``function`` compiled for one activation and one set of input dtypes (None: no bias): a copy with a
    code object of its own, since dynamo keeps a few compiled variants per code object (the layouts met
    here), and shapes symbolic (``dynamic=True``: one compilation for every size)."""
    name = "_".join([function.__name__.lstrip("_"), activation, *(str(d).removeprefix("torch.") for d in dtypes)])
    code = function.__code__.replace(co_name=name)
    copy = types.FunctionType(code, function.__globals__, name, function.__defaults__)
    return torch.compile(copy, dynamic=True, fullgraph=True)


def _call(function, activation: str, *args):
    """The compiled ``function``'s result, or None: where dynamo has compiled as many variants of it as it
    keeps (then this call), or where compiling fails (then for the rest of the process, with a warning)."""
    global _failure
    dtypes = tuple(a.dtype if isinstance(a, Tensor) else None for a in args[:3])
    try:
        with torch.no_grad(), _dynamo_settings():  # (nothing here is differentiated: one grad mode, one variant)
            return _compiled(function, activation, dtypes)(*args)
    except Exception as error:
        if "RecompileLimit" in type(error).__name__ or "CacheLimit" in type(error).__name__:
            return None
        _failure = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        warnings.warn(f"fusedact's compiled CPU path is off, the fallback runs instead: {_failure}", stacklevel=3)
        return None


def _dynamo_settings():
    """Dynamo's settings for these calls alone. Floats as constants, not inputs: where they are symbolic
    (specialize_float=False, PyTorch 2.14's default) inductor passes every coefficient in as a double (the
    fit's cdf, bf16 [8192, 4096], into an output already written: 37 ms instead of 17). And more variants per
    function than dynamo's default 8: each layout of x and the bias (rows, strided, channels-last, NCL, ...)
    is one; past the limit a call takes the fallback (the test suite reached 8 for gelu's fp32 forward)."""
    config = torch._dynamo.config
    settings = {"specialize_float": True, "recompile_limit": 64, "cache_size_limit": 64}
    present = {k: v for k, v in settings.items() if hasattr(config, k)}
    if "recompile_limit" in present:
        del present["cache_size_limit"]  # (an alias of it there)
    return config.patch(**present) if present else contextlib.nullcontext()


def bias_act(
    x: Tensor, bias: Optional[Tensor], weight, weight2, activation: str, param: float, param2: float, dim: int
) -> Optional[Tensor]:
    """``_fallback.bias_act`` compiled, or None where this path does not apply."""
    if not _applies(activation, (x, bias), (weight, weight2)):
        return None
    return _call(_forward, activation, x, _fallback._along(bias, x, dim), activation, param, param2)


def bias_act_backward(
    grad_y: Tensor,
    saved: Tensor,
    bias: Optional[Tensor],
    weight,
    weight2,
    activation: str,
    param: float,
    param2: float,
    dim: int,
    saved_is_output: bool,
    compute_grad_bias: bool,
) -> Optional[tuple[Tensor, Tensor]]:
    """(grad_x, the bias gradient in fp32, or empty where not asked for) as ``_fallback.bias_act_backward``
    computes them, or None where this path does not apply (``saved`` must be the input). With a bias
    gradient to sum, the compiled code gives each cache-sized piece's fp32 gradient and PyTorch rounds and
    sums it (``_fallback._piecewise``): inductor's own sum over the rows recomputes the whole formula in a
    second loop that walks the columns (bf16 [8192, 4096]: 128 ms against 44 without the sum)."""
    if saved_is_output or not _applies(activation, (saved, grad_y, bias), (weight, weight2)):
        return None
    if bias is None or not compute_grad_bias:
        grad_x = _call(_gradient_rounded, activation, grad_y, saved, _fallback._along(bias, saved, dim), activation,
                       param, param2)  # fmt: skip
        return None if grad_x is None else (grad_x, saved.new_empty(0))
    dim = _fallback._last_as_minus_one(dim, saved)
    args = (bias, activation, param, param2, dim)
    (grad_x,), (grad_bias,) = _fallback._piecewise(_gradient_piece, (grad_y, saved), args, dim, (saved,))
    return grad_x, grad_bias


def _gradient_piece(grad_y, saved, bias, activation, param, param2, dim) -> tuple[Tensor, Tensor]:
    """(grad_x in fp32, its sum over all but ``dim``) for one piece: compiled, or by the fallback where
    compiling stopped."""
    grad_x = _call(_gradient, activation, grad_y, saved, _fallback._along(bias, saved, dim), activation, param,
                   param2)  # fmt: skip
    if grad_x is None:
        args = (bias, None, None, activation, param, param2, dim, False, True, False)
        return _fallback._bias_act_backward_whole(grad_y, saved, *args)[:2]
    return grad_x, _fallback._channel_sum(grad_x, bias, True, dim)
