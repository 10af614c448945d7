"""The compiled code of the hot kernels, for an H100/H200 (sm_90), as a real launch at each width compiles it.

``bench.ptx_report`` records what fusedact's launchers pass for a shape (kernel, FLAT, VECTOR, block,
every argument), lets Triton's own binder specialise it as a launch would, and compiles it; no GPU needed.
These tests hold the facts that decide bandwidth, so a change that loses them fails here:

- **Access width.** A contiguous call is addressed flat: every load and store of an activation tensor
  is 16 bytes, whatever the width. A call addressed by rows (a bias or slope gradient to reduce, a packed
  half, a stride) gets the widest access its rows' alignment allows: 16 bytes when the width is a multiple
  of 8 bf16 elements, 8 at 196 (ViT's 14 x 14) and at 4100, 2 at an odd width. That holds for a packed
  tensor's second half and a column slice too, whose pointers are not 16-byte aligned (the kernels take
  them as an aligned pointer plus a ``VECTOR``-multiple offset). The only
  narrower accesses allowed are the per-channel vectors (bias, slope: gathered per element in a flat
  block, loaded once per program by rows) and the fp32 partial sums of a parameter gradient (4 bytes).
- **No spills**, and registers under ``REGISTER_CEILING`` (128: two blocks of 8 warps per SM at least).
- **No barrier inside a loop**: a backward accumulates its bias gradient in a tile and reduces it once.

Compiles ~60 kernel variants with Triton's ptxas: about 30 s on a 2-core CPU.
"""

import importlib.util
import json
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton", allow_module_level=True)

from test_bench import run_ptx_report  # noqa: E402

from fusedact.kernels import vector_width  # noqa: E402

WIDTHS = [4096, 11008, 760, 1128, 196, 49, 11007, 4100]
REGISTER_CEILING = 128
ELEMENT_SIZE = 2  # bf16
# Elements per thread: a flat block of 4096 over 8 warps; a row-addressed backward tile of 2048 over 8.
FLAT_ELEMENTS_PER_THREAD = 16


# case -> (activation, per-channel vectors it gathers or loads, addressed flat)
CASES = {
    "act-fwd": ("gelu", 1, True),
    "act-bwd": ("gelu", 1, True),
    "gated-fwd": ("swish", 0, True),
    "gated-bwd": ("swish", 0, True),
    "conv-fwd": ("relu", 1, True),
    "act-bwd-bias": ("gelu", 1, False),
    "conv-bwd-bias": ("relu", 1, False),
    "gated-bwd-bias": ("swish", 2, False),
    "act-fwd-sliced": ("gelu", 1, False),
    "gated-fwd-packed": ("swish", 0, False),
    "gated-bwd-packed": ("swish", 0, False),
}
# case -> what else its rows' alignment is a multiple of, in elements, beside the width (a column slice
# from column 4: its rows start 4 elements past a 16-byte boundary)
START_ELEMENTS = {"act-fwd-sliced": 4}
FP32_CASES = ["act-fwd", "gated-bwd-bias"]
SOFTMAX_CASES = {"softmax-fwd": "softmax", "softmax-bwd-bias": "log"}
SOFTMAX_WIDTHS = [4096, 760, 1128, 11007, 32768]


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    """(case, activation, dtype, width) -> facts, from one ``bench.ptx_report --json`` run per dtype, in a
    process without ``TRITON_INTERPRET`` (the tests' own process has the interpreted kernels)."""
    facts = {}
    softmax_specs = [f"{case}:{activation}" for case, activation in SOFTMAX_CASES.items()]
    runs = (("bf16", [f"{case}:{CASES[case][0]}" for case in CASES], WIDTHS),
            ("fp32", [f"{case}:{CASES[case][0]}" for case in FP32_CASES], [1128]),
            ("bf16", softmax_specs, SOFTMAX_WIDTHS))  # fmt: skip
    for dtype, specs, widths in runs:
        done = run_ptx_report("--json", "--dtypes", dtype, "--cases", *specs, "--widths", *map(str, widths))
        assert done.returncode == 0, done.stderr
        for record in json.loads(done.stdout):
            facts.setdefault((record["case"], record["activation"], record["dtype"], record["width"]), []).append(
                record
            )
    return facts


