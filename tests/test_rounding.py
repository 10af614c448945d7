"""One rounding, to nearest even, on every store: bit for bit what PyTorch's own conversion gives.

The inputs are every bf16 (and every fp16) bit pattern: subnormals, the largest finite values (whose sum
with a bias overflows to inf), signed zeros, infinities and NaN. The fp32 results of these ops are a
single IEEE operation on the loaded values (an add, a product), so the exact expected output is that
fp32 operation in PyTorch followed by PyTorch's fp32 -> bf16/fp16 conversion (round to nearest even).
Through Triton's interpreter this checks the kernels' own conversions (the interpreter's bf16 ones are
wrong, see ``fusedact.kernels.rounding``); on the GPU, the hardware's.
"""

import pytest
import torch

import fusedact

DTYPES = [torch.bfloat16, torch.float16]


def every_value(dtype: torch.dtype, device) -> torch.Tensor:
    """All 65536 bit patterns of a 16-bit float type, as a [256, 256] tensor."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256).to(device)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(actual), nan), f"{what}: NaN positions differ"
    same = actual.view(torch.int16) == expected.view(torch.int16)
    bad = ~(same | nan)
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} results are not the correctly rounded value; first: "
            f"got {actual[index].item()!r}, expected {expected[index].item()!r}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_bias_add_rounds_once_to_nearest_even(dtype, device):
    """relu(x + b) with b not representable next to x: the fp32 sum, rounded once."""
    x = every_value(dtype, device)
    bias = torch.linspace(-3.0, 3.0, 256, dtype=torch.float64).to(dtype).to(device) * 1.00390625
    y = fusedact.relu(x, bias)
    expected = torch.relu(x.float() + bias.float()).to(dtype)
    assert_bitwise(y.cpu(), expected.cpu(), f"relu(x + b) {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_products_round_once_to_nearest_even(dtype, device):
    """leaky_relu's negative side is one fp32 product: rounded once (subnormal results included)."""
    x = every_value(dtype, device)
    y = fusedact.leaky_relu(x, negative_slope=0.3)
    expected = torch.where(x.float() > 0, x.float(), x.float() * 0.3).to(dtype)
    assert_bitwise(y.cpu(), expected.cpu(), f"leaky_relu {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_loads_are_exact(dtype, device):
    """relu of every value is the value itself or zero: the loads widen exactly (subnormals too)."""
    x = every_value(dtype, device)
    assert_bitwise(fusedact.relu(x).cpu(), torch.relu(x).cpu(), f"relu {dtype}")
