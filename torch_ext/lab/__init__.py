"""The activation lab: look at, swap, train with and plot a model's activations.

- ``inspect_model(model)``: every activation of a model, layer by layer (``fusedact inspect MODEL``);
- ``swap(model, "relu", "leaky_relu", negative_slope=0.2)``: replace one kind with another (``fusedact swap``);
- ``run_experiment(ExperimentConfig(...))``: train one small network per activation and compare speed,
  accuracy, loss shape, dead and saturated units and the gradient reaching the first layer
  (``fusedact experiment``);
- ``plot_activations([...])``: each activation and its derivative as fusedact computes them (``fusedact plot``).

The command line is ``fusedact --help`` (or ``python -m fusedact --help``). Nothing here is imported by
``import fusedact``; matplotlib, scikit-learn and tqdm (the ``lab`` extra) load only when a command needs them.
"""

from .specs import ActivationSpec, LabError, parse_activation

__all__ = ["ActivationSpec", "LabError", "parse_activation"]
