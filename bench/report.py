"""Everything the benchmark writes: the environment, tables, the targets check, JSON, CSV, markdown, plots.

The report is one dict (``metadata``, ``settings``, ``copy_bandwidth``, ``results``, ``memory``,
``host_overhead``, ``skipped``, ``notes``), written as JSON; the CSV has one row per result and provider,
the markdown file every table, the PNGs the bandwidth and speedup curves. File names carry the device
(``nvidia-h100-80gb-hbm3.json``), so results of several GPUs can sit side by side.
"""

import csv
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import torch

import fusedact

from .cases import PROVIDERS, format_shape
from .linear import LINEAR_LEGEND, linear_table
from .overhead import BREAKDOWN_GOAL, breakdown_ratio, breakdown_table
from .timing import MIN_CPU_ROUNDS

try:
    import triton
except ImportError:
    triton = None

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed results (``--out`` without DIR)
LOCAL_RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench-results"  # every other run (git-ignored)
CPU_NOTE = (
    "CPU run: these are fusedact's PyTorch fallback on the CPU against eager PyTorch on the CPU, not the "
    "Triton kernels' speed; the GPU targets are not judged here"
)
TARGET_MIN_BYTES = 64 * 2**20  # the targets hold for tensors of 64 MiB and more


# ---------------------------------------------------------------------------------------------------
# Environment


def run_quietly(command: Sequence[str], cwd: Optional[Path] = None) -> Optional[str]:
    """stdout of ``command``, stripped, or None if it cannot run or fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def nvidia_driver_version() -> str:
    version = run_quietly(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version.splitlines()[0]
    try:  # no nvidia-smi in the container: the kernel module says it too
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"Kernel Module\s+(\S+)", text)
    return match.group(1) if match else "unknown"


def git_commit() -> str:
    """The repository's commit, with ``+dirty`` when the work tree has changes (results then say so)."""
    root = Path(__file__).resolve().parent.parent
    commit = run_quietly(["git", "rev-parse", "--short=12", "HEAD"], cwd=root)
    if commit is None:
        return "unknown"
    dirty = run_quietly(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv: Sequence[str]) -> dict:
    """What produced the numbers: device, driver, versions, date, commit, command line."""
    metadata = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "not installed"),
        "python": platform.python_version(),
        "fusedact": fusedact.__version__,
        "git_commit": git_commit(),
        "command": " ".join(["python -m bench", *argv]),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        metadata.update(
            device=properties.name,
            driver=nvidia_driver_version(),
            cuda=torch.version.cuda,
            sm_count=properties.multi_processor_count,
            memory_gib=round(properties.total_memory / 2**30, 1),
            l2_mib=round(getattr(properties, "L2_cache_size", 0) / 2**20, 1),
            timing="CUDA events around single calls, each after a read of 4x the L2 (clean lines): median, p20, p80",
        )
    else:
        metadata.update(
            device=f"CPU: {cpu_model()}, {torch.get_num_threads()} threads",
            driver="n/a",
            note=CPU_NOTE,
            timing=f"providers timed together in rounds (order rotating, >= {MIN_CPU_ROUNDS} rounds, batches of "
            ">= 1 ms): median and p20-p80 over the rounds; ratios round by round",
        )
    return metadata