def _widths(counts: dict) -> dict:
    return {int(width): count for width, count in counts.items()}


def _narrower(widths, width):
    return {w: n for w, n in widths.items() if w < width}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_code(compiled, case, width):
    activation, channel_vectors, flat = CASES[case]
    (facts,) = compiled[case, activation, "bf16", width]
    where = f"{case} {activation} bf16 at {width} columns ({facts['kernel']}, {facts['constants']})"
    assert facts["constants"]["FLAT"] == flat, where
    assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, f"{where}: spills"
    assert facts["registers"] < REGISTER_CEILING, f"{where}: {facts['registers']} registers"
    assert facts["barriers_in_loops"] == 0, f"{where}: bar.sync inside a loop"
    # Rows: the widest access the rows' alignment allows, for every tensor (a packed one's second half,
    # `width` elements into the row, and a column slice's, included).
    widest = 16 if flat else ELEMENT_SIZE * vector_width(ELEMENT_SIZE, width, START_ELEMENTS.get(case, 0))
    narrowest = widest
    allowed_narrow_loads = channel_vectors * FLAT_ELEMENTS_PER_THREAD
    loads, stores = _widths(facts["loads"]), _widths(facts["stores"])
    if case.endswith("-bias"):
        stores.pop(4, None)  # the fp32 partial sums of the parameter gradient (one per channel)
    assert facts["constants"]["VECTOR"] == (1 if flat else widest // ELEMENT_SIZE), where
    assert max(loads) == widest, f"{where}: widest load {max(loads)} B, expected {widest}"
    # (the output is allocated here, aligned: a column slice's output may take wider stores than its loads)
    assert max(stores) >= widest, f"{where}: widest store {max(stores)} B, expected {widest}"
    narrow_stores = _narrower(stores, narrowest)
    assert not narrow_stores, f"{where}: stores narrower than {narrowest} B: {narrow_stores}"
    narrow_loads = sum(_narrower(loads, narrowest).values())
    assert narrow_loads <= allowed_narrow_loads, f"{where}: {narrow_loads} loads narrower than {narrowest} B"


@pytest.mark.parametrize("case", FP32_CASES)
def test_fp32_is_16_bytes_wide(compiled, case):
    """fp32 rows of 1128 columns (a multiple of 4): 16-byte accesses too."""
    (facts,) = compiled[case, CASES[case][0], "fp32", 1128]
    loads, stores = _widths(facts["loads"]), _widths(facts["stores"])
    assert max(stores) == 16 and max(loads) == 16, f"{case} fp32: {loads} {stores}"
    assert facts["spill_stores"] == 0 and facts["registers"] < REGISTER_CEILING


@pytest.mark.parametrize("width", SOFTMAX_WIDTHS)
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_softmax_compiled_code(compiled, case, width):
    """Softmax rows: as wide as the rows' alignment allows, no spills, under the register ceiling (rows past
    one block also run the backward's row-sums kernel). Their row reductions stay inside the row loop."""
    widest = ELEMENT_SIZE * vector_width(ELEMENT_SIZE, width)
    for facts in compiled[case, SOFTMAX_CASES[case], "bf16", width]:
        where = f"{case} bf16 at {width} columns ({facts['kernel']}, {facts['constants']})"
        assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, f"{where}: spills"
        assert facts["registers"] < REGISTER_CEILING, f"{where}: {facts['registers']} registers"
        loads, stores = _widths(facts["loads"]), _widths(facts["stores"])
        stores.pop(4, None)  # fp32 row sums and partial bias sums
        if widest != 4:
            loads.pop(4, None)  # the fp32 row sums, read back
        assert max(loads) == widest, f"{where}: widest load {max(loads)} B, expected {widest}"
        assert not stores or max(stores) == widest, f"{where}: stores {stores}"


def test_launch_cache_agrees_with_triton():
    """``fusedact._triton.LAUNCH_CACHE`` launches a compiled kernel with exactly the arguments Triton's
    ``JITFunction.run`` would pass it, under a key at least as fine as Triton's specialisation, for every
    case's real launches (bench.ptx_report --check-launch-cache)."""
    done = run_ptx_report("--check-launch-cache", "--dtypes", "bf16", "fp32", "--widths", "4096", "760", "11007", "196")
    assert done.returncode == 0, done.stdout + done.stderr
