"""Host overhead: CPU time per call on a tiny tensor, where launching costs more than the work.

Decoding runs an MLP on one token: ``[1, 4096]``. There the GPU finishes each kernel before the CPU has
launched the next, so the time per call of a long loop of calls, with one synchronisation at the end, is
the CPU's cost of issuing the call: Python, the dispatcher, autograd bookkeeping and the launches
(fusedact: one custom op and one kernel; eager: two ops, two kernels). Measured for a forward on inputs
that need no gradient (inference) and for forward + backward (training), for fusedact and eager only.

The breakdown (``measure_breakdown``) takes ``fusedact.gelu(x, b)`` at [1, 4096] fp32 apart by calling
each layer under the public function directly, in the same rounds (``timing.paired_cpu_ms``), with inputs
that do not and that do require grad:

    public          fusedact.gelu(x, b)                      everything a user pays
    entry           ops.run_bias_act(x, b, ...)              below the functional API's input checks
    implementation  ops._bias_act_impl(x, b, ...)            below the autograd wrapping (no Function, no graph)
    kernel call     ops._backend(x).bias_act(x, b, ...)      the Triton launcher (GPU) or the fallback's math (CPU)

so that public - entry is the input checks, entry - implementation the autograd wrapping (the Function and,
with grad, the graph it records), implementation - kernel call the dispatch and layout handling, and the
kernel call the launch (GPU) or the compute (CPU). Beside it, eager's ``x + b``, ``F.gelu(z)`` and the
pair ``F.gelu(x + b)``. The layers are found by name in ``fusedact.ops`` (``LAYERS``); a layer that a
change to ops.py renamed or removed is reported as missing, not silently skipped, and the test of the
breakdown fails until ``LAYERS`` names it again. Issue 14's goal: our host time above the kernel call
(the checks, the autograd wrapping, the dispatch) within 1.5x of eager's pair. It is timed whole, as the
public call with the kernel call stubbed (``STUBBED_STAGE``: the backend only allocates the output), not
as public - kernel call: the kernel call is the launch on a GPU and the fallback's math on the CPU (for
gelu an accurate erfc, 4-5x eager's erf at this size, whose jitter exceeds our part); "public / eager"
beside it is the whole call.

Both run with one intra-op thread (``one_thread``): a [1, 4096] op gains nothing from a second one, and on
a busy machine the hand-off to an OpenMP thread that is not running costs a scheduler slice (measured on
the 2-core development machine under load: ``F.gelu`` of 4096 elements 12 ms per call with two threads,
10 us with one), which would bury the microseconds this section is about.
"""

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F

import fusedact

from .cases import DTYPES, InputSet, Op, forward_backward, make_input_set, provider_function
from .sweep import first_line
from .timing import paired_cpu_ms, quantiles

OVERHEAD_OPS = ("gelu", "swiglu")
OVERHEAD_SHAPE = (1, 4096)
OVERHEAD_MODES = ("fwd", "fwd+bwd")
OVERHEAD_PROVIDERS = ("fusedact", "eager")
BREAKDOWN_DTYPE = "fp32"
BREAKDOWN_GOAL = 1.5  # issue 14: fusedact's host time per call within 1.5x of eager's add + activation


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


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to one inside, restored after (see the module docstring)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_overhead(ops: dict[str, Op], dtype_name: str, device: torch.device, quick: bool) -> list[dict]:
    """One record per op x provider x mode: microseconds per call on an ``OVERHEAD_SHAPE`` tensor."""
    with one_thread():
        return _measure_overhead(ops, dtype_name, device, quick)


def _measure_overhead(ops: dict[str, Op], dtype_name: str, device: torch.device, quick: bool) -> list[dict]:
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


# ---------------------------------------------------------------------------------------------------
# The breakdown of one call

# (stage, what it shows, attribute path in fusedact.ops or None for the public function). The arguments
# are those functional.gelu passes down: (x, bias, weight, activation, param, dim), dim as an index.
LAYERS = (
    ("public", "fusedact.gelu(x, b)", None),
    ("entry", "ops.run_bias_act: below the input checks", "run_bias_act"),
    ("implementation", "ops._bias_act_impl: below the autograd wrapping", "_bias_act_impl"),
    ("kernel call", "ops._backend(x).bias_act: the launcher (GPU) / the fallback's math (CPU)", "_backend"),
)
EAGER_STAGES = ("x + b", "F.gelu(z)", "F.gelu(x + b)")


