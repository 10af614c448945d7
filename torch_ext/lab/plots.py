"""``fusedact plot``: each activation and its derivative, as fusedact computes them.

The curve is fusedact's forward and the derivative is fusedact's backward (autograd through
``fusedact.bias_act``: for an elementwise f, the gradient of ``sum(f(x))`` is ``f'(x)``), so the picture also
checks the library: on a GPU it draws what the Triton kernels compute. Each plot marks f(1) and f'(1) and
shades where ``|f'(x)| < flat_below`` (default 0.01): the flat zone, where a unit's gradient has all but
vanished (sigmoid beyond |x| ~ 4.6, tanh beyond ~ 3, ReLU for x < 0, the step everywhere).

    >>> rows = plot_activations(["gelu", "sigmoid"], "plots/")
    >>> round(rows[0]["f(1)"], 4)
    0.8413
"""

import os
from typing import Optional

import torch

from .specs import ActivationSpec, LabError, parse_activation, resolve_device


def default_activations() -> list[ActivationSpec]:
    """Every elementwise activation of ``fusedact.functional.ACTIVATIONS``, plus the tanh GELU (not swish:
    at its default beta = 1 it is silu)."""
    from .. import functional

    specs = []
    for name in functional.ACTIVATIONS:
        if name == "swish":
            continue
        spec = parse_activation(name)
        if is_elementwise(spec):
            specs.append(spec)
            if name == "gelu":
                specs.append(parse_activation("gelu:approximate=tanh"))
    return specs


def is_elementwise(spec: ActivationSpec) -> bool:
    """Whether ``spec`` maps each element on its own: the same values on a row and on a column of a tensor
    (the gated ones halve their input and softmax-like ones mix a row, so neither has a 1-D curve)."""
    x = torch.linspace(-2.0, 2.0, 6, dtype=torch.float64)
    try:
        row, column = spec(x.reshape(1, -1)), spec(x.reshape(-1, 1))
    except (TypeError, ValueError):
        return False
    return row.shape == (1, 6) and torch.allclose(row.reshape(-1), column.reshape(-1))


