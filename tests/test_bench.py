"""Tests of the benchmark harness (``bench/``): byte counts, the float64 reference and its errors, the
targets check, the files a quick CPU run writes, and the command line's errors. Never its speed.

``bench`` is not installed: it is loaded from its directory as a package, without putting the repository
root on ``sys.path`` (a top-level ``kernels`` directory there would shadow what transformers probes for).
The end-to-end run is a real ``python -m bench`` in a subprocess, from the repository root.
"""

import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

import fusedact

ROOT = Path(__file__).resolve().parent.parent


def run_ptx_report(*args: str) -> subprocess.CompletedProcess:
    """``python -m bench.ptx_report ARGS`` in a process without ``TRITON_INTERPRET`` (the tests' own process
    has the interpreted kernels), skipping where the report says this Triton's binder is not the one it runs."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.ptx_report", *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode == 2 and done.stderr.startswith("bench.ptx_report: this Triton"):  # (its UNSUPPORTED:
        # not imported here, as importing it unsets TRITON_INTERPRET)
        pytest.skip(done.stderr.strip())
    return done


def import_bench(module: str):
    """``bench.<module>``, with the ``bench`` package loaded from ``ROOT/bench`` if it is not yet."""
    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "bench", ROOT / "bench" / "__init__.py", submodule_search_locations=[str(ROOT / "bench")]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"bench.{module}")


@pytest.fixture(scope="module")
def cases():
    return import_bench("cases")


@pytest.fixture
def torch_backend():
    """The harness measures fusedact's PyTorch fallback on the CPU; so do these tests."""
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")
    yield
    fusedact.set_cpu_backend(previous)


# ---------------------------------------------------------------------------------------------------
# Byte counts


@pytest.mark.parametrize(
    "op_name, mode, elements",
    [
        # N = rows x cols, C = cols. README: gelu(x + b) forward reads x, writes y = 2N (+ the bias).
        ("gelu", "fwd", lambda n, c: 2 * n + c),
        # backward reads grad_y, x, b; writes grad_x, grad_b.
        ("gelu", "bwd", lambda n, c: 3 * n + 2 * c),
        ("relu", "fwd+bwd", lambda n, c: 5 * n + 3 * c),
        # README: silu(g + bg) * (u + bu) forward reads g, u, writes y = 3N (+ two biases).
        ("swiglu_bias", "fwd", lambda n, c: 3 * n + 2 * c),
        ("swiglu_bias", "bwd", lambda n, c: 5 * n + 4 * c),
        ("swiglu", "fwd", lambda n, c: 3 * n),
        ("swiglu", "bwd", lambda n, c: 5 * n),
        # packed [gate | up] of width 2C: the same bytes as two tensors of width C.
        ("swiglu_packed", "fwd", lambda n, c: 3 * n),
        ("swiglu_packed", "fwd+bwd", lambda n, c: 8 * n),
    ],
)
@pytest.mark.parametrize("itemsize", [2, 4])
def test_minimal_bytes_match_the_hand_count(cases, op_name, mode, elements, itemsize):
    rows, cols = 6, 10
    op = cases.available_ops()[op_name]
    assert cases.case_bytes(op, mode, rows, cols, itemsize) == elements(rows * cols, cols) * itemsize


def test_input_tensor_bytes_is_the_largest_input(cases):
    ops = cases.available_ops()
    assert cases.input_tensor_bytes(ops["gelu"], 8192, 4096, 2) == 64 * 2**20
    assert cases.input_tensor_bytes(ops["swiglu_packed"], 8192, 4096, 2) == 128 * 2**20


def test_rotation_spans_four_l2_sizes(cases, monkeypatch):
    timing = import_bench("timing")
    monkeypatch.setattr(timing, "l2_bytes", lambda device: 50 * 2**20)
    gpu = torch.device("cuda")
    assert timing.rotation_count(gpu, 20 * 2**20) == 10
    assert timing.rotation_count(gpu, 2**10) == timing.MAX_INPUT_SETS
    assert timing.rotation_count(gpu, 60 * 2**20) == 1
    assert timing.rotation_count(torch.device("cpu"), 2**10) == 1


