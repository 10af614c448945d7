"""Timing: quantiles of one call's run time, the calls each mode times, and the copy-bandwidth yardstick.

GPU (``gpu_time_ms``): single calls timed with CUDA events, each after a *read* of a buffer four times the
L2's size (at least 256 MiB), so that no call finds the previous one's data in the L2. A read, not a
write: ``triton.testing.do_bench`` zeroes its buffer, which leaves the L2 full of dirty lines that are
written back to memory while the next timed call runs, and bills that call for them; the lines a read
leaves are clean, and the previous call's own dirty lines are written back during the read, outside the
timed region. Where one set of inputs fits in the L2 the calls also rotate among several sets.
The copy yardstick is timed by the same function, so both sides of "% of copy" see the same flush.

CPU (``paired_cpu_ms``): the providers of a point are timed in *rounds*: each round times every provider
once, in an order that rotates from round to round, so that a busy machine's drift (another process, the
clock) hits all of them alike; a provider's time is the median over the rounds, and fusedact's ratio to
another provider is the median of the per-round ratios, with their 20-80 % range as the spread. A sample
is a batch of calls lasting at least ``MIN_SAMPLE_S`` (a 20 us call is timed as 50 calls; the first
round's single calls set the batches), one input set
(the CPU's caches are part of what a CPU user gets). At least ``MIN_CPU_ROUNDS`` rounds (a median of 5
is moved by no 2 outliers) and more while the time budget lasts: a [8192, 4096] point gets 5, a tiny one
up to ``MAX_CPU_ROUNDS``.
"""

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor

from .cases import InputSet, forward_backward

QUANTILES = (0.5, 0.2, 0.8)  # median first, then the 20-80 % range
DEFAULT_L2_BYTES = 50 * 2**20  # an H100's, where the device does not report its own
MIN_FLUSH_BYTES = 256 * 2**20
MAX_INPUT_SETS = 64
MIN_TIMED_CALLS = 8
MAX_TIMED_CALLS = 2000
MIN_CPU_ROUNDS = 5
MAX_CPU_ROUNDS = 200
MIN_SAMPLE_S = 1e-3


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


def quantiles(samples: Sequence[float]) -> list[float]:
    """``QUANTILES`` (median, p20, p80) of ``samples``, linear interpolation as ``torch.quantile``."""
    values = torch.tensor(list(samples), dtype=torch.float64)
    return values.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


# ---------------------------------------------------------------------------------------------------
# CPU


def calls_per_sample(one_call_s: float) -> int:
    """How many calls make one sample of at least ``MIN_SAMPLE_S``, given one call's time."""
    return max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(one_call_s, 1e-9))))


def paired_cpu_ms(
    calls: Mapping[str, Callable[[], object]],
    budget_s: float,
    min_rounds: int = MIN_CPU_ROUNDS,
    synchronize: Optional[Callable[[], None]] = None,
) -> dict[str, list[float]]:
    """Per name, the ms per call of each round (see the module docstring): at least ``min_rounds`` rounds,
    more while ``budget_s`` lasts (at most ``MAX_CPU_ROUNDS``). Each call must have run once already.
    ``synchronize`` (the host overhead on a GPU) runs before each batch's clock starts and stops."""
    synchronize = synchronize or (lambda: None)
    names = list(calls)
    # The first round times single calls and sets each name's batch from them: no call is spent on
    # calibrating alone (at [8192, 4096] a call costs up to a second, and each one counts).
    batch = dict.fromkeys(names, 1)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_index in itertools.count():
        if round_index >= MAX_CPU_ROUNDS or (round_index >= min_rounds and time.perf_counter() - start >= budget_s):
            break
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            call, count = calls[name], batch[name]
            synchronize()
            begin = time.perf_counter()
            for _ in range(count):
                call()
            synchronize()
            samples[name].append((time.perf_counter() - begin) * 1e3 / count)
        if round_index == 0:
            batch = {name: calls_per_sample(samples[name][0] / 1e3) for name in names}
    return samples


