"""PTX report: what the compiler makes of every fusedact kernel on an H100, without a GPU.

    python -m bench.ptx_report                                   # every kernel x activation, bf16 and fp32
    python -m bench.ptx_report --kernels bias_act_bwd_kernel --activations gelu_tanh --dtypes bf16
    python -m bench.ptx_report --kernels softmax_fwd_kernel softmax_bwd_kernel --cols 8192

The softmax kernels (``fusedact.kernels.softmax``) take no activation: their rows are ``softmax`` and
``log_softmax``, at the last dimension (``inner_size`` 1), for ``--cols`` columns (beyond ``MAX_BLOCK_N``
the online loop and the backward's row-sums kernel).

For each kernel of ``fusedact.kernels`` (unwrapped from ``@triton.heuristics`` down to its ``JITFunction``),
activation and dtype, ``triton.compile`` builds it for sm_90 with the specialisation a contiguous launch
gets: 16-byte-aligned pointers, row strides, sizes and rows per program divisible by 16
(``tt.divisibility``), column strides of 1 as constants, every optional pointer present (bias, bias
gradient), and the block shape and warps the launchers pick for ``--cols`` columns. Then Triton's own
``ptxas`` (``-arch=sm_90a -v``) reports registers per thread and spill bytes, and the PTX is searched for
the width of every global load and store (16 bytes: ``ld.global.v4.b32``, the widest there is).

A kernel argument the table below does not know stops the report with its name: the kernels changed, and
this file must learn the new argument. No GPU and no ``TRITON_INTERPRET`` needed (it is ignored here).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would hand us no JITFunction to compile

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fusedact import kernels  # noqa: E402
from fusedact.kernels import softmax as softmax_kernels  # noqa: E402
from fusedact.ops import saves_output  # noqa: E402

SOFTMAX_KERNELS = ("softmax_fwd_kernel", "softmax_bwd_kernel", "softmax_bwd_row_sums_kernel")
KERNELS = ("bias_act_fwd_kernel", "bias_act_bwd_kernel", "gated_fwd_kernel", "gated_bwd_kernel", *SOFTMAX_KERNELS)
SOFTMAX_VARIANTS = ("softmax", "log_softmax")
TARGET = GPUTarget("cuda", 90, 32)
TRITON_TYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


def jit_function(kernel) -> JITFunction:
    """The ``JITFunction`` under any ``@triton.heuristics`` / ``@triton.autotune`` wrappers."""
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def argument_spec(name: str, dtype: str, constants: dict) -> tuple[str, Optional[object], bool]:
    """(signature type, constant value or None, divisible by 16) of one kernel argument."""
    if name in constants:
        return "constexpr", constants[name], False
    if name.endswith("_ptr"):
        return ("*fp32" if name.startswith(("partial", "row_sums")) else f"*{TRITON_TYPES[dtype]}"), None, True
    if name == "stride_weight":
        return "i32", None, False  # 0 or 1 (a shared or per-channel PReLU slope)
    if name.startswith("stride_") and name.endswith(("_col", "_inner")) or name == "inner_size":
        return "constexpr", 1, False  # a launch with a column stride of 1 (softmax: last dim) specialises it so
    if name.startswith(("stride_", "num_")) or name == "rows_per_program":
        return "i32", None, True
    if name == "param":
        return "fp32", None, False
    raise KeyError(f"ptx_report does not know the kernel argument {name!r}: teach argument_spec about it")


def kernel_constants(activation: str, cols: int) -> dict:
    """The constexprs a launch of ``activation`` at ``cols`` columns passes, with every option switched on."""
    block_m, block_n = kernels.block_shape(cols)
    return {
        "ACTIVATION": kernels.ACTIVATIONS[activation],
        "HAS_BIAS": True,
        "HAS_GATE_BIAS": True,
        "HAS_UP_BIAS": True,
        "SAVED_IS_OUTPUT": saves_output(activation, 1.0),
        "COMPUTE_GRAD_BIAS": True,
        # The Linear case: bias along the columns, no per-channel parameter (PReLU and conv channels are
        # the other specialisations of the same kernels).
        "HAS_WEIGHT": False,
        "CHANNELS_ALONG_ROWS": False,
        "COMPUTE_GRAD_WEIGHT": False,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
    }


def softmax_constants(kernel_name: str, variant: str, cols: int) -> dict:
    """The constexprs of a softmax launch at the last dimension of ``cols`` columns, with a bias (gradient);
    the backward of a row that fits one block reduces it in place, without row sums."""
    block_m, block_n = softmax_kernels.softmax_block_shape(1 << 20, cols, rows_adjacent=False)
    constants = {"LOG": variant == "log_softmax", "HAS_BIAS": True, "COMPUTE_GRAD_BIAS": True}
    constants.update(SINGLE_BLOCK=cols <= block_n, HAS_ROW_SUMS=cols > block_n, BLOCK_M=block_m, BLOCK_N=block_n)
    if cols <= block_n and kernel_name == "softmax_bwd_kernel":
        constants["row_sums_ptr"] = None
    return constants


def block_and_warps(kernel_name: str, constants: dict) -> tuple[int, int]:
    block_m, block_n = constants["BLOCK_M"], constants["BLOCK_N"]
    if kernel_name in SOFTMAX_KERNELS:
        return block_m * block_n, softmax_kernels.softmax_num_warps(block_m, block_n)
    return block_m * block_n, kernels.num_warps_for(block_m, block_n)


def compile_ptx(kernel_name: str, activation: str, dtype: str, cols: int) -> tuple[str, int]:
    """(PTX, num_warps) of one kernel specialisation for sm_90."""
    if kernel_name in SOFTMAX_KERNELS:
        function = jit_function(getattr(softmax_kernels, kernel_name))
        constants = softmax_constants(kernel_name, activation, cols)
    else:
        function = jit_function(getattr(kernels, kernel_name))
        constants = kernel_constants(activation, cols)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(function.arg_names):
        kind, value, divisible = argument_spec(name, dtype, constants)
        signature[name] = kind
        if value is not None:
            constexprs[(index,)] = value
        if divisible:
            attrs[(index,)] = DIVISIBLE_BY_16
    _, num_warps = block_and_warps(kernel_name, constants)
    source = ASTSource(fn=function, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=TARGET, options={"num_warps": num_warps})
    return compiled.asm["ptx"], num_warps


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


def format_widths(widths: Counter) -> str:
    return ", ".join(f"{width} B x{count}" for width, count in sorted(widths.items(), reverse=True)) or "–"


def report_row(kernel_name: str, activation: str, dtype: str, cols: int) -> str:
    ptx, num_warps = compile_ptx(kernel_name, activation, dtype, cols)
    usage = registers_and_spills(ptx)
    if kernel_name in SOFTMAX_KERNELS:
        block_m, block_n = softmax_kernels.softmax_block_shape(1 << 20, cols, rows_adjacent=False)
    else:
        block_m, block_n = kernels.block_shape(cols)
    spills = f"{usage['spill_stores']} / {usage['spill_loads']}"
    cells = [kernel_name, activation, dtype, f"{block_m}x{block_n}", str(num_warps), str(usage["registers"]), spills]
    cells += [format_widths(access_widths(ptx, "ld")), format_widths(access_widths(ptx, "st"))]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| kernel | activation | dtype | BLOCK_M x BLOCK_N | warps | registers | spill bytes (st / ld) "
    "| global loads (bytes per thread x count) | global stores |\n|---|---|---|---|--:|--:|--:|---|---|"
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the report as a markdown table. Returns 0."""
    parser = argparse.ArgumentParser(prog="python -m bench.ptx_report", description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    activations = list(kernels.ACTIVATIONS)
    parser.add_argument("--activations", nargs="+", choices=activations, default=activations)
    parser.add_argument("--dtypes", nargs="+", choices=list(TRITON_TYPES), default=["bf16", "fp32"])
    parser.add_argument("--cols", type=int, default=4096, help="row width the launch is for (block shape, warps)")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, target sm_90 (ptxas -arch=sm_90a), {args.cols} columns\n")
    print(HEADER, flush=True)
    for kernel_name in args.kernels:
        variants = SOFTMAX_VARIANTS if kernel_name in SOFTMAX_KERNELS else args.activations
        for activation in variants:
            for dtype in args.dtypes:
                print(report_row(kernel_name, activation, dtype, args.cols), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