@pytest.mark.parametrize("text, shape", [("8192x4096", (8192, 4096)), ("1X760", (1, 760))])
def test_parse_shape(cases, text, shape):
    assert cases.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["8192", "0x5", "3x-1", "axb", "1x2x3"])
def test_parse_shape_rejects(cases, text):
    with pytest.raises(ValueError, match="ROWSxCOLS|>= 1"):
        cases.parse_shape(text)


# ---------------------------------------------------------------------------------------------------
# The reference and the errors


def test_every_op_and_its_eager_twin_compute_the_same(cases, torch_backend):
    """The op table pairs each fused call with the eager code it replaces: same leaves, same result."""
    for op in cases.available_ops().values():
        inputs = cases.make_input_set(op, 5, 12, torch.float64, torch.device("cpu"))
        fused, eager = op.fused(*inputs.detached), op.eager(*inputs.detached)
        assert fused.shape == eager.shape == (5, 12), op.name
        torch.testing.assert_close(fused, eager, msg=f"{op.name}: fusedact vs {op.eager_text}")


def test_reference_errors_of_the_reference_are_zero_and_see_a_perturbation(cases):
    op = cases.available_ops()["swiglu_bias"]
    inputs = cases.make_input_set(op, 7, 9, torch.float32, torch.device("cpu"))
    leaves = [t.detach().double().requires_grad_() for t in inputs.leaves]
    output, grads = cases.forward_backward(op.eager, leaves, inputs.grad_out.double())
    errors = cases.reference_errors(op, inputs, output.detach(), grads)
    assert errors == {"output": 0.0, "input_grad": 0.0, "bias_grad": 0.0}

    perturbed = [g.clone() for g in grads]
    perturbed[1][3, 4] += 0.25  # an input gradient (up)
    perturbed[3][2] -= 0.5  # a bias gradient (up_bias)
    errors = cases.reference_errors(op, inputs, output.detach() + 0.125, perturbed)
    assert errors == pytest.approx({"output": 0.125, "input_grad": 0.25, "bias_grad": 0.5})


def test_reference_in_chunks_sums_bias_gradients_over_all_rows(cases, torch_backend):
    """Row chunks of 2 rows give the same errors as one chunk: the bias gradient adds up every chunk."""
    op = cases.available_ops()["gelu"]
    inputs = cases.make_input_set(op, 11, 6, torch.float32, torch.device("cpu"))
    output, grads = cases.forward_backward(op.fused, inputs.leaves, inputs.grad_out)
    whole = cases.reference_errors(op, inputs, output.detach(), grads)
    chunked = cases.reference_errors(op, inputs, output.detach(), grads, chunk_elements=12)
    assert len(list(cases.reference_chunks(op, inputs, chunk_elements=12))) == 6
    assert chunked == pytest.approx(whole, rel=1e-9, abs=1e-12)


def reference_scales(cases, op, inputs) -> dict[str, float]:
    """max |value| of the float64 output, input gradients and bias gradients: what an error is relative to."""
    leaves = [t.detach().double().requires_grad_() for t in inputs.leaves]
    output, grads = cases.forward_backward(op.eager, leaves, inputs.grad_out.double())
    input_grads = [g for g, leaf in zip(grads, leaves, strict=True) if leaf.dim() == 2]
    bias_grads = [g for g, leaf in zip(grads, leaves, strict=True) if leaf.dim() == 1]
    largest = lambda tensors: max([1.0] + [t.abs().max().item() for t in tensors])  # noqa: E731
    return {"output": largest([output]), "input_grad": largest(input_grads), "bias_grad": largest(bias_grads)}


# Relative to the largest value: fp32 results are within a few ULP, bf16 ones within about two roundings
# (eager rounds x + b before the activation; a gradient through the product of two rounded values).
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(RELATIVE_TOLERANCE))
@pytest.mark.parametrize("provider", ["fusedact", "eager"])
def test_measured_errors_are_small(cases, torch_backend, dtype, provider):
    for op in cases.available_ops().values():
        inputs = cases.make_input_set(op, 16, 32, dtype, torch.device("cpu"))
        errors = cases.measure_errors(op, cases.provider_function(op, provider), inputs)
        expected_keys = {"output", "input_grad"} | ({"bias_grad"} if cases.has_bias(op) else set())
        assert set(errors) == expected_keys, op.name
        scales = reference_scales(cases, op, inputs)
        for key, error in errors.items():
            assert error <= RELATIVE_TOLERANCE[dtype] * scales[key], (op.name, key, errors, scales)


def test_worst_error_keeps_nan(cases):
    assert math.isnan(cases.worst(0.5, math.nan)) and math.isnan(cases.worst(math.nan, 0.5))
    assert cases.worst(0.5, 0.25) == 0.5


def test_liger_is_none_without_liger_or_for_an_op_it_lacks(cases):
    ops = cases.available_ops()
    assert cases.liger_function(ops["gelu"]) is None
    if importlib.util.find_spec("liger_kernel") is None:
        assert cases.liger_function(ops["swiglu"]) is None


# ---------------------------------------------------------------------------------------------------
# Targets and tables, on made-up records


def made_up_record(op="gelu", mode="fwd", input_bytes=128 * 2**20, pct_copy=95.0, speedup=None, failed=None):
    fused = {"ms": [1.0, 0.9, 1.1], "gbps": 3000.0, "pct_copy": pct_copy, "errors": {"output": 1e-3}}
    fused["errors"].update(input_grad=2e-3, bias_grad=3e-2)
    providers = {"fusedact": fused, "eager": {"ms": [2.0, 1.9, 2.1], "gbps": 1500.0, "pct_copy": 50.0}}
    providers["eager"]["errors"] = dict(fused["errors"])
    if failed:
        providers["compile"] = {"failed": failed}
    layout = "gated" if op == "swiglu" else "bias"
    return {
        "op": op, "dtype": "bf16", "rows": 8192, "cols": 8192, "mode": mode, "bytes": 3 * input_bytes,
        "input_bytes": input_bytes, "layout": layout, "has_bias": layout == "bias", "providers": providers,
        "speedup": speedup or {"eager": 2.0},
    }  # fmt: skip


def test_targets_report_the_worst_point_and_whether_it_is_met():
    report = import_bench("report")
    results = [
        made_up_record(mode="fwd", speedup={"eager": 2.5, "compile": 1.2}),
        made_up_record(mode="bwd", pct_copy=85.0, speedup={"eager": 1.2, "compile": 1.3}),
        made_up_record(mode="fwd", input_bytes=2**20, pct_copy=10.0, speedup={"eager": 0.5}),  # < 64 MiB
        made_up_record(op="swiglu", mode="fwd", speedup={"eager": 1.7, "liger": 0.9}),
    ]
    overhead = [
        {"op": "gelu", "mode": "fwd", "provider": "fusedact", "us_per_call": 12.0},
        {"op": "gelu", "mode": "fwd", "provider": "eager", "us_per_call": 10.0},
    ]
    memory = [{"block": "swiglu-mlp", "provider": p, "peak_bytes": b} for p, b in [("fusedact", 3), ("eager", 4)]]
    gpu_run = {"metadata": {"device_type": "cuda"}, "results": results, "host_overhead": overhead, "memory": memory}
    targets = report.check_targets(gpu_run)
    worst_and_met = {t["target"]: (t["worst"], t["met"]) for t in targets}
    copy = targets[0]
    assert (copy["target"], copy["worst"], copy["met"], copy["points"]) == (
        "fusedact fwd and bwd >= 90% of copy bandwidth",
        85.0,
        False,
        3,
    )
    assert copy["where"] == "gelu bf16 8192x8192 bwd"
    assert worst_and_met["bias+activation fwd >= 1.9x eager"] == (2.5, True)
    assert worst_and_met["bwd with bias gradient >= 1.3x eager"] == (1.2, False)
    assert worst_and_met["SwiGLU fwd >= 1.6x eager"] == (1.7, True)
    assert worst_and_met["every op and mode >= 1.0x torch.compile"] == (1.2, True)
    assert worst_and_met["bwd with bias gradient >= 1.15x torch.compile"] == (1.3, True)
    assert worst_and_met["SwiGLU >= 1.0x Liger"] == (0.9, False)
    assert worst_and_met["host overhead per call <= eager's (fusedact / eager)"] == (pytest.approx(1.2), False)
    assert worst_and_met["swiglu-mlp peak memory < eager's (fusedact / eager)"] == (0.75, True)
    table = report.targets_table(targets)
    assert "| **no** |" in table and "| yes |" in table
    # The same numbers from a CPU run judge nothing: the targets are the GPU kernels'.
    assert report.check_targets({**gpu_run, "metadata": {"device_type": "cpu"}}) == []


