"""``fusedact experiment``: the same small network trained once per activation, and what that changes.

Every run uses the same data, the same split, the same initial weights (the seed is reset before each
model is built, and every activation but the gated ones gives the same parameter shapes) and the same
batch order; only the activation differs. Each hidden layer is a ``Linear`` (or ``Conv2d``) without bias
followed by ``fusedact.nn.BiasAct``, which owns the bias and adds it inside the activation's kernel, so
forward and backward of every activation are fusedact's. The bias starts as ``torch.nn.Linear`` would start
it (uniform in +-1/sqrt(fan_in)), or at the constant ``bias_init``.

Measures (per activation):

- ``seconds_per_epoch``: median wall time of a training epoch (the median skips the first epoch's warm-up
  and Triton compilation on a GPU);
- ``val_accuracy``: on the held-out quarter of the data, after the fixed number of epochs;
- ``spikiness``: mean |loss[t+1] - loss[t]| / mean loss over the training steps (``loss_spikiness``):
  0 for a flat curve, small for a smooth descent, large for a curve that jumps from step to step;
- per hidden layer, over the validation set after training, with z the pre-activation (input + bias):
  ``dead``: the fraction of units (features; channels for a conv layer) of a ReLU-family activation whose z
  is never positive, so they output 0 and get no gradient for any input: they cannot learn again;
  ``saturated``: for sigmoid/tanh (and GLU's sigmoid gate), the fraction of pre-activations with
  |z| > 4, where the derivative is below 0.018 (sigmoid) or 0.0014 (tanh);
  ``grad_norm``: the L2 norm of the loss's gradient with respect to the layer's weight, averaged over the
  training steps; ``first_layer_grad_norm`` is layer 0's (vanishing gradients: a deep sigmoid stack
  multiplies derivatives of at most 1/4, so little reaches the first layer).

While it trains it says so on stderr (``Progress``): what it trains, an estimate of the whole time after
the first epochs, and a line per finished run; on a terminal also a line per epoch, rewritten in place.
The defaults (8 activations x 100 epochs) take 1.5-3 minutes on a 2-core CPU (0.1-0.25 s per epoch, the
upper end on a machine busy with other work); ``QUICK`` (``fusedact experiment --quick``) is the same network
and data with 4 activations for 10 epochs, 10-15 s.

Example::

    result = run_experiment(ExperimentConfig(activations=["relu", "sigmoid"], depth=8, epochs=5), "out/")
    print(format_table(result))  # the table `fusedact experiment` prints
"""

import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, TextIO

import torch
from torch import Tensor, nn

from .. import nn as fused_nn
from .specs import ActivationSpec, LabError, parse_activations, resolve_device

DEAD_FAMILY = frozenset({"relu", "relu_squared", "reglu"})  # derivative exactly 0 wherever z <= 0
SATURATING_FAMILY = frozenset({"sigmoid", "tanh", "glu"})  # bounded, derivative vanishing for large |z|
DATASETS = ("spirals", "digits")
MODELS = ("mlp", "cnn")


@dataclass
class ExperimentConfig:
    """What to train; the defaults take 1.5-3 minutes on a 2-core CPU, ``quick()`` 10-15 s."""

    activations: list = field(
        default_factory=lambda: ["relu", "leaky_relu", "elu", "gelu", "silu", "mish", "tanh", "sigmoid"]
    )
    dataset: str = "spirals"  # "spirals" (generated) or "digits" (scikit-learn's bundled 8x8 digits)
    model: str = "mlp"  # "mlp", or "cnn" (digits only)
    depth: int = 6  # hidden layers of the MLP
    width: int = 128  # units per hidden layer of the MLP
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9)
    samples: int = 3000  # spirals: points in all (half per spiral); digits: all 1797 are used
    noise: float = 0.04  # spirals: standard deviation of the Gaussian noise on each point
    seed: int = 0
    bias_init: Optional[float] = None  # None: as torch.nn.Linear; a number: every hidden bias starts there
    saturation_threshold: float = 4.0
    device: Optional[str] = None  # None: CUDA when present, else CPU
    # CPU threads while training; None: torch's setting. One is fastest for networks this small, and on a
    # busy machine two threads wait on each other at every op (measured: 1.5 s per epoch instead of 0.18).
    threads: Optional[int] = 1
    progress: Optional[bool] = None  # None: a line per run (and per epoch on a terminal); True: per epoch; False: none

    @classmethod
    def quick(cls, **settings) -> "ExperimentConfig":
        """``QUICK``'s activations and epochs (``fusedact experiment --quick``), ``settings`` over them."""
        return cls(**{**QUICK, **settings})


