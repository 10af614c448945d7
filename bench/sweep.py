"""One point of the sweep: an op x dtype x shape, every provider, every mode, into one record per mode.

GPU: providers run one after the other on the same input sets: first the max error of the output and of
the gradients against the float64 reference, then the time of each mode. CPU: every provider's errors
(on the first ``CPU_ERROR_ROWS`` rows: the float64 reference of a [8192, 4096] tensor would cost more
than timing it), then per mode all providers timed together in rounds (``timing.paired_cpu_ms``).
A provider that fails (out of memory, a compile error, an op Liger does not have) is recorded as failed
with the error's first line, and the sweep goes on: a one-shot GPU run must never lose the other results
to one bad point.

A record (one per mode) holds the point, its minimal byte count, and per provider the time quantiles, GB/s,
% of the copy bandwidth (GPU) and errors, and fusedact's speedup over each other provider (their median
time over fusedact's; on the CPU the median of that ratio round by round, with its 20-80 % range).
"""

from collections.abc import Sequence
from typing import Optional

import torch

from .cases import (
    COMPILE_MODES,
    CPU_ERROR_ROWS,
    DTYPES,
    InputSet,
    Op,
    case_bytes,
    error_input_set,
    has_bias,
    input_tensor_bytes,
    make_input_set,
    measure_errors,
    provider_function,
)
from .timing import gbps, paired_cpu_ms, paired_ratios, quantiles, rotation_count, time_ms, timed_call


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
    """GPU: ``{"errors": {...}, "ms": {mode: [median, p20, p80]}}``, ``{"failed": message}``, or None where
    the provider has no version of ``op``."""
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


def measure_paired(
    op: Op, providers: Sequence[str], inputs: InputSet, modes: Sequence[str], rep_ms: float
) -> dict[str, dict]:
    """CPU: every provider's errors (on ``error_input_set``'s rows), then per mode the providers timed
    together in rounds (``paired_cpu_ms``): ``{provider: {"errors", "ms": {mode: quantiles}, "samples":
    {mode: [ms per round]}}}`` or ``{provider: {"failed": message}}``."""
    if any(provider in COMPILE_MODES for provider in providers):
        torch._dynamo.reset()  # once per point: the compiled providers are timed side by side
    measured: dict[str, dict] = {}
    functions = {}
    error_inputs = error_input_set(inputs, CPU_ERROR_ROWS)
    for provider in providers:
        function = provider_function(op, provider)
        if function is None:
            continue
        try:
            measured[provider] = {"errors": measure_errors(op, function, error_inputs), "ms": {}, "samples": {}}
            functions[provider] = function
        except Exception as error:  # recorded per provider; see the module docstring
            measured[provider] = {"failed": first_line(error)}
    for mode in modes:
        calls = {}
        for provider, function in list(functions.items()):
            try:
                call = timed_call(function, [inputs], mode)
                call()  # a provider that fails in this mode fails alone, before the rounds
                calls[provider] = call
            except Exception as error:
                measured[provider] = {"failed": first_line(error)}
                del functions[provider]
        samples = paired_cpu_ms(calls, budget_s=rep_ms / 1e3) if calls else {}
        for provider, times in samples.items():
            measured[provider]["ms"][mode] = quantiles(times)
            measured[provider]["samples"][mode] = times
    return measured


def point_record(
    op: Op,
    dtype_name: str,
    shape: tuple[int, int],
    mode: str,
    measured: dict[str, dict],
    copy_gbps: Optional[float],
    input_sets: int,
) -> dict:
    """The record of one mode of one point, from every provider's measurements. ``copy_gbps`` None (the
    CPU): no % of copy. Where the providers were timed in rounds (CPU), ``paired`` holds, per provider,
    the quantiles of its time over fusedact's round by round, and ``speedup`` is the median of fusedact's
    speedup round by round; else ``speedup`` is the ratio of the medians."""
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
        share = None if copy_gbps is None else 100 * rate / copy_gbps
        providers[provider] = {"ms": ms, "gbps": rate, "pct_copy": share, "errors": result["errors"]}
    fused = providers.get("fusedact", {})
    timed = [p for p, entry in providers.items() if p != "fusedact" and "ms" in entry and "ms" in fused]
    paired = {}
    if timed and "samples" in measured["fusedact"]:
        samples = {p: measured[p]["samples"][mode] for p in ["fusedact", *timed]}
        paired = {p: paired_ratios(samples, p, "fusedact") for p in timed}
        speedup = {p: paired[p][0] for p in timed}
    else:
        speedup = {p: providers[p]["ms"][0] / fused["ms"][0] for p in timed}
    record = {
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
    if paired:
        record["paired"] = paired
        record["rounds"] = len(measured["fusedact"]["samples"][mode])
    return record


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
    if device.type != "cuda":
        measured = measure_paired(op, providers, first, modes, rep_ms)
        return [point_record(op, dtype_name, shape, mode, measured, None, 1) for mode in modes]
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
