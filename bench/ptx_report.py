"""PTX report: what the compiler makes of fusedact's kernels for an H100/H200 (sm_90), without a GPU.

    python -m bench.ptx_report                                        # the hot cases at the usual widths
    python -m bench.ptx_report --cases act-bwd-bias gated-bwd --widths 760 11007 --dtypes bf16
    python -m bench.ptx_report --cases act-fwd --activations gelu silu --widths 4096 --ptx-dir ptx/

A *case* is one real call of fusedact's launchers (``fusedact._triton``, ``fusedact.softmax``) on CPU
tensors of the case's shape and layout, with ``_triton.launch`` replaced by a recorder: the launcher
picks the kernel, the grid, the block shape, ``FLAT``/``VECTOR`` and every argument exactly as it does for
a CUDA tensor of that shape. Each recorded launch is then specialised by Triton's own binder for sm_90,
as a real launch is (integers divisible by 16 and pointers aligned to 16 bytes marked so, integers equal
to 1 made constants, the ``@triton.heuristics`` applied), compiled with ``triton.compile``, and Triton's
``ptxas`` (``-arch=sm_90a -v``) reports registers and spills. From the PTX: the width of every global load
and store (16 bytes = ``ld.global.v4.b32``, the widest), the barriers inside loops (a reduction per row
step shows up as ``bar.sync`` in the loop body) and the instruction count.

What a report says is what the GPU runs for that shape: nothing is assumed about alignment or sizes.
No GPU and no ``TRITON_INTERPRET`` needed (it is ignored here). ``compile_case`` is the library entry
(``tests/test_ptx.py`` asserts on it).
"""

import argparse
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would hand us no JITFunction to compile

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fusedact import _triton, kernels, ops  # noqa: E402

softmax_ops = importlib.import_module("fusedact.softmax")  # the module (fusedact.softmax is also the function)

TARGET = GPUTarget("cuda", 90, 32)
UNSUPPORTED = "bench.ptx_report: this Triton"  # how an unsupported Triton's message starts (the tests skip on it)


def unsupported_triton() -> Optional[str]:
    """Why this Triton's binder can not specialise the launches here, or None. The report runs Triton's own
    binder, ``create_function_from_signature(signature, params, backend)`` then ``JITFunction._pack_args``,
    as the Triton versions it is tested with have them (3.6, 3.8); Triton 3.1's takes no backend and has
    no ``_pack_args``."""
    takes_backend = len(inspect.signature(create_function_from_signature).parameters) >= 3
    if takes_backend and hasattr(JITFunction, "_pack_args"):
        return None
    return (f"{UNSUPPORTED} ({triton.__version__}) has another binder than the one the report runs "
            "(create_function_from_signature with a backend, JITFunction._pack_args: Triton 3.6, 3.8)")  # fmt: skip


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WIDTHS = (4096, 11008, 760, 1128, 196, 49, 11007)
ROWS = 4096
CONV_CHANNELS = 64


# ---------------------------------------------------------------------------------------------------
# Cases: real launcher calls


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


# Each activation's float parameters, and its learned ones (shared by every channel, as xIELU's), as a call
# of fusedact passes them: (param, param2, number of learned parameters).
_PARAMETERS = {"hardtanh": (0.0, 6.0), "softplus": (1.0, 20.0), "xielu": (0.5, -1e-6), "leaky_relu": (0.01, 0.0)}


def _parameters(activation: str, dtype) -> tuple:
    """(weight, weight2, param, param2) of ``activation`` for the launchers."""
    learned = kernels.LEARNED_PARAMETERS.get(activation, 0)
    weights = [torch.empty(1, dtype=dtype) for _ in range(learned)] + [None] * (2 - learned)
    return (*weights, *_PARAMETERS.get(activation, (1.0, 0.0)))


def _bias_act(x, bias, activation, dim=1):
    weight, weight2, param, param2 = _parameters(activation, x.dtype)
    _triton.bias_act(x, bias, weight, weight2, activation, param, param2, dim)


def _bias_act_backward(grad_y, saved, bias, activation, with_bias_grad):
    weight, weight2, param, param2 = _parameters(activation, saved.dtype)
    saved_is_output = ops.saves_output(activation, param)
    _triton.bias_act_backward(
        grad_y, saved, bias, weight, weight2, activation, param, param2, 1, saved_is_output, with_bias_grad,
        weight is not None,
    )  # fmt: skip


def _act_fwd(activation, dtype, width, rows):
    x, bias = _empty(rows, width, dtype=dtype), _empty(width, dtype=dtype)
    _bias_act(x, bias, activation)


