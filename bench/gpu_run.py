"""The whole GPU run in one call of at most 8 minutes: install, versions, the tests on CUDA, the sweep's key
points, host overhead, the memory block and the end-to-end step, each in its own time box, every file in
one folder.

    python3 -m bench.gpu_run --out "$OUT"                 # on the GPU box (bench/NOTES.md: the device command)
    python3 -m bench.gpu_run --dry-run                    # here: every part at toy size on the CPU, < 1 minute
    python3 -m bench.gpu_run --out "$OUT" --parts sweep   # one part again, in a rerun

Each part is a subprocess with a time box (``PARTS``): at the end of its box it gets SIGINT (bench, its
end-to-end step and pytest then write or print what they have), 10 s later SIGKILL, and the run goes on
with the next part, so a hang or a slow part cannot eat the others. A box never reaches into the minimum
time of the parts after it, and the last part gets what is left of ``--budget`` (470 s). The parts:

    install    pip install --no-deps --no-build-isolation -e . (no network there), and the Liger wheel
               from .whl/ when carried (``pip download --no-deps liger-kernel -d .whl`` beforehand)
    env        GPU, driver, CUDA, torch, Triton, Python, Liger versions
    tests      pytest on CUDA, the kernels' test files first (``FIRST_TESTS``); a cut keeps what it reached
    sweep      every op, fwd and bwd, bf16, at three sizes of 64 MiB and more, the odd widths 760, 1128 and
               11007 at 64 MiB and more, and the decode shape [1, 4096]; fusedact, eager, torch.compile at
               8192x11008 for relu, gelu, silu, swiglu, swiglu_bias, Liger where its wheel was carried;
               and the bias-in-the-GEMM baseline
    overhead   host time per call, and one call taken apart (checks, autograd, dispatch, launch)
    memory     peak memory and step time of the two MLP blocks (eager, fusedact, torch.compile)
    e2e        one training step of the small Llama and the ViT: eager, fusedact, torch.compile

Files (at most 8, all directly in ``--out``; each is rewritten whole as a part goes, so a cut keeps the last
complete one): ``gpu-run.md`` (the summary: each part's status and time, the versions, the tests' last
lines, then every part's tables), ``log.txt`` (every part's output but the tests'), ``tests.txt``,
``sweep.json``, ``overhead.json``, ``memory.json``, ``e2e-gpu.json`` and ``e2e-gpu.md`` (``e2e-cpu.*`` in a
dry run). The plots are drawn afterwards from ``sweep.json`` on any machine (``python -m bench.gpu_run
--plots OUT``).

The dry run (``--dry-run``) runs the same parts with the same arguments at toy sizes on the CPU: the
install part only shows pip (and what it would install), the tests part checks that every test file named
here exists and runs one small test, torch.compile is left out of the sweep (30 s a graph on a CPU). It is
run by the tests (tests/test_gpu_run.py), so that the GPU call cannot fail on a typo.

This module imports only the standard library: it runs before the project is installed.
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 470.0  # 8 minutes less a margin for the start and the summary
GRACE_S = 10.0  # between SIGINT and SIGKILL: time to write what was measured
RENDER_BOX_S = 60.0
MAX_FILES = 8

# The kernels' tests first: a cut after them still says whether the kernels are right on the GPU.
FIRST_TESTS = (
    "test_ops.py",
    "test_functional.py",
    "test_softmax.py",
    "test_channels.py",
    "test_launch.py",
    "test_rounding.py",
    "test_nn.py",
)
# Last: the harness's own tests (they run on the CPU; test_ptx compiles for sm_90 without a GPU), and never
# the dry run from inside the real run. Every other test file (tests/**/test_*.py) runs in between.
LAST_TESTS = ("test_ptx.py", "test_bench.py", "test_bench_e2e.py")
NOT_ON_GPU = ("test_gpu_run.py",)
DRY_TEST = "tests/test_bench.py::test_parse_shape"

# The sweep's key points: three sizes of 64 MiB and more in bf16 (a 4096-wide layer, Llama-2-7B's MLP,
# Llama-3-8B's on 16k tokens), the odd widths at 64 MiB and more (760 and 1128 bf16 columns are 16-byte
# rows, 11007 is not), and one decoding token.
SWEEP_SHAPES = ("8192x4096", "8192x11008", "16384x14336", "65536x760", "32768x1128", "8191x11007", "1x4096")
COMPILE_SHAPES = ("8192x11008",)
# torch.compile costs seconds per op and graph: at one shape, for the ops the targets name (a bias+act of
# each kind of math, SwiGLU with and without biases).
COMPILE_OPS = ("relu", "gelu", "silu", "swiglu", "swiglu_bias")
DRY_SHAPES = ("8x256", "4x760", "1x256")
DRY_OPS = ("relu", "gelu", "swiglu", "swiglu_packed", "softmax")
SWEEP_MARGIN_S = 35.0  # the sweep's --time-limit ends this long before its box: the last point, the write


@dataclass
class Part:
    """One part of the run: its commands (given the run's settings), its time box and the least time it
    needs (kept free for it by the parts before), and its log file."""

    name: str
    box_s: float
    min_s: float
    commands: Callable[["Run"], list[list[str]]]
    log: str = "log.txt"


@dataclass
class Run:
    out: Path
    dry: bool
    python: str = sys.executable
    results: list = field(default_factory=list)


def bench(run: Run, *arguments: str) -> list[str]:
    return [run.python, "-m", "bench", *arguments]


def install_commands(run: Run) -> list[list[str]]:
    """pip with no network: the project (its build backend is on the box) and any carried wheels."""
    wheels = sorted(str(path.relative_to(ROOT)) for path in (ROOT / ".whl").glob("*.whl"))
    commands = [[run.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]]
    if wheels:
        commands.append([run.python, "-m", "pip", "install", "-q", "--no-deps", *wheels])
    if run.dry:  # show them; install nothing
        return [[run.python, "-c", f"print('would run:', {commands!r})"], [run.python, "-m", "pip", "--version"]]
    return commands


ENV_SCRIPT = """
import platform, subprocess, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
try:
    import importlib.metadata as metadata
    print("liger-kernel", metadata.version("liger-kernel"))
except Exception:
    print("liger-kernel: not installed")
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(index)
        print(f"GPU {index}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
    query = ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
             "--format=csv"]
    try:
        print(subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip())
    except OSError:
        print("nvidia-smi: not found")
else:
    print("no CUDA device: torch.cuda.is_available() is False")
"""


def env_commands(run: Run) -> list[list[str]]:
    return [[run.python, "-c", ENV_SCRIPT]]


def test_files(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(test files in the order they run, names in FIRST_TESTS/LAST_TESTS that do not exist). Names are
    paths under tests/ (``patching/test_source.py``)."""
    tests = root / "tests"
    present = {path.relative_to(tests).as_posix() for path in tests.rglob("test_*.py")}
    named = FIRST_TESTS + LAST_TESTS
    missing = [name for name in named if name not in present]
    middle = sorted(present - set(named) - set(NOT_ON_GPU), key=lambda name: ("/" in name, name))  # the ops' first
    order = [name for name in FIRST_TESTS if name in present] + middle
    order += [name for name in LAST_TESTS if name in present]
    return [f"tests/{name}" for name in order], missing


def tests_commands(run: Run) -> list[list[str]]:
    files, missing = test_files()
    if missing:  # a renamed test file: say so in the log, run the rest
        print(f"note: FIRST_TESTS/LAST_TESTS name files that do not exist: {missing}", flush=True)
    pytest = [run.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", "--maxfail=100", "--durations=15"]
    if run.dry:
        if missing:
            return [[run.python, "-c", f"raise SystemExit('missing test files: {missing}')"]]
        return [pytest + [DRY_TEST]]
    return [pytest + files]


def sweep_commands(run: Run, box_s: float) -> list[list[str]]:
    limit = max(10.0, box_s - SWEEP_MARGIN_S)
    common = ["--sections", "linear", "sweep", "--dtypes", "bf16", "--modes", "fwd", "bwd"]
    common += ["--compile-shapes", *COMPILE_SHAPES, "--time-limit", f"{limit:.0f}"]
    if not run.dry:  # the dry run compiles nothing (no compile provider), so names no op to compile
        common += ["--compile-ops", *COMPILE_OPS]
    common += ["--name", "sweep", "--formats", "json", "--out", str(run.out)]
    if run.dry:
        return [bench(run, "--device", "cpu", "--quick", "--ops", *DRY_OPS, "--shapes", *DRY_SHAPES,
                      "--providers", "fusedact", "eager", "liger", "--rep-ms", "1", *common)]  # fmt: skip
    return [bench(run, "--device", "cuda", "--ops", "all", "--shapes", *SWEEP_SHAPES,
                  "--providers", "fusedact", "eager", "compile", "liger", "--rep-ms", "20", *common)]  # fmt: skip


def overhead_commands(run: Run) -> list[list[str]]:
    files = ["--name", "overhead", "--formats", "json", "--out", str(run.out), "--sections", "overhead"]
    return [bench(run, *(["--device", "cpu", "--quick"] if run.dry else ["--device", "cuda"]), *files)]


def memory_commands(run: Run) -> list[list[str]]:
    files = ["--name", "memory", "--formats", "json", "--out", str(run.out), "--sections", "memory"]
    if run.dry:
        return [bench(run, "--device", "cpu", "--quick", "--providers", "fusedact", "eager", *files)]
    return [bench(run, "--device", "cuda", "--providers", "fusedact", "eager", "compile", *files)]


def e2e_commands(run: Run) -> list[list[str]]:
    e2e = [run.python, "-m", "bench.e2e", "--out", str(run.out)]
    if run.dry:
        return [e2e + ["--device", "cpu", "--quick", "--warmup", "1", "--steps", "1"]]
    # fusedact-nolean: patch(lean_mlp=False), the fused path without the lean MLP blocks (issue 15's comparison)
    variants = ["--variants", "eager", "fusedact", "fusedact-nolean", "compile"]
    return [e2e + ["--device", "cuda", *variants, "--warmup", "3", "--steps", "10"]]


PARTS = (
    Part("install", 90, 20, install_commands),
    Part("env", 30, 5, env_commands),
    Part("tests", 140, 30, tests_commands, log="tests.txt"),
    Part("sweep", 130, 40, lambda run: []),  # its commands need its box: see run_parts
    Part("overhead", 40, 15, overhead_commands),
    Part("memory", 60, 20, memory_commands),
    Part("e2e", 240, 30, e2e_commands),
)
PART_NAMES = tuple(part.name for part in PARTS)
DRY_BOX_S = 60.0  # every part's box in a dry run


# ---------------------------------------------------------------------------------------------------
# Running a part


def run_command(command: Sequence[str], log_path: Path, timeout_s: float, env: dict) -> tuple[str, float]:
    """Run ``command`` with its output appended to ``log_path``; at ``timeout_s``, SIGINT to its process
    group, SIGKILL ``GRACE_S`` later. Returns (status, seconds): "ok", "failed (exit N)" or "cut at N s"."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        shown = " ".join(command)
        log.write(f"\n$ {shown if len(shown) < 400 else shown[:400] + ' ...'}\n")
        log.flush()
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the signals reach its children too
        )  # fmt: skip
        try:
            code = process.wait(timeout=max(1.0, timeout_s - GRACE_S))
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"cut at {time.monotonic() - start:.0f} s"
            signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()
        finally:
            signal_group(process, signal.SIGKILL)  # whatever it left running in its group
    return status, time.monotonic() - start


def signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def box_for(part: Part, remaining_s: float, later: Sequence[Part], last: bool, dry: bool) -> float:
    """The part's time box: its own (all that is left for the last part), never reaching into the
    minimum time of the parts after it."""
    if dry:
        return min(DRY_BOX_S, remaining_s)
    reserve = sum(other.min_s for other in later)
    own = remaining_s - reserve if last else min(part.box_s, remaining_s - reserve)
    return max(0.0, own)


def run_parts(run: Run, names: Sequence[str], budget_s: float, on_part_done: Callable[[], None]) -> None:
    """Every selected part in order, each in its box; ``on_part_done`` after each (rewrites the summary)."""
    deadline = time.monotonic() + budget_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    selected = [part for part in PARTS if part.name in names]
    for index, part in enumerate(selected):
        later = selected[index + 1 :]
        box = box_for(part, deadline - time.monotonic(), later, last=not later, dry=run.dry)
        log_path = run.out / part.log
        offset = log_path.stat().st_size if log_path.exists() else 0
        result = {"part": part.name, "box_s": round(box), "status": "not run: no time left", "seconds": 0.0}
        if box >= 5:
            commands = sweep_commands(run, box) if part.name == "sweep" else part.commands(run)
            with open(log_path, "a") as log:
                log.write(f"\n===== {part.name} (time box {box:.0f} s)\n")
            print(f"[{part.name}] time box {box:.0f} s ...", flush=True)
            start = time.monotonic()
            status = "ok"
            for command in commands:
                status, _ = run_command(command, log_path, box - (time.monotonic() - start), env)
                if status != "ok":
                    break
            result.update(status=status, seconds=round(time.monotonic() - start, 1))
        result["output"] = read_from(log_path, offset)
        run.results.append(result)
        print(f"[{part.name}] {result['status']} ({result['seconds']:.0f} s)", flush=True)
        on_part_done()


def read_from(path: Path, offset: int, limit: int = 200_000) -> str:
    """The text appended to ``path`` since ``offset`` (its last ``limit`` characters)."""
    if not path.exists():
        return ""
    with open(path, errors="replace") as file:
        file.seek(offset)
        return file.read()[-limit:]


# ---------------------------------------------------------------------------------------------------
# The summary


def tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def summary(run: Run, started: str, tables: str = "") -> str:
    """gpu-run.md: the parts' status, the versions, the tests' last lines, then ``tables``."""
    title = "fusedact GPU run" + (" (dry run, toy sizes on the CPU)" if run.dry else "")
    parts = [f"# {title}", "", f"started {started}; `python -m bench.gpu_run {' '.join(sys.argv[1:])}`", ""]
    parts += ["| part | status | seconds | time box (s) |", "|---|---|--:|--:|"]
    parts += [f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | {r['box_s']} |" for r in run.results]
    by_name = {result["part"]: result for result in run.results}
    if "env" in by_name:
        parts += ["", "## Environment", "", "```text", tail(by_name["env"]["output"], 30), "```"]
    for name in ("install", "tests"):
        if name in by_name:
            parts += ["", f"## {name} (last lines; all of it in {PARTS[PART_NAMES.index(name)].log})", ""]
            parts += ["```text", tail(by_name[name]["output"], 40), "```"]
    if tables:
        parts += ["", tables]
    return "\n".join(parts) + "\n"


def write_summary(run: Run, started: str, tables: str = "") -> None:
    path = run.out / "gpu-run.md"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(summary(run, started, tables))
    partial.replace(path)


def render_tables(out: Path) -> str:
    """Every part's tables from its JSON (run in a subprocess, after the install: it imports the project)."""
    from . import e2e, overhead, report  # noqa: PLC0415 (the project may not be installed at import)

    sections = []
    sweep = out / "sweep.json"
    if sweep.exists():
        data = json.loads(sweep.read_text())
        sections.append(report.markdown_report(data).replace("# fusedact benchmark:", "## Sweep:", 1))
    host = out / "overhead.json"
    if host.exists():
        data = json.loads(host.read_text())
        sections += ["## Host overhead", "", report.overhead_table(data["host_overhead"]), ""]
        sections += [overhead.breakdown_table(data.get("host_overhead_breakdown", {})), ""]
    memory = out / "memory.json"
    if memory.exists():
        data = json.loads(memory.read_text())
        sections += ["## Memory and step time of MLP blocks", "", report.memory_table(data["memory"]), ""]
    for path in sorted(out.glob("e2e-*.json")):
        rows = json.loads(path.read_text())["rows"]
        sections += ["## End to end", "", e2e.HEADER, *(e2e.format_row(row) for row in rows), ""]
    return "\n".join(sections)


def render(run: Run, env: dict) -> str:
    """``render_tables`` in a subprocess (its own time box); a note instead if it fails."""
    command = [run.python, "-m", "bench.gpu_run", "--render", str(run.out)]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RENDER_BOX_S)
    except subprocess.TimeoutExpired:
        return "(the tables could not be rendered in time: read the JSON files)"
    if done.returncode != 0:
        return f"(the tables could not be rendered: {tail(done.stderr, 5)})"
    return done.stdout


def write_plots(out: Path) -> list[Path]:
    """The sweep's plots from ``out/sweep.json``, beside it (any machine with matplotlib)."""
    from . import report  # noqa: PLC0415

    data = json.loads((out / "sweep.json").read_text())
    return report.write_plots(data, out, "sweep")


# ---------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"parts: {' '.join(PART_NAMES)}",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="the folder for every file (default: $OUT, else bench-results/)")
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU (< 1 minute)")
    parser.add_argument("--parts", nargs="+", choices=PART_NAMES, metavar="PART", help="a subset, in run order")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all the parts")
    parser.add_argument("--render", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--plots", type=Path, metavar="DIR", help="draw the sweep's plots from DIR/sweep.json")
    return parser


def default_out(dry: bool) -> Path:
    if os.environ.get("OUT") and not dry:
        return Path(os.environ["OUT"])
    return ROOT / "bench-results" / ("gpu-run-dry" if dry else "gpu-run")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the parts; write the summary after each. Returns 0 when every part ran to its end, else 1."""
    args = build_parser().parse_args(argv)
    if args.render is not None:
        print(render_tables(args.render))
        return 0
    if args.plots is not None:
        for path in write_plots(args.plots):
            print(f"wrote {path}")
        return 0
    if args.budget <= 0:
        build_parser().error("--budget must be positive")
    run = Run(out=(args.out or default_out(args.dry_run)).resolve(), dry=args.dry_run)
    run.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"fusedact GPU run{' (dry run)' if run.dry else ''}: writing to {run.out}/", flush=True)
    names = args.parts or PART_NAMES
    run_parts(run, names, args.budget, on_part_done=lambda: write_summary(run, started))
    tables = render(run, {**os.environ, "PYTHONUNBUFFERED": "1"})
    write_summary(run, started, tables)
    written = sorted(path.name for path in run.out.iterdir() if path.is_file() and not path.name.endswith(".partial"))
    print(summary(run, started).split("## Environment")[0].rstrip())
    targets = tables.split("## Targets", 1)
    if len(targets) == 2:
        print("\n## Targets" + targets[1].split("\n## ", 1)[0].rstrip())
    print(f"\n{len(written)} files in {run.out}/: {' '.join(written)}")
    if len(written) > MAX_FILES:
        print(f"warning: more than {MAX_FILES} files", flush=True)
    return 0 if all(result["status"] == "ok" for result in run.results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
