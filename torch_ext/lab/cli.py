"""The ``fusedact`` command: ``inspect``, ``swap``, ``experiment`` and ``plot`` (``fusedact --help``).

Exit codes: 0 on success, 2 for a usage error (an unknown model, activation, dataset or setting: the
message says what is accepted), 1 for anything else that fails.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Optional

from .specs import LabError

EPILOG = """\
examples:
  fusedact inspect tiny-llama                      # a built-in tiny transformers model
  fusedact inspect resnet18                        # a timm model, random weights (needs timm)
  fusedact inspect mypackage.models:build_model    # any callable returning an nn.Module
  fusedact swap resnet18 --from relu --to leaky_relu:negative_slope=0.1
  fusedact experiment --activations relu tanh sigmoid --depth 8 --epochs 20
  fusedact experiment --quick                      # 4 activations x 10 epochs, well under a minute
  fusedact experiment --dataset digits --model cnn
  fusedact plot gelu gelu:approximate=tanh sigmoid --out plots/

activations: a fusedact name (relu, gelu, silu, ...) or name:key=value,... with that function's keywords,
e.g. leaky_relu:negative_slope=0.2, gelu:approximate=tanh, swish:beta=1.702, elu:alpha=0.5.
"""


def _json_default(value):
    return str(value)


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's activations, layer by layer",
        description="Every activation module of MODEL (path, kind, settings, whether fusedact runs it), and the "
        "activations a Hugging Face config names for functional calls (hidden_act and friends).",
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.set_defaults(handler=_run_inspect, command_parser=parser)


_MODEL_HELP = (
    "a built-in tiny transformers model (tiny-llama, tiny-gpt2, tiny-bert, ...), a local directory (or "
    "config.json) of a transformers config, module:callable (or path/to/file.py:callable) returning an "
    "nn.Module, or a timm model name (random weights, nothing downloaded)"
)


def _add_swap(subparsers) -> None:
    parser = subparsers.add_parser(
        "swap",
        help="replace one kind of activation with another and report what changed",
        description="Replace every activation of kind --from in MODEL by --to (a fusedact module) and list each "
        "change; with --patch, then fuse everything else fusedact can (fusedact.patch) and show its report.",
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--from", dest="source", required=True, metavar="KIND", help="kind to replace, e.g. relu")
    parser.add_argument(
        "--to", dest="target", required=True, metavar="ACTIVATION", help="e.g. leaky_relu:negative_slope=0.1"
    )
    parser.add_argument("--patch", action="store_true", help="also run fusedact.patch on the swapped model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.set_defaults(handler=_run_swap, command_parser=parser)


def _add_experiment(subparsers) -> None:
    from .experiment import DATASETS, MODELS, QUICK, ExperimentConfig

    defaults = ExperimentConfig()
    parser = subparsers.add_parser(
        "experiment",
        help="train the same small network once per activation and compare",
        description="Train the same network (same data, seed, initial weights and batch order) once per "
        "activation for a fixed number of epochs; print time per epoch, validation accuracy, loss spikiness "
        "(mean |loss[t+1]-loss[t]| / mean loss), the gradient norm reaching the first layer and, per layer, "
        "dead ReLU-family units and saturated sigmoid/tanh pre-activations. Writes report.json, report.md, "
        "loss_curves.png, units.png and grad_norms.png to --out. The defaults (8 activations x 100 epochs) "
        "take 1.5-3 minutes on a 2-core CPU (0.1-0.25 s per epoch, the upper end on a busy machine); --quick "
        "10-15 s. Progress goes to stderr: a line per run, an estimate of the whole time after the second "
        "epoch, and on a terminal a line per epoch. The GPU is used when present.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a quick look: {' '.join(QUICK['activations'])} for {QUICK['epochs']} epochs (--activations and "
        "--epochs still win)",
    )
    parser.add_argument(
        "--activations",
        nargs="+",
        default=None,
        metavar="ACTIVATION",
        help=f"(default: {' '.join(defaults.activations)})",
    )
    parser.add_argument("--dataset", choices=DATASETS, default=defaults.dataset, help="(default: %(default)s)")
    parser.add_argument(
        "--model", choices=MODELS, default=defaults.model, help="cnn: digits only (default: %(default)s)"
    )
    parser.add_argument("--depth", type=int, default=defaults.depth, help="MLP hidden layers (default: %(default)s)")
    parser.add_argument("--width", type=int, default=defaults.width, help="MLP units per layer (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help=f"(default: {defaults.epochs})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default=defaults.optimizer)
    parser.add_argument("--samples", type=int, default=defaults.samples, help="spirals: points (default: %(default)s)")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="spirals: noise std (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--bias-init", type=float, default=None, help="start every hidden bias at this value (default: as nn.Linear)"
    )
    parser.add_argument("--saturation-threshold", type=float, default=defaults.saturation_threshold)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.threads,
        help="CPU threads while training (default: %(default)s: fastest for these small networks)",
    )
    parser.add_argument("--out", default="fusedact-experiment", help="report directory (default: %(default)s)")
    parser.add_argument("--no-plots", action="store_true", help="write the JSON and markdown reports only")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="a line per epoch, also off a terminal"
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress lines")
    parser.set_defaults(handler=_run_experiment, command_parser=parser)


def _add_plot(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="PNG of each activation and its derivative, from fusedact's forward and backward",
        description="One PNG per activation (f and f', computed by fusedact's own forward and backward) with "
        "f(1) and f'(1) marked and the flat zone |f'(x)| < --flat-below shaded, and overview.png with all of them.",
    )
    parser.add_argument("activations", nargs="*", metavar="ACTIVATION", help="default: every elementwise one")
    parser.add_argument("--out", default="fusedact-plots", help="directory for the PNGs (default: %(default)s)")
    parser.add_argument("--range", dest="x_range", type=float, default=6.0, help="plot x in [-R, R] (default: 6)")
    parser.add_argument("--points", type=int, default=1201, help="(default: %(default)s)")
    parser.add_argument("--flat-below", type=float, default=0.01, help="shade |f'| below this (default: 0.01)")
    parser.add_argument("--device", default=None, help="default: cuda when present (the Triton kernels), else cpu")
    parser.add_argument("--json", action="store_true", help="print the values as JSON instead of the table")
    parser.set_defaults(handler=_run_plot, command_parser=parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedact",
        description="The fusedact activation lab: inspect a model's activations, swap them, train with each and "
        "compare, and plot every activation with its derivative.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_inspect(subparsers)
    _add_swap(subparsers)
    _add_experiment(subparsers)
    _add_plot(subparsers)
    return parser


def _run_inspect(args) -> None:
    from .inspection import format_inspection, inspect_model
    from .models import load_model

    report = inspect_model(load_model(args.model))
    print(json.dumps(report, indent=1, default=_json_default) if args.json else format_inspection(report))


def _run_swap(args) -> None:
    from .models import load_model
    from .specs import parse_activation
    from .swap import format_swap, source_filter, swap_model

    source_filter(args.source)  # a typo in --from or --to fails before the model is built
    parse_activation(args.target)
    report = swap_model(load_model(args.model), args.source, args.target, patch=args.patch)
    print(json.dumps(report, indent=1, default=_json_default) if args.json else format_swap(report))


def _experiment_config(args):
    """The ``ExperimentConfig`` of ``fusedact experiment``'s arguments: ``--quick``'s presets under any option
    given explicitly, the defaults under both."""
    from .experiment import ExperimentConfig

    settings = dict(
        dataset=args.dataset,
        model=args.model,
        depth=args.depth,
        width=args.width,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        samples=args.samples,
        noise=args.noise,
        seed=args.seed,
        bias_init=args.bias_init,
        saturation_threshold=args.saturation_threshold,
        device=args.device,
        threads=args.threads,
        progress=args.progress,
    )
    explicit = {key: getattr(args, key) for key in ("activations", "epochs") if getattr(args, key) is not None}
    return (ExperimentConfig.quick if args.quick else ExperimentConfig)(**settings, **explicit)


def _run_experiment(args) -> None:
    from .experiment import format_duration, format_table, run_experiment

    config = _experiment_config(args)
    result = run_experiment(config, args.out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(result, indent=1, default=_json_default))
        return
    seconds = result["wall_seconds"]
    print(
        f"{config.dataset} / {config.model} on {result['device']}, {config.epochs} epochs: "
        f"{format_duration(seconds)} in all"
    )
    print(format_table(result))
    plots = "" if args.no_plots else "; plots: loss_curves.png, units.png, grad_norms.png"
    print(f"\nreport: {args.out}/report.md, report.json{plots}")


def _run_plot(args) -> None:
    from .plots import format_table, plot_activations

    rows = plot_activations(
        args.activations or None,
        args.out,
        x_range=args.x_range,
        points=args.points,
        flat_below=args.flat_below,
        device=args.device,
    )
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(format_table(rows))
    print(f"\n{len(rows)} plots and overview.png in {args.out}/")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # parse_args would blame the top-level parser and print its usage; the subcommand's is the one to read.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.handler(args)
    except LabError as error:
        print(f"fusedact {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