# The quick look: the story of the full run (ReLU and GELU learn the spirals, tanh lags, the deep sigmoid
# stack stays at chance, its first layer starved of gradient) in a twentieth of the steps.
QUICK = {"activations": ["relu", "gelu", "tanh", "sigmoid"], "epochs": 10}


# ---------------------------------------------------------------------------------------------------
# Data


def spirals(samples: int, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Two interleaved spirals of ``samples // 2`` points each, 2.5 turns, in [-1, 1]^2 plus noise.

    No linear model separates them: each spiral winds around the other, so a classifier needs a
    nonlinear boundary that follows the arms.
    """
    generator = torch.Generator().manual_seed(seed)
    per_class = samples // 2
    turns = 2.5
    # sqrt spreads points evenly along the arm (its length grows with the radius).
    t = torch.rand(2, per_class, generator=generator).sqrt() * turns * 2 * math.pi
    phase = torch.tensor([[0.0], [math.pi]])
    radius = t / (turns * 2 * math.pi)
    points = torch.stack([radius * torch.cos(t + phase), radius * torch.sin(t + phase)], dim=-1)
    points = points + noise * torch.randn(points.shape, generator=generator)
    labels = torch.arange(2).repeat_interleave(per_class)
    return points.reshape(-1, 2).float(), labels


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits: 1797 images of 8x8 pixels in [0, 1], 10 classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LabError("the digits dataset needs scikit-learn: pip install 'fusedact[lab]'") from None
    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(data.target)


def load_dataset(config: ExperimentConfig) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """(train x, train y, validation x, validation y, classes): a seeded shuffle, three quarters for training."""
    if config.dataset == "spirals":
        if config.samples < 8:
            raise LabError("spirals needs at least 8 samples")
        x, y = spirals(config.samples, config.noise, config.seed)
    elif config.dataset == "digits":
        x, y = digits()
    else:
        raise LabError(f"unknown dataset {config.dataset!r}; choose from: {', '.join(DATASETS)}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
    x, y = x[order], y[order]
    cut = (3 * len(y)) // 4
    return x[:cut], y[:cut], x[cut:], y[cut:], int(y.max()) + 1


# ---------------------------------------------------------------------------------------------------
# Models: hidden layers are (weight layer without bias, BiasAct); the head is a plain Linear.


class Block(nn.Module):
    """``activation(weight_layer(x) + bias)``, the bias fused into fusedact's activation kernel."""

    def __init__(self, weight_layer: nn.Module, features: int, spec: ActivationSpec, channel_dim: int) -> None:
        super().__init__()
        self.layer = weight_layer
        self.act = fused_nn.BiasAct(features, spec.name, dim=channel_dim, **spec.params)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.layer(x))


class LabNet(nn.Module):
    """Hidden ``blocks`` then a linear ``head``; ``flatten_at`` is the block index before which x is flattened."""

    def __init__(self, blocks: list, head: nn.Module, flatten_at: int, pool_after: tuple = ()) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.flatten_at = flatten_at
        self.pool_after = pool_after

    def forward(self, x: Tensor) -> Tensor:
        for index, block in enumerate(self.blocks):
            if index == self.flatten_at:
                x = x.flatten(1)
            x = block(x)
            if index in self.pool_after:
                x = nn.functional.max_pool2d(x, 2)
        if self.flatten_at >= len(self.blocks):
            x = x.flatten(1)
        return self.head(x)


