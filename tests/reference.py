"""float64 references and the tolerances the tests hold fusedact to.

References are PyTorch's own ops evaluated in float64 on ``z = x + bias`` (computed exactly in float64),
with the mathematical limit where PyTorch's formula gives NaN for an infinite input. Gradients come from
float64 autograd through the same ops.

Tolerances, per output dtype, for a result computed in fp32 and rounded once:
- bf16 / fp16: 1 ULP of the output dtype at the reference value. One rounding of an fp32 result that is
  within a few fp32 ULPs of the exact value lands on one of the two neighbours of the exact value.
- fp32: 8 fp32 ULPs: the GPU's exp/erf approximations are within 2 ULPs, and the formula adds a few
  roundings (sigmoid, the product, gelu-tanh's polynomial).
- all: plus an absolute floor of 2e-6 * clamp(|z|, 1, 10) * |grad|, for fp32's cancellation in ``1 + erf(z)`` and
  ``1 - sigmoid`` far in the negative tail, where the true value is below fp32 precision relative to 1
  (PyTorch's own fp32 ops share it).
- fp64 (the fallback's fp64 path): 1e-12 relative.
Bias gradients are sums over M rows in fp32 before one rounding: the floor becomes 2e-6 times the sum of
the magnitudes of the summed terms.
"""

import math

import torch
import torch.nn.functional as F

# (name, fusedact function name, keyword parameters)
SINGLE_CASES = [
    ("relu", "relu", {}),
    ("leaky_relu", "leaky_relu", {"negative_slope": 0.01}),
    ("leaky_relu_negative_slope", "leaky_relu", {"negative_slope": -0.2}),
    ("gelu", "gelu", {}),
    ("gelu_tanh", "gelu", {"approximate": "tanh"}),
    ("silu", "silu", {}),
    ("swish_beta", "swish", {"beta": 1.702}),
]

_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
_MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}


def reference_activation(z: torch.Tensor, function: str, params: dict) -> torch.Tensor:
    """f(z) in float64 from PyTorch's ops, with the limits at +-inf that PyTorch's formulas miss."""
    if function == "relu":
        y = F.relu(z)
    elif function == "leaky_relu":
        y = F.leaky_relu(z, params["negative_slope"])
    elif function == "gelu":
        y = F.gelu(z, approximate=params.get("approximate", "none"))
    elif function == "silu":
        y = F.silu(z)
    elif function == "swish":
        y = z * torch.sigmoid(params["beta"] * z)
    else:
        raise ValueError(function)
    if function in ("gelu", "silu", "swish"):
        y = torch.where(z == math.inf, math.inf, torch.where(z == -math.inf, -0.0, y))
    return y


def reference_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at ``|values|`` (float64), subnormals included."""
    _, exponent = torch.frexp(values.abs().to(torch.float64))
    exponent = torch.clamp(exponent - 1, min=_MIN_EXPONENT[dtype])
    return torch.pow(2.0, (exponent - _MANTISSA_BITS[dtype]).to(torch.float64))


def tolerance(reference: torch.Tensor, dtype: torch.dtype, floor: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Allowed |error| per element (see the module docstring)."""
    if dtype == torch.float64:
        return 1e-12 * reference.abs() + 1e-300 + floor * 1e-6
    ulps = 8.0 if dtype == torch.float32 else 1.0
    return ulps * ulp(reference, dtype) + floor


def assert_close(actual: torch.Tensor, reference: torch.Tensor, floor=0.0, what: str = "") -> None:
    """Compare to a float64 reference: the same NaN and infinity positions, otherwise within tolerance."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    actual64 = actual.detach().to(torch.float64).cpu()
    reference = reference.detach().to(torch.float64).cpu()
    nan = torch.isnan(reference)
    assert torch.equal(torch.isnan(actual64), nan), f"{what}: NaN positions differ from the float64 reference"
    inf = torch.isinf(reference)
    assert torch.equal(actual64[inf], reference[inf]), f"{what}: infinities differ from the float64 reference"
    finite = ~(nan | inf)
    allowed = tolerance(reference, actual.dtype, floor)
    error = (actual64 - reference).abs()
    bad = finite & ~(error <= allowed)
    if bad.any():
        index = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {reference.numel()} elements off the float64 reference; "
            f"first at {index}: got {actual64[tuple(index)].item()!r}, reference {reference[tuple(index)].item()!r}, "
            f"allowed error {allowed[tuple(index)].item():.3g}"
        )


def cancellation_floor(z: torch.Tensor, grad: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Absolute error floor for fp32 math at pre-activation ``z``: 2e-6 * |z| (|z| taken in [1, 10]: beyond
    10 every tail is exactly 0 or 1 in fp32 and the true remainder is below 1e-20), times |grad|; zero
    where z or grad is not finite, so those elements are held to the exact limit."""
    grad = grad.abs() if isinstance(grad, torch.Tensor) else torch.tensor(abs(grad), dtype=torch.float64)
    floor = 2e-6 * torch.clamp(z.abs(), 1.0, 10.0) * grad
    return torch.where(torch.isfinite(floor), floor, 0.0)