def layer_calls(x: torch.Tensor, bias: torch.Tensor, detached: tuple) -> dict[str, Callable[[], object]]:
    """The callable of each of ``LAYERS`` on (x, bias); ``detached``: the same tensors without grad, for
    the layers below the autograd wrapping (which must record no graph). A layer whose name ``fusedact.ops``
    lacks raises AttributeError naming it."""
    ops = fusedact.ops
    dim = x.dim() - 1
    args = (None, None, "gelu", 0.0, 0.0, dim)  # (no learned parameters)
    calls = {"public": lambda: fusedact.gelu(x, bias)}
    entry = ops.run_bias_act
    calls["entry"] = lambda: entry(x, bias, *args)
    implementation = ops._bias_act_impl
    calls["implementation"] = lambda: implementation(*detached, *args)
    backend = ops._backend(detached[0])
    calls["kernel call"] = lambda: backend.bias_act(*detached, *args)
    return calls


def measure_breakdown(device: torch.device, quick: bool, synchronize: Optional[Callable[[], None]] = None) -> dict:
    """us per call of every layer of ``fusedact.gelu(x, b)`` and of eager's pair, at ``OVERHEAD_SHAPE`` in
    ``BREAKDOWN_DTYPE``, without and with ``requires_grad`` (forward only: what a decoding step or a
    training forward pays per call). Returns ``{"shape", "dtype", "columns": {"no grad": {stage: [median,
    p20, p80]}, "requires grad": {...}}, "missing": [...]}``."""
    with one_thread():
        return _measure_breakdown(device, quick, synchronize)


def _measure_breakdown(device: torch.device, quick: bool, synchronize: Optional[Callable[[], None]]) -> dict:
    dtype = DTYPES[BREAKDOWN_DTYPE]
    if synchronize is None and device.type == "cuda":
        synchronize = torch.cuda.synchronize
    x = torch.randn(OVERHEAD_SHAPE, dtype=dtype, device=device)
    bias = torch.randn(OVERHEAD_SHAPE[1], dtype=dtype, device=device)
    result = {"shape": list(OVERHEAD_SHAPE), "dtype": BREAKDOWN_DTYPE, "columns": {}, "missing": []}
    for column, grad in (("no grad", False), ("requires grad", True)):
        xs, bs = x.detach().clone().requires_grad_(grad), bias.detach().clone().requires_grad_(grad)
        detached = (xs.detach(), bs.detach())
        try:
            calls = layer_calls(xs, bs, detached)
        except AttributeError as error:  # ops.py changed: say which layer is gone, keep the rest
            result["missing"] = [first_line(error)]
            calls = {"public": lambda xs=xs, bs=bs: fusedact.gelu(xs, bs)}
        z = (xs + bs).detach().requires_grad_(grad)
        if not result["missing"]:  # our part alone: the kernel call stubbed out
            calls[STUBBED_STAGE] = lambda xs=xs, bs=bs: _with_kernel_stubbed(fusedact.gelu, xs, bs)
        if device.type == "cuda":  # the same public call with fusedact's launch cache off: what it saves
            calls[UNCACHED_STAGE] = lambda xs=xs, bs=bs: _without_launch_cache(fusedact.gelu, xs, bs)
        calls.update({
            "x + b": lambda xs=xs, bs=bs: xs + bs,
            "F.gelu(z)": lambda z=z: F.gelu(z),
            "F.gelu(x + b)": lambda xs=xs, bs=bs: F.gelu(xs + bs),
        })  # fmt: skip
        for call in calls.values():
            for _ in range(3):  # warm-up: first calls build caches (dispatch keys, the launcher's)
                call()
        samples = paired_cpu_ms(calls, budget_s=0.05 if quick else 0.5, min_rounds=5 if quick else 15,
                                synchronize=synchronize)  # fmt: skip
        result["columns"][column] = {stage: [1e3 * v for v in quantiles(times)] for stage, times in samples.items()}
    return result


UNCACHED_STAGE = "public, launch cache off"
STUBBED_STAGE = "public, kernel call stubbed"


class _StubBackend:
    """A backend whose ``bias_act`` only allocates its output (as every launcher does): what is left of the
    public call is our host time above the kernel call, measured whole rather than as a difference of two
    timings (on the CPU the kernel call is the fallback's math, tens of microseconds that vary by more
    than our part)."""

    @staticmethod
    def bias_act(x, *args):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _with_kernel_stubbed(function: Callable[..., object], *args) -> object:
    """``function(*args)`` with ``fusedact.ops._backend`` answering ``_StubBackend`` (restored after)."""
    ops = fusedact.ops
    backend, ops._backend = ops._backend, lambda t: _StubBackend
    try:
        return function(*args)
    finally:
        ops._backend = backend