def _fan_in_bias(block: Block) -> None:
    """Start the block's bias as the bias of ``torch.nn.Linear``/``Conv2d`` with the same weight would start."""
    fan_in = block.layer.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        block.act.bias.uniform_(-bound, bound)


def build_model(
    config: ExperimentConfig, spec: ActivationSpec, in_features: int, classes: int, in_shape: tuple
) -> LabNet:
    """The MLP (``depth`` hidden layers of ``width``) or the small CNN (two 3x3 conv layers with 2x2 max
    pooling, then one hidden linear layer), every hidden layer ending in fusedact's ``spec``."""
    widen = 2 if spec.gated else 1  # a gated activation halves its packed [gate | up] input
    if config.model == "mlp":
        if config.depth < 1 or config.width < 1:
            raise LabError("the MLP needs depth >= 1 and width >= 1")
        blocks, features = [], in_features
        for _ in range(config.depth):
            blocks.append(Block(nn.Linear(features, widen * config.width, bias=False), widen * config.width, spec, -1))
            features = config.width
        model = LabNet(blocks, nn.Linear(features, classes), flatten_at=0)
    elif config.model == "cnn":
        if len(in_shape) != 3:
            raise LabError("the CNN takes images: use --dataset digits")
        if spec.gated:
            raise LabError(f"{spec.label} is gated (it halves the last dimension): the CNN needs a channel activation")
        channels, height, width = in_shape
        blocks = [
            Block(nn.Conv2d(channels, 16, 3, padding=1, bias=False), 16, spec, 1),
            Block(nn.Conv2d(16, 32, 3, padding=1, bias=False), 32, spec, 1),
            Block(nn.Linear(32 * (height // 4) * (width // 4), 64, bias=False), 64, spec, -1),
        ]
        model = LabNet(blocks, nn.Linear(64, classes), flatten_at=2, pool_after=(0, 1))
    else:
        raise LabError(f"unknown model {config.model!r}; choose from: {', '.join(MODELS)}")
    for block in model.blocks:
        if config.bias_init is None:
            _fan_in_bias(block)
        else:
            nn.init.constant_(block.act.bias, config.bias_init)
    return model


# ---------------------------------------------------------------------------------------------------
# Measures


def loss_spikiness(losses) -> float:
    """mean |loss[t+1] - loss[t]| / mean loss: how much the curve moves per step, relative to its level.

    >>> loss_spikiness([1.0, 2.0, 1.0, 2.0])  # steps of 1 around a mean of 1.5
    0.6666666666666666
    """
    losses = [float(loss) for loss in losses]
    if len(losses) < 2:
        return 0.0
    mean = sum(losses) / len(losses)
    steps = sum(abs(later - earlier) for earlier, later in itertools.pairwise(losses)) / (len(losses) - 1)
    return steps / mean if mean else 0.0


def _pre_activation(block: Block, x: Tensor) -> Tensor:
    """z = x + bias of the block's activation (the gate half for a gated activation), channels last."""
    act = block.act
    z = x + (act.bias.view(-1, *([1] * (x.dim() - 2))) if act.dim == 1 and x.dim() > 2 else act.bias)
    if act.dim == 1 and z.dim() > 2:
        z = z.movedim(1, -1)
    if act.activation in ("swiglu", "geglu", "reglu"):
        z = z[..., : z.shape[-1] // 2]
    elif act.activation == "glu":
        z = z[..., z.shape[-1] // 2 :]
    return z.reshape(-1, z.shape[-1])


@torch.no_grad()
def layer_statistics(model: LabNet, x: Tensor, saturation_threshold: float = 4.0, batch_size: int = 1024) -> list:
    """Per hidden layer over the inputs ``x``: ``dead`` and ``saturated`` fractions (None where they do not
    apply to the activation) and the pre-activation's mean and standard deviation."""
    inputs: dict[int, list] = {index: [] for index in range(len(model.blocks))}
    hooks = [
        block.act.register_forward_hook(lambda module, args, out, index=index: inputs[index].append(args[0]))
        for index, block in enumerate(model.blocks)
    ]
    try:
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        for hook in hooks:
            hook.remove()
    statistics = []
    for index, block in enumerate(model.blocks):
        z = _pre_activation(block, torch.cat(inputs[index])).float()
        kind = block.act.activation
        statistics.append(
            {
                "layer": index,
                "units": z.shape[-1],
                "dead": (z <= 0).all(dim=0).float().mean().item() if kind in DEAD_FAMILY else None,
                "saturated": (z.abs() > saturation_threshold).float().mean().item()
                if kind in SATURATING_FAMILY
                else None,
                "z_mean": z.mean().item(),
                "z_std": z.std().item() if z.numel() > 1 else 0.0,
            }
        )
    return statistics


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    correct = sum(
        (model(x[start : start + batch_size]).argmax(-1) == y[start : start + batch_size]).sum().item()
        for start in range(0, len(y), batch_size)
    )
    return correct / max(len(y), 1)


# ---------------------------------------------------------------------------------------------------
# Training


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(
    config: ExperimentConfig,
    spec: ActivationSpec,
    data: tuple,
    device: torch.device,
    progress: Optional["Progress"] = None,
) -> dict:
    """Train one network with ``spec`` and measure it (see the module docstring); ``progress`` hears of
    every epoch."""
    x_train, y_train, x_val, y_val, classes = data
    torch.manual_seed(config.seed)
    model = build_model(config, spec, x_train[0].numel(), classes, tuple(x_train.shape[1:])).to(device)
    if config.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    else:
        raise LabError(f"unknown optimizer {config.optimizer!r}; choose from: adam, sgd")
    x_train, y_train, x_val, y_val = (t.to(device) for t in (x_train, y_train, x_val, y_val))
    weights = [block.layer.weight for block in model.blocks]
    init_statistics = layer_statistics(model, x_val, config.saturation_threshold)

    generator = torch.Generator().manual_seed(config.seed + 1)  # the batch order, the same for every activation
    step_losses, epoch_seconds, val_curve = [], [], []
    grad_norm_sums = torch.zeros(len(weights), dtype=torch.float64, device=device)
    steps = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(y_train), generator=generator).to(device)
        epoch_losses = []
        model.train()
        _synchronize(device)
        start = time.perf_counter()
        for first in range(0, len(order), config.batch_size):
            batch = order[first : first + config.batch_size]
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            grad_norm_sums += torch.stack([weight.grad.detach().double().norm() for weight in weights])
            optimizer.step()
            epoch_losses.append(loss.detach())
            steps += 1
        _synchronize(device)
        epoch_seconds.append(time.perf_counter() - start)
        step_losses.extend(torch.stack(epoch_losses).tolist())
        model.eval()
        val_curve.append(accuracy(model, x_val, y_val))
        if progress is not None:
            progress.epoch(epoch + 1, step_losses[-1], val_curve[-1])

    statistics = layer_statistics(model, x_val, config.saturation_threshold)
    grad_norms = (grad_norm_sums / max(steps, 1)).tolist()
    for layer, grad_norm, at_init in zip(statistics, grad_norms, init_statistics, strict=True):
        layer["grad_norm"] = grad_norm
        layer["dead_at_init"] = at_init["dead"]
        layer["saturated_at_init"] = at_init["saturated"]
    epochs_sorted = sorted(epoch_seconds)
    return {
        "activation": spec.label,
        "name": spec.name,
        "params": spec.params,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "seconds_per_epoch": epochs_sorted[len(epochs_sorted) // 2] if epochs_sorted else 0.0,
        "epoch_seconds": epoch_seconds,
        "val_accuracy": val_curve[-1] if val_curve else accuracy(model.eval(), x_val, y_val),
        "val_accuracy_curve": val_curve,
        "final_train_loss": step_losses[-1] if step_losses else None,
        "spikiness": loss_spikiness(step_losses),
        "first_layer_grad_norm": grad_norms[0],
        "layers": statistics,
        "step_losses": step_losses,
    }


def run_experiment(
    config: ExperimentConfig, out_dir: Optional[str] = None, plots: bool = True, stream: Optional[TextIO] = None
) -> dict:
    """Train one network per activation of ``config`` and return ``{"config", "device", "runs", ...}``.

    With ``out_dir``: also writes ``report.json``, ``report.md`` and (``plots=True``) ``loss_curves.png``,
    ``units.png`` (dead/saturated fraction per layer) and ``grad_norms.png`` there. Progress goes to
    ``stream`` (default stderr) as ``config.progress`` says (see ``Progress``).
    """
    specs = parse_activations(config.activations)
    if config.epochs < 1 or config.batch_size < 1:
        raise LabError("epochs and batch_size must be at least 1")
    device = resolve_device(config.device)
    data = load_dataset(config)
    if plots and out_dir is not None:
        _matplotlib()  # fail now, not after the training
    if config.threads is not None and config.threads < 1:
        raise LabError(f"threads must be at least 1, got {config.threads}")
    progress = Progress(config, specs, device, len(data[1]), stream)
    threads = torch.get_num_threads()
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    runs = []
    try:
        for spec in specs:
            progress.begin_run(spec)
            runs.append(train_one(config, spec, data, device, progress))
            progress.end_run(runs[-1])
    finally:
        torch.set_num_threads(threads)
    result = {
        "config": {**asdict(config), "activations": [spec.label for spec in specs]},
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "train_samples": len(data[1]),
        "val_samples": len(data[3]),
        "classes": data[4],
        "wall_seconds": time.perf_counter() - started,
        "runs": runs,
    }
    if out_dir is not None:
        write_report(result, out_dir, plots)
    return result


# ---------------------------------------------------------------------------------------------------
# Progress


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``: a time a person reads at a glance.

    >>> format_duration(185.2)
    '3 min 05 s'
    """
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """What ``run_experiment`` says while it trains, on ``stream`` (default stderr, so the table and the
    ``--json`` report on stdout stay clean).

    With ``config.progress`` None (the default): a line saying what is trained, as soon as it starts; an
    estimate of the whole run after the first epochs (the second epoch's time where there are several,
    past the first one's warm-up and, on a GPU, Triton's compilation); one line per finished run with its
    time, accuracy and the time left. On a terminal also a status line per epoch, rewritten in place.
    ``progress=True``: the epoch lines on any stream, one line each; ``False``: nothing.
    """

    def __init__(
        self, config: ExperimentConfig, specs: list, device: torch.device, samples: int, stream: Optional[TextIO]
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = config.progress is not False
        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.epoch_lines = config.progress is True or (config.progress is None and terminal)
        self.rewrite = terminal  # a terminal's epoch line is rewritten in place; elsewhere each is a new line
        self.config, self.specs = config, specs
        self.runs_done, self.spec, self.width, self.pending = 0, None, max(len(spec.label) for spec in specs), 0
        self.started = self.run_started = self.epoch_started = time.perf_counter()
        steps = -(-samples // config.batch_size)
        self._say(
            f"fusedact experiment: {len(specs)} runs ({', '.join(spec.label for spec in specs)}) x "
            f"{config.epochs} epochs of {steps} steps, {config.dataset} / {config.model} on {device}"
        )

    def _say(self, line: str, final: bool = True) -> None:
        if not self.enabled:
            return
        if self.rewrite:
            # Pad over what the previous status line left, and stay on the line until the run ends.
            self.stream.write("\r" + line.ljust(self.pending) + ("\n" if final else ""))
            self.pending = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _prefix(self) -> str:
        """``[2/8] leaky_relu``: the run in progress."""
        return f"[{self.runs_done + 1}/{len(self.specs)}] {self.spec.label:<{self.width}}"

    def begin_run(self, spec: ActivationSpec) -> None:
        self.spec = spec
        self.run_started = self.epoch_started = time.perf_counter()

    def epoch(self, epoch: int, loss: float, val_accuracy: float) -> None:
        """After each epoch of the current run: ``epoch`` counts from 1."""
        now = time.perf_counter()
        seconds, self.epoch_started = now - self.epoch_started, now
        if self.epoch_lines:
            self._say(
                f"{self._prefix()}  epoch {epoch}/{self.config.epochs}  {seconds:.2f} s  loss {loss:.3f}  "
                f"val acc {val_accuracy:.3f}",
                final=not self.rewrite,
            )
        if self.runs_done == 0 and epoch == min(2, self.config.epochs):
            total = seconds * self.config.epochs * len(self.specs)
            self._say(
                f"estimate: {seconds:.2f} s per epoch (epoch {epoch} of {self.spec.label}), so about "
                f"{format_duration(total)} for {len(self.specs)} runs x {self.config.epochs} epochs"
            )

    def end_run(self, run: dict) -> None:
        now = time.perf_counter()
        done, left = self.runs_done + 1, len(self.specs) - self.runs_done - 1
        remaining = f"; about {format_duration((now - self.started) / done * left)} left" if left else ""
        self._say(
            f"{self._prefix()}  {self.config.epochs} epochs in {format_duration(now - self.run_started)}  "
            f"val acc {run['val_accuracy']:.3f}  train loss {run['final_train_loss']:.3f}{remaining}"
        )
        self.runs_done = done


# ---------------------------------------------------------------------------------------------------
# Reports


def _per_layer(values) -> str:
    if all(value is None for value in values):
        return "-"
    return " ".join("-" if value is None else f"{100 * value:.0f}" for value in values)


def summary_rows(result: dict) -> list[dict]:
    """One row per activation with the numbers of the on-screen and markdown tables."""
    rows = []
    for run in result["runs"]:
        rows.append(
            {
                "activation": run["activation"],
                "s/epoch": f"{run['seconds_per_epoch']:.3f}",
                "val acc": f"{run['val_accuracy']:.3f}",
                "spikiness": f"{run['spikiness']:.3f}",
                "grad L0": f"{run['first_layer_grad_norm']:.2e}",
                "dead % per layer": _per_layer([layer["dead"] for layer in run["layers"]]),
                "saturated % per layer": _per_layer([layer["saturated"] for layer in run["layers"]]),
            }
        )
    return rows


def format_table(result: dict) -> str:
    rows = summary_rows(result)
    columns = list(rows[0]) if rows else []
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines.append("  ".join("-" * widths[column] for column in columns))
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(lines)


MEASURES_TEXT = """\
- s/epoch: median wall time of a training epoch.
- val acc: accuracy on the held-out quarter of the data after the last epoch.
- spikiness: mean |loss[t+1] - loss[t]| / mean loss over the training steps (0: flat; larger: jumpier).
- grad L0: L2 norm of the gradient of the first layer's weight, averaged over the training steps.
- dead % per layer: ReLU-family units (features; channels for conv layers) whose pre-activation is never
  positive on the validation set: they output 0 and receive no gradient, for every input.
- saturated % per layer: sigmoid/tanh pre-activations beyond +-{threshold:g} on the validation set, where the
  derivative has all but vanished. "-": the measure does not apply to the activation."""


def format_markdown(result: dict) -> str:
    config = result["config"]
    rows = summary_rows(result)
    columns = list(rows[0]) if rows else []
    lines = [
        "# fusedact experiment",
        "",
        f"Dataset `{config['dataset']}` ({result['train_samples']} train / {result['val_samples']} validation, "
        f"{result['classes']} classes), model `{config['model']}`"
        + (f" (depth {config['depth']}, width {config['width']})" if config["model"] == "mlp" else "")
        + f", {config['epochs']} epochs, batch {config['batch_size']}, {config['optimizer']} lr {config['lr']}, "
        f"seed {config['seed']}, device {result['device']}; {result['wall_seconds']:.1f} s in all.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(row[column] for column in columns) + " |" for row in rows]
    lines += ["", MEASURES_TEXT.format(threshold=config["saturation_threshold"]), ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str, plots: bool = True) -> list[str]:
    """``report.json``, ``report.md`` and the PNGs in ``out_dir``; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    with open(paths[0], "w") as file:
        json.dump(result, file, indent=1)
    with open(paths[1], "w") as file:
        file.write(format_markdown(result))
    if plots:
        paths += plot_result(result, out_dir)
    return paths


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise LabError("the plots need matplotlib: pip install 'fusedact[lab]' (or --no-plots)") from None
    matplotlib.use("Agg")
    return matplotlib


def plot_result(result: dict, out_dir: str) -> list[str]:
    """``loss_curves.png`` (every activation's training loss per step on one plot), ``units.png`` (dead and
    saturated fraction per layer) and ``grad_norms.png`` (gradient norm per layer, log scale)."""
    _matplotlib()
    import matplotlib.pyplot as plt

    runs = result["runs"]
    paths = []
    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps_per_epoch = max(1, len(runs[0]["step_losses"]) // max(1, result["config"]["epochs"])) if runs else 1
    for index, run in enumerate(runs):
        losses = torch.tensor(run["step_losses"], dtype=torch.float64)
        color = f"C{index % 10}"
        axis.plot(losses.numpy(), color=color, linewidth=0.6, alpha=0.25)
        # The bold line is the mean over one epoch's steps, so the trend shows through the batch noise.
        window = min(steps_per_epoch, len(losses))
        if window > 1:
            smooth = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), window, stride=1).view(-1)
            steps = torch.arange(window - 1, len(losses))
        else:
            smooth, steps = losses, torch.arange(len(losses))
        label = f"{run['activation']} (spikiness {run['spikiness']:.2f})"
        axis.plot(steps.numpy(), smooth.numpy(), color=color, linewidth=1.6, label=label)
    axis.set_yscale("log")
    axis.set_xlabel("training step")
    axis.set_ylabel("cross-entropy (log scale); bold: mean over an epoch")
    axis.set_title(f"training loss, {result['config']['dataset']} / {result['config']['model']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "loss_curves.png"))
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, (dead_axis, saturated_axis) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, key, title in (
        (dead_axis, "dead", "dead units (ReLU family)"),
        (saturated_axis, "saturated", "saturated pre-activations (sigmoid/tanh)"),
    ):
        for run in runs:
            values = [layer[key] for layer in run["layers"]]
            if any(value is not None for value in values):
                layers = [layer["layer"] for layer in run["layers"]]
                axis.plot(layers, [100 * (value or 0.0) for value in values], "o-", label=run["activation"])
        axis.set_title(title)
        axis.set_xlabel("hidden layer")
        axis.set_ylim(-3, 103)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no activation of this family", ha="center", transform=axis.transAxes, color="0.5")
    dead_axis.set_ylabel("% (validation set, after training)")
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "units.png"))
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        norms = [max(layer["grad_norm"], 1e-30) for layer in run["layers"]]
        axis.plot(range(len(norms)), norms, "o-", label=run["activation"])
    axis.set_yscale("log")
    axis.set_xlabel("hidden layer (0 = first)")
    axis.set_ylabel("mean |dL/dW| over training")
    axis.set_title("gradient reaching each layer")
    axis.legend(fontsize=8)
    figure.tight_layout()
    paths.append(os.path.join(out_dir, "grad_norms.png"))
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths
