"""The fallback in cache-sized pieces (``_fallback.CHUNK_ELEMENTS``) gives what it gives on whole tensors:
every output element within the ULPs the fallback's accuracy allows of the whole tensor's result, and the
bias's and learned parameters' gradients as sums of terms that differ by as much, rounded once (bounded by
the sum of the terms' magnitudes; checked against float64 sums of the same terms too).

Not bitwise: PyTorch's CPU ops compute a tensor's last elements (its length modulo the SIMD width) on a
scalar path whose bits may differ from the vector path's (each within the ~4 fp32 ULPs of the exact value
that ``_fallback.FAST_RANGE`` allows, so within 8 of each other), and a piece and the whole tensor may
take different accurate formulas for the same element: the fast op, or, in a block recomputed because a
neighbour lies outside the fast range (``_fallback.CHECK_BLOCK``), the careful one, or for a piece whose
elements all lie where a cheaper formula is accurate, that one (``_fallback.MIDDLE_RANGE``). Every path is
held to the float64 references by the accuracy tests (tests/test_numerics.py)."""

import contextlib

import pytest
import torch

import fusedact
from fusedact import _fallback

PIECE = 192  # elements per piece in these tests: a [37, 64] tensor is 13 pieces of three rows (the last short)


@contextlib.contextmanager
def fusedact_backend(name):
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend(name)
    try:
        yield
    finally:
        fusedact.set_cpu_backend(previous)


@pytest.fixture
def small_pieces(monkeypatch):
    def run(function, *args):
        monkeypatch.setattr(_fallback, "CHUNK_ELEMENTS", 1 << 40)
        whole = function(*args)
        monkeypatch.setattr(_fallback, "CHUNK_ELEMENTS", PIECE)
        return whole, function(*args)

    return run


def _inputs(dtype, shape=(37, 64), scale=4.0):
    return torch.randn(*shape).mul_(scale).to(dtype)


def _assert_same(piecewise, whole, terms=None):
    """Within 8 ULPs of their dtype (two results of PyTorch's CPU ops' scalar and vector paths, each within
    4 of the exact value) of the larger of the result and ``terms``, the size of the terms it is a sum of
    (a derivative such as gelu's cdf + z pdf cancels near its root); same dtype and strides."""
    assert piecewise.dtype == whole.dtype and piecewise.stride() == whole.stride()
    size = whole.abs().double() if terms is None else torch.maximum(whole.abs().double(), terms.abs().double())
    difference = (piecewise.double() - whole.double()).abs()
    allowed = 8 * torch.finfo(whole.dtype).eps * size + torch.finfo(whole.dtype).tiny
    assert bool((difference <= allowed).all()), f"{int((difference > allowed).sum())} elements differ"


def _derivative_terms(z, *factors):
    """(1 + |z|) times the factors: a bound on the terms of an activation derivative's sum, times the rest."""
    size = 1.0 + z.double().abs()
    for factor in factors:
        size = size * factor.double().abs()
    return size


def _assert_sums(piecewise, whole, dtype, magnitude):
    """Two fp32 (fp64) sums of terms that may differ by the ULPs the fallback's paths allow (a piece and the
    whole tensor can take different accurate formulas) and are added in different orders, rounded once to
    ``dtype``: within the rounding of ``dtype`` plus 32 compute-dtype ULPs of ``magnitude``, the sum of
    the terms' absolute values (or a bound on it), shaped like the sums."""
    rounding = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-6, torch.float64: 1e-14}[dtype]
    compute_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    allowed = rounding * whole.double().abs() + 32 * compute_eps * magnitude.double() + 1e-30
    difference = (piecewise.double() - whole.double()).abs()
    assert bool((difference <= allowed).all()), f"sums differ by {(difference / allowed).max().item():.3g}x the bound"


def _channel_magnitude(terms, dims):
    """The sum of the absolute terms over ``dims`` (all of them for a parameter shared by every element)."""
    return terms.double().abs().sum(dims).reshape(-1)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
