"""Host overhead: CPU time per call on a tiny tensor, where launching costs more than the work.

Decoding runs an MLP on one token: ``[1, 4096]``. There the GPU finishes each kernel before the CPU has
launched the next, so the time per call of a long loop of calls, with one synchronisation at the end, is
the CPU's cost of issuing the call: Python, the dispatcher, autograd bookkeeping and the launches
(fusedact: one custom op and one kernel; eager: two ops, two kernels). Measured for a forward on inputs
that need no gradient (inference) and for forward + backward (training), for fusedact and eager only.
"""

import time
from collections.abc import Callable

import torch

from .cases import DTYPES, InputSet, Op, forward_backward, make_input_set, provider_function
from .sweep import first_line

OVERHEAD_OPS = ("gelu", "swiglu")
OVERHEAD_SHAPE = (1, 4096)
OVERHEAD_MODES = ("fwd", "fwd+bwd")
OVERHEAD_PROVIDERS = ("fusedact", "eager")


def microseconds_per_call(call: Callable[[], object], device: torch.device, calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the wall-clock time of ``calls`` calls (synchronised once) / ``calls``."""
    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(samples)[len(samples) // 2]


def overhead_call(function: Callable[..., object], inputs: InputSet, mode: str) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: function(*inputs.detached)
    return lambda: forward_backward(function, inputs.leaves, inputs.grad_out)


def measure_overhead(ops: dict[str, Op], dtype_name: str, device: torch.device, quick: bool) -> list[dict]:
    """One record per op x provider x mode: microseconds per call on an ``OVERHEAD_SHAPE`` tensor."""
    calls, repeats = (50, 3) if quick else (300, 7)
    records = []
    for op in (ops[name] for name in OVERHEAD_OPS if name in ops):
        inputs = make_input_set(op, *OVERHEAD_SHAPE, DTYPES[dtype_name], device)
        for provider in OVERHEAD_PROVIDERS:
            function = provider_function(op, provider)
            for mode in OVERHEAD_MODES:
                record = {"op": op.name, "dtype": dtype_name, "shape": list(OVERHEAD_SHAPE), "mode": mode}
                record["provider"] = provider
                try:
                    call = overhead_call(function, inputs, mode)
                    record["us_per_call"] = microseconds_per_call(call, device, calls, repeats)
                except Exception as error:  # recorded, as in the sweep
                    record["failed"] = first_line(error)
                records.append(record)
    return records
