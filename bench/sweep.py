"""One point of the sweep: an op x dtype x shape, every provider, every mode, into one record per mode.

Providers run one after the other on the same input sets: first the max error of the output and of the
gradients against the float64 reference, then the time of each mode. A provider that fails (out of memory,
a compile error, an op Liger does not have) is recorded as failed with the error's first line, and the
sweep goes on: a one-shot GPU run must never lose the other results to one bad point.

A record (one per mode) holds the point, its minimal byte count, and per provider the time quantiles, GB/s,
% of the copy bandwidth and errors, and fusedact's speedup over each other provider (their median time
over fusedact's).
"""

from collections.abc import Sequence
from typing import Optional

import torch

from .cases import (
    COMPILE_MODES,
    DTYPES,
    Op,
    case_bytes,
    has_bias,
    input_tensor_bytes,
    make_input_set,
    measure_errors,
    provider_function,
)
from .timing import gbps, rotation_count, time_ms, timed_call


def first_line(error: BaseException, limit: int = 240) -> str:
    """``Type: first line of the message``, short enough for a table cell."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def release_memory(device: torch.device) -> None:
    """Give cached blocks back between providers: shapes vary, and fragmentation could fail a large one."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_provider(
    op: Op, provider: str, input_sets: Sequence, modes: Sequence[str], device: torch.device, rep_ms: float
) -> Optional[dict]:
    """``{"errors": {...}, "ms": {mode: [median, p20, p80]}}``, ``{"failed": message}``, or None where the
    provider has no version of ``op``."""
    if provider in COMPILE_MODES:
        torch._dynamo.reset()  # a fresh cache per point: static shapes never reach the recompile limit
    function = provider_function(op, provider)
    if function is None:
        return None
    try:
        errors = measure_errors(op, function, input_sets[0])
        ms = {mode: time_ms(timed_call(function, input_sets, mode), device, rep_ms) for mode in modes}
    except Exception as error:  # recorded per provider; see the module docstring
        return {"failed": first_line(error)}
    finally:
        release_memory(device)
    return {"errors": errors, "ms": ms}


def point_record(
    op: Op,
    dtype_name: str,
    shape: tuple[int, int],
    mode: str,
    measured: dict[str, dict],
    copy_gbps: float,
    input_sets: int,
) -> dict:
    """The record of one mode of one point, from every provider's measurements."""
    rows, cols = shape
    itemsize = DTYPES[dtype_name].itemsize
    nbytes = case_bytes(op, mode, rows, cols, itemsize)
    providers = {}
    for provider, result in measured.items():
        if "failed" in result:
            providers[provider] = {"failed": result["failed"]}
            continue
        ms = result["ms"][mode]
        rate = gbps(nbytes, ms[0])
        providers[provider] = {"ms": ms, "gbps": rate, "pct_copy": 100 * rate / copy_gbps, "errors": result["errors"]}
    fused = providers.get("fusedact", {})
    speedup = {
        provider: entry["ms"][0] / fused["ms"][0]
        for provider, entry in providers.items()
        if provider != "fusedact" and "ms" in entry and "ms" in fused
    }
    return {
        "op": op.name,
        "eager_code": op.eager_text,
        "layout": op.layout,
        "has_bias": has_bias(op),
        "dtype": dtype_name,
        "rows": rows,
        "cols": cols,
        "mode": mode,
        "bytes": nbytes,
        "input_bytes": input_tensor_bytes(op, rows, cols, itemsize),
        "input_sets": input_sets,
        "providers": providers,
        "speedup": speedup,
    }


def run_point(
    op: Op,
    dtype_name: str,
    shape: tuple[int, int],
    modes: Sequence[str],
    providers: Sequence[str],
    device: torch.device,
    rep_ms: float,
    copy_gbps: float,
) -> list[dict]:
    """Every provider at one point; one record per mode."""
    rows, cols = shape
    dtype = DTYPES[dtype_name]
    first = make_input_set(op, rows, cols, dtype, device)
    set_bytes = sum(t.nbytes for t in first.leaves) + first.grad_out.nbytes
    count = rotation_count(device, set_bytes)
    input_sets = [first] + [make_input_set(op, rows, cols, dtype, device) for _ in range(count - 1)]
    measured = {}
    for provider in providers:
        result = measure_provider(op, provider, input_sets, modes, device, rep_ms)
        if result is not None:
            measured[provider] = result
    del input_sets, first
    release_memory(device)
    return [point_record(op, dtype_name, shape, mode, measured, copy_gbps, count) for mode in modes]