ACTIVATIONS = [("gelu", 0.0, 0.0), ("swish", 1.0, 0.0), ("relu", 0.0, 0.0), ("softplus", 2.0, 3.0), ("tanh", 0.0, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,param,param2", ACTIVATIONS)
def test_bias_act(activation, param, param2, dtype, small_pieces):
    x, bias = _inputs(dtype), _inputs(dtype, (64,))
    whole, pieces = small_pieces(_fallback.bias_act, x, bias, None, None, activation, param, param2, 1)
    _assert_same(pieces, whole)
    grad_y = _inputs(dtype)
    for saved_is_output in (False, True):
        saved = whole if saved_is_output else x
        args = (grad_y, saved, bias, None, None, activation, param, param2, 1, saved_is_output, True, False)
        whole_grads, piece_grads = small_pieces(_fallback.bias_act_backward, *args)
        terms = _derivative_terms(x.double() + bias.double(), grad_y)
        _assert_same(piece_grads[0], whole_grads[0], terms)
        _assert_sums(piece_grads[1], whole_grads[1], dtype, _channel_magnitude(terms, 0))
        assert piece_grads[1].dtype == dtype and piece_grads[1].shape == (64,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_bias_and_learned_parameters(dtype, small_pieces):
    """NCHW with a channel bias (pieces along the batch), channels-last; PReLU's per-channel slope and
    xIELU's two shared coefficients, whose gradients are summed per piece."""
    x = _inputs(dtype, (9, 3, 8, 8))
    for layout in (x, x.to(memory_format=torch.channels_last)):
        bias, slope = _inputs(dtype, (3,)), _inputs(dtype, (3,), 0.3)
        whole, pieces = small_pieces(_fallback.bias_act, layout, bias, slope, None, "prelu", 0.0, 0.0, 1)
        _assert_same(pieces, whole)
        args = (_inputs(dtype, x.shape), layout, bias, slope, None, "prelu", 0.0, 0.0, 1, False, True, True)
        whole_grads, piece_grads = small_pieces(_fallback.bias_act_backward, *args)
        _assert_same(piece_grads[0], whole_grads[0])
        z = layout.double() + bias.double().view(3, 1, 1)
        terms = _derivative_terms(z, args[0], 1.0 + slope.double().abs().view(3, 1, 1))
        for a, b in zip(piece_grads[1:3], whole_grads[1:3], strict=True):
            _assert_sums(a, b, dtype, _channel_magnitude(terms, (0, 2, 3)))
    x, bias = _inputs(dtype), _inputs(dtype, (64,))
    alpha_p, alpha_n = torch.tensor([0.8], dtype=dtype), torch.tensor([1.1], dtype=dtype)
    args = (_inputs(dtype), x, bias, alpha_p, alpha_n, "xielu", 0.5, -1e-6, 1, False, True, True)
    whole_grads, piece_grads = small_pieces(_fallback.bias_act_backward, *args)
    _assert_same(piece_grads[0], whole_grads[0])
    terms = _derivative_terms(x.double() + bias.double(), args[0], 1.0 + (x.double() + bias.double()).abs())
    magnitudes = (_channel_magnitude(terms, 0), _channel_magnitude(terms, (0, 1)), _channel_magnitude(terms, (0, 1)))
    for a, b, magnitude in zip(piece_grads[1:], whole_grads[1:], magnitudes, strict=True):
        _assert_sums(a, b, dtype, magnitude)
        assert a.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_gated(dtype, packed, small_pieces):
    """The gated forward and backward, on separate gate/up and on the halves of a packed [gate | up]."""
    if packed:
        gate, up = _inputs(dtype, (37, 128)).chunk(2, dim=-1)
    else:
        gate, up = _inputs(dtype), _inputs(dtype)
    gate_bias, up_bias = _inputs(dtype, (64,)), _inputs(dtype, (64,))
    for activation, param, scale in (("swish", 1.0, 1.0), ("gelu", 0.0, 0.7)):
        args = (gate, up, gate_bias, up_bias, activation, param, 0.0, scale)
        whole, pieces = small_pieces(_fallback.gated, *args)
        _assert_same(pieces, whole)
        grad_y = _inputs(dtype)
        whole_grads, piece_grads = small_pieces(_fallback.gated_backward, grad_y, *args, True)
        z = (gate.double() + gate_bias.double()) * scale
        terms = _derivative_terms(z, up.double() + up_bias.double(), grad_y)
        _assert_same(piece_grads[0], whole_grads[0], terms)
        _assert_same(piece_grads[1], whole_grads[1])
        magnitudes = (_channel_magnitude(terms, 0), _channel_magnitude(_derivative_terms(z, grad_y), 0))
        for a, b, magnitude in zip(piece_grads[2:], whole_grads[2:], magnitudes, strict=True):
            _assert_sums(a, b, dtype, magnitude)


def test_differentiable_backward_is_taken_whole(monkeypatch):
    """A backward that autograd records (double backward) is not written piece by piece into an output."""
    x = _inputs(torch.float64).requires_grad_()
    grad_y = _inputs(torch.float64)
    monkeypatch.setattr(_fallback, "CHUNK_ELEMENTS", PIECE)
    assert _fallback._pieces(x, 1, grad_y) is None
    with torch.no_grad():
        assert _fallback._pieces(x, 1, grad_y) is not None


def test_sums_against_float64():
    """The piecewise bias gradient is the float64 sum of the same terms within fp32 summation error."""
    x, bias, grad_y = (
        _inputs(torch.float32, (300, 40)),
        _inputs(torch.float32, (40,)),
        _inputs(torch.float32, (300, 40)),
    )
    saved_chunk = _fallback.CHUNK_ELEMENTS
    try:
        _fallback.CHUNK_ELEMENTS = 256
        grad_x, grad_bias, _, _ = _fallback.bias_act_backward(
            grad_y, x, bias, None, None, "gelu", 0.0, 0.0, 1, False, True, False
        )
    finally:
        _fallback.CHUNK_ELEMENTS = saved_chunk
    torch.testing.assert_close(grad_bias.double(), grad_x.double().sum(0), rtol=1e-5, atol=1e-4)


# (activation, public call, reference function and parameters, formulas of PyTorch ops of our own, the ranges
# they are claimed over): gelu's erfc ones (``_fallback.MIDDLE_RANGE``, between PyTorch's op and the careful
# twin), the tanh form's sigmoid ones (its fast path, ``_fallback.FAST_RANGE``)
OWN_FORMULA_CASES = [
    ("gelu", lambda x: fusedact.gelu(x), ("gelu", {}), ("_gelu_erfc", "_gelu_erfc_backward"), "MIDDLE_RANGE"),
    (
        "gelu_tanh",
        lambda x: fusedact.gelu(x, approximate="tanh"),
        ("gelu", {"approximate": "tanh"}),
        ("_gelu_tanh_sigmoid", "_gelu_tanh_sigmoid_backward"),
        "FAST_RANGE",
    ),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", OWN_FORMULA_CASES, ids=[c[0] for c in OWN_FORMULA_CASES])
def test_own_formulas_over_their_range(case, dtype):
    """The fallback's formulas of PyTorch ops of its own, which a tensor whose every element lies in their
    range takes, hold the whole-range claims of tests/test_numerics.py there (forward 1 ULP in bf16/fp16,
    backward 2; fp32 and fp64 the condition number's tolerance) over every bf16/fp16 value of the range and a
    dense fp32 (fp64) grid of it; the spy makes sure they ran."""
    from unittest import mock

    from test_numerics import allowed_ulps, inputs_for

    from reference import exact_activation, ulp_error

    activation, call, (function, params), formulas, ranges = case
    low, high = getattr(_fallback, ranges)[(activation, "forward")]
    assert getattr(_fallback, ranges)[(activation, "backward")] == (low, high)
    x = inputs_for(dtype, 1) if dtype != torch.float64 else inputs_for(torch.float32, 1).double()
    x = x[(x.double() >= low) & (x.double() <= high)]  # (in float64: a bf16 x would round -12.8 first)
    if ranges == "MIDDLE_RANGE":
        assert bool((x < _fallback.FAST_RANGE[(activation, "forward")][0]).any())  # not all inside
    ran = dict.fromkeys(formulas, 0)

    def spied(name):
        formula = getattr(_fallback, name)

        def run(*args):
            ran[name] += 1
            return formula(*args)

        return run

    with fusedact_backend("torch"), contextlib.ExitStack() as stack:
        for name in formulas:
            stack.enter_context(mock.patch.object(_fallback, name, spied(name)))
        x = x.clone().requires_grad_()
        y = call(x)
        y.backward(torch.ones_like(y))
    assert all(ran.values()), f"formulas not taken: {ran}"
    z = x.detach().double()
    value, slope = exact_activation(z, function, params)
    for actual, reference, derivative in ((y.detach(), value, False), (x.grad, slope, True)):
        error = ulp_error(actual, reference, dtype)
        allowed = allowed_ulps(z, function, params, dtype, derivative)
        worst = int((error / allowed).argmax())
        assert bool((error <= allowed).all()), f"z = {z[worst].item()!r}: {error[worst].item():.3g} ULP"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_rows(dtype, small_pieces):
    """[B, T, H] with the bias on H: pieces of the [B T, H] rows (one batch element can be far larger than a
    piece), for bias_act, its backward and the gated pair."""
    x, bias, grad_y = _inputs(dtype, (2, 37, 64)), _inputs(dtype, (64,)), _inputs(dtype, (2, 37, 64))
    assert _fallback._pieces(x.view(-1, 64), -1) is None  # (real piece sizes: taken whole)
    whole, pieces = small_pieces(_fallback.bias_act, x, bias, None, None, "gelu", 0.0, 0.0, 2)
    _assert_same(pieces, whole)
    assert pieces.shape == x.shape
    args = (grad_y, x, bias, None, None, "gelu", 0.0, 0.0, 2, False, True, False)
    whole_grads, piece_grads = small_pieces(_fallback.bias_act_backward, *args)
    terms = _derivative_terms(x.double() + bias.double(), grad_y)
    _assert_same(piece_grads[0], whole_grads[0], terms)
    _assert_sums(piece_grads[1], whole_grads[1], dtype, _channel_magnitude(terms, (0, 1)))
    up = _inputs(dtype, (2, 37, 64))
    whole, pieces = small_pieces(_fallback.gated, x, up, None, None, "swish", 1.0, 0.0, 1.0)
    _assert_same(pieces, whole)
    whole_grads, piece_grads = small_pieces(
        _fallback.gated_backward, grad_y, x, up, None, None, "swish", 1.0, 0.0, 1.0, True
    )
    _assert_same(piece_grads[1], whole_grads[1])
    assert piece_grads[0].shape == x.shape


def _smaps_field(address: int, field: str) -> int | None:
    """``field`` (e.g. THPeligible) of the mapping of this process that holds ``address``, None where the
    kernel does not list it."""
    import re

    holds = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            bounds = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if bounds:
                holds = int(bounds[1], 16) <= address < int(bounds[2], 16)
            elif holds and line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return setting.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages (not Linux, or THP off)")
def test_large_outputs_ask_for_huge_pages():
    """A piecewise output of 16 MiB lies, past its first 2 MiB boundary, in a mapping eligible for transparent
    huge pages (its first touch faults 2 MiB at a time), where a plain tensor's does not unless the kernel
    gives them to every mapping; its values are relu's. A small output asks nothing; what is asked for is
    whole 2 MiB pages inside the output's own memory."""
    x = torch.randn(1024, 4096)
    y = _fallback.bias_act(x, None, None, None, "relu", 0.0, 0.0, -1)
    middle = y.data_ptr() + y.nbytes // 2
    eligible = _smaps_field(middle, "THPeligible")
    if eligible is None:
        pytest.skip("this kernel's smaps has no THPeligible")
    assert eligible == 1
    torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)
    plain = torch.empty(1 << 24)  # (64 MiB: above glibc's largest mmap threshold, a fresh mapping)
    if _thp_mode() == "madvise":
        assert _smaps_field(plain.data_ptr() + plain.nbytes // 2, "THPeligible") == 0
    called = []
    original = _fallback._madvise
    try:
        _fallback._madvise = lambda *args: called.append(args) or 0
        small = _fallback._huge_page_empty_like(torch.empty(1 << 19, dtype=torch.bfloat16))  # 1 MiB
        assert small.shape == (1 << 19,) and not called
        _fallback._huge_page_empty_like(x)
        assert called and called[0][1] % (2 << 20) == 0 and called[0][0] % (2 << 20) == 0
    finally:
        _fallback._madvise = original
