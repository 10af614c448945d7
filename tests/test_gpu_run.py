"""bench.gpu_run, the one-call GPU run: its DRY RUN on the CPU (every part at toy size, the same commands
as on the GPU box), and the time boxes that keep one slow part from eating the others.

The dry run is the test that matters: the GPU call has one try, and it must not fail on a typo. It runs
every part (about 45 s on a busy 2-core machine); the rest are small checks of the time boxing.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optional import needs_transformers_models
from test_bench import ROOT, import_bench  # bench is loaded from its folder, as there

gpu_run = import_bench("gpu_run")


@needs_transformers_models  # (its e2e part builds transformers' Llama)
def test_dry_run_runs_every_part_on_the_cpu_and_writes_at_most_8_files(tmp_path):
    """THE DRY RUN: ``python -m bench.gpu_run --dry-run`` runs every part, each to its end, at toy size."""
    command = [sys.executable, "-m", "bench.gpu_run", "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == sorted(
        ["gpu-run.md", "log.txt", "tests.txt", "sweep.json", "overhead.json", "memory.json"]
        + ["e2e-cpu.json", "e2e-cpu.md"]
    ), files
    assert len(files) <= gpu_run.MAX_FILES

    summary = (tmp_path / "gpu-run.md").read_text()
    for part in gpu_run.PART_NAMES:
        assert f"| {part} | ok |" in summary, (part, summary[:2000])
    assert "torch" in summary and "triton" in summary  # the versions
    assert "2 passed" in (tmp_path / "tests.txt").read_text()  # test_parse_shape: two cases

    sweep = json.loads((tmp_path / "sweep.json").read_text())
    measured = {(r["op"], r["mode"]) for r in sweep["results"]}
    assert measured == {(op, mode) for op in gpu_run.DRY_OPS for mode in ("fwd", "bwd")}
    assert {f"{r['rows']}x{r['cols']}" for r in sweep["results"]} == set(gpu_run.DRY_SHAPES)
    assert sweep["linear"] and sweep["skipped"] == []
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert overhead["host_overhead"] and overhead["host_overhead_breakdown"]["missing"] == []
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert {r["provider"] for r in memory["memory"]} == {"fusedact", "eager"}
    rows = json.loads((tmp_path / "e2e-cpu.json").read_text())["rows"]
    assert {(r["model"], r["variant"]) for r in rows} == {
        (m, v) for m in ("llama", "vit") for v in ("eager", "fusedact")
    }
    # The summary renders every part's tables from the JSON files.
    for heading in ("## Sweep:", "## Host overhead", "## Memory and step time", "## End to end"):
        assert heading in summary, heading


def test_a_part_past_its_box_gets_sigint_and_the_run_goes_on(tmp_path):
    """A hanging child is interrupted at the end of its box (SIGINT first: it may write what it has)."""
    marker = tmp_path / "interrupted"
    script = (
        "import time, pathlib\n"
        "try:\n    time.sleep(60)\n"
        f"except KeyboardInterrupt:\n    pathlib.Path({str(marker)!r}).write_text('saved')\n    raise\n"
    )
    start = time.monotonic()
    status, seconds = gpu_run.run_command([sys.executable, "-c", script], tmp_path / "log.txt", 1.0, env=None)
    assert status.startswith("cut at") and seconds < 10 and time.monotonic() - start < 10
    assert marker.read_text() == "saved"
    assert "$ " in (tmp_path / "log.txt").read_text()
    status, _ = gpu_run.run_command([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log.txt", 30, None)
    assert status == "failed (exit 3)"


def test_boxes_keep_the_later_parts_minimum_and_the_last_part_gets_the_rest():
    parts = {part.name: part for part in gpu_run.PARTS}
    later = [parts["overhead"], parts["memory"], parts["e2e"]]
    reserve = sum(part.min_s for part in later)
    assert gpu_run.box_for(parts["sweep"], 1000, later, last=False, dry=False) == parts["sweep"].box_s
    assert gpu_run.box_for(parts["sweep"], reserve + 50, later, last=False, dry=False) == 50
    assert gpu_run.box_for(parts["e2e"], 333, [], last=True, dry=False) == 333
    assert gpu_run.box_for(parts["sweep"], 10, later, last=False, dry=False) == 0
    # The boxes of a whole run fit its budget when every part needs its minimum.
    assert sum(part.min_s for part in gpu_run.PARTS) < gpu_run.DEFAULT_BUDGET_S


def test_the_tests_run_kernels_first_and_never_the_dry_run_itself():
    files, missing = gpu_run.test_files()
    assert missing == [], f"gpu_run names test files that do not exist: {missing}"
    names = [name.removeprefix("tests/") for name in files]
    assert names[: len(gpu_run.FIRST_TESTS)] == list(gpu_run.FIRST_TESTS)
    assert names[-len(gpu_run.LAST_TESTS) :] == list(gpu_run.LAST_TESTS)
    assert "test_gpu_run.py" not in names and len(names) == len(set(names))
    every = {path.relative_to(ROOT / "tests").as_posix() for path in (ROOT / "tests").rglob("test_*.py")}
    assert set(names) == every - {"test_gpu_run.py"}, "every test file runs, those in subfolders too"


def test_the_gpu_sweep_points_are_the_issues_key_points():
    run = gpu_run.Run(out=Path("/tmp/out"), dry=False, python="python3")
    command = gpu_run.sweep_commands(run, box_s=130)[0]
    assert command[:3] == ["python3", "-m", "bench"]
    text = " ".join(command)
    assert "--device cuda --ops all" in text and "--dtypes bf16 --modes fwd bwd" in text
    assert "--providers fusedact eager compile liger" in text and "--time-limit 95" in text
    rows_cols = [tuple(map(int, shape.split("x"))) for shape in gpu_run.SWEEP_SHAPES]
    large = [(r, c) for r, c in rows_cols if r * c * 2 >= 64 * 2**20]  # bf16 inputs of 64 MiB and more
    assert len(large) == 6 and {760, 1128, 11007} <= {c for _, c in large} and (1, 4096) in rows_cols
    install = gpu_run.install_commands(run)[0]
    assert install == ["python3", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", "."]


def test_the_real_gpu_commands_parse(tmp_path):
    """What the dry run cannot run: the GPU run's own arguments (its ops to compile, cuda, compile, the
    sizes), parsed by the same parsers. ``--plan`` lets ``--device cuda`` parse on a machine without one."""
    main_module, e2e = import_bench("__main__"), import_bench("e2e")
    run = gpu_run.Run(out=tmp_path, dry=False, python="python3")
    bench_commands = gpu_run.sweep_commands(run, 130) + gpu_run.overhead_commands(run) + gpu_run.memory_commands(run)
    for command in bench_commands:
        assert command[1:3] == ["-m", "bench"]
        settings, device, args, _ = main_module.parse_args([*command[3:], "--plan"])
        assert device.type == "cuda" and args.out == str(tmp_path) and args.formats == ["json"]
    sweep = main_module.parse_args([*bench_commands[0][3:], "--plan"])[0]
    assert set(sweep.compile_ops) == set(gpu_run.COMPILE_OPS) <= set(sweep.ops)
    assert [p for p in sweep.providers_at("bf16", (8192, 11008), "gelu") if p == "compile"] == ["compile"]
    assert "compile" not in sweep.providers_at("bf16", (8192, 11008), "mish")
    assert "compile" not in sweep.providers_at("bf16", (8192, 4096), "gelu")
    (command,) = gpu_run.e2e_commands(run)
    assert command[1:3] == ["-m", "bench.e2e"]
    args = e2e.build_parser().parse_args(command[3:])
    assert args.device == "cuda" and args.variants == ["eager", "fusedact", "fusedact-nolean", "compile"]


def test_bench_interrupted_writes_what_it_measured(tmp_path, monkeypatch, capsys):
    """SIGINT (the time box) in the middle of the sweep: the JSON keeps the points done and says so."""
    main_module = import_bench("__main__")
    calls = []
    real_run_point = main_module.run_point

    def run_point_then_interrupt(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_point(*args, **kwargs)

    monkeypatch.setattr(main_module, "run_point", run_point_then_interrupt)
    argv = ["--device", "cpu", "--quick", "--sections", "sweep", "--ops", "relu", "silu", "--dtypes", "fp32"]
    assert (
        main_module.main([*argv, "--rep-ms", "1", "--name", "sweep", "--formats", "json", "--out", str(tmp_path)]) == 0
    )
    assert [path.name for path in tmp_path.iterdir()] == ["sweep.json"]
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert {r["op"] for r in report["results"]} == {"relu"}
    assert any("interrupted" in note for note in report["notes"])
    assert "interrupted: writing what was measured" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plots_are_drawn_afterwards_from_the_sweep_json(tmp_path):
    record = {"op": "gelu", "dtype": "bf16", "mode": "fwd", "speedup": {"eager": 2.0}}
    results = [
        {**record, "input_bytes": size, "providers": {"fusedact": {"gbps": 3000.0}, "eager": {"gbps": 1500.0}}}
        for size in (2**26, 2**28)
    ]
    data = {"metadata": {"device": "GPU"}, "copy_bandwidth": {"gbps": 4000.0}, "results": results, "notes": []}
    (tmp_path / "sweep.json").write_text(json.dumps(data))
    assert [path.name for path in gpu_run.write_plots(tmp_path)] == ["sweep-gbps-bf16.png", "sweep-speedup-bf16.png"]
