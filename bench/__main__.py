"""Benchmark: fusedact against eager PyTorch, torch.compile and Liger Kernel; time, GB/s and error side by side.

    python -m bench                                   # the default sweep: the GPU if there is one, else the CPU
    python -m bench --out                             # ... written to bench/results/<device>-<date>/ (to commit)
    python -m bench --quick --device cpu              # a few seconds: fusedact's CPU fallback vs eager
    python -m bench --ops gelu swiglu --dtypes bf16 --shapes 8192x4096 --modes fwd --providers fusedact eager
    python -m bench --plan                            # what the chosen sweep runs, and a rough time estimate

What runs, in order (see each module's docstring for the details):
1. the copy bandwidth, the yardstick of every GB/s (``timing.py``);
2. host overhead: microseconds per call on a [1, 4096] tensor, and a [1, 4096] gelu with a bias taken
   apart layer by layer (input checks, autograd wrapping, dispatch, the launch) next to eager's add + gelu
   (``overhead.py``);
3. memory and step time of fwd+bwd of a Linear -> GELU -> Linear block and of a SwiGLU MLP (``memory.py``);
   the bias in the GEMM: eager ``act(F.linear(a, W, b))`` against fusedact after the same GEMM, on the
   whole layer and beyond the GEMM (``linear.py``);
4. the sweep: op x dtype x shape, every provider, every mode (fwd, bwd, fwd+bwd): median/p20/p80 time,
   GB/s from the minimal byte count, % of copy bandwidth, speedup over every provider, and every
   provider's max error against a float64 reference (``cases.py``, ``sweep.py``).
A markdown table is printed as the sweep goes; every run writes JSON, CSV, markdown (and plots) into
``bench-results/<device>-<date>/`` (git-ignored; ``--out DIR`` elsewhere) and says where; on a GPU the
issue's targets are checked against the results. ``--time-limit`` stops the sweep (not the sections
before it) in time to write what was measured, listing the points left out.

On the CPU the numbers are those of fusedact's PyTorch fallback against eager PyTorch, not the Triton
kernels: the default CPU run (70-95 s on a busy 2-core machine) times gelu, silu and swiglu at
[8192, 4096] in fp32 and bf16, forward and forward + backward, both providers in rounds, and prints
fusedact / eager round by round with its spread; the GPU targets are not judged there. torch.compile runs
on the CPU only when asked for (``--providers ... compile``: about 30 s per compile there).
"""

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

import fusedact

from .cases import (
    COMPILE_MODES,
    CPU_DEFAULT_MODES,
    CPU_DEFAULT_OPS,
    CPU_QUICK_SHAPES,
    CPU_SHAPES,
    DEFAULT_OPS,
    DTYPES,
    GPU_COMPILE_SHAPES,
    GPU_QUICK_SHAPES,
    GPU_SHAPES,
    MODES,
    PROVIDERS,
    available_ops,
    format_shape,
    liger_function,
    parse_shape,
)
from .linear import LINEAR_LEGEND, linear_table, measure_linear
from .memory import measure_blocks
from .overhead import breakdown_table, measure_breakdown, measure_overhead
from .report import (
    CPU_LEGEND,
    CPU_NOTE,
    FORMATS,
    SWEEP_LEGEND,
    Progress,
    check_targets,
    cpu_ratio_table,
    environment,
    failures,
    memory_table,
    out_dir_from,
    overhead_table,
    sweep_header,
    sweep_row,
    targets_table,
    write_report,
)
from .sweep import run_point
from .timing import copy_bandwidth

try:
    import triton
except ImportError:
    triton = None

SECTIONS = ("overhead", "memory", "linear", "sweep")
SAVE_EVERY_S = 20.0
DEFAULT_DTYPES = {"cuda": ("bf16", "fp32", "fp16"), "cpu": ("fp32", "bf16")}
# Milliseconds of calls per timing: do_bench's ``rep`` on the GPU, the CPU timer's budget on the CPU.
DEFAULT_REP_MS = {("cuda", False): 25.0, ("cuda", True): 20.0, ("cpu", False): 100.0, ("cpu", True): 20.0}


