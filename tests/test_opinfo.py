"""fusedact against PyTorch's own test inputs: the OpInfo database (``op_db``) of every op fusedact mirrors.

For each mirrored OpInfo, every ``sample_inputs`` and ``reference_inputs`` sample, and each one's
``.noncontiguous()`` twin (which also makes a tensor argument such as PReLU's weight non-contiguous), is
mapped onto fusedact's signature with a random bias added (non-contiguous for the non-contiguous twin),
so fusedact computes ``f(x + bias)``, and held to PyTorch's op applied to ``z = x + bias`` in float64:
the value and the gradients of x, the bias and any further tensor argument, for a random upstream
gradient. Where fusedact differs from PyTorch on purpose, what it must return comes from
``fusedact.differences`` (``expected_output`` / ``expected_gradient``), and a PyTorch argument it does not
take skips the sample with the reason from ``fusedact.differences.unsupported`` (``inplace``, softmax's
``dtype``, ``glu`` along another dimension...); nothing is special-cased here.

Tolerances, from ``reference.py``: 1 ULP of bf16/fp16, 8 fp32 ULPs, 1e-12 in float64, plus the fp32
cancellation floor; sigmoid/tanh and softmax differentiate their rounded output as eager does
(``test_functional.saved_output_floor``, ``test_softmax``'s floors); a gradient summed over rows (the
bias, PReLU's weight) gets 2e-6 of the sum of the magnitudes it adds plus its rows' floors.

Time (CI has two cores): OpInfo's reference inputs hold tensors of a million elements, and many samples
differ only in their sizes. Each op's samples are made once, in float32, and cast to each dtype with their
layouts (the same values, rounded); they are cut to ``FALLBACK_ELEMENTS`` by narrowing leading dimensions
(strides, offset and transposition are kept: a ``(1024, 1024).T`` stays a transposed view), and of the
samples with the same layout class (rank, density, stride order, stride 0, offset, empty, finite or not) and
the same arguments only the first is checked. Triton's interpreter runs each program as Python: there a
sample is cut further, to ``INTERPRETER_ELEMENTS``. float16 is left to test_functional.py (it shares bf16's
one rounding to a 16-bit float); float64 runs the fallback on every backend, so it is checked once.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from test_functional import saved_output_floor
from test_softmax import grad_floor as softmax_grad_floor
from test_softmax import output_floor as softmax_output_floor
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import SampleInput

import fusedact
from fusedact import differences
from reference import assert_close, cancellation_floor

FALLBACK_ELEMENTS = 1 << 14
INTERPRETER_ELEMENTS = 512


class Call(NamedTuple):
    """One OpInfo sample as a fusedact call: ``fused(x, bias, *extras)`` against PyTorch's
    ``reference(z, *extras)`` in float64. ``function``/``params`` are fusedact's public name and keyword
    arguments (what ``fusedact.differences`` is keyed by); ``bias_dim`` is where the bias runs."""

    function: str
    params: dict
    fused: Callable
    reference: Callable
    bias_dim: int
    extras: tuple = ()


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def _keywords(sample, function: str, names: tuple) -> dict | str:
    """The sample's positional and keyword arguments by name, or the reason one is not supported."""
    given = dict(zip(names, sample.args, strict=False))
    given.update(sample.kwargs)
    for name, value in given.items():
        if name not in names or (name == "inplace" and value):
            return differences.unsupported(function, name) or f"{function}: no argument {name!r}"
    given.pop("inplace", None)
    return given


def _elementwise(function: str, names: tuple = (), convert: Callable = dict):
    """A mapper for an elementwise activation ``fusedact.<function>(x, bias, **params)``; ``names`` are
    PyTorch's argument names in order (``inplace`` among them), ``convert`` turns them into fusedact's."""

    def mapper(op, sample):
        given = _keywords(sample, function, (*names, "inplace"))
        if isinstance(given, str):
            return given
        params = convert({k: _scalar(v) if k != "approximate" else v for k, v in given.items()})
        args, kwargs = sample.args, sample.kwargs  # (not the sample: its input may be a million elements)
        return Call(
            function,
            params,
            lambda x, bias: getattr(fusedact, function)(x, bias, **params),
            lambda z: op.op(z, *args, **kwargs),
            -1,
        )

    return mapper


def _prelu(op, sample):
    weight = sample.args[0] if sample.args else sample.kwargs["weight"]
    dim = 1 if sample.input.dim() >= 2 else 0
    return Call("prelu", {}, lambda x, bias, w: fusedact.prelu(x, w, bias), op.op, dim, (weight,))


def _glu(op, sample):
    dim = sample.args[0] if sample.args else sample.kwargs.get("dim", -1)
    if dim % max(sample.input.dim(), 1) != sample.input.dim() - 1:
        return differences.unsupported("glu", "dim")
    return Call("glu", {}, lambda x, bias: fusedact.glu(x, bias), lambda z: op.op(z, dim), -1)


def _softmax(function: str):
    def mapper(op, sample):
        if "dtype" in sample.kwargs:
            return differences.unsupported(function, "dtype")
        dim = sample.args[0]
        bias_dim = dim % max(sample.input.dim(), 1)
        fused = getattr(fusedact, function)
        return Call(function, {"dim": dim}, lambda x, bias: fused(x, bias, dim=dim), lambda z: op.op(z, dim), bias_dim)

    return mapper


def _heaviside(op, sample):
    (values,) = sample.args
    if values.numel() != 1 or values.dim() > sample.input.dim():  # a tensor of values, or one that broadcasts x
        return differences.unsupported("heaviside", "values")
    value = _scalar(values)
    return Call(
        "heaviside",
        {"value": value},
        lambda x, bias: fusedact.heaviside(x, bias, value=value),
        lambda z: torch.heaviside(z, torch.tensor(value, dtype=z.dtype)),
        -1,
    )


def _gelu_params(given):
    return {"approximate": given.get("approximate", "none")}


# OpInfo (name, variant) -> mapper(op, sample) -> Call or the reason the sample is skipped.
MIRRORS = {
    ("nn.functional.relu", ""): _elementwise("relu"),
    ("nn.functional.leaky_relu", ""): _elementwise("leaky_relu", ("negative_slope",)),
    ("nn.functional.prelu", ""): _prelu,
    ("nn.functional.gelu", ""): _elementwise("gelu", ("approximate",), _gelu_params),
    ("nn.functional.silu", ""): _elementwise("silu"),
    ("nn.functional.mish", ""): _elementwise("mish"),
    ("nn.functional.elu", ""): _elementwise("elu", ("alpha",)),
    ("nn.functional.selu", ""): _elementwise("selu"),
    ("nn.functional.celu", ""): _elementwise("celu", ("alpha",)),
    ("sigmoid", ""): _elementwise("sigmoid"),
    ("tanh", ""): _elementwise("tanh"),
    ("nn.functional.glu", ""): _glu,
    ("softmax", ""): _softmax("softmax"),
    ("log_softmax", ""): _softmax("log_softmax"),
    ("heaviside", ""): _heaviside,
    ("nn.functional.relu6", ""): _elementwise("relu6"),
    ("nn.functional.hardtanh", ""): _elementwise("hardtanh", ("min_val", "max_val")),
    ("nn.functional.hardswish", ""): _elementwise("hardswish"),
    ("nn.functional.hardsigmoid", ""): _elementwise("hardsigmoid"),
    ("nn.functional.softplus", ""): _elementwise("softplus", ("beta", "threshold")),
}
OPINFOS = {(op.name, op.variant_test_name): op for op in op_db if (op.name, op.variant_test_name) in MIRRORS}

# Known failures of code this suite does not own, each strict: when fixed, the test says so. (None today:
# the ELU family's NaN gradient, once here, is listed in fusedact.differences, which the checks read.)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _is_finite(sample) -> bool:
    tensors = [sample.input, *[a for a in sample.args if isinstance(a, torch.Tensor)]]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.numel())


def _cut(t: torch.Tensor, limit: int, keep: int) -> torch.Tensor:
    """``t`` narrowed, leading dimensions first, towards ``limit`` elements (a view: same strides). The
    last dimension and ``keep`` (the bias's, PReLU's channels, softmax's rows) keep their length."""
    for dim in range(t.dim() - 1):
        if t.numel() <= limit:
            break
        if dim != keep % t.dim():
            rest = t.numel() // t.shape[dim]
            t = t.narrow(dim, 0, max(1, limit // max(rest, 1)))
    return t


def _compact(t, dtype: torch.dtype):
    """``t`` in ``dtype`` with its shape, strides (overlapping or stride-0 ones too) and a storage offset,
    in a storage of its own just large enough (a cut of a million-element sample does not keep the million
    alive); anything but a floating-point tensor as it is."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    if t.numel() == 0:
        return t.detach().to(dtype, copy=True)
    offset = min(t.storage_offset(), 3)
    extent = offset + 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    window = t.detach().as_strided((extent,), (1,), t.storage_offset() - offset)
    return window.to(dtype, copy=True).as_strided(t.shape, t.stride(), offset)


def _layout_class(x: torch.Tensor) -> tuple:
    """What a kernel launch distinguishes: rank, emptiness, density, stride 0, offset, the order of the
    strides and whether the last one is 1 (not the sizes)."""
    order = tuple(sorted(range(x.dim()), key=lambda d: x.stride(d)))
    return (x.dim(), x.numel() == 0, x.is_contiguous(), 0 in x.stride(), x.storage_offset() > 0, order,
            x.dim() > 0 and x.stride(-1) == 1)  # fmt: skip


class Prepared(NamedTuple):
    """One sample, mapped and cut: ``call`` (or the reason it is skipped), its input ``x``, and the key
    under which samples that test the same thing are checked once (the first of them)."""

    call: Call | str
    x: torch.Tensor
    noncontiguous: bool
    finite: bool
    description: str
    same_launch: tuple  # same layout class and arguments: checked once


def _arguments_key(sample) -> tuple:
    parts = [(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else repr(a) for a in sample.args]
    parts += [(k, (tuple(v.shape), v.stride()) if isinstance(v, torch.Tensor) else repr(v)) for k, v in
              sorted(sample.kwargs.items())]  # fmt: skip
    return tuple(parts)


@functools.cache
def _float32_samples(key) -> tuple[tuple[SampleInput, bool], ...]:
    """Every float32 sample and reference sample of ``key`` and their non-contiguous twins, cut to
    ``FALLBACK_ELEMENTS`` and compact: OpInfo's reference inputs take about a second per op to make, so
    they are made once, and cast (layout and all) to each dtype."""
    op, samples = OPINFOS[key], []
    for source in (op.sample_inputs, op.reference_inputs):
        for original in source("cpu", torch.float32, requires_grad=False):
            for noncontiguous in (False, True):
                sample = original.noncontiguous() if noncontiguous else original
                call = MIRRORS[key](op, sample)
                keep = call.bias_dim if isinstance(call, Call) else -1
                x = _cut(sample.input, FALLBACK_ELEMENTS, keep)
                samples.append((_in_dtype(sample, torch.float32, x), noncontiguous))
    return tuple(samples)


def _in_dtype(sample, dtype, x=None) -> SampleInput:
    """``sample`` (with input ``x`` if given) with every floating-point tensor in ``dtype``, layouts kept."""
    return SampleInput(
        _compact(sample.input if x is None else x, dtype),
        args=tuple(_compact(a, dtype) for a in sample.args),
        kwargs={k: _compact(v, dtype) for k, v in sample.kwargs.items()},
    )


@functools.cache
def _prepared(key, dtype) -> tuple[Prepared, ...]:
    op, prepared = OPINFOS[key], []
    for sample32, noncontiguous in _float32_samples(key):
        sample = _in_dtype(sample32, dtype)
        call = MIRRORS[key](op, sample)
        keep = call.bias_dim if isinstance(call, Call) else -1
        arguments = _arguments_key(sample)
        finite = _is_finite(sample)
        prepared.append(Prepared(
            call, sample.input, noncontiguous, finite, _describe(sample.input, sample, noncontiguous),
            (_layout_class(_cut(sample.input, INTERPRETER_ELEMENTS, keep)), finite, arguments),
        ))  # fmt: skip
    return tuple(prepared)


def _describe(x, sample, noncontiguous: bool) -> str:
    args = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in sample.args]
    kwargs = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()}
    kind = " noncontiguous twin" if noncontiguous else ""
    return f"x {tuple(x.shape)} strides {x.stride()} offset {x.storage_offset()}{kind} args {args} kwargs {kwargs}"


def _reduce_to(grad: torch.Tensor, dim: int) -> torch.Tensor:
    if grad.dim() <= 1:
        return grad.reshape(-1)
    return grad.sum(dim=[d for d in range(grad.dim()) if d != dim % grad.dim()])


def _check_sample(call: Call, x: torch.Tensor, noncontiguous: bool, dtype, device, generator, limit: int):
    # Fresh leaves: a sample's tensors may be shared with other samples (PReLU's weight is).
    x = _cut(x, limit, call.bias_dim).detach().to(device).requires_grad_()
    extras = [e.detach().to(device).requires_grad_() for e in call.extras]
    bias = None
    if x.dim() >= 1:
        width = x.shape[call.bias_dim]
        bias = torch.testing.make_tensor(
            (width,), dtype=dtype, device=device, low=-2, high=2, noncontiguous=noncontiguous
        ).requires_grad_()

    y = call.fused(x, bias, *extras)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
    y.backward(grad_y)

    # PyTorch in float64 on the exact z = x + bias, then what fusedact returns where it differs on purpose.
    z = x.detach().double().cpu()
    if bias is not None:
        shape = [1] * z.dim()
        shape[call.bias_dim] = -1
        z = z + bias.detach().double().cpu().view(shape)
    z.requires_grad_()
    extras64 = [e.detach().double().cpu().requires_grad_() for e in extras]
    g = grad_y.double().cpu()
    y_ref = call.reference(z, *extras64)
    grad_z_ref, extras_ref = None, []
    if call.function != "heaviside":  # torch.heaviside has no derivative (see fusedact.differences)
        grad_z_ref, *extras_ref = torch.autograd.grad(y_ref, [z, *extras64], g, allow_unused=True)
    y_ref = differences.expected_output(call.function, z.detach(), y_ref.detach(), **call.params)
    grad_z_ref = differences.expected_gradient(call.function, z.detach(), grad_z_ref, g, **call.params)

    z = z.detach()
    if call.function in ("softmax", "log_softmax"):
        dim, log = call.bias_dim, call.function == "log_softmax"
        present = z.dim() and z.numel()
        # (float64: test_softmax's fp32 derivation; reference.tolerance scales a floor by 1e-6 there, more
        # than fp64's 2^-29 of fp32's rounding)
        floor_dtype = torch.float32 if dtype == torch.float64 else dtype
        floor = softmax_output_floor(y_ref, z, dim, log) if present else 0.0
        grad_floor = softmax_grad_floor(y_ref, z, g, dim, log, floor_dtype) if present else 0.0
    elif call.function == "glu":  # a product of two fp32 factors: scaled by the largest of them
        scale = 1.0 + (z[torch.isfinite(z)].abs().max().item() ** 2 if z.isfinite().any() else 0.0)
        floor = grad_floor = 2e-6 * scale * max(1.0, g.abs().max().item() if g.numel() else 1.0)
    else:
        floor = cancellation_floor(z)
        grad_floor = cancellation_floor(z, g) + saved_output_floor(call.function, y_ref, dtype, g)
    assert_close(y, y_ref, floor, "output")
    assert_close(x.grad, grad_z_ref, grad_floor, "grad of x")
    if bias is not None:
        rows = z.numel() // max(bias.numel(), 1)
        summed_floor = torch.as_tensor(grad_floor, dtype=torch.float64).max().item() * rows if z.numel() else 0.0
        magnitude = _reduce_to(grad_z_ref.abs().nan_to_num(posinf=0.0), call.bias_dim)
        assert_close(bias.grad, _reduce_to(grad_z_ref, call.bias_dim), 2e-6 * magnitude + summed_floor, "grad of bias")
    for extra, expected in zip(extras, extras_ref, strict=True):
        magnitude = (z.abs() * g.abs()).nan_to_num(posinf=0.0).sum().item()  # d/dw prelu = z g: a sum of them
        assert_close(extra.grad, expected, 2e-6 * magnitude + 1e-30, "grad of weight")


@pytest.mark.parametrize("values", ["finite", "nonfinite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("key", list(MIRRORS), ids=[f"{name}{'.' + v if v else ''}" for name, v in MIRRORS])
def test_opinfo(key, dtype, values, device, request):
    on_interpreter = device == "cpu" and fusedact.get_cpu_backend() == "triton"
    if on_interpreter and dtype == torch.float64:
        pytest.skip("float64 runs the fallback on every backend")
    if (key[0], values) in KNOWN_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[key[0], values]))
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    limit = INTERPRETER_ELEMENTS if on_interpreter else FALLBACK_ELEMENTS
    checked, seen, skipped, failures = 0, set(), {}, []
    for prepared in _prepared(key, dtype):
        if prepared.finite != (values == "finite"):
            continue
        if isinstance(prepared.call, str):
            skipped[prepared.call] = skipped.get(prepared.call, 0) + 1
            continue
        if prepared.same_launch in seen:
            continue
        seen.add(prepared.same_launch)
        try:
            _check_sample(prepared.call, prepared.x, prepared.noncontiguous, dtype, device, generator, limit)
        except AssertionError as error:
            failures.append(f"{prepared.description}: {str(error).splitlines()[0]}")
        checked += 1
    assert not failures, f"{len(failures)} of {checked} samples fail:\n" + "\n".join(failures[:10])
    if not checked:
        pytest.skip("; ".join(skipped) or f"OpInfo {key[0]} has no {values} samples")


def test_every_mirrored_op_is_in_op_db():
    """Each mirror names an OpInfo that exists (a renamed OpInfo would silently test nothing)."""
    assert set(OPINFOS) == set(MIRRORS)