def _act_fwd_strided(activation, dtype, width, rows):
    x, bias = _empty(rows, width + 8, dtype=dtype)[:, :width], _empty(width, dtype=dtype)
    _bias_act(x, bias, activation)


def _act_fwd_sliced(activation, dtype, width, rows):
    """x a column slice from the fifth column: its rows start 4 elements past a 16-byte boundary (8 bytes
    in bf16), so the widest access its alignment allows is 4 elements."""
    x, bias = _empty(rows, width + 8, dtype=dtype)[:, 4 : 4 + width], _empty(width, dtype=dtype)
    _bias_act(x, bias, activation)


def _act_fwd_offset(activation, dtype, width, rows):
    """x contiguous but one element into its storage: its pointer is not 16-byte aligned."""
    x, bias = _empty(rows * width + 1, dtype=dtype)[1:].view(rows, width), _empty(width, dtype=dtype)
    _bias_act(x, bias, activation)


def _act_bwd(activation, dtype, width, rows, with_bias_grad=False):
    """The backward, with the learned parameters' gradients where the activation has them."""
    grad_y, saved, bias = _empty(rows, width, dtype=dtype), _empty(rows, width, dtype=dtype), _empty(width, dtype=dtype)
    _bias_act_backward(grad_y, saved, bias, activation, with_bias_grad)