@dataclass(frozen=True)
class Settings:
    """Everything the command line chose, resolved against the device's defaults."""

    ops: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    compile_shapes: tuple[tuple[int, int], ...]
    compile_dtypes: tuple[str, ...]
    compile_ops: tuple[str, ...]
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    sections: tuple[str, ...]
    rep_ms: float
    quick: bool
    time_limit_s: Optional[float]

    def providers_at(self, dtype_name: str, shape: tuple[int, int], op_name: Optional[str] = None) -> tuple[str, ...]:
        """The compiled providers run only at ``compile_dtypes`` x ``compile_shapes`` x ``compile_ops``; the
        others everywhere."""
        compiled_here = dtype_name in self.compile_dtypes and shape in self.compile_shapes
        compiled_here = compiled_here and (op_name is None or op_name in self.compile_ops)
        return tuple(p for p in self.providers if p not in COMPILE_MODES or compiled_here)

    def points(self) -> list[tuple[str, str, tuple[int, int]]]:
        """(dtype, op, shape) in the order they run: dtype first, so a time limit cuts the last dtype."""
        return list(itertools.product(self.dtypes, self.ops, self.shapes))

    def as_dict(self) -> dict:
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}
        data["shapes"] = [format_shape(shape) for shape in self.shapes]
        data["compile_shapes"] = [format_shape(shape) for shape in self.compile_shapes]
        data["compile_dtypes"] = list(self.compile_dtypes)
        return data


def shape_argument(text: str) -> tuple[int, int]:
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(op_names: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="fusedact vs eager PyTorch, torch.compile and Liger: time, GB/s, % of copy bandwidth, "
        "speedup, and every provider's max error against float64.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"ops: {' '.join(op_names)} (or all)\n"
        f"default ops: {' '.join(DEFAULT_OPS)} (CPU: {' '.join(CPU_DEFAULT_OPS)})\n"
        f"default GPU shapes: tokens x hidden grid and odd sizes: {' '.join(map(format_shape, GPU_SHAPES))}\n"
        f"default GPU compile shapes: {' '.join(map(format_shape, GPU_COMPILE_SHAPES))}\n"
        f"default CPU shapes: {' '.join(map(format_shape, CPU_SHAPES))}",
    )
    parser.add_argument("--ops", nargs="+", choices=[*op_names, "all"], metavar="OP", help="ops to sweep")
    parser.add_argument(
        "--dtypes", nargs="+", choices=list(DTYPES), metavar="DTYPE", help="bf16 fp16 fp32 (default: all on a GPU)"
    )
    parser.add_argument("--shapes", nargs="+", type=shape_argument, metavar="ROWSxCOLS", help="e.g. 8192x4096")
    parser.add_argument(
        "--compile-shapes",
        nargs="+",
        metavar="ROWSxCOLS",
        help="shapes at which torch.compile runs, or 'all' (default: the GPU compile shapes on the default GPU "
        "sweep, else every swept shape)",
    )
    parser.add_argument(
        "--compile-dtypes",
        nargs="+",
        choices=list(DTYPES),
        metavar="DTYPE",
        help="dtypes at which torch.compile runs (default: the first swept dtype on a GPU, every one on the CPU)",
    )
    parser.add_argument(
        "--compile-ops", nargs="+", choices=op_names, metavar="OP", help="ops torch.compile runs for (default: all)"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, metavar="MODE", help="fwd bwd fwd+bwd (default: all; CPU: fwd fwd+bwd)"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        metavar="PROVIDER",
        help=f"any of {' '.join(PROVIDERS)} (default: all on a GPU, fusedact eager on the CPU)",
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, metavar="SECTION", help=" ".join(SECTIONS))
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if available")
    parser.add_argument(
        "--cpu-backend",
        choices=["torch", "compiled"],
        default="torch",
        help="what runs fusedact on the CPU: the fallback (torch) or its compiled path (fusedact.set_cpu_backend)",
    )
    parser.add_argument("--quick", action="store_true", help="one shape, shorter timing")
    parser.add_argument(
        "--rep-ms", type=float, help="ms of calls per timing (GPU: 25, quick 20; CPU: rounds' budget, 100, quick 20)"
    )
    parser.add_argument("--time-limit", type=float, metavar="SECONDS", help="start no sweep point after this")
    parser.add_argument(
        "--out",
        nargs="?",
        const="",
        metavar="DIR",
        help="write JSON, CSV, markdown and PNG plots into DIR (no DIR: bench/results/<device>-<date>/, to commit; "
        "default: bench-results/<device>-<date>/, git-ignored)",
    )
    parser.add_argument("--name", metavar="STEM", help="file names STEM.json, STEM.md, ... (default: the device)")
    parser.add_argument(
        "--formats", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FORMAT", help="json csv md png"
    )
    parser.add_argument("--plan", action="store_true", help="print what would run and a rough time; run nothing")
    return parser


