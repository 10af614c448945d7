"""Where fusedact deliberately differs from PyTorch: the one list, each entry with its reason.

Everything not listed here matches PyTorch's ``torch.nn.functional`` op applied to ``x + bias``: values
and gradients of any order (``create_graph=True``), NaN propagation, signed zeros, empty tensors, meta
tensors (meta outputs), tensors made under ``torch.inference_mode``. The tests read this list
(``tests/test_opinfo.py`` holds fusedact to PyTorch's own OpInfo samples through ``expected_output`` and
``expected_gradient``; ``tests/test_differences.py`` checks every entry against PyTorch and that the
README's "Inputs and semantics" list says the same) instead of special-casing an input anywhere else.

Two kinds of entries:

- ``DIFFERENCES``: fusedact returns another result than PyTorch, on purpose. Where that result is a
  value, ``output_rule``/``gradient_rule`` say exactly which one, as a function of the float64 PyTorch
  reference, so a test can compute what fusedact must return.
- ``UNSUPPORTED``: an argument or a mode of PyTorch's op that fusedact does not take; it raises a clear
  error (or has no such parameter) instead of returning anything.

Example::

    >>> import torch, fusedact
    >>> z = torch.tensor([-float("inf"), 1.0], dtype=torch.float64)
    >>> torch.nn.functional.gelu(z)
    tensor([    nan, 0.8413], dtype=torch.float64)
    >>> fusedact.differences.expected_output("gelu", z, torch.nn.functional.gelu(z))
    tensor([-0.0000, 0.8413], dtype=torch.float64)
    >>> text = fusedact.differences.table()  # the whole list, as markdown
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "DIFFERENCES",
    "UNSUPPORTED",
    "Difference",
    "Unsupported",
    "expected_gradient",
    "expected_output",
    "table",
    "unsupported",
]


@dataclass(frozen=True)
class Difference:
    """One deliberate difference. ``functions`` are fusedact's public names (``fusedact.<name>``; for the
    gated ops the entry applies to the gate's activation). ``summary`` is the sentence the README says.

    ``output_rule(z, reference, params) -> Tensor`` and ``gradient_rule(z, reference, grad_y, params) ->
    Tensor`` (float64 tensors; ``reference`` is PyTorch's value or input gradient at ``z``, None where
    PyTorch gives none) return what fusedact gives instead, or are None where the difference is not a value.
    """

    name: str
    functions: tuple[str, ...]
    summary: str
    pytorch: str
    fusedact: str
    reason: str
    output_rule: Optional[Callable[[Tensor, Tensor, dict], Tensor]] = None
    gradient_rule: Optional[Callable[[Tensor, Optional[Tensor], Tensor, dict], Tensor]] = None


@dataclass(frozen=True)
class Unsupported:
    """An argument (or a mode) of PyTorch's op that fusedact does not take, and what happens instead."""

    functions: tuple[str, ...]
    argument: str
    behaviour: str
    reason: str


# --- the limits of the x * gate(x) activations --------------------------------------------------------
# gelu, silu, swish, quick_gelu, mish and hardswish are z * g(z) with a gate g that tends to 1 on one side
# and 0 on the other (swish with a negative beta swaps the sides). PyTorch evaluates that product
# literally, so -inf * 0 is NaN (and the tanh GELU's gradient 0 * inf, once z^2 overflows: past 1e19 in
# fp32, 1e154 in float64); the function has a limit there, and fusedact returns it.
_GATED_LIMIT_FUNCTIONS = ("gelu", "silu", "swish", "quick_gelu", "mish", "hardswish", "swiglu", "geglu")


def _gate_limit(z: Tensor, params: dict) -> Tensor:
    """1.0 where the gate tends to 1 (the side where f(z) ~ z), else 0.0."""
    beta = params.get("beta", 1.0)
    if beta == 0:  # swish(beta=0) = z / 2: no NaN to replace (the rules are never asked there)
        return torch.full_like(z, 0.5)
    return ((z > 0) == (beta > 0)).to(z.dtype)


def _limit_output(z: Tensor, reference: Tensor, params: dict) -> Tensor:
    limit = torch.where(_gate_limit(z, params) == 1, z, torch.copysign(torch.zeros_like(z), z))
    return torch.where(torch.isnan(reference) & ~torch.isnan(z), limit, reference)