def test_cpu_ratio_table_gives_fusedact_over_eager_from_the_paired_ratios():
    report = import_bench("report")
    record = made_up_record(mode="fwd")
    record["paired"], record["rounds"] = {"eager": [2.0, 1.6, 2.5]}, 5  # eager / fusedact, round by round
    table = report.cpu_ratio_table([record, made_up_record(mode="bwd")])  # the unpaired record: no row
    lines = table.splitlines()
    assert len(lines) == 3
    # fusedact / eager = 1 / (eager / fusedact): the median 0.5, its 20-80 % range [1 / 2.5, 1 / 1.6].
    assert lines[2] == "| gelu | bf16 | 8192x8192 | fwd | 1.000 | 2.000 | 0.500 [0.400, 0.625] | 5 |"


def test_tables_and_csv_show_failures_and_both_gradient_errors():
    report = import_bench("report")
    record = made_up_record(mode="bwd", failed="OutOfMemoryError: CUDA out of memory")
    providers = report.providers_in([record])
    assert providers == ["fusedact", "eager", "compile"]
    row = report.sweep_row(record, providers)
    assert "| 2.00x | failed |" in row and "2.0e-03 / 3.0e-02" in row
    assert row.count("|") == report.sweep_header(providers).splitlines()[0].count("|")
    rows = list(report.csv_rows([record]))
    assert [r["provider"] for r in rows] == providers
    assert rows[2]["failed"].startswith("OutOfMemoryError") and rows[1]["fusedact_speedup"] == 2.0
    assert report.failures({"results": [record]}) == [
        "compile: OutOfMemoryError: CUDA out of memory (1 points, e.g. gelu bf16 8192x8192)"
    ]


def test_cpu_rows_leave_out_percent_of_copy():
    report = import_bench("report")
    record = made_up_record()
    record["providers"]["fusedact"]["pct_copy"] = None
    providers = report.providers_in([record])
    header, row = report.sweep_header(providers, show_copy=False), report.sweep_row(record, providers, show_copy=False)
    assert "% copy" not in header and row.count("|") == header.splitlines()[0].count("|")
    assert "% copy" in report.sweep_header(providers)


def test_default_output_is_the_git_ignored_folder():
    report = import_bench("report")
    metadata = {"device": "CPU: x", "date": "2026-12-01T10:00:00+00:00"}
    assert report.out_dir_from(None, metadata) == ROOT / "bench-results" / "cpu-2026-12-01"
    assert report.out_dir_from("", metadata) == ROOT / "bench" / "results" / "cpu-2026-12-01"
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench-results/x.json"], cwd=ROOT)
    assert ignored.returncode == 0, "bench-results/ must be git-ignored"


# ---------------------------------------------------------------------------------------------------
# Host overhead taken apart, and the bias in the GEMM