def resolve_device(parser: argparse.ArgumentParser, requested: str, plan_only: bool) -> torch.device:
    """The device to run on; ``--plan`` may name cuda without one (it only prints the GPU sweep)."""
    device_type = requested
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if plan_only:
        return torch.device(device_type)
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if device_type == "cuda" and triton is None:
        parser.error("--device cuda: triton is not installed")
    return torch.device(device_type)


def resolve_compile_points(
    args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device, shapes, dtypes
) -> tuple[tuple[tuple[int, int], ...], tuple[str, ...]]:
    """(compile shapes, compile dtypes). Compiling every point of the GPU grid would take an hour, so on
    the GPU torch.compile runs in the first dtype (bf16 by default), and on the default grid at the GPU
    compile shapes only; on the CPU (where it runs only when asked for) at every point."""
    if args.compile_shapes is None:
        default_gpu_grid = device.type == "cuda" and args.shapes is None and not args.quick
        compile_shapes = GPU_COMPILE_SHAPES if default_gpu_grid else shapes
    elif args.compile_shapes == ["all"]:
        compile_shapes = shapes
    else:
        try:
            compile_shapes = tuple(parse_shape(text) for text in args.compile_shapes)
        except ValueError as error:
            parser.error(f"--compile-shapes: {error}")
    compile_dtypes = args.compile_dtypes or (dtypes[:1] if device.type == "cuda" else dtypes)
    return compile_shapes, tuple(compile_dtypes)


def parse_args(argv: Sequence[str]) -> tuple[Settings, torch.device, argparse.Namespace, list[str]]:
    """Settings, device, the parsed arguments (``out``: None, "" for the default directory, or DIR;
    ``plan``, ``name``, ``formats``), and notes."""
    ops = available_ops()
    parser = build_parser(list(ops))
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device, args.plan)
    notes = []
    if args.cpu_backend == "compiled":
        previous = fusedact.get_cpu_backend()
        try:
            fusedact.set_cpu_backend("compiled")
        except RuntimeError as error:
            parser.error(f"--cpu-backend compiled: {error}")
        fusedact.set_cpu_backend(previous)

    default_ops = DEFAULT_OPS if device.type == "cuda" else CPU_DEFAULT_OPS
    op_names = tuple(ops) if args.ops and "all" in args.ops else tuple(args.ops or default_ops)
    missing = [name for name in op_names if name not in ops]
    op_names = tuple(name for name in op_names if name in ops)
    if missing:  # only default ops can be missing: --ops choices are the available ones
        notes.append(f"this fusedact has no {', '.join(missing)}: left out")
    if device.type == "cuda":
        shapes = GPU_QUICK_SHAPES if args.quick else GPU_SHAPES
        providers = args.providers or PROVIDERS
    else:
        shapes = CPU_QUICK_SHAPES if args.quick else CPU_SHAPES
        providers = args.providers or ("fusedact", "eager")
    shapes = tuple(args.shapes or shapes)
    if "liger" in providers and not any(liger_function(ops[name]) for name in op_names if ops[name].liger):
        if args.providers and "liger" in args.providers:
            notes.append("liger_kernel does not import (or no selected op has a Liger version): Liger skipped")
        providers = tuple(p for p in providers if p != "liger")
    if "fusedact" not in providers:
        providers = ("fusedact", *providers)  # every speedup is fusedact's
    rep_ms = args.rep_ms or DEFAULT_REP_MS[(device.type, args.quick)]
    if rep_ms <= 0:
        parser.error("--rep-ms must be positive")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error("--time-limit must be positive")
    dtypes = tuple(args.dtypes or DEFAULT_DTYPES[device.type])
    compile_shapes, compile_dtypes = resolve_compile_points(args, parser, device, shapes, dtypes)
    settings = Settings(
        ops=op_names,
        dtypes=dtypes,
        shapes=shapes,
        compile_shapes=compile_shapes,
        compile_dtypes=compile_dtypes,
        compile_ops=tuple(args.compile_ops or op_names),
        modes=tuple(args.modes or (MODES if device.type == "cuda" else CPU_DEFAULT_MODES)),
        providers=tuple(providers),
        sections=tuple(args.sections or SECTIONS),
        rep_ms=rep_ms,
        quick=args.quick,
        time_limit_s=args.time_limit,
    )
    return settings, device, args, notes


# Rough costs for --plan: seconds per timing beyond its rep time, per point, per compile of one graph.
PLAN_COSTS = {
    "cuda": {"timing": 0.02, "point": 0.1, "compile": 4.0},
    "cpu": {"timing": 0.01, "point": 0.2, "compile": 30.0},
}