def _limit_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    limit = grad_y * _gate_limit(z, params)
    return torch.where(torch.isnan(reference) & ~torch.isnan(z) & ~torch.isnan(grad_y), limit, reference)


def _celu_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    if z.dtype != torch.float64:  # within every lower precision's tolerance: PyTorch's value stands
        return reference
    alpha = params.get("alpha", 1.0)
    exact = torch.where(z > 0, grad_y, grad_y * torch.exp(z / alpha))
    return torch.where(torch.isnan(z), reference, exact)  # (the gradient at NaN is another matter)


def _hardsigmoid_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    if z.dtype != torch.float64:  # within every lower precision's tolerance: PyTorch's value stands
        return reference
    exact = torch.where((z > -3) & (z < 3), grad_y / 6, torch.zeros_like(grad_y))
    return torch.where(torch.isnan(z), reference, exact)


def _step_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    return grad_y.clone() if params.get("straight_through", False) else torch.zeros_like(grad_y)


def _xielu_limit(z: Tensor, reference: Tensor, params: dict) -> Tensor:
    """At -inf, alpha_n (expm1(z) - z) + beta z tends to (beta - alpha_n) z - alpha_n: +inf for alpha_n > beta
    (always, for transformers' alpha_n = beta + softplus(raw)), -inf below, -alpha_n at equality."""
    alpha_n = torch.as_tensor(params.get("alpha_n", 0.8), dtype=z.dtype).reshape(-1)
    beta = params.get("beta", 0.5)
    limit = torch.where(alpha_n > beta, torch.inf, torch.where(alpha_n < beta, -torch.inf, -alpha_n))
    return torch.where((z == -torch.inf) & torch.isnan(reference), limit.to(z.device), reference)


def _xielu_limit_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    """At -inf the derivative tends to beta - alpha_n; transformers' formula gives NaN there (its z > 0
    branch's gradient, 0 * z * z, is 0 * inf)."""
    alpha_n = torch.as_tensor(params.get("alpha_n", 0.8), dtype=z.dtype).reshape(-1).to(z.device)
    limit = grad_y * (params.get("beta", 0.5) - alpha_n)
    return torch.where((z == -torch.inf) & torch.isnan(reference) & ~torch.isnan(grad_y), limit, reference)


def _nan_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    return torch.where(torch.isnan(z), torch.nan, reference)


def _nan_passes_gradient(z: Tensor, reference: Optional[Tensor], grad_y: Tensor, params: dict) -> Tensor:
    return torch.where(torch.isnan(z), grad_y, reference)


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        name="limits",
        functions=_GATED_LIMIT_FUNCTIONS,
        summary="where PyTorch's formula turns an infinite or huge input into NaN (`gelu(-inf)`, `silu(-inf)`, "
        "the tanh-GELU gradient at `1e20`) fusedact returns the mathematical limit instead",
        pytorch="NaN: the product z * gate(z) evaluated as -inf * 0 (or the gradient's 0 * inf)",
        fusedact="the limit: f(+inf) = +inf, f(-inf) = -0.0, f'(+inf) = 1, f'(-inf) = 0 (sides swapped for "
        "swish with a negative beta)",
        reason="the function has a limit there; a NaN would poison a whole row (a softmax, a norm, a loss) "
        "for an input the function is defined on",
        output_rule=_limit_output,
        gradient_rule=_limit_gradient,
    ),
    Difference(
        name="xielu_limit",
        functions=("xielu",),
        summary="`xielu(-inf)` is its limit, +inf, where transformers' formula gives `inf - inf = NaN`",
        pytorch="NaN: alpha_n (expm1(-inf) - (-inf)) + beta (-inf) = inf - inf",
        fusedact="the limit of (beta - alpha_n) z - alpha_n: +inf (alpha_n > beta, as transformers' "
        "beta + softplus(raw) always is); its gradient there is the derivative's limit, grad * (beta - alpha_n), "
        "where the formula's gradient is NaN too (0 * inf in the branch not taken); likewise the "
        "coefficients' gradients from an infinite input on the side they do not act on are 0 (alpha_p's "
        "at -inf, alpha_n's at +inf), where the formula's are NaN",
        reason="the function has a limit there; a NaN would poison a whole row for an input it is defined on",
        output_rule=_xielu_limit,
        gradient_rule=_xielu_limit_gradient,
    ),
    Difference(
        name="elu_nan_gradient",
        functions=("elu", "selu", "celu"),
        summary="the ELU family's gradient at a NaN input is NaN, where PyTorch's is NaN or `grad * scale` by its path",
        pytorch="elu_backward gives NaN on its vectorized CPU path and grad * scale on its element-by-element "
        "CPU path (short tensors, tails) and on CUDA",
        fusedact="NaN on every backend and size: NaN in, NaN out",
        reason="a result that changes with a tensor's length cannot be matched; NaN in, NaN out is the rule "
        "everywhere else",
        gradient_rule=_nan_gradient,
    ),
    Difference(
        name="hard_nan_gradient",
        functions=("hardtanh", "relu6", "hardswish"),
        summary="hardtanh's, relu6's and hardswish's gradient at a NaN input is the incoming gradient (as "
        "PyTorch's CUDA kernels'), where PyTorch's vectorized CPU kernels give 0 (hardtanh) or NaN (hardswish)",
        pytorch="hardtanh_backward gives 0 vectorized and grad element by element (CPU) and on CUDA; "
        "hardswish_backward NaN vectorized and grad element by element and on CUDA",
        fusedact="the incoming gradient on every backend and size (as relu's, whose PyTorch paths all agree)",
        reason="a result that changes with a tensor's length cannot be matched; this is the one PyTorch's "
        "CUDA kernels and scalar paths give",
        gradient_rule=_nan_passes_gradient,
    ),
    Difference(
        name="step_gradient",
        functions=("heaviside",),
        summary="`heaviside` has gradient 0 (`straight_through=True`: the incoming gradient), where "
        "`torch.heaviside` has no derivative",
        pytorch="backward raises (the derivative for aten::heaviside is not implemented)",
        fusedact="0 everywhere, the step's derivative wherever it exists; straight_through=True passes the "
        "incoming gradient unchanged (the straight-through estimator)",
        reason="an error would stop every other parameter of a network that contains a step from training; "
        "the estimator is an explicit option, never the default",
        gradient_rule=_step_gradient,
    ),
    Difference(
        name="celu_gradient_float64",
        functions=("celu",),
        summary="`celu`'s float64 gradient uses `1 / alpha` in float64 (PyTorch's rounds it to float32 first)",
        pytorch="exp(z * float32(1 / alpha)): relative error up to ~6e-8 of the float64 gradient",
        fusedact="exp(z / alpha) in float64: the float64 value",
        reason="float64 is asked for to be exact; the lower precisions are unaffected (below their rounding)",
        gradient_rule=_celu_gradient,
    ),
    Difference(
        name="hardsigmoid_gradient_float64",
        functions=("hardsigmoid",),
        summary="`hardsigmoid`'s float64 gradient is `grad / 6` in float64 (PyTorch's multiplies by 1/6 "
        "rounded to float32)",
        pytorch="hardsigmoid_backward multiplies by float32(1/6) = 0.16666667163 in float64 too: relative error 3e-8",
        fusedact="grad * (1/6) in float64: the float64 value",
        reason="float64 is asked for to be exact; the lower precisions are unaffected (below their rounding)",
        gradient_rule=_hardsigmoid_gradient,
    ),
    Difference(
        name="one_rounding",
        functions=("*",),
        summary="in float16/bfloat16 a result may differ from eager PyTorch's by one ULP: fusedact rounds "
        "once, eager rounds `x + b` first",
        pytorch="rounds x + bias to the dtype, then the activation's result again (two roundings)",
        fusedact="computes x + bias and the activation in fp32 and rounds once: within 1 ULP of the float64 value",
        reason="the fused result is the closer one; tests compare with float64, never with eager in low precision",
    ),
    Difference(
        name="output_layout",
        functions=("*",),
        summary="outputs are contiguous (an input whose channel dimension is innermost in memory, as "
        "channels-last with a channel bias, keeps it innermost), where PyTorch's elementwise ops keep a permuted "
        "input's strides",
        pytorch="F.relu(x.t()) is laid out like x.t() (an elementwise op keeps a dense permuted layout)",
        fusedact="a contiguous result (a channels-last input with a channel bias gives a channels-last one, "
        "and x.t() with a bias on dim 0 a result laid out like x.t())",
        reason="the kernels write one dense layout; values are the same and the next op reads any strides",
    ),
    Difference(
        name="inplace",
        functions=("nn.*",),
        summary="`inplace=True` on the `nn` modules is accepted for compatibility; the result is always a new tensor",
        pytorch="nn.ReLU(inplace=True) overwrites its input",
        fusedact="a new tensor; the input is left as it was",
        reason="the fused kernel reads x and writes y in one pass, and GELU-like backwards keep x: overwriting "
        "it would destroy what the backward reads",
    ),
)