def paired_ratios(samples: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> list[float]:
    """Round by round, ``numerator``'s time over ``denominator``'s: ``QUANTILES`` of those ratios."""
    ratios = [a / b for a, b in zip(samples[numerator], samples[denominator], strict=True) if b > 0]
    return quantiles(ratios) if ratios else [math.nan] * len(QUANTILES)


def cpu_time_ms(call: Callable[[], object], budget_s: float, min_rounds: int = MIN_CPU_ROUNDS) -> list[float]:
    """``QUANTILES`` of ``call``'s ms per call on the CPU (after one untimed call): ``paired_cpu_ms`` with one name."""
    call()
    return quantiles(paired_cpu_ms({"call": call}, budget_s, min_rounds)["call"])


# ---------------------------------------------------------------------------------------------------
# GPU

_flush_buffers: dict[str, Tensor] = {}


def flush_buffer(device: torch.device) -> Tensor:
    """A buffer of 4x the L2 (at least ``MIN_FLUSH_BYTES``), made once per device; its values never matter."""
    key = str(device)
    if key not in _flush_buffers:
        nbytes = max(MIN_FLUSH_BYTES, 4 * l2_bytes(device))
        _flush_buffers[key] = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    return _flush_buffers[key]


def read_flush(buffer: Tensor) -> None:
    """Read every byte of ``buffer`` (a sum: one scalar written); evicts the L2 with clean lines."""
    buffer.sum()


def gpu_time_ms(
    call: Callable[[], object],
    rep_ms: float,
    flush: Tensor,
    event: Optional[Callable[[], object]] = None,
    synchronize: Optional[Callable[[], None]] = None,
) -> list[float]:
    """``QUANTILES`` of single calls' times (ms) by events around each call, after ``read_flush(flush)``.

    About ``rep_ms`` of calls (at least ``MIN_TIMED_CALLS``, at most ``MAX_TIMED_CALLS``) after a quarter of
    that in warm-up. ``event`` and ``synchronize`` default to CUDA's (a test passes host-clock ones)."""
    event = event or (lambda: torch.cuda.Event(enable_timing=True))
    synchronize = synchronize or torch.cuda.synchronize
    call()
    synchronize()
    first, last = event(), event()
    first.record()
    for _ in range(5):
        read_flush(flush)
        call()
    last.record()
    synchronize()
    estimate_ms = max(first.elapsed_time(last) / 5, 1e-4)  # a call and its flush
    repeats = max(MIN_TIMED_CALLS, min(MAX_TIMED_CALLS, int(rep_ms / estimate_ms)))
    for _ in range(max(1, min(MAX_TIMED_CALLS, int(rep_ms / 4 / estimate_ms)))):
        call()
    starts, ends = [event() for _ in range(repeats)], [event() for _ in range(repeats)]
    for start, end in zip(starts, ends, strict=True):
        read_flush(flush)
        start.record()
        call()
        end.record()
    synchronize()
    return quantiles([start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)])


def time_ms(call: Callable[[], object], device: torch.device, rep_ms: float) -> list[float]:
    """[median, 20th, 80th percentile] of ``call``'s run time in ms over about ``rep_ms`` of calls: the
    GPU timer with its read flush, or the CPU's (one name, ``MIN_CPU_ROUNDS`` samples at least)."""
    if device.type == "cuda":
        return gpu_time_ms(call, rep_ms, flush_buffer(device))
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
    """GB/s of a large device-to-device copy, counting bytes read + written: the practical ceiling. Timed
    by ``time_ms`` like every result (on the GPU: after the same read flush)."""
    nbytes = 2**30 if device.type == "cuda" else 2**26
    source = torch.randn(nbytes // 4, device=device)
    destination = torch.empty_like(source)
    ms = time_ms(lambda: destination.copy_(source), device, rep_ms)
    moved = 2 * nbytes
    return {"bytes": moved, "ms": ms, "gbps": gbps(moved, ms[0])}


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