def plan(settings: Settings, device: torch.device) -> str:
    """What the sweep runs, and a rough estimate of its time (the sections before it add about a minute
    on a GPU with torch.compile, seconds without)."""
    points = settings.points()
    providers = [settings.providers_at(dtype, shape, op) for dtype, op, shape in points]
    timings = sum(len(here) for here in providers) * len(settings.modes)
    compiled = sum(provider in COMPILE_MODES for here in providers for provider in here)
    graphs = 2 * compiled  # an inference graph and a training graph (forward + backward) per point
    costs = PLAN_COSTS[device.type]
    seconds = timings * (settings.rep_ms * 1.3e-3 + costs["timing"]) + len(points) * costs["point"]
    seconds += graphs * costs["compile"]
    return "\n".join(
        [
            f"device: {device.type}; sections: {' '.join(settings.sections)}",
            f"ops: {' '.join(settings.ops)}",
            f"dtypes: {' '.join(settings.dtypes)}; modes: {' '.join(settings.modes)}",
            f"shapes ({len(settings.shapes)}): {' '.join(map(format_shape, settings.shapes))}",
            f"providers: {' '.join(settings.providers)}; torch.compile at "
            f"{' '.join(map(format_shape, settings.compile_shapes))} in {' '.join(settings.compile_dtypes)}",
            f"sweep: {len(points)} points, {timings} timings, {graphs} torch.compile graphs",
            f"rough sweep time: {seconds / 60:.1f} min (rep {settings.rep_ms:g} ms per timing)",
        ]
    )


def run_sweep(
    settings: Settings, device: torch.device, copy_gbps: float, report: dict, save
) -> tuple[list[dict], list[str]]:
    """Every point of the sweep; prints each row as it comes. Returns the records and the points left out
    by the time limit. ``save(report)`` follows every point, so a killed run keeps (nearly) all it measured.

    Under ``--time-limit`` a point with torch.compile runs its compiled providers only if their estimated
    cost fits in the time left (``compile_cost_s`` per compiled provider: ``PLAN_COSTS``'s two graphs at
    first, then the dearest compiled point seen so far, per provider); otherwise it runs without them,
    listed in ``report["compile_cut"]``: one compile of minutes cannot overshoot the limit."""
    ops = available_ops()
    points = settings.points()
    providers = [p for p in settings.providers if p != "liger" or any(ops[o].liger for o in settings.ops)]
    gpu = device.type == "cuda"
    print(sweep_header(providers, show_copy=gpu), flush=True)
    progress = Progress(len(points))
    skipped = report["skipped"]  # filled as it goes: an interrupted run still lists what it left out
    compile_cost_s = 2 * PLAN_COSTS[device.type]["compile"]
    try:
        for dtype_name, op_name, shape in points:
            label = f"{op_name} {dtype_name} {format_shape(shape)}"
            elapsed = time.perf_counter() - report["started"]
            if settings.time_limit_s is not None and elapsed > settings.time_limit_s:
                skipped.append(label)
                continue
            here = settings.providers_at(dtype_name, shape, op_name)
            compiled = [p for p in here if p in COMPILE_MODES]
            if compiled and not compile_fits(settings.time_limit_s, elapsed, len(compiled) * compile_cost_s):
                here = tuple(p for p in here if p not in COMPILE_MODES)
                report["compile_cut"].append(label)
                compiled = []
            progress.begin(label)
            begin = time.perf_counter()
            records = run_point(
                ops[op_name], dtype_name, shape, settings.modes, here, device, settings.rep_ms, copy_gbps
            )
            if compiled:
                compile_cost_s = max(compile_cost_s, (time.perf_counter() - begin) / len(compiled))
            for record in records:
                progress.write(sweep_row(record, providers, show_copy=gpu))
            report["results"].extend(records)
            save(report)
            progress.end()
    finally:
        progress.close()
    return report["results"], skipped


def run_sections(settings: Settings, device: torch.device, report: dict, save) -> None:
    """The copy bandwidth, then each selected section in order, filling ``report`` as each ends."""
    report["copy_bandwidth"] = copy = copy_bandwidth(device, settings.rep_ms)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2**30:.2f} GiB read + written)\n")
    if "overhead" in settings.sections:
        report["host_overhead"] = measure_overhead(available_ops(), settings.dtypes[0], device, settings.quick)
        report["host_overhead_breakdown"] = measure_breakdown(device, settings.quick)
        print("## Host overhead (one intra-op thread)\n\n" + overhead_table(report["host_overhead"]) + "\n")
        print(breakdown_table(report["host_overhead_breakdown"]) + "\n", flush=True)
        save(report)
    if "memory" in settings.sections:
        report["memory"] = measure_blocks(
            settings.providers, settings.dtypes[0], device, settings.rep_ms, settings.quick
        )
        print("## Training memory and step time of MLP blocks\n\n" + memory_table(report["memory"]) + "\n")
        save(report)
    if "linear" in settings.sections:
        report["linear"] = measure_linear(device, settings.dtypes[0], settings.rep_ms, settings.quick)
        print("## Bias in the GEMM: eager F.linear(a, W, b) + act vs fusedact\n\n" + linear_table(report["linear"]))
        print("\n" + LINEAR_LEGEND + "\n", flush=True)
        save(report)
    if "sweep" in settings.sections:
        run_sweep(settings, device, copy["gbps"], report, save)