UNSUPPORTED: tuple[Unsupported, ...] = (
    Unsupported(
        ("relu", "leaky_relu", "elu", "selu", "celu", "silu", "mish"),
        "inplace",
        "the functions have no inplace parameter (the nn modules accept and ignore it, see 'inplace')",
        "a fused activation writes a new tensor",
    ),
    Unsupported(
        ("softmax", "log_softmax"),
        "dtype",
        "no dtype parameter: cast x first (under CUDA autocast the result is float32, as PyTorch's)",
        "the kernel computes in fp32 and rounds to x's dtype once",
    ),
    Unsupported(
        ("glu",),
        "dim",
        "only the last dimension (dim=-1 or its index) is split; another raises ValueError",
        "the packed kernel reads the two halves of each row in place",
    ),
    Unsupported(
        ("heaviside",),
        "values",
        "one float `value` for z == 0, not a tensor of them",
        "the value is a kernel constant",
    ),
    Unsupported(
        ("*",),
        "type promotion",
        "a bias (or PReLU weight) of another dtype or device than x raises TypeError/ValueError",
        "a silent upcast would change the output dtype and double the bytes read",
    ),
    Unsupported(
        ("*",),
        "torch.func",
        "torch.func.grad/vmap/jvp and torch.autograd.forward_ad raise PyTorch's error; torch.autograd "
        "(create_graph=True included) works",
        "the ops define reverse-mode formulas only",
    ),
)


def _applies(difference: Difference, function: str) -> bool:
    return function in difference.functions or "*" in difference.functions


def expected_output(function: str, z: Tensor, reference: Tensor, **params) -> Tensor:
    """What fusedact's ``function`` returns at ``z`` (float64), given PyTorch's float64 ``reference`` there.

    ``params`` are the function's keyword arguments (``beta`` for swish). Example:
    ``expected_output("silu", z, torch.nn.functional.silu(z))``."""
    for difference in DIFFERENCES:
        if difference.output_rule is not None and _applies(difference, function):
            reference = difference.output_rule(z, reference, params)
    return reference


def expected_gradient(
    function: str, z: Tensor, reference: Optional[Tensor], grad_y: Tensor, **params
) -> Optional[Tensor]:
    """fusedact's gradient with respect to ``z`` for the upstream ``grad_y``, given PyTorch's float64
    ``reference`` gradient (None where PyTorch has no derivative, as for ``heaviside``)."""
    for difference in DIFFERENCES:
        if difference.gradient_rule is not None and _applies(difference, function):
            reference = difference.gradient_rule(z, reference, grad_y, params)
    return reference


def unsupported(function: str, argument: str) -> Optional[str]:
    """Why fusedact's ``function`` does not take PyTorch's ``argument``, or None if it does."""
    for entry in UNSUPPORTED:
        if entry.argument == argument and (function in entry.functions or "*" in entry.functions):
            return f"{function}: {entry.argument}: {entry.behaviour} ({entry.reason})"
    return None


def table() -> str:
    """The list as a markdown table (differences first, then what is not supported)."""
    lines = ["| difference | functions | PyTorch | fusedact | why |", "|---|---|---|---|---|"]
    for d in DIFFERENCES:
        lines.append(f"| {d.name} | {', '.join(d.functions)} | {d.pytorch} | {d.fusedact} | {d.reason} |")
    lines += ["", "| not supported | functions | instead | why |", "|---|---|---|---|"]
    for u in UNSUPPORTED:
        lines.append(f"| {u.argument} | {', '.join(u.functions)} | {u.behaviour} | {u.reason} |")
    return "\n".join(lines)