def _without_launch_cache(function: Callable[..., object], *args) -> object:
    """``function(*args)`` with ``fusedact._triton.LAUNCH_CACHE`` off: every launch through Triton's own."""
    cache = fusedact.ops._triton.LAUNCH_CACHE
    enabled, cache.enabled = cache.enabled, False
    try:
        return function(*args)
    finally:
        cache.enabled = enabled


def breakdown_rows(breakdown: dict) -> list[tuple[str, str, list[Optional[float]]]]:
    """(stage, what it adds, us per column) for the table: each layer's own share (its time minus the
    layer below's), then the totals and fusedact / eager."""
    columns = list(breakdown["columns"].values())
    median = lambda column, stage: column.get(stage, [None])[0]  # noqa: E731

    def share(stage: str, below: Optional[str]) -> list[Optional[float]]:
        values = []
        for column in columns:
            top, bottom = median(column, stage), (median(column, below) if below else 0.0)
            values.append(None if top is None or bottom is None else top - bottom)
        return values

    names = [name for name, _, _ in LAYERS]
    shares = {"public": "input checks", "entry": "autograd wrapping", "implementation": "dispatch and layout"}
    rows = []
    for index, (name, what, _) in enumerate(LAYERS):
        rows.append((name, what, [median(column, name) for column in columns]))
        if name in shares:
            rows.append((f"  {shares[name]}", f"{name} - {names[index + 1]}", share(name, names[index + 1])))
    if any(UNCACHED_STAGE in column for column in columns):
        rows.append(
            (
                UNCACHED_STAGE,
                "every launch through Triton's JITFunction.run",
                [median(c, UNCACHED_STAGE) for c in columns],
            )
        )
    for stage in EAGER_STAGES:
        rows.append((f"eager {stage}", "PyTorch", [median(column, stage) for column in columns]))
    above = [median(column, STUBBED_STAGE) for column in columns]
    rows.append((STUBBED_STAGE, "our host time above the kernel call (checks, autograd, dispatch)", above))
    total, ratio = [], []
    for column, ours in zip(columns, above, strict=True):
        fused, eager = median(column, "public"), median(column, "F.gelu(x + b)")
        total.append(None if fused is None or not eager else fused / eager)
        ratio.append(None if ours is None or not eager else ours / eager)
    rows.append(("public / eager", "public over F.gelu(x + b), the launch (CPU: the math) included", total))
    rows.append(("fusedact / eager", f"kernel call stubbed over F.gelu(x + b); goal <= {BREAKDOWN_GOAL}", ratio))
    return rows


def breakdown_table(breakdown: dict) -> str:
    """The breakdown as markdown: us per call (median), one column per grad setting."""
    if not breakdown:
        return "not measured"
    columns = list(breakdown["columns"])
    shape = "x".join(map(str, breakdown["shape"]))
    lines = [f"gelu with a bias, [{shape}] {breakdown['dtype']}, us per call (median), forward:", ""]
    lines += ["| stage | what | " + " | ".join(columns) + " |", "|---|---|" + "--:|" * len(columns)]
    for stage, what, values in breakdown_rows(breakdown):
        is_ratio = stage in ("fusedact / eager", "public / eager")
        cells = ["–" if v is None else (f"{v:.2f}x" if is_ratio else f"{v:.1f}") for v in values]
        lines.append(f"| {stage} | {what} | " + " | ".join(cells) + " |")
    for missing in breakdown.get("missing", []):
        lines.append(f"\nmissing layer (bench/overhead.py LAYERS names one that fusedact.ops lacks): {missing}")
    return "\n".join(lines)


def breakdown_ratio(breakdown: dict, column: str) -> Optional[float]:
    """Issue 14's measure, in ``column``: our host time above the kernel call (``fusedact.gelu(x, b)`` with
    the kernel call stubbed: the checks, autograd and dispatch; on a GPU the launch is the kernel call)
    over eager's ``F.gelu(x + b)``, its two ops whole."""
    values = breakdown.get("columns", {}).get(column, {})
    if STUBBED_STAGE not in values or "F.gelu(x + b)" not in values:
        return None
    return values[STUBBED_STAGE][0] / values["F.gelu(x + b)"][0]


def stage_names() -> Sequence[str]:
    return [name for name, _, _ in LAYERS] + [STUBBED_STAGE] + list(EAGER_STAGES)
