"""The activation lab: look at, swap, train with and plot a model's activations.

- ``inspect_model(model)``: every activation of a model, layer by layer, as a dict (``format_inspection`` makes
  the table ``fusedact inspect MODEL`` prints);
- ``swap(model, "relu", "leaky_relu", negative_slope=0.2)``: replace one kind with another; ``swap_model`` adds
  the counts before and after and an optional ``fusedact.patch`` (``fusedact swap``);
- ``run_experiment(ExperimentConfig(...))``: train one small network per activation and compare speed,
  accuracy, loss shape, dead and saturated units and the gradient reaching the first layer
  (``fusedact experiment``);
- ``plot_activations([...])``: each activation and its derivative as fusedact computes them (``fusedact plot``).

The command line is ``fusedact --help`` (or ``python -m fusedact --help``). Nothing here is imported by
``import fusedact``; matplotlib and scikit-learn (the ``lab`` extra) load only when a command needs them.
"""

from .inspection import format_inspection, inspect_model
from .specs import ActivationSpec, LabError, parse_activation
from .swap import format_swap, swap, swap_model

__all__ = [
    "ActivationSpec",
    "LabError",
    "format_inspection",
    "format_swap",
    "inspect_model",
    "parse_activation",
    "swap",
    "swap_model",
]