def compile_fits(time_limit_s: Optional[float], elapsed_s: float, estimate_s: float) -> bool:
    """Whether a point's compiled providers, estimated at ``estimate_s``, end before the time limit."""
    return time_limit_s is None or elapsed_s + estimate_s <= time_limit_s


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark: print tables and write every file (``--out``, else ``bench-results/``). Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, device, args, notes = parse_args(argv)
    if args.plan:
        print(plan(settings, device))
        return 0
    metadata = environment(device, argv)
    metadata["cpu_backend"] = args.cpu_backend
    out_dir = out_dir_from(args.out, metadata)
    gpu = device.type == "cuda"
    report = {
        "metadata": metadata,
        "settings": settings.as_dict(),
        "notes": notes,
        "started": time.perf_counter(),
        "copy_bandwidth": {},
        "host_overhead": [],
        "host_overhead_breakdown": {},
        "memory": [],
        "linear": [],
        "results": [],
        "skipped": [],
        "compile_cut": [],
        "targets": [],
    }

    last_save = [0.0]

    def save(current: dict, final: bool = False) -> None:
        """Write the report so far (at most every SAVE_EVERY_S: a 2 MB JSON per point would cost half a
        minute over the default sweep); the final save adds the plots."""
        now = time.perf_counter()
        if not final and now - last_save[0] < SAVE_EVERY_S:
            return
        last_save[0] = now
        current["elapsed_s"] = round(now - current["started"], 1)
        current["targets"] = check_targets(current)
        kept = {k: v for k, v in current.items() if k != "started"}
        write_report(kept, out_dir, with_plots=final, name=args.name, formats=args.formats)

    print(f"# fusedact benchmark: {metadata['device']}\n")
    print(" | ".join(f"{key}: {metadata[key]}" for key in ("torch", "triton", "fusedact", "git_commit")))
    print(f"timing: {metadata['timing']}")
    if not gpu:
        print(f"note: {CPU_NOTE}; fusedact's CPU backend: {args.cpu_backend}.")
    for note in notes:
        print(f"note: {note}")
    print(f"writing to {out_dir}/", flush=True)

    torch.manual_seed(0)
    previous_cpu_backend = fusedact.get_cpu_backend()
    # CPU numbers are the fallback's (or its compiled path's), as labelled, even under TRITON_INTERPRET=1
    fusedact.set_cpu_backend(args.cpu_backend)
    try:
        run_sections(settings, device, report, save)
    except KeyboardInterrupt:  # SIGINT (bench.gpu_run's time box): write what was measured, then stop
        report["notes"].append("interrupted (SIGINT): the results stop where the run was cut")
        print("\ninterrupted: writing what was measured", flush=True)
    finally:
        fusedact.set_cpu_backend(previous_cpu_backend)

    if "sweep" in settings.sections:
        print("\n" + SWEEP_LEGEND + ("" if gpu else "\n\n" + CPU_LEGEND))
    report["targets"] = check_targets(report)
    if gpu:
        print("\n## Targets (inputs of 64 MiB and more)\n\n" + targets_table(report["targets"]))
    else:
        if any("paired" in record for record in report["results"]):
            print("\n## CPU path: fusedact / eager time\n\n" + cpu_ratio_table(report["results"]))
        print("\n## Targets: not judged on CPU (GPU targets: the Triton kernels' bandwidth and speed)")
    for line in failures(report):
        print(f"failed: {line}")
    if report["compile_cut"]:
        cut = report["compile_cut"]
        print(f"\ntime limit: torch.compile left out at {len(cut)} points (too long to compile): {', '.join(cut)}")
    if report["skipped"]:
        print(f"\ntime limit reached: {len(report['skipped'])} points not measured (listed in the report)")
    save(report, final=True)
    print(f"\ndone in {time.perf_counter() - report['started']:.0f} s; wrote {out_dir}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
