"""Timing: quantiles of one call's run time, the calls each mode times, and the copy-bandwidth yardstick.

GPU: ``triton.testing.do_bench``, which zeroes a 256 MB buffer before every call so that the L2 holds
nothing of the previous one, and times each call with CUDA events; where one set of inputs fits in the L2
(50 MB on an H100) the calls also rotate among several sets, so no call finds its inputs in the cache
even when the flush is absent from a Triton version. CPU: wall-clock time of single calls after warm-up,
one input set (the CPU's caches are part of what a CPU user gets).

The copy bandwidth is that of one large device-to-device ``copy_`` (bytes read + bytes written over its
time), measured in the same run: the practical ceiling for a memory-bound kernel, against which every
result's GB/s is given as a percentage.
"""

import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .cases import InputSet, forward_backward

try:
    import triton.testing
except ImportError:  # a CPU-only install may have no Triton; only the GPU timer needs it
    triton = None

QUANTILES = (0.5, 0.2, 0.8)  # median first, then the 20-80 % range
DEFAULT_L2_BYTES = 50 * 2**20  # an H100's, where the device does not report its own
MAX_INPUT_SETS = 64
MIN_TIMED_CALLS = 8


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_L2_BYTES) or DEFAULT_L2_BYTES


def rotation_count(device: torch.device, set_bytes: int) -> int:
    """How many input sets to cycle through so that no timed call finds its inputs in the GPU's L2: one
    when a set is at least the L2's size, else enough that the sets together span 4x the L2."""
    cache = l2_bytes(device)
    if device.type != "cuda" or set_bytes >= cache:
        return 1
    return min(MAX_INPUT_SETS, math.ceil(4 * cache / max(set_bytes, 1)))


def cpu_time_ms(call: Callable[[], object], budget_s: float, warmup: int = 2, min_repeats: int = 5) -> list[float]:
    """``QUANTILES`` of the wall-clock times (ms) of single calls, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 1000):
        begin = time.perf_counter()
        call()
        times.append((time.perf_counter() - begin) * 1e3)
    quantiles = torch.tensor(QUANTILES, dtype=torch.float64)
    return torch.tensor(times, dtype=torch.float64).quantile(quantiles).tolist()


def single_call_ms(call: Callable[[], object]) -> float:
    """One call's time on the GPU, after one untimed call."""
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_ms(call: Callable[[], object], device: torch.device, rep_ms: float) -> list[float]:
    """[median, 20th, 80th percentile] of ``call``'s run time in ms, over about ``rep_ms`` of calls and at
    least ``MIN_TIMED_CALLS`` calls (a 30 ms call would otherwise be timed once: no quantiles)."""
    if device.type == "cuda":
        rep = max(rep_ms, MIN_TIMED_CALLS * single_call_ms(call))
        warmup = max(1, int(rep_ms // 4))
        return list(triton.testing.do_bench(call, warmup=warmup, rep=math.ceil(rep), quantiles=list(QUANTILES)))
    return cpu_time_ms(call, budget_s=rep_ms / 1e3)


def timed_call(function: Callable[..., Tensor], input_sets: Sequence[InputSet], mode: str) -> Callable[[], object]:
    """A call of ``function`` in ``mode`` for the timer, taking the next input set each time.

    ``fwd``: the forward on inputs that need no gradient (inference). ``fwd+bwd``: forward, then the
    gradients of every leaf. ``bwd``: the backward alone, of one forward run here once per input set and
    kept (``retain_graph``), into fresh gradient tensors on every call.
    """
    rotation = itertools.cycle(input_sets)
    if mode == "fwd":
        return lambda: function(*next(rotation).detached)
    if mode == "fwd+bwd":

        def forward_and_backward() -> object:
            inputs = next(rotation)
            return forward_backward(function, inputs.leaves, inputs.grad_out)

        return forward_and_backward
    if mode == "bwd":
        saved = itertools.cycle([(function(*inputs.leaves), inputs) for inputs in input_sets])

        def backward() -> object:
            output, inputs = next(saved)
            return torch.autograd.grad(output, inputs.leaves, inputs.grad_out, retain_graph=True)

        return backward
    raise ValueError(f"unknown mode {mode!r}")


def copy_bandwidth(device: torch.device, rep_ms: float) -> dict:
    """GB/s of a large device-to-device copy, counting bytes read + written: the practical ceiling."""
    nbytes = 2**30 if device.type == "cuda" else 2**26
    source = torch.randn(nbytes // 4, device=device)
    destination = torch.empty_like(source)
    ms = time_ms(lambda: destination.copy_(source), device, rep_ms)
    moved = 2 * nbytes
    return {"bytes": moved, "ms": ms, "gbps": gbps(moved, ms[0])}


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