def _conv(activation, dtype, width, rows, backward=False):
    """An NCHW feature map of ``width`` = H x W pixels and a bias on its channels (``bias_act(dim=1)``)."""
    batch = max(1, rows // CONV_CHANNELS)
    x, bias = _empty(batch, CONV_CHANNELS, width, dtype=dtype), _empty(CONV_CHANNELS, dtype=dtype)
    if backward:
        _bias_act_backward(torch.empty_like(x), x, bias, activation, True)
    else:
        _bias_act(x, bias, activation)


def _gated_fwd(activation, dtype, width, rows, packed=False):
    if packed:
        x = _empty(rows, 2 * width, dtype=dtype)
        gate, up = x[:, :width], x[:, width:]
    else:
        gate, up = _empty(rows, width, dtype=dtype), _empty(rows, width, dtype=dtype)
    _, _, param, param2 = _parameters(activation, dtype)
    _triton.gated(gate, up, None, None, activation, param, param2, 1.0)


def _gated_bwd(activation, dtype, width, rows, packed=False, with_bias=False):
    _, _, param, param2 = _parameters(activation, dtype)
    if packed:
        x, grad_x = _empty(rows, 2 * width, dtype=dtype), _empty(rows, 2 * width, dtype=dtype)
        gate, up, grad_gate, grad_up = x[:, :width], x[:, width:], grad_x[:, :width], grad_x[:, width:]
    else:
        gate, up = _empty(rows, width, dtype=dtype), _empty(rows, width, dtype=dtype)
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    biases = (_empty(width, dtype=dtype), _empty(width, dtype=dtype)) if with_bias else (None, None)
    _triton.gated_backward_into(
        grad_gate, grad_up, _empty(rows, width, dtype=dtype), gate, up, *biases, activation, param, param2, 1.0,
        with_bias,
    )  # fmt: skip


def _softmax_fwd(activation, dtype, width, rows):
    softmax_ops._softmax_triton(_empty(rows, width, dtype=dtype), _empty(width, dtype=dtype), 1, activation == "log")


def _softmax_bwd(activation, dtype, width, rows):
    y = _empty(rows, width, dtype=dtype)
    softmax_ops._softmax_backward_triton(torch.empty_like(y), y, 1, activation == "log", True)


# name -> (call, activations it takes by default, description)
CASES: dict[str, tuple[Callable, tuple[str, ...], str]] = {
    "act-fwd": (_act_fwd, ("gelu", "gelu_tanh", "swish", "relu"), "x [rows, width] + bias, contiguous"),
    "act-fwd-strided": (_act_fwd_strided, ("gelu",), "x a column slice of [rows, width + 8]"),
    "act-fwd-sliced": (_act_fwd_sliced, ("gelu",), "x a column slice of [rows, width + 8] from column 4"),
    "act-fwd-offset": (_act_fwd_offset, ("gelu",), "x contiguous from the second element of its storage"),
    "act-bwd": (_act_bwd, ("gelu", "gelu_tanh", "swish", "relu"), "backward, no bias gradient"),
    "act-bwd-bias": (
        functools.partial(_act_bwd, with_bias_grad=True),
        ("gelu", "gelu_tanh", "swish", "relu"),
        "backward with the bias gradient",
    ),
    "conv-fwd": (_conv, ("relu", "swish"), f"NCHW [rows/{CONV_CHANNELS}, {CONV_CHANNELS}, width], channel bias"),
    "conv-bwd-bias": (functools.partial(_conv, backward=True), ("relu", "swish"), "its backward, bias gradient"),
    "gated-fwd": (_gated_fwd, ("swish", "gelu"), "gate and up separate [rows, width]"),
    "gated-fwd-packed": (functools.partial(_gated_fwd, packed=True), ("swish",), "halves of [rows, 2 width]"),
    "gated-bwd": (_gated_bwd, ("swish", "gelu"), "backward, separate, no biases"),
    "gated-bwd-packed": (functools.partial(_gated_bwd, packed=True), ("swish", "gelu"), "backward, packed"),
    "gated-bwd-bias": (
        functools.partial(_gated_bwd, with_bias=True),
        ("swish", "gelu"),
        "backward with gate/up bias gradients",
    ),
    "softmax-fwd": (_softmax_fwd, ("softmax", "log"), "rows of width, bias"),
    "softmax-bwd-bias": (_softmax_bwd, ("softmax", "log"), "backward with the bias gradient"),
}
DEFAULT_CASES = ("act-fwd", "act-bwd", "act-bwd-bias", "conv-fwd", "conv-bwd-bias", "gated-fwd", "gated-bwd",
                 "gated-bwd-packed", "gated-bwd-bias")  # fmt: skip


@dataclass
class Launch:
    kernel: object  # the @triton.heuristics wrapper or the JITFunction
    args: tuple
    meta: dict


def record_launches(case: str, activation: str, dtype: str, width: int, rows: int = ROWS) -> list[Launch]:
    """Run one case's launcher on CPU tensors with ``_triton.launch`` recording instead of launching."""
    launches = []

    def record(kernel, grid, device, *args, **meta):
        launches.append(Launch(kernel, args, meta))

    call = CASES[case][0]
    with mock.patch.object(_triton, "launch", record):
        call(activation, DTYPES[dtype], width, rows)
    return launches


# ---------------------------------------------------------------------------------------------------
# Specialise as Triton does, compile, read the PTX


@dataclass
class KernelFacts:
    """What the compiled code of one launch shows."""

    kernel: str
    constants: dict  # the launch's constexprs (FLAT, VECTOR, BLOCK_M, ...)
    num_warps: int
    registers: Optional[int]
    spill_stores: int
    spill_loads: int
    loads: Counter  # bytes per thread of one ld.global -> how many in the PTX
    stores: Counter
    barriers_in_loops: int
    instructions: int
    ptx: str = field(repr=False)


def _unwrap(kernel) -> tuple[JITFunction, dict]:
    """The JITFunction under the heuristics wrappers, and the heuristics' rules."""
    rules = {}
    while not isinstance(kernel, JITFunction):
        rules.update(getattr(kernel, "values", {}))
        kernel = kernel.fn
    return kernel, rules


@functools.cache
def _backend():
    return make_backend(TARGET)


def specialise(launch: Launch) -> tuple[JITFunction, dict, dict, dict, object]:
    """(function, signature, constexprs, attrs, options) of a launch, by Triton's own binder for sm_90."""
    function, rules = _unwrap(launch.kernel)
    kwargs = dict(launch.meta)
    named = dict(zip(function.arg_names, launch.args, strict=False))
    named.update(kwargs)
    for name, rule in rules.items():
        kwargs[name] = rule(named)
    binder = create_function_from_signature(function.signature, function.params, _backend())
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = function._pack_args(_backend(), kwargs, bound_args, specialization, options)
    return function, signature, constexprs, attrs, options


_COMPILED: dict = {}


def compile_launch(launch: Launch) -> KernelFacts:
    function, signature, constexprs, attrs, options = specialise(launch)
    key = (function.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))  # fmt: skip
    if key not in _COMPILED:
        compiled = triton.compile(ASTSource(function, signature, constexprs, attrs), target=TARGET,
                                  options=options.__dict__)  # fmt: skip
        ptx = compiled.asm["ptx"]
        usage = registers_and_spills(ptx)
        constants = {function.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        _COMPILED[key] = KernelFacts(
            kernel=function.__name__,
            constants={k: v for k, v in constants.items() if k.isupper()},
            num_warps=options.num_warps,
            registers=usage["registers"],
            spill_stores=usage["spill_stores"],
            spill_loads=usage["spill_loads"],
            loads=access_widths(ptx, "ld"),
            stores=access_widths(ptx, "st"),
            barriers_in_loops=barriers_in_loops(ptx),
            instructions=instruction_count(ptx),
            ptx=ptx,
        )
    return _COMPILED[key]


def compile_case(case: str, activation: str, dtype: str, width: int, rows: int = ROWS) -> list[KernelFacts]:
    """The facts of every kernel one case launches, as the GPU would compile them."""
    return [compile_launch(launch) for launch in record_launches(case, activation, dtype, width, rows)]


def check_launch_cache(widths: Sequence[int], dtypes: Sequence[str], rows: int = ROWS) -> list[str]:
    """Hold ``fusedact._triton.LAUNCH_CACHE`` to Triton's own binder over every case's real launches.

    For each recorded launch: (1) the arguments the cache launches a compiled kernel with, ``args`` then
    its constexpr values, are exactly ``bound_args.values()``, what ``JITFunction.run`` passes; (2) their
    count is the compiled signature's; (3) launches with equal cache keys have equal Triton
    specialisations and options (the key is at least as fine as Triton's). Returns the problems found."""
    problems, triton_key_of = [], {}
    device = torch.device("cuda", 0)
    for case, (_, activations, _) in CASES.items():
        for activation in activations:
            for dtype in dtypes:
                for width in widths:
                    for launch in record_launches(case, activation, dtype, width, rows):
                        where = f"{case} {activation} {dtype} {width}"
                        function, signature, _, _, options = specialise(launch)
                        rules = _unwrap(launch.kernel)[1]
                        kwargs = dict(launch.meta)
                        named = dict(zip(function.arg_names, launch.args, strict=False)) | kwargs
                        kwargs.update({name: rule(named) for name, rule in rules.items()})
                        binder = create_function_from_signature(function.signature, function.params, _backend())
                        bound_args, specialization, _ = binder(*launch.args, **kwargs)
                        constexprs = _triton.LAUNCH_CACHE.constexpr_values(launch.kernel, launch.args, launch.meta)
                        ours = [*launch.args, *(constexprs or ())]
                        theirs = list(bound_args.values())
                        if (
                            constexprs is None
                            or len(ours) != len(theirs)
                            or any(
                                a is not b and not (type(a) is type(b) and a == b)
                                for a, b in zip(ours, theirs, strict=True)
                            )
                        ):
                            problems.append(f"{where}: cached launch arguments differ from JITFunction.run's")
                        if len(signature) != len(ours):
                            problems.append(f"{where}: {len(ours)} arguments for a signature of {len(signature)}")
                        key = _triton.LAUNCH_CACHE.key(launch.kernel, device, launch.args, launch.meta)
                        triton_key = (repr(specialization), repr(sorted(options.__dict__.items())))
                        if triton_key_of.setdefault(key, triton_key) != triton_key:
                            problems.append(f"{where}: one cache key for two Triton specialisations")
    return problems


def ptxas_path() -> Path:
    binaries = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (binaries / name).exists():
            return binaries / name
    raise FileNotFoundError(f"no ptxas in {binaries}")


def registers_and_spills(ptx: str) -> dict:
    """ptxas -v on the PTX: registers per thread, spill store and load bytes."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.ptx"
        path.write_text(ptx)
        command = [str(ptxas_path()), "-arch=sm_90a", "-v", str(path), "-o", str(Path(directory) / "kernel.o")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": int(registers.group(1)) if registers else None,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
    }


def access_widths(ptx: str, kind: str) -> Counter:
    """Bytes per thread of each ``ld.global`` (kind "ld") or ``st.global`` ("st") in the PTX -> count."""
    widths: Counter = Counter()
    for suffix in re.findall(rf"\b{kind}\.global([\w.:]*)", ptx):
        vector = re.search(r"\.v(\d)", suffix)
        bits = re.search(r"\.[bfsu](\d+)\b", suffix)
        if bits:
            widths[(int(vector.group(1)) if vector else 1) * int(bits.group(1)) // 8] += 1
    return widths


def barriers_in_loops(ptx: str) -> int:
    """``bar.sync`` instructions inside a loop: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {}
    for index, line in enumerate(lines):
        match = re.match(r"^(\$L__\w+):", line.strip())
        if match:
            labels[match.group(1)] = index
    inside = set()
    for index, line in enumerate(lines):
        match = re.search(r"\bbra(?:\.uni)?\s+(\$L__\w+);", line)
        if match and labels.get(match.group(1), index) < index:
            inside.update(range(labels[match.group(1)], index + 1))
    return sum(1 for index in inside if "bar.sync" in lines[index])


def instruction_count(ptx: str) -> int:
    """PTX instructions (lines ending in ';' that are not declarations)."""
    declarations = (".reg", ".param", ".shared", ".local", ".global", ".loc", ".file", ".visible", ".entry")
    return sum(
        1 for line in ptx.splitlines() if line.strip().endswith(";") and not line.strip().startswith(declarations)
    )


def format_widths(widths: Counter) -> str:
    return ", ".join(f"{width} B x{count}" for width, count in sorted(widths.items(), reverse=True)) or "–"


HEADER = (
    "| case | activation | dtype | width | kernel | FLAT | VECTOR | block | warps | registers | spills (st/ld B) "
    "| loads (B per thread x count) | stores | bar.sync in loops | instructions |\n"
    "|---|---|---|--:|---|---|--:|---|--:|--:|--:|---|---|--:|--:|"
)


def facts_json(case: str, activation: str, dtype: str, width: int, facts: KernelFacts) -> dict:
    """One launch's facts as plain JSON (widths as {"bytes": count})."""
    return {
        "case": case, "activation": activation, "dtype": dtype, "width": width, "kernel": facts.kernel,
        "constants": facts.constants, "num_warps": facts.num_warps, "registers": facts.registers,
        "spill_stores": facts.spill_stores, "spill_loads": facts.spill_loads,
        "loads": {str(k): v for k, v in facts.loads.items()}, "stores": {str(k): v for k, v in facts.stores.items()},
        "barriers_in_loops": facts.barriers_in_loops, "instructions": facts.instructions,
    }  # fmt: skip


def report_rows(case: str, activation: str, dtype: str, width: int, rows: int = ROWS) -> list[str]:
    out = []
    for facts in compile_case(case, activation, dtype, width, rows):
        constants = facts.constants
        cells = [case, activation, dtype, str(width), facts.kernel, str(constants.get("FLAT", "–")),
                 str(constants.get("VECTOR", "–")), f"{constants.get('BLOCK_M')}x{constants.get('BLOCK_N')}",
                 str(facts.num_warps), str(facts.registers), f"{facts.spill_stores} / {facts.spill_loads}",
                 format_widths(facts.loads), format_widths(facts.stores), str(facts.barriers_in_loops),
                 str(facts.instructions)]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the report as a markdown table. Returns 0."""
    parser = argparse.ArgumentParser(prog="python -m bench.ptx_report", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cases", nargs="+", default=list(DEFAULT_CASES), metavar="CASE[:ACTIVATION]",
        help=f"cases (one of {', '.join(CASES)}), each optionally with the activation to compile it for",
    )  # fmt: skip
    parser.add_argument("--activations", nargs="+", help="instead of each case's default activations")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    parser.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS), help="row widths (conv: H x W)")
    parser.add_argument("--rows", type=int, default=ROWS, help="rows of the [rows, width] tensors")
    parser.add_argument("--ptx-dir", type=Path, help="also write each compiled kernel's PTX here")
    parser.add_argument("--json", action="store_true", help="print one JSON list of every launch's facts instead")
    parser.add_argument(
        "--check-launch-cache", action="store_true",
        help="check fusedact's launch cache against Triton's binder over every case (exit 1 on a problem)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    reason = unsupported_triton()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    if args.check_launch_cache:
        problems = check_launch_cache(args.widths, args.dtypes, args.rows)
        print("\n".join(problems) or f"launch cache agrees with Triton {triton.__version__}'s binder on every case")
        return 1 if problems else 0
    plan = []  # (case, activations)
    for spec in args.cases:
        case, _, activation = spec.partition(":")
        if case not in CASES:
            parser.error(f"unknown case {case!r}; expected one of {', '.join(CASES)}")
        plan.append((case, [activation] if activation else args.activations or list(CASES[case][1])))
    if args.json:
        records = []
        for case, activations in plan:
            for activation in activations:
                for dtype in args.dtypes:
                    for width in args.widths:
                        for facts in compile_case(case, activation, dtype, width, args.rows):
                            records.append(facts_json(case, activation, dtype, width, facts))
        print(json.dumps(records))
        return 0
    print(f"triton {triton.__version__}, target sm_90 (ptxas -arch=sm_90a), real launches at {args.rows} rows\n")
    for case, _ in plan:
        print(f"- {case}: {CASES[case][2]}")
    print("\n" + HEADER, flush=True)
    for case, activations in plan:
        for activation in activations:
            for dtype in args.dtypes:
                for width in args.widths:
                    for row in report_rows(case, activation, dtype, width, args.rows):
                        print(row, flush=True)
    if args.ptx_dir:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
        for index, facts in enumerate(_COMPILED.values()):
            (args.ptx_dir / f"{index:03d}-{facts.kernel}.ptx").write_text(facts.ptx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
