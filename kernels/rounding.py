"""Loads widen to fp32 exactly; stores round once, to nearest even: the two conversions every kernel makes.

Compiled for a GPU both are the hardware's conversions (``cvt.f32.bf16``, ``cvt.rn.bf16.f32``,
``cvt.rn.f16.f32``: exact, and round-to-nearest-even with subnormals and overflow to inf).

Triton's interpreter (``TRITON_INTERPRET=1``, which runs the kernels on CPU tensors for the tests)
evaluates them with numpy, which has no bf16: its own bf16 conversions truncate on the way down (even with
``fp_downcast_rounding="rtne"``, which mishandles subnormals and overflow) and misplace subnormals on the
way up. Under the interpreter the kernels therefore convert bf16 in integer arithmetic, the exact
definition of both conversions, so the interpreter computes the bits the GPU does. fp16 and fp32 take
numpy's conversions there, which are correct.
"""

import os

import triton
import triton.language as tl

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_fp32(x):
    """A loaded block as fp32, exactly."""
    if x.dtype == tl.bfloat16 and _INTERPRETED:
        # A bf16 number is the top half of the fp32 number with the same value.
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def round_to(y, dtype: tl.constexpr):
    """``y`` (fp32) rounded once to ``dtype``, to nearest even (subnormals and overflow to inf included)."""
    if dtype == tl.bfloat16 and _INTERPRETED:
        bits = y.to(tl.uint32, bitcast=True)
        # Add just under half of the dropped 16 bits' unit, plus one if the kept part is odd: ties go to even.
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)  # a NaN stays a (quiet) NaN, never rounds into inf
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)