def device_slug(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``; every CPU is ``"cpu"``."""
    if device_name.startswith("CPU"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "gpu"


def default_out_dir(metadata: dict, base: Path = RESULTS_DIR) -> Path:
    return base / f"{device_slug(metadata['device'])}-{metadata['date'][:10]}"


# ---------------------------------------------------------------------------------------------------
# Tables


def providers_in(records: Iterable[dict]) -> list[str]:
    seen = {provider for record in records for provider in record["providers"]}
    return [provider for provider in PROVIDERS if provider in seen]


def error_cell(record: dict, provider: str) -> str:
    """The errors a row shows: the output's (fwd), else the input gradients' and, after a slash, the bias
    gradients' (bwd, fwd+bwd)."""
    errors = record["providers"].get(provider, {}).get("errors")
    if errors is None:
        return "–"
    if record["mode"] == "fwd":
        return f"{errors['output']:.1e}"
    if "bias_grad" in errors:
        return f"{errors['input_grad']:.1e} / {errors['bias_grad']:.1e}"
    return f"{errors['input_grad']:.1e}"


def sweep_header(providers: Sequence[str], show_copy: bool = True) -> str:
    """The sweep table's header; ``show_copy`` False (the CPU) leaves out % of copy bandwidth, which says
    nothing of a PyTorch fallback whose data sits partly in the CPU's caches."""
    others = [p for p in providers if p != "fusedact"]
    cells = ["op", "dtype", "shape", "mode", "MiB", "fusedact ms [p20, p80]", "GB/s"] + ["% copy"] * show_copy
    cells += [f"vs {p}" for p in others] + [f"err {p}" for p in providers]
    align = ["---"] * 4 + ["--:"] * (len(cells) - 4)
    return "| " + " | ".join(cells) + " |\n|" + "|".join(align) + "|"


def sweep_row(record: dict, providers: Sequence[str], show_copy: bool = True) -> str:
    """One markdown row: fusedact's time, bandwidth, speedup over each provider, every provider's error."""
    fused = record["providers"].get("fusedact", {})
    if "ms" in fused:
        median, p20, p80 = fused["ms"]
        time_cell = f"{median:.4f} [{p20:.4f}, {p80:.4f}]"
        rate = f"{fused['gbps']:.0f}"
        share = "–" if fused.get("pct_copy") is None else f"{fused['pct_copy']:.0f}"
    else:
        time_cell, rate, share = fused.get("failed", "–"), "–", "–"
    cells = [
        record["op"],
        record["dtype"],
        f"{record['rows']}x{record['cols']}",
        record["mode"],
        f"{record['input_bytes'] / 2**20:.1f}",
        time_cell,
        rate,
    ] + [share] * show_copy
    for provider in (p for p in providers if p != "fusedact"):
        entry = record["providers"].get(provider)
        if entry is None:
            cells.append("–")
        elif "failed" in entry:
            cells.append("failed")
        else:
            cells.append(f"{record['speedup'][provider]:.2f}x" if provider in record["speedup"] else "–")
    cells += [error_cell(record, provider) for provider in providers]
    return "| " + " | ".join(cells) + " |"


SWEEP_LEGEND = """\
MiB: size of one input tensor (x; each of gate and up; the packed [gate | up]). shape: rows x cols of the
output; every bias has the input's width. GB/s: minimal bytes (each input and bias read once, the output
written once; backward reads grad_out and one saved tensor per input and writes every gradient) over
fusedact's median time; % copy: that GB/s over the copy bandwidth measured in the same run.
vs P: P's median time over fusedact's (above 1: fusedact is faster). err P: max |P - float64 reference| of
the output (fwd), or of the input gradients / the bias gradients (bwd, fwd+bwd); the reference is the eager
formula in float64 on the same inputs (a bias gradient sums every row: its error grows with the rows).
–: not measured at this point (torch.compile runs at --compile-shapes only; Liger only has SwiGLU and GeGLU,
without bias)."""
CPU_LEGEND = """\
CPU: the PyTorch fallback against eager PyTorch, both on this CPU; not the Triton kernels. The providers
of a point are timed in rounds (every provider once per round, the order rotating), so vs P is the median
of P's time over fusedact's round by round; errors are measured on the first rows of the inputs only."""


def cpu_ratio_table(records: Sequence[dict], provider: str = "eager") -> str:
    """fusedact's time over ``provider``'s on the CPU, round by round: median and 20-80 % range (issue 14's
    goal for the fallback: at most 1.05 against eager in every dtype and mode)."""
    lines = [
        f"| op | dtype | shape | mode | fusedact ms | {provider} ms | fusedact / {provider} [p20, p80] | rounds |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    for record in records:
        ratios = record.get("paired", {}).get(provider)
        if ratios is None:
            continue
        fused, other = record["providers"]["fusedact"]["ms"][0], record["providers"][provider]["ms"][0]
        median, p20, p80 = (1 / value for value in ratios)  # fusedact / P: the reciprocal's p80 is its p20
        cells = [record["op"], record["dtype"], f"{record['rows']}x{record['cols']}", record["mode"]]
        cells += [f"{fused:.3f}", f"{other:.3f}", f"{median:.3f} [{p80:.3f}, {p20:.3f}]", str(record["rounds"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures(report: dict) -> list[str]:
    """Each distinct failure (provider and message) of the sweep, with how many points it hit."""
    counts: dict[tuple[str, str], list[str]] = {}
    for record in report["results"]:
        if record["mode"] != record_modes(report)[0]:
            continue  # a provider fails for every mode of a point at once: count points, not modes
        for provider, entry in record["providers"].items():
            if "failed" in entry:
                point = f"{record['op']} {record['dtype']} {record['rows']}x{record['cols']}"
                counts.setdefault((provider, entry["failed"]), []).append(point)
    return [
        f"{provider}: {message} ({len(points)} points, e.g. {points[0]})"
        for (provider, message), points in counts.items()
    ]


def record_modes(report: dict) -> list[str]:
    return list(dict.fromkeys(record["mode"] for record in report["results"])) or ["fwd"]


def memory_table(records: Sequence[dict]) -> str:
    lines = [
        "| block | tokens x D -> F | dtype | provider | peak MiB | extra MiB | step ms | max diff vs eager |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    for record in records:
        size = f"{record['tokens']}x{record['model_dim']} -> {record['hidden']}"
        if "failed" in record:
            cells = [record["failed"], "", "", ""]
        else:
            peak = record.get("peak_bytes")
            cells = [
                "n/a (CPU)" if peak is None else f"{peak / 2**20:.0f}",
                "n/a (CPU)" if peak is None else f"{record['extra_bytes'] / 2**20:.0f}",
                f"{record['ms'][0]:.3f}",
                f"{record['max_abs_diff_vs_eager']:.1e}",
            ]
        lines.append("| " + " | ".join([record["block"], size, record["dtype"], record["provider"], *cells]) + " |")
    return "\n".join(lines)


def overhead_table(records: Sequence[dict]) -> str:
    lines = ["| op | shape | dtype | mode | provider | us per call |", "|---|---|---|---|---|--:|"]
    for record in records:
        value = record.get("failed") or f"{record['us_per_call']:.1f}"
        cells = [record["op"], format_shape(record["shape"]), record["dtype"], record["mode"], record["provider"]]
        lines.append("| " + " | ".join([*cells, value]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Targets


def _worst(records: Iterable[dict], value_of, threshold: float, higher_is_better: bool = True) -> dict:
    """The worst value over the records where ``value_of`` gives one, and whether it meets ``threshold``."""
    values = [(value_of(record), record) for record in records]
    values = [(value, record) for value, record in values if value is not None]
    if not values:
        return {"worst": None, "where": "not measured", "met": None, "points": 0}
    value, record = min(values, key=lambda pair: pair[0]) if higher_is_better else max(values, key=lambda p: p[0])
    met = value >= threshold if higher_is_better else value <= threshold
    where = f"{record['op']} {record['dtype']} {record['rows']}x{record['cols']} {record['mode']}"
    return {"worst": value, "where": where, "met": met, "points": len(values)}


def _speedup(provider: str):
    return lambda record: record["speedup"].get(provider)


def _worst_compile(record: dict) -> Optional[float]:
    values = [record["speedup"][p] for p in ("compile", "compile-max-autotune") if p in record["speedup"]]
    return min(values) if values else None


def _pct_copy(record: dict) -> Optional[float]:
    return record["providers"].get("fusedact", {}).get("pct_copy")


def check_targets(report: dict) -> list[dict]:
    """The issue's targets, each with the worst point measured (results for inputs of 64 MiB and more).
    GPU targets only: nothing (an empty list) for a run on any other device."""
    if report["metadata"]["device_type"] != "cuda":
        return []
    large = [r for r in report["results"] if r["input_bytes"] >= TARGET_MIN_BYTES]
    kernels = [r for r in large if r["mode"] != "fwd+bwd"]
    bias_act_fwd = [r for r in large if r["layout"] == "bias" and r["mode"] == "fwd"]
    bias_bwd = [r for r in large if r["has_bias"] and r["mode"] == "bwd"]
    swiglu_fwd = [r for r in large if r["op"].startswith("swiglu") and r["mode"] == "fwd"]
    rows = [
        ("fusedact fwd and bwd >= 90% of copy bandwidth", 90.0, kernels, _pct_copy),
        ("bias+activation fwd >= 1.9x eager", 1.9, bias_act_fwd, _speedup("eager")),
        ("bwd with bias gradient >= 1.3x eager", 1.3, bias_bwd, _speedup("eager")),
        ("SwiGLU fwd >= 1.6x eager", 1.6, swiglu_fwd, _speedup("eager")),
        ("every op and mode >= 1.0x torch.compile", 1.0, large, _worst_compile),
        ("bwd with bias gradient >= 1.15x torch.compile", 1.15, bias_bwd, _worst_compile),
        ("SwiGLU >= 1.0x Liger", 1.0, [r for r in large if r["op"] == "swiglu"], _speedup("liger")),
    ]
    targets = [{"target": text, "threshold": threshold, **_worst(records, value_of, threshold)}
               for text, threshold, records, value_of in rows]  # fmt: skip
    targets.append(_overhead_target(report["host_overhead"]))
    targets.append(_breakdown_target(report.get("host_overhead_breakdown", {})))
    targets.extend(_memory_targets(report["memory"]))
    return targets


def _overhead_target(records: Sequence[dict]) -> dict:
    """fusedact's us per call over eager's, worst op and mode (<= 1 meets the target)."""
    by_key = {(r["op"], r["mode"], r["provider"]): r.get("us_per_call") for r in records}
    ratios = []
    for (op, mode, provider), value in by_key.items():
        eager = by_key.get((op, mode, "eager"))
        if provider == "fusedact" and value is not None and eager:
            ratios.append({"ratio": value / eager, "op": op, "mode": mode})
    result = {"target": "host overhead per call <= eager's (fusedact / eager)", "threshold": 1.0}
    if not ratios:
        return {**result, "worst": None, "where": "not measured", "met": None, "points": 0}
    worst = max(ratios, key=lambda r: r["ratio"])
    where = f"{worst['op']} {worst['mode']}"
    return {**result, "worst": worst["ratio"], "where": where, "met": worst["ratio"] <= 1.0, "points": len(ratios)}


def _breakdown_target(breakdown: dict) -> dict:
    """Issue 14: our host time above the kernel call for fusedact.gelu(x, b) at [1, 4096] within 1.5x of
    eager's F.gelu(x + b), worst grad setting (``breakdown_ratio``)."""
    target = {"target": f"gelu+bias [1, 4096] host time above the kernel call <= {BREAKDOWN_GOAL}x eager's add + gelu"}
    target["threshold"] = BREAKDOWN_GOAL
    ratios = [(breakdown_ratio(breakdown, column), column) for column in breakdown.get("columns", {})]
    ratios = [(ratio, column) for ratio, column in ratios if ratio is not None]
    if not ratios:
        return {**target, "worst": None, "where": "not measured", "met": None, "points": 0}
    worst, column = max(ratios)
    return {**target, "worst": worst, "where": column, "met": worst <= BREAKDOWN_GOAL, "points": len(ratios)}


def _memory_targets(records: Sequence[dict]) -> list[dict]:
    """Peak training memory of each block, fusedact / eager: <= 1, and < 1 for the SwiGLU MLP."""
    peaks = {(r["block"], r["provider"]): r.get("peak_bytes") for r in records}
    targets = []
    for block in dict.fromkeys(r["block"] for r in records):
        fused, eager = peaks.get((block, "fusedact")), peaks.get((block, "eager"))
        strict = block.startswith("swiglu")
        target = {"target": f"{block} peak memory {'<' if strict else '<='} eager's (fusedact / eager)"}
        target["threshold"] = 1.0
        if fused is None or not eager:
            targets.append({**target, "worst": None, "where": "not measured", "met": None, "points": 0})
            continue
        ratio = fused / eager
        met = ratio < 1.0 if strict else ratio <= 1.0
        targets.append({**target, "worst": ratio, "where": block, "met": met, "points": 1})
    return targets


def targets_table(targets: Sequence[dict]) -> str:
    lines = ["| target | worst measured | where | points | met |", "|---|--:|---|--:|---|"]
    for target in targets:
        worst = "–" if target["worst"] is None else f"{target['worst']:.3g}"
        met = {True: "yes", False: "**no**", None: "not measured"}[target["met"]]
        cells = [target["target"], worst, target["where"], str(target["points"]), met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Files


def markdown_report(report: dict, plot_files: Sequence[str] = ()) -> str:
    metadata, copy = report["metadata"], report["copy_bandwidth"]
    parts = [f"# fusedact benchmark: {metadata['device']}", ""]
    parts += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in metadata.items()]
    parts += ["", f"Copy bandwidth (``copy_`` of {copy['bytes'] / 2**21:.0f} MiB, bytes read + written over its "
              f"median time): **{copy['gbps']:.0f} GB/s** (median {copy['ms'][0]:.3f} ms)."]  # fmt: skip
    for note in report["notes"]:
        parts += ["", f"Note: {note}"]
    gpu = metadata["device_type"] == "cuda"
    if gpu:
        parts += ["", "## Targets (inputs of 64 MiB and more)", "", targets_table(report["targets"])]
    else:
        parts += ["", "## Targets: not judged on CPU", "", CPU_NOTE + "."]
    parts += ["", "## Time, bandwidth and error", ""]
    providers = providers_in(report["results"])
    rows = [sweep_row(r, providers, show_copy=gpu) for r in report["results"]]
    parts += [sweep_header(providers, show_copy=gpu), *rows, "", SWEEP_LEGEND]
    if not gpu:
        parts += ["", CPU_LEGEND]
        if any("paired" in r for r in report["results"]):
            parts += ["", "## CPU path: fusedact / eager time", "", cpu_ratio_table(report["results"])]
    failed = failures(report)
    if failed:
        parts += ["", "## Failures", ""] + [f"- {line}" for line in failed]
    if report.get("linear"):
        parts += ["", "## Bias in the GEMM: eager F.linear(a, W, b) + act vs fusedact", ""]
        parts += [linear_table(report["linear"]), "", LINEAR_LEGEND]
    if report["memory"]:
        parts += ["", "## Training memory and step time of MLP blocks", "", memory_table(report["memory"])]
    if report["host_overhead"]:
        parts += ["", "## Host overhead (tiny tensor, one intra-op thread)", ""]
        parts += [overhead_table(report["host_overhead"])]
    if report.get("host_overhead_breakdown"):
        parts += ["", "### One call taken apart", "", breakdown_table(report["host_overhead_breakdown"])]
    if report.get("compile_cut"):
        parts += ["", "## torch.compile left out by the time limit (its compiles would not have fit)", ""]
        parts += [f"- {point}" for point in report["compile_cut"]]
    if report["skipped"]:
        parts += ["", f"## Not measured: the time limit was reached ({len(report['skipped'])} points)", ""]
        parts += [f"- {point}" for point in report["skipped"]]
    if plot_files:
        parts += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plot_files]
    return "\n".join(parts) + "\n"


CSV_FIELDS = [
    "op", "dtype", "rows", "cols", "mode", "provider", "bytes", "input_bytes", "ms_median", "ms_p20", "ms_p80",
    "gbps", "pct_copy", "fusedact_speedup", "speedup_p20", "speedup_p80", "err_output", "err_input_grad",
    "err_bias_grad", "failed",
]  # fmt: skip


def csv_rows(results: Iterable[dict]) -> Iterable[dict]:
    """One row per result and provider; ``fusedact_speedup`` is that provider's time over fusedact's."""
    for record in results:
        for provider, entry in record["providers"].items():
            row = {key: record[key] for key in ("op", "dtype", "rows", "cols", "mode", "bytes", "input_bytes")}
            row["provider"] = provider
            if "failed" in entry:
                row["failed"] = entry["failed"]
            else:
                row.update(ms_median=entry["ms"][0], ms_p20=entry["ms"][1], ms_p80=entry["ms"][2])
                row.update(gbps=entry["gbps"], pct_copy=entry["pct_copy"])
                row["fusedact_speedup"] = 1.0 if provider == "fusedact" else record["speedup"].get(provider)
                if provider in record.get("paired", {}):  # CPU: the 20-80 % range of the per-round ratios
                    row["speedup_p20"], row["speedup_p80"] = record["paired"][provider][1:]
                errors = entry["errors"]
                row.update(err_output=errors["output"], err_input_grad=errors["input_grad"])
                row["err_bias_grad"] = errors.get("bias_grad")
            yield row


FORMATS = ("json", "csv", "md", "png")


def write_report(
    report: dict, out_dir: Path, with_plots: bool, name: Optional[str] = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write ``formats`` of the report (JSON, CSV, markdown, and the plots when ``with_plots``) into
    ``out_dir`` as ``<name>.<format>`` (``name``: the device's slug by default); returns the paths written.
    Each file is written whole and then renamed into place: a run killed mid-write leaves the last
    complete file, never half of one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or device_slug(report["metadata"]["device"])
    plot_paths = write_plots(report, out_dir, stem) if with_plots and "png" in formats else []
    texts = {}
    if "json" in formats:
        texts["json"] = json.dumps(report, indent=1, allow_nan=True) + "\n"
    if "csv" in formats:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(report["results"]))
        texts["csv"] = buffer.getvalue()
    if "md" in formats:
        texts["md"] = markdown_report(report, [p.name for p in plot_paths])
    paths = []
    for extension, text in texts.items():
        path = out_dir / f"{stem}.{extension}"
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
        paths.append(path)
    return paths + plot_paths


# ---------------------------------------------------------------------------------------------------
# Plots


def write_plots(report: dict, out_dir: Path, slug: str) -> list[Path]:
    """Per dtype: GB/s against input size (one panel per op and mode, the copy bandwidth as a line), and
    fusedact's speedup over every other provider. Nothing (with a note) when matplotlib is missing, or
    for a dtype whose results have one size (a curve needs two: the CPU's default sweep)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["notes"].append("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    paths = []
    results = [r for r in report["results"] if "fusedact" in r["providers"]]
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        records = [r for r in results if r["dtype"] == dtype]
        if len({r["input_bytes"] for r in records}) < 2:
            continue
        for kind in ("gbps", "speedup"):
            figure = _plot_grid(plt, records, kind, report["copy_bandwidth"]["gbps"])
            title = "GB/s (minimal bytes / median time)" if kind == "gbps" else "fusedact speedup (time P / fusedact)"
            figure.suptitle(f"{report['metadata']['device']}, {dtype}: {title}")
            figure.tight_layout(rect=(0, 0, 1, 0.98))
            path = out_dir / f"{slug}-{kind}-{dtype}.png"
            figure.savefig(path, dpi=90)
            plt.close(figure)
            paths.append(path)
    return paths


def _plot_grid(plt, records: Sequence[dict], kind: str, copy_gbps: float):
    """One panel per op (rows) and mode (columns); x: input MiB, log scale."""
    ops = list(dict.fromkeys(r["op"] for r in records))
    modes = list(dict.fromkeys(r["mode"] for r in records))
    figure, axes = plt.subplots(len(ops), len(modes), figsize=(4.2 * len(modes), 2.8 * len(ops)), squeeze=False)
    for (row, op), (column, mode) in ((a, b) for a in enumerate(ops) for b in enumerate(modes)):
        axis = axes[row][column]
        points = sorted((r for r in records if r["op"] == op and r["mode"] == mode), key=lambda r: r["input_bytes"])
        for provider in providers_in(points):
            if kind == "speedup" and provider == "fusedact":
                continue
            xs, ys = [], []
            for record in points:
                entry = record["providers"].get(provider, {})
                value = entry.get("gbps") if kind == "gbps" else record["speedup"].get(provider)
                if value is not None:
                    xs.append(record["input_bytes"] / 2**20)
                    ys.append(value)
            axis.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=provider)
        if kind == "gbps":
            axis.axhline(copy_gbps, color="black", linestyle="--", linewidth=1, label="copy bandwidth")
        else:
            axis.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1x")
        axis.set_ylim(bottom=0)
        axis.set_xscale("log")
        axis.set_title(f"{op} {mode}", fontsize=9)
        axis.set_xlabel("input MiB", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=6, loc="lower right")
    return figure


# ---------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress on stderr while rows go to stdout. On a terminal a tqdm bar when tqdm is installed; else
    (no tqdm, or output to a log file) a line at the first point and then at most every ``every_s``
    seconds. ``begin(label)`` before a point, ``end()`` after it."""

    def __init__(self, total: int, every_s: float = 15.0) -> None:
        self.total, self.count, self.every_s = total, 0, every_s
        self.start = self.last_line = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def begin(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_description(label)
            return
        now = time.perf_counter()
        if self.count == 1 or now - self.last_line >= self.every_s:
            self.last_line = now
            print(f"[{self.count}/{self.total}, {now - self.start:.0f} s] {label}", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def out_dir_from(argument: Optional[str], metadata: dict) -> Path:
    """Where a run writes: ``--out DIR``; ``--out`` alone: ``bench/results/<device>-<date>/`` (results to
    commit); no ``--out``: ``bench-results/<device>-<date>/`` at the repository root (git-ignored)."""
    if argument is None:
        return default_out_dir(metadata, LOCAL_RESULTS_DIR)
    return default_out_dir(metadata) if argument == "" else Path(os.path.expanduser(argument))