def evaluate(spec: ActivationSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), f'(x)) from fusedact's forward and backward on ``x`` (any float dtype and device)."""
    x = x.detach().clone().requires_grad_(True)
    y = spec(x)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return y.detach(), grad.detach()


def flat_regions(
    x: torch.Tensor, derivative: torch.Tensor, flat_below: float, min_width: float = 0.25
) -> list[tuple[float, float]]:
    """The intervals of ``x`` (sorted) where ``|derivative| < flat_below``, as (start, end) pairs.

    Intervals narrower than ``min_width`` are left out: there the derivative only crosses zero (GELU's and
    SiLU's minimum), which is a turning point, not a zone where gradients vanish.
    """
    flat = (derivative.abs() < flat_below).tolist()
    values = x.tolist()
    regions, start = [], None
    for index, is_flat in enumerate(flat):
        if is_flat and start is None:
            start = values[index]
        if start is not None and (not is_flat or index == len(flat) - 1):
            end = values[index if is_flat else index - 1]
            if end - start >= min_width:
                regions.append((start, end))
            start = None
    return regions


def _file_name(spec: ActivationSpec) -> str:
    label = spec.label.replace("(", "_").replace(")", "").replace(", ", "_").replace("=", "")
    return "".join(character if character.isalnum() or character in "._-" else "_" for character in label) + ".png"


def _draw(axis, spec: ActivationSpec, x, y, derivative, row: dict, flat_below: float, small: bool = False) -> None:
    """f (solid) and f' (dashed) with the flat zone shaded and the points at x = 1 marked.

    The values at 1 are written in the legend (a small plot: its title), outside the axes, so no label can
    cover a curve whatever its shape.
    """
    x, y, derivative = x.cpu().double().numpy(), y.cpu().double().numpy(), derivative.cpu().double().numpy()
    value, slope = row["f(1)"], row["f'(1)"]
    axis.axhline(0.0, color="0.8", linewidth=0.8)
    axis.axvline(0.0, color="0.8", linewidth=0.8)
    axis.axvline(1.0, color="0.6", linewidth=0.6, linestyle=":")
    for index, (start, end) in enumerate(row["flat_regions"]):
        label = f"flat: |f'(x)| < {flat_below:g}" if index == 0 else None
        axis.axvspan(start, end, color="tab:red", alpha=0.12, linewidth=0, label=label)
    axis.plot(x, y, color="tab:blue", label=f"f(x); f(1) = {value:.4g}")
    axis.plot(x, derivative, color="tab:orange", linestyle="--", label=f"f'(x); f'(1) = {slope:.4g}")
    axis.plot([1.0], [value], "o", color="tab:blue", markersize=4 if not small else 3)
    axis.plot([1.0], [slope], "o", color="tab:orange", markersize=4 if not small else 3)
    low = min(y.min(), derivative.min(), -0.5)
    high = max(min(y.max(), x.max()), derivative.max(), 1.5)
    axis.set_ylim(low - 0.1 * (high - low), high + 0.1 * (high - low))
    if small:
        axis.set_title(f"{spec.label}\nf(1) = {value:.4g}, f'(1) = {slope:.4g}", fontsize=7)
        return
    axis.set_title(spec.label, fontsize=10, pad=30)
    axis.set_xlabel("x")
    axis.set_ylabel("f(x) and f'(x)")
    handles, labels = axis.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda index: labels[index].startswith("flat"))  # the curves first
    # Above the axes, in one row: never over a curve.
    axis.legend(
        [handles[index] for index in order],
        [labels[index] for index in order],
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0),
        ncol=3,
        fontsize=8,
        frameon=False,
        borderaxespad=0.3,
    )


def activation_figure(spec: ActivationSpec, x, y, derivative, row: dict, flat_below: float):
    """The figure of one activation's PNG (a matplotlib ``Figure``; the caller saves and closes it)."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    _draw(axis, spec, x, y, derivative, row, flat_below)
    figure.tight_layout()
    return figure


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise LabError("plots need matplotlib: pip install 'fusedact[lab]'") from None
    matplotlib.use("Agg")
    return matplotlib


def plot_activations(
    activations=None,
    out_dir: Optional[str] = "plots",
    x_range: float = 6.0,
    points: int = 1201,
    flat_below: float = 0.01,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """One PNG per activation (f and f' on [-x_range, x_range]) and ``overview.png`` (a grid of all of them).

    ``activations``: specs or strings (``"gelu:approximate=tanh"``); default every elementwise activation.
    ``device``: default CUDA when present (the Triton kernels), else CPU. ``out_dir=None`` draws nothing and
    only returns the numbers. Returns one row per activation: ``f(1)``, ``f'(1)``, ``flat_regions`` (the
    intervals where ``|f'| < flat_below``), ``flat_fraction`` (of the plotted range) and ``file``.
    """
    if activations is None:
        specs = default_activations()
    else:
        specs = [spec if isinstance(spec, ActivationSpec) else parse_activation(spec) for spec in activations]
    for spec in specs:
        if not is_elementwise(spec):
            raise LabError(f"{spec.label} is not elementwise (gated or softmax-like): it has no 1-D curve to plot")
    if x_range <= 0 or points < 2:
        raise LabError("x_range must be positive and points at least 2")
    device = resolve_device(device)
    x = torch.linspace(-x_range, x_range, points, dtype=dtype, device=device)
    one = torch.ones(1, dtype=dtype, device=device)

    rows, curves = [], []
    for spec in specs:
        y, derivative = evaluate(spec, x)
        y_one, derivative_one = evaluate(spec, one)
        regions = flat_regions(x, derivative, flat_below)
        row = {
            "activation": spec.label,
            "f(1)": y_one.item(),
            "f'(1)": derivative_one.item(),
            "flat_regions": regions,
            "flat_fraction": sum(end - start for start, end in regions) / (2 * x_range),
            "file": None,
        }
        rows.append(row)
        curves.append((spec, y, derivative, row))
    if out_dir is None:
        return rows

    _matplotlib()
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    for spec, y, derivative, row in curves:
        figure = activation_figure(spec, x, y, derivative, row, flat_below)
        row["file"] = os.path.join(out_dir, _file_name(spec))
        figure.savefig(row["file"], dpi=110)
        plt.close(figure)

    columns = min(4, len(curves))
    grid_rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.8 * grid_rows), squeeze=False)
    for axis in axes.flat[len(curves) :]:
        axis.set_visible(False)
    for axis, (spec, y, derivative, row) in zip(axes.flat, curves, strict=False):
        _draw(axis, spec, x, y, derivative, row, flat_below, small=True)
    for axis in axes[:, 0]:
        axis.set_ylabel("f(x), f'(x)", fontsize=8)
    figure.suptitle(f"fusedact activations (blue) and derivatives (orange); shaded: |f'(x)| < {flat_below:g}")
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, "overview.png"), dpi=100)
    plt.close(figure)
    return rows


def format_table(rows: list[dict]) -> str:
    """The numbers behind the plots, one line per activation."""
    lines = [f"{'activation':<28} {'f(1)':>10} " + "f'(1)".rjust(10) + "  flat: |f'(x)| below the threshold on"]
    for row in rows:
        value, slope = row["f(1)"], row["f'(1)"]
        regions = ", ".join(f"[{start:.2f}, {end:.2f}]" for start, end in row["flat_regions"]) or "-"
        lines.append(f"{row['activation']:<28} {value:>10.6f} {slope:>10.6f}  {regions}")
    return "\n".join(lines)