def test_every_layer_of_the_breakdown_computes_the_public_result(torch_backend):
    """Each layer the breakdown times is the same computation, one wrapper fewer each time: if ops.py
    renames one, this fails (and the breakdown reports it missing) until LAYERS is updated."""
    overhead = import_bench("overhead")
    x, bias = torch.randn(3, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    calls = overhead.layer_calls(x, bias, (x.detach(), bias.detach()))
    assert list(calls) == [name for name, _, _ in overhead.LAYERS]
    expected = torch.nn.functional.gelu(x.detach() + bias.detach())
    for name, call in calls.items():
        torch.testing.assert_close(call(), expected, msg=f"breakdown layer {name!r} vs F.gelu(x + b)")
    assert not calls["implementation"]().requires_grad, "below the autograd wrapping: no graph"
    assert calls["entry"]().requires_grad


def test_stubbed_stage_runs_the_public_call_without_the_kernel(torch_backend):
    """The stubbed stage is the public call (checks, autograd, dispatch) with only the kernel call replaced:
    the stub's output comes back through autograd, and the real backend is in place again after."""
    overhead = import_bench("overhead")
    x, bias = torch.randn(3, 64, requires_grad=True), torch.randn(64, requires_grad=True)
    backend = fusedact.ops._backend
    calls = []
    with mock.patch.object(overhead._StubBackend, "bias_act", side_effect=lambda x, *a: calls.append(a) or x * 0):
        y = overhead._with_kernel_stubbed(fusedact.gelu, x, bias)
    assert fusedact.ops._backend is backend and len(calls) == 1 and calls[0][1:3] == (None, None)
    assert y.shape == x.shape and y.grad_fn is not None and not y.detach().any()
    with pytest.raises(TypeError):  # (the checks still run: a bad bias is refused before any kernel)
        overhead._with_kernel_stubbed(fusedact.gelu, x, "bias")
    assert fusedact.ops._backend is backend


def test_breakdown_shares_are_the_differences_of_the_layers():
    overhead = import_bench("overhead")
    column = {"public": [10.0] * 3, "entry": [7.0] * 3, "implementation": [4.5] * 3, "kernel call": [4.0] * 3}
    column.update({"x + b": [1.0] * 3, "F.gelu(z)": [2.0] * 3, "F.gelu(x + b)": [4.0] * 3})
    rows = {stage.strip(): values for stage, _, values in overhead.breakdown_rows({"columns": {"no grad": column}})}
    assert rows["input checks"] == [3.0] and rows["autograd wrapping"] == [2.5]
    assert rows["dispatch and layout"] == [0.5] and rows["kernel call"] == [4.0]
    assert rows["public / eager"] == [2.5]
    assert "fusedact / eager" in rows and rows["fusedact / eager"] == [None]  # (no stubbed stage timed)
    column[overhead.STUBBED_STAGE] = [5.0] * 3
    rows = {stage.strip(): values for stage, _, values in overhead.breakdown_rows({"columns": {"no grad": column}})}
    assert rows["fusedact / eager"] == [1.25]  # our part alone (kernel call stubbed) over eager's pair
    report = import_bench("report")
    with_grad = {**column, overhead.STUBBED_STAGE: [7.0] * 3}
    target = report._breakdown_target({"columns": {"no grad": column, "requires grad": with_grad}})
    assert (target["worst"], target["where"], target["met"]) == (1.75, "requires grad", False)


def test_linear_point_times_the_layer_and_the_part_beyond_the_gemm(torch_backend):
    linear = import_bench("linear")
    records = linear.measure_linear_point("relu", (16, 8, 32), "fp32", torch.device("cpu"), rep_ms=1.0)
    assert [r["mode"] for r in records] == ["fwd", "fwd+bwd"]
    for record in records:
        assert set(record["ms"]) == set(linear.VARIANTS)
        gemm = record["ms"]["gemm"][0]
        for name, beyond in record["beyond_gemm_ms"].items():
            assert beyond == pytest.approx(record["ms"][name][0] - gemm)
        layer = record["speedup_layer"]["vs eager-linear"]
        assert layer == pytest.approx(record["ms"]["eager-linear"][0] / record["ms"]["fusedact"][0])
        assert record["max_abs_diff_vs_eager_linear"] < 1e-5
    assert "| relu | 16x8 -> 32 | fp32 | fwd |" in linear.linear_table(records)


# ---------------------------------------------------------------------------------------------------
# Timers, on calls whose cost the test controls


def test_paired_rounds_time_every_call_once_per_round_in_rotating_order():
    timing = import_bench("timing")
    log = []

    def call_of(name):
        def call():
            time.sleep(1.2 * timing.MIN_SAMPLE_S)  # longer than a sample: one call per sample
            log.append(name)

        return call

    calls = {name: call_of(name) for name in ("a", "b", "c")}
    samples = timing.paired_cpu_ms(calls, budget_s=0.0, min_rounds=4)
    assert {name: len(times) for name, times in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(times_ms >= 1.2 for times in samples.values() for times_ms in times)
    rounds = log  # no calibrating call: the first round's single calls set the batches
    assert rounds == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"], "each round starts one later"


def test_paired_ratios_are_taken_round_by_round():
    timing = import_bench("timing")
    # b is 2x a in every round although the machine slows down 10x in the last two rounds.
    samples = {"a": [1.0, 1.0, 1.0, 10.0, 10.0], "b": [2.0, 2.0, 2.0, 20.0, 20.0]}
    assert timing.paired_ratios(samples, "b", "a") == pytest.approx([2.0, 2.0, 2.0])
    assert timing.quantiles([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx([3.0, 1.8, 4.2])


class HostClockEvent:
    """A stand-in for ``torch.cuda.Event`` on the host clock, logging each record."""

    log: list = []

    def record(self) -> None:
        self.time = time.perf_counter()
        HostClockEvent.log.append("event")

    def elapsed_time(self, end: "HostClockEvent") -> float:
        return (end.time - self.time) * 1e3


def test_gpu_timer_reads_the_flush_buffer_before_every_timed_call(monkeypatch):
    """The GPU timer's logic on the host: a read flush, then the events around exactly one call."""
    timing = import_bench("timing")
    log = HostClockEvent.log
    log.clear()
    monkeypatch.setattr(timing, "read_flush", lambda buffer: log.append("flush"))

    def call():
        time.sleep(2e-4)
        log.append("call")

    ms = timing.gpu_time_ms(call, rep_ms=4.0, flush=torch.empty(0), event=HostClockEvent, synchronize=lambda: None)
    timed = "".join("F" if e == "flush" else "E" if e == "event" else "c" for e in log)
    # One call; the estimate (5 flushed calls between two events); warm-up calls; then each timed call
    # alone between its two events, right after a flush.
    match = re.fullmatch(r"cE(Fc){5}Ec+((FEcE)+)", timed)
    assert match, timed
    assert len(match.group(2)) // 4 >= timing.MIN_TIMED_CALLS
    median, p20, p80 = ms
    assert 0.2 <= p20 <= median <= p80 < 50, ms


def test_device_slug():
    report = import_bench("report")
    assert report.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.device_slug("CPU: AMD EPYC, 2 threads") == "cpu"


# ---------------------------------------------------------------------------------------------------
# The command line


def run_bench(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` from the repository root, as the README runs it."""
    command = [sys.executable, "-m", "bench", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# Absolute bounds for randn inputs of 256 x 1024: values up to about 20 (a gate times an up), bias
# gradients summing 256 rows. Loose on purpose: test_measured_errors_are_small checks the scale.
SANE_ERRORS = {
    "fp32": {"output": 1e-4, "input_grad": 1e-3, "bias_grad": 1e-2},
    "bf16": {"output": 0.5, "input_grad": 1.0, "bias_grad": 4.0},
}


def test_quick_cpu_run_writes_every_report(tmp_path):
    out = tmp_path / "results"
    ops, dtypes = ["gelu", "swiglu_bias", "swiglu_packed"], ["fp32", "bf16"]
    shapes = ["64x128", "256x1024"]  # two sizes: a curve to plot
    argv = ["--device", "cpu", "--ops", *ops, "--dtypes", *dtypes, "--shapes", *shapes, "--rep-ms", "2"]
    done = run_bench("--quick", *argv, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "| op | dtype | shape | mode |" in done.stdout and "fusedact ms" in done.stdout

    report = json.loads((out / "cpu.json").read_text())
    assert report["metadata"]["device"].startswith("CPU") and "fallback" in report["metadata"]["note"]
    for key in ("torch", "triton", "date", "git_commit", "driver", "command"):
        assert report["metadata"][key]
    assert report["copy_bandwidth"]["gbps"] > 0
    results = report["results"]
    assert len(results) == len(ops) * len(dtypes) * len(shapes) * 2
    assert {(r["op"], r["dtype"], r["mode"]) for r in results} == {
        (op, dtype, mode) for op in ops for dtype in dtypes for mode in ("fwd", "fwd+bwd")
    }, "the CPU's default modes: forward, and forward + backward"
    for record in results:
        assert set(record["providers"]) == {"fusedact", "eager"}, "torch.compile on the CPU only when asked"
        assert record["rounds"] >= 5 and set(record["paired"]) == {"eager"}
        ratio_median, ratio_p20, ratio_p80 = record["paired"]["eager"]
        assert 0 < ratio_p20 <= ratio_median <= ratio_p80 and record["speedup"]["eager"] == ratio_median
        for provider, entry in record["providers"].items():
            median, p20, p80 = entry["ms"]
            assert 0 < p20 <= median <= p80, (provider, entry["ms"])
            assert entry["gbps"] > 0 and entry["pct_copy"] is None, "no % of copy on the CPU"
            for key, bound in SANE_ERRORS[record["dtype"]].items():
                assert entry["errors"].get(key, 0.0) < bound, (record["op"], record["dtype"], provider, entry["errors"])
        assert record["speedup"]["eager"] > 0
        assert record["bytes"] > record["input_bytes"] > 0

    memory = {(r["block"], r["provider"]): r for r in report["memory"]}
    assert set(memory) == {(b, p) for b in ("linear-gelu-linear", "swiglu-mlp") for p in ("fusedact", "eager")}
    for record in memory.values():
        assert "peak_bytes" not in record, "no allocator statistics on the CPU: memory is not measured"
        assert record["ms"][0] > 0 and record["max_abs_diff_vs_eager"] < 1e-3
    breakdown = report["host_overhead_breakdown"]
    assert breakdown["missing"] == [] and set(breakdown["columns"]) == {"no grad", "requires grad"}
    assert {(r["op"], r["mode"]) for r in report["linear"]} == {("gelu", "fwd"), ("gelu", "fwd+bwd")}
    assert all(r["max_abs_diff_vs_eager_linear"] < 1e-4 for r in report["linear"])  # fp32: a few ULP
    assert {(r["op"], r["provider"], r["mode"]) for r in report["host_overhead"]} == {
        (op, p, m) for op in ("gelu", "swiglu") for p in ("fusedact", "eager") for m in ("fwd", "fwd+bwd")
    }
    assert all(r["us_per_call"] > 0 for r in report["host_overhead"])
    assert report["targets"] == [] and report["skipped"] == [], "GPU targets are not judged on the CPU"
    assert "not the Triton kernels" in done.stdout and "## CPU path: fusedact / eager time" in done.stdout
    assert "**no**" not in done.stdout and "| yes |" not in done.stdout

    csv_lines = (out / "cpu.csv").read_text().splitlines()
    assert csv_lines[0].startswith("op,dtype,rows,cols,mode,provider,bytes")
    assert len(csv_lines) == 1 + 2 * len(results)
    markdown = (out / "cpu.md").read_text()
    headings = ("# fusedact benchmark: CPU", "## Targets: not judged on CPU", "## Time, bandwidth and error")
    more = ("## CPU path: fusedact / eager time", "## Host overhead", "### One call taken apart", "## Bias in the GEMM")
    for heading in (*headings, *more):
        assert heading in markdown
    if importlib.util.find_spec("matplotlib") is not None:
        assert {p.name for p in out.glob("*.png")} == {f"cpu-{k}-{d}.png" for k in ("gbps", "speedup") for d in dtypes}
    else:
        assert any("matplotlib" in note for note in report["notes"])


def test_cpu_backend_compiled_runs_the_compiled_path_and_says_so(tmp_path, capsys, monkeypatch):
    """``--cpu-backend compiled``: fusedact's CPU numbers are the compiled path's (it ran, on a point above
    its size floor), the report says which backend, and the previous backend is back afterwards; where this
    PyTorch cannot compile it, a clear argument error instead."""
    main = import_bench("__main__").main
    argv = ["--device", "cpu", "--quick", "--sections", "sweep", "--ops", "gelu", "--dtypes", "fp32"]
    argv += ["--shapes", "256x512", "--modes", "fwd", "--rep-ms", "1", "--out", str(tmp_path), "--formats", "json"]
    from fusedact import _compiled

    if _compiled.problem() is not None:
        with pytest.raises(SystemExit):
            main([*argv, "--cpu-backend", "compiled"])
        assert "--cpu-backend compiled: the 'compiled' CPU backend cannot run here" in capsys.readouterr().err
        return
    ran = []
    call = _compiled._call
    monkeypatch.setattr(_compiled, "_call", lambda *args: ran.append(args[0].__name__) or call(*args))
    previous = fusedact.get_cpu_backend()
    assert main([*argv, "--cpu-backend", "compiled"]) == 0
    assert "fusedact's CPU backend: compiled" in capsys.readouterr().out and "_forward" in ran
    assert json.loads((tmp_path / "cpu.json").read_text())["metadata"]["cpu_backend"] == "compiled"
    assert fusedact.get_cpu_backend() == previous and not _compiled._enabled


def test_a_compile_that_would_overshoot_the_time_limit_is_left_out(tmp_path, capsys):
    """The CPU's first estimate of a compile (two graphs, 30 s each) does not fit in 20 s: the point runs
    without torch.compile, and says so."""
    main = import_bench("__main__").main
    argv = ["--device", "cpu", "--quick", "--sections", "sweep", "--ops", "relu", "--dtypes", "fp32", "--rep-ms", "1"]
    argv += ["--providers", "fusedact", "eager", "compile", "--time-limit", "20"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["compile_cut"] == ["relu fp32 256x1024"] and report["skipped"] == []
    assert {provider for record in report["results"] for provider in record["providers"]} == {"fusedact", "eager"}
    assert "torch.compile left out at 1 points" in capsys.readouterr().out
    main_module = import_bench("__main__")
    assert main_module.compile_fits(None, 1e9, 1e9) and main_module.compile_fits(100, 40, 60)
    assert not main_module.compile_fits(100, 41, 60)


def test_time_limit_skips_points_and_still_writes(tmp_path, capsys):
    main = import_bench("__main__").main
    argv = ["--device", "cpu", "--quick", "--sections", "sweep", "--ops", "relu", "silu", "--rep-ms", "1"]
    assert main([*argv, "--time-limit", "1e-9", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu.json").read_text())
    assert report["results"] == [] and len(report["skipped"]) == 4
    assert report["host_overhead"] == [] and report["memory"] == []
    assert "time limit reached: 4 points" in capsys.readouterr().out


def test_plan_of_the_default_gpu_sweep(capsys):
    main = import_bench("__main__").main
    assert main(["--plan", "--device", "cuda"]) == 0
    plan = capsys.readouterr().out
    assert "shapes (23)" in plan and "torch.compile at 8192x11008 in bf16" in plan
    assert "fusedact eager compile compile-max-autotune" in plan and "rough sweep time" in plan
    assert main(["--plan", "--device", "cpu"]) == 0
    assert "providers: fusedact eager;" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ops", "nope"], "invalid choice"),
        (["--dtypes", "fp8"], "invalid choice"),
        (["--modes", "backward"], "invalid choice"),
        (["--providers", "tensorrt"], "invalid choice"),
        (["--shapes", "4096"], "ROWSxCOLS"),
        (["--shapes", "0x4096"], ">= 1"),
        (["--compile-shapes", "big"], "--compile-shapes"),
        (["--rep-ms", "-1"], "--rep-ms must be positive"),
        (["--time-limit", "0"], "--time-limit must be positive"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    main = import_bench("__main__").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that is absent")
def test_cuda_without_a_gpu_is_an_error(capsys):
    main = import_bench("__main__").main
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_ptx_report_compiles_a_kernel_for_sm90():
    """One kernel through triton.compile for sm_90 and ptxas: no GPU needed."""
    done = run_ptx_report("--cases", "act-fwd:gelu", "--widths", "760")
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1]
    assert row.startswith("| act-fwd | gelu | bf16 | 760 | bias_act_fwd_kernel | True |") and "16 B" in row


def test_breakdown_shows_the_launch_cache_off():
    """On a GPU the breakdown also times the public call with the launch cache off (its row appears when
    measured); the switch is restored afterwards, even on an error."""
    overhead = import_bench("overhead")
    cache = fusedact.ops._triton.LAUNCH_CACHE
    before = cache.enabled
    seen = overhead._without_launch_cache(lambda: cache.enabled)
    assert seen is False and cache.enabled == before
    with pytest.raises(ZeroDivisionError):
        overhead._without_launch_cache(lambda: 1 / 0)
    assert cache.enabled == before
    stages = {name: [2.0, 1.0, 3.0] for name in overhead.stage_names()}
    breakdown = {"shape": [1, 4096], "dtype": "fp32", "missing": [],
                 "columns": {"no grad": {**stages, overhead.UNCACHED_STAGE: [5.0, 4.0, 6.0]}}}  # fmt: skip
    rows = {stage: values for stage, _, values in overhead.breakdown_rows(breakdown)}
    assert rows[overhead.UNCACHED_STAGE] == [5.0]
