"""The activation lab (``fusedact inspect | swap | experiment | plot``): commands end to end on tiny settings,
and the numbers they report checked against what they must be."""

import copy
import io
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch
from optional import needs_transformers_models
from torch import nn

import fusedact
from fusedact.lab import cli
from fusedact.lab.experiment import QUICK, ExperimentConfig, format_duration, loss_spikiness, run_experiment, spirals
from fusedact.lab.inspection import format_inspection, inspect_model
from fusedact.lab.models import load_model
from fusedact.lab.plots import activation_figure, evaluate, flat_regions, plot_activations
from fusedact.lab.specs import ALIASES, LabError, accepted_parameters, parse_activation
from fusedact.lab.swap import format_swap, swap, swap_model
from fusedact.patching import FoldedBias

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def torch_backend():
    """Training runs on the PyTorch fallback: the Triton interpreter would take minutes for the same steps."""
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")
    yield
    fusedact.set_cpu_backend(previous)


def tiny(**overrides) -> ExperimentConfig:
    settings = dict(depth=3, width=16, epochs=1, samples=200, batch_size=32, device="cpu", progress=False)
    return ExperimentConfig(**{**settings, **overrides})


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """``python -m fusedact ...`` in a fresh process, on the fallback backend."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "fusedact", *argv], capture_output=True, text=True, cwd=REPOSITORY, env=environment
    )


# ---------------------------------------------------------------------------------------------------
# Activation specs


def test_parse_activation_names_params_and_aliases():
    spec = parse_activation("leaky_relu:negative_slope=0.2")
    assert (spec.name, spec.params, spec.label) == (
        "leaky_relu",
        {"negative_slope": 0.2},
        "leaky_relu(negative_slope=0.2)",
    )
    assert parse_activation("gelu_tanh") == parse_activation("gelu:approximate=tanh")
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(spec(x), torch.nn.functional.leaky_relu(x, 0.2), rtol=0, atol=0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("relux", "unknown activation 'relux' (did you mean 'relu'?)"),
        ("gelu:approximate=cubic", "approximate must be 'none' or 'tanh'"),
        ("relu:slope=0.1", "unexpected keyword 'slope' for relu; it takes no parameters"),
        ("leaky_relu:slope=0.2", "unexpected keyword 'slope' for leaky_relu; it takes: negative_slope"),
        ("heaviside:values=1", "unexpected keyword 'values' for heaviside; it takes: value, straight_through"),
        ("geglu:beta=2", "unexpected keyword 'beta' for geglu; it takes: approximate"),
        ("elu:alpha", "expected key=value"),
    ],
)
def test_parse_activation_errors(text, message):
    with pytest.raises(LabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_activation(text)


def test_accepted_parameters_are_the_public_functions_keywords():
    """Each name's keywords are exactly those its public function takes, and each is accepted by bias_act."""
    expected = {"leaky_relu": ["negative_slope"], "gelu": ["approximate"], "swish": ["beta"], "elu": ["alpha"]}
    expected |= {"celu": ["alpha"], "heaviside": ["value", "straight_through"], "geglu": ["approximate"]}
    expected |= {"hardtanh": ["min_val", "max_val"], "softplus": ["beta", "threshold"]}
    expected |= {"xielu": ["alpha_p", "alpha_n", "beta", "eps"]}
    for name in fusedact.functional.ACTIVATIONS:
        assert accepted_parameters(name) == expected.get(name, []), name
    for name, keywords in expected.items():
        defaults = {"negative_slope": 0.2, "approximate": "tanh", "beta": 1.5, "alpha": 0.5, "value": 0.5}
        defaults |= {"min_val": -0.5, "max_val": 2.0, "threshold": 10.0, "alpha_p": 0.7, "alpha_n": 0.9, "eps": -1e-6}
        spec = parse_activation(f"{name}:" + ",".join(f"{key}={defaults.get(key, 'true')}" for key in keywords))
        assert set(spec.params) == set(keywords)


def test_plot_unknown_keyword_names_the_accepted_ones(capsys):
    """Issue 11: this said `<lambda>() got an unexpected keyword argument 'slope'`."""
    assert cli.main(["plot", "leaky_relu:slope=0.2", "--out", "unused"]) == 2
    error = capsys.readouterr().err
    assert error == (
        "fusedact plot: error: activation 'leaky_relu:slope=0.2': unexpected keyword 'slope' for leaky_relu; "
        "it takes: negative_slope\n"
    )


def test_valid_names_are_listed_without_aliases():
    with pytest.raises(LabError) as error:
        parse_activation("relux")
    names = str(error.value).split("choose from: ")[1].split(" (shorthands:")[0].split(", ")
    assert names == list(fusedact.functional.ACTIVATIONS)
    assert "swish_1.702" not in str(error.value)
    assert "(shorthands: gelu_tanh = gelu(approximate=tanh), gelu_new = gelu(approximate=tanh))" in str(error.value)
    for alias in ALIASES:  # still accepted, and suggested for a near miss
        assert parse_activation(alias) == parse_activation("gelu:approximate=tanh")
    with pytest.raises(LabError, match="did you mean 'gelu_new'"):
        parse_activation("gelu_neww")


# ---------------------------------------------------------------------------------------------------
# plot


def _phi(x: float) -> float:
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# f(1) and f'(1) from the formulas (README's activation table), in float64.
AT_ONE = {
    "relu": (1.0, 1.0),
    "leaky_relu:negative_slope=0.2": (1.0, 1.0),
    "gelu": (0.5 * (1 + math.erf(1 / math.sqrt(2))), 0.5 * (1 + math.erf(1 / math.sqrt(2))) + _phi(1.0)),
    "silu": (_sigmoid(1.0), _sigmoid(1.0) * (2 - _sigmoid(1.0))),
    "sigmoid": (_sigmoid(1.0), _sigmoid(1.0) * (1 - _sigmoid(1.0))),
    "tanh": (math.tanh(1.0), 1 - math.tanh(1.0) ** 2),
    "relu_squared": (1.0, 2.0),
    "elu": (1.0, 1.0),
    "heaviside": (1.0, 0.0),
}


def test_plot_values_at_one_match_the_formulas():
    rows = plot_activations(list(AT_ONE), out_dir=None)
    assert [row["activation"] for row in rows] == [parse_activation(name).label for name in AT_ONE]
    for name, row in zip(AT_ONE, rows, strict=True):
        value, slope = AT_ONE[name]
        assert row["f(1)"] == pytest.approx(value, abs=1e-6), name
        assert row["f'(1)"] == pytest.approx(slope, abs=1e-6), name
    assert rows[2]["f(1)"] == pytest.approx(0.8413447, abs=1e-6)  # gelu(1)


def test_plot_flat_zones():
    """Shaded where |f'| < 0.01: sigmoid beyond |x| = log-odds of the root of s(1-s) = 0.01, ReLU's negative
    half, the step everywhere, leaky ReLU nowhere, and not GELU's turning point near -0.75."""
    rows = {
        row["activation"]: row for row in plot_activations(["sigmoid", "relu", "heaviside", "leaky_relu", "gelu"], None)
    }
    edge = math.log((1 + math.sqrt(1 - 0.04)) / (1 - math.sqrt(1 - 0.04)))  # s(1 - s) = 0.01 at |x| = 4.595
    (low_start, low_end), (high_start, high_end) = rows["sigmoid"]["flat_regions"]
    assert (low_start, high_end) == (-6.0, 6.0)
    assert low_end == pytest.approx(-edge, abs=0.011) and high_start == pytest.approx(edge, abs=0.011)
    ((start, end),) = rows["relu"]["flat_regions"]
    assert start == -6.0 and -0.02 <= end <= 0.0
    assert rows["heaviside"]["flat_fraction"] == pytest.approx(1.0)
    assert rows["leaky_relu"]["flat_regions"] == []
    assert all(end < -3 for _, end in rows["gelu"]["flat_regions"])


def test_plot_command_writes_pngs(tmp_path, capsys):
    assert cli.main(["plot", "gelu", "sigmoid", "gelu:approximate=tanh", "--out", str(tmp_path)]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["gelu.png", "gelu_approximatetanh.png", "overview.png", "sigmoid.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    output = capsys.readouterr().out
    assert "0.841345" in output and "0.731059" in output and "[4.59, 6.00]" in output


def test_plot_default_covers_every_elementwise_activation():
    labels = [row["activation"] for row in plot_activations(out_dir=None, points=101)]
    assert {"relu", "gelu", "gelu(approximate=tanh)", "sigmoid", "tanh", "heaviside", "mish"} <= set(labels)
    assert not {"swiglu", "geglu", "reglu", "glu"} & set(labels)


def test_plot_rejects_gated(capsys):
    assert cli.main(["plot", "swiglu", "--out", "unused"]) == 2
    assert "swiglu is not elementwise" in capsys.readouterr().err


def _texts_over_curves(figure) -> list[str]:
    """The texts of ``figure`` whose box, as drawn, holds a point of one of its curves."""
    from matplotlib.text import Text

    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    curves = [line for axis in figure.axes for line in axis.get_lines() if len(line.get_xdata()) > 2]
    points = [line.get_transform().transform(line.get_xydata()) for line in curves]
    covering = []
    for text in figure.findobj(Text):
        if text.get_visible() and text.get_text().strip():
            box = text.get_window_extent(renderer)
            for xy in points:
                if ((xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)).any():
                    covering.append(text.get_text())
    return covering


@pytest.mark.parametrize("name", ["sigmoid", "gelu", "tanh", "relu", "silu", "mish"])
def test_plot_labels_stay_off_the_curves_and_the_y_axis_is_labelled(name):
    """Issue 11: the f(1) and f'(1) labels sat on the curves (sigmoid, tanh, GELU, SiLU, ...), and the y-axis
    had no label. The values are in the legend, above the axes, and still written out in full."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    spec = parse_activation(name)
    x = torch.linspace(-6.0, 6.0, 1201)
    y, derivative = evaluate(spec, x)
    value, slope = (tensor.item() for tensor in evaluate(spec, torch.ones(1)))
    row = {"f(1)": value, "f'(1)": slope, "flat_regions": flat_regions(x, derivative, 0.01)}
    figure = activation_figure(spec, x, y, derivative, row, 0.01)
    try:
        assert _texts_over_curves(figure) == []
        (axis,) = figure.axes
        assert axis.get_ylabel() == "f(x) and f'(x)" and axis.get_xlabel() == "x"
        labels = [text.get_text() for text in axis.get_legend().get_texts()]
        assert f"f(x); f(1) = {value:.4g}" in labels and f"f'(x); f'(1) = {slope:.4g}" in labels
    finally:
        plt.close(figure)


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli.main(["plot", "relu", "--out", "unused"]) == 2
    assert "plots need matplotlib: pip install 'fusedact[lab]'" in capsys.readouterr().err
    assert not os.path.exists("unused")


# ---------------------------------------------------------------------------------------------------
# experiment: the measures


def test_loss_spikiness_on_known_sequences():
    assert loss_spikiness([1.0, 2.0, 1.0, 2.0]) == pytest.approx(1.0 / 1.5)  # steps of 1 around a mean of 1.5
    assert loss_spikiness([3.0, 3.0, 3.0]) == 0.0
    assert loss_spikiness([4.0, 3.0, 2.0, 1.0]) == pytest.approx(1.0 / 2.5)  # a smooth descent
    assert loss_spikiness([2.0]) == 0.0


def test_spirals_are_balanced_and_not_linearly_separable():
    x, y = spirals(400, 0.04, seed=0)
    assert x.shape == (400, 2) and torch.equal(y.bincount(), torch.tensor([200, 200]))
    assert x.abs().max() < 1.3
    # The best least-squares linear classifier stays far from separating them.
    design = torch.cat([x, torch.ones(400, 1)], 1).double()
    weights = torch.linalg.lstsq(design, (2.0 * y - 1).double().unsqueeze(1)).solution
    assert ((design @ weights).squeeze(1) > 0).eq(y.bool()).double().mean() < 0.75


def test_relu_with_large_negative_bias_is_all_dead():
    result = run_experiment(tiny(activations=["relu"], bias_init=-5.0))
    (run,) = result["runs"]
    assert [layer["dead"] for layer in run["layers"]] == [1.0, 1.0, 1.0]
    assert [layer["dead_at_init"] for layer in run["layers"]] == [1.0, 1.0, 1.0]
    assert run["first_layer_grad_norm"] == 0.0  # no gradient passes a dead unit
    assert [layer["saturated"] for layer in run["layers"]] == [None, None, None]  # not a saturating activation


def test_relu_with_default_init_is_mostly_alive():
    """Some units start dead even so (a 2-D input leaves some hyperplanes with every point on their negative
    side), but far from all."""
    (run,) = run_experiment(tiny(activations=["relu"], width=32))["runs"]
    assert all(layer["dead"] < 0.5 for layer in run["layers"])
    assert run["first_layer_grad_norm"] > 0


def test_deep_sigmoid_gets_a_smaller_first_layer_gradient_than_relu():
    result = run_experiment(tiny(activations=["relu", "sigmoid"], depth=6, width=32, samples=256))
    relu, sigmoid = result["runs"]
    assert sigmoid["first_layer_grad_norm"] < relu["first_layer_grad_norm"] / 10
    # The vanishing is progressive: sigmoid's first layer gets far less than its last.
    assert sigmoid["layers"][0]["grad_norm"] < sigmoid["layers"][-1]["grad_norm"] / 10


def test_saturated_sigmoid_and_tanh():
    result = run_experiment(tiny(activations=["sigmoid", "tanh", "relu"], bias_init=6.0))
    sigmoid, tanh, relu = result["runs"]
    assert sigmoid["layers"][0]["saturated"] == 1.0 and tanh["layers"][0]["saturated"] == 1.0  # |x W| < 2 here
    assert all(layer["saturated"] > 0.9 for layer in sigmoid["layers"] + tanh["layers"])
    assert all(layer["dead"] is None for layer in sigmoid["layers"])
    assert relu["layers"][0]["dead"] == 0.0  # the same bias keeps every first-layer ReLU on


def test_same_initial_weights_data_and_batches_for_every_activation():
    """leaky_relu with slope 0 is relu: the same start and batches must give the same losses, step for step."""
    result = run_experiment(tiny(activations=["relu", "leaky_relu:negative_slope=0.0"], epochs=2))
    relu, leaky = result["runs"]
    assert relu["step_losses"] == leaky["step_losses"] and len(relu["step_losses"]) == 2 * math.ceil(150 / 32)
    again = run_experiment(tiny(activations=["relu"], epochs=2))["runs"][0]
    assert again["step_losses"] == relu["step_losses"]


def test_cnn_on_digits_and_gated_mlp():
    result = run_experiment(tiny(activations=["relu", "gelu"], dataset="digits", model="cnn"))
    assert (result["train_samples"], result["val_samples"], result["classes"]) == (1347, 450, 10)
    for run in result["runs"]:
        assert len(run["layers"]) == 3 and [layer["units"] for layer in run["layers"]] == [16, 32, 64]
        assert run["val_accuracy"] > 0.3  # one epoch is well above chance (0.1)
    (swiglu,) = run_experiment(tiny(activations=["swiglu"]))["runs"]
    (relu,) = run_experiment(tiny(activations=["relu"]))["runs"]
    assert swiglu["parameters"] > relu["parameters"]  # the gate doubles each hidden projection
    with pytest.raises(LabError, match="swiglu is gated"):
        run_experiment(tiny(activations=["swiglu"], dataset="digits", model="cnn"))
    with pytest.raises(LabError, match="use --dataset digits"):
        run_experiment(tiny(model="cnn"))


# ---------------------------------------------------------------------------------------------------
# experiment: the command


def test_experiment_command_end_to_end(tmp_path, capsys):
    argv = ["experiment", "--activations", "relu", "tanh", "--epochs", "2", "--depth", "2", "--width", "8"]
    assert cli.main([*argv, "--samples", "128", "--device", "cpu", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert "val acc" in output and "spikiness" in output and "relu" in output and "tanh" in output
    expected = ["grad_norms.png", "loss_curves.png", "report.json", "report.md", "units.png"]
    assert sorted(os.listdir(tmp_path)) == expected
    report = json.loads((tmp_path / "report.json").read_text())
    assert [run["activation"] for run in report["runs"]] == ["relu", "tanh"]
    for run in report["runs"]:
        assert len(run["epoch_seconds"]) == 2 and len(run["layers"]) == 2
        assert 0 <= run["val_accuracy"] <= 1 and math.isfinite(run["spikiness"])
        assert run["spikiness"] == pytest.approx(loss_spikiness(run["step_losses"]))
    markdown = (tmp_path / "report.md").read_text()
    assert "| activation |" in markdown and "mean |loss[t+1] - loss[t]| / mean loss" in markdown


def test_experiment_command_errors(capsys):
    assert cli.main(["experiment", "--activations", "relu", "relux"]) == 2
    assert "unknown activation 'relux' (did you mean 'relu'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", "--dataset", "mnist"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_subcommand_errors_show_the_subcommand_usage(capsys):
    """Issue 11: `experiment --bogus` printed the top-level usage (`fusedact [-h] COMMAND ...`)."""
    for command in (
        ["experiment"],
        ["plot", "relu"],
        ["inspect", "tiny-bert"],
        ["swap", "m", "--from", "a", "--to", "b"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--bogus"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith(f"usage: fusedact {command[0]} [-h]"), error
        assert error.endswith(f"fusedact {command[0]}: error: unrecognized arguments: --bogus\n")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_experiment_progress_off_a_terminal(tmp_path, capsys):
    """Issue 11: with output to a pipe or a file the defaults ran 29 minutes without a word. Off a terminal:
    a line as it starts, the estimate after epoch 2, one line per run; stdout keeps only the table."""
    argv = ["experiment", "--activations", "relu", "tanh", "--epochs", "3", "--depth", "2", "--width", "8"]
    assert cli.main([*argv, "--samples", "128", "--device", "cpu", "--no-plots", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 4, captured.err
    assert lines[0] == (
        "fusedact experiment: 2 runs (relu, tanh) x 3 epochs of 2 steps, spirals / mlp on cpu"
    )  # 96 training samples in batches of 64
    assert lines[1].startswith("estimate: ") and " s per epoch (epoch 2 of relu), so about " in lines[1]
    assert lines[1].endswith(" for 2 runs x 3 epochs")
    report = json.loads((tmp_path / "report.json").read_text())
    for line, run, index in zip(lines[2:], report["runs"], (1, 2), strict=True):
        assert line.startswith(f"[{index}/2] {run['activation']:<4}  3 epochs in ")
        assert f"val acc {run['val_accuracy']:.3f}  train loss {run['final_train_loss']:.3f}" in line
    assert lines[2].endswith(" left") and "left" not in lines[3]
    assert "\r" not in captured.err and "estimate" not in captured.out and "val acc" in captured.out
    # --progress: a line per epoch besides; --no-progress: nothing at all; --json: stdout is the report alone.
    assert (
        cli.main([*argv, "--samples", "128", "--device", "cpu", "--no-plots", "--out", str(tmp_path), "--progress"])
        == 0
    )
    epochs = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line and "/3  " in line]
    assert [line.split("  epoch ")[1].split()[0] for line in epochs] == ["1/3", "2/3", "3/3"] * 2
    assert cli.main([*argv, "--samples", "128", "--no-plots", "--out", str(tmp_path), "--no-progress", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["config"]["epochs"] == 3


def test_experiment_progress_on_a_terminal_rewrites_one_line():
    stream = Terminal()
    run_experiment(tiny(activations=["relu"], epochs=3, progress=None), stream=stream)
    text = stream.getvalue()
    statuses = [part for part in text.split("\r") if "  epoch " in part]
    assert [status.split("  epoch ")[1].split()[0] for status in statuses] == ["1/3", "2/3", "3/3"]
    assert text.count("\n") == 3  # the start, the estimate and the finished run; the epoch lines are overwritten
    assert text.endswith("val acc " + text.split("val acc ")[-1]) and "[1/1] relu  3 epochs in " in text


def test_experiment_trains_on_one_cpu_thread_and_restores_the_setting():
    """Two threads made a busy 2-core machine 8x slower on these tiny layers (1.5 s per epoch instead of 0.18)."""
    seen = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            seen.append(torch.get_num_threads())
            return super().write(text)

    before = torch.get_num_threads()
    run_experiment(tiny(activations=["relu"], epochs=2, progress=True), stream=Recorder())
    assert torch.get_num_threads() == before
    assert len(seen) >= 3 and set(seen[1:]) == {1}  # the first line is written before training starts
    with pytest.raises(LabError, match="threads must be at least 1"):
        run_experiment(tiny(threads=0))


def test_experiment_quick_mode(tmp_path, capsys):
    """--quick is QUICK's activations and epochs on the default network; explicit options win over it. The
    real --quick (3000 samples) takes 10-15 s here; 400 samples run the same path in a fraction of that."""
    args = cli.build_parser().parse_args(["experiment", "--quick"])
    config = cli._experiment_config(args)
    assert (
        (config.activations, config.epochs)
        == (QUICK["activations"], QUICK["epochs"])
        == (
            ["relu", "gelu", "tanh", "sigmoid"],
            10,
        )
    )
    assert (config.depth, config.width, config.samples) == (6, 128, 3000)  # the network and data of the defaults
    args = cli.build_parser().parse_args(["experiment", "--quick", "--epochs", "3", "--activations", "elu"])
    assert (cli._experiment_config(args).activations, cli._experiment_config(args).epochs) == (["elu"], 3)
    defaults = cli._experiment_config(cli.build_parser().parse_args(["experiment"]))
    assert (defaults.activations, defaults.epochs) == (ExperimentConfig().activations, 100)

    argv = ["experiment", "--quick", "--samples", "400", "--device", "cpu", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["activations"] == QUICK["activations"] and report["config"]["epochs"] == 10
    steps = math.ceil(300 / 64)  # three quarters of 400 samples train, in batches of 64
    for run in report["runs"]:
        assert len(run["epoch_seconds"]) == len(run["val_accuracy_curve"]) == 10
        assert len(run["step_losses"]) == 10 * steps
        assert run["val_accuracy"] == run["val_accuracy_curve"][-1]
    assert [line.split()[0] for line in captured.out.splitlines()[3:7]] == QUICK["activations"]
    assert "10 epochs" in (tmp_path / "report.md").read_text()
    assert captured.err.splitlines()[0].startswith("fusedact experiment: 4 runs (relu, gelu, tanh, sigmoid) x 10")


def test_format_duration():
    assert [format_duration(seconds) for seconds in (3.21, 42.4, 185.2, 3725)] == [
        "3.2 s",
        "42 s",
        "3 min 05 s",
        "1 h 02 min",
    ]


def test_python_dash_m_fusedact():
    completed = run_cli("--help")
    assert completed.returncode == 0
    for command in ("inspect", "swap", "experiment", "plot"):
        assert command in completed.stdout
    completed = run_cli("plot", "gelux")
    assert completed.returncode == 2
    assert "fusedact plot: error: unknown activation 'gelux' (did you mean 'gelu'?)" in completed.stderr


# ---------------------------------------------------------------------------------------------------
# inspect


def torch_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.GELU(approximate="tanh"),
        nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.2)),
        nn.Softsign(),  # looks like an activation, and fusedact does not know it
        fusedact.nn.SiLU(),
        fusedact.nn.BiasAct(8, "elu", alpha=0.5),
    )


def columns(report: dict) -> list:
    return [(row["path"], row["kind"], row["params"], row["fused"]) for row in report["activations"]]


def test_inspect_torch_model_before_and_after_patch():
    model = torch_model()
    report = inspect_model(model)
    assert columns(report) == [
        ("1", "relu", {}, False),
        ("3", "gelu", {"approximate": "tanh"}, False),
        ("4.1", "leaky_relu", {"negative_slope": 0.2}, False),
        ("5", None, {}, False),
        ("6", "silu", {}, True),
        ("7", "elu", {"alpha": 0.5}, True),
    ]
    assert report["counts"] == {
        "relu": 1,
        "gelu(approximate=tanh)": 1,
        "leaky_relu(negative_slope=0.2)": 1,
        "unrecognized": 1,
        "silu": 1,
        "elu(alpha=0.5)": 1,
    }
    assert (report["fused"], report["parameters"], report["config"]) == (2, 3 * 8 + 8 + 2 * (8 * 8 + 8) + 8, [])
    text = format_inspection(report)
    assert "6 activation modules" in text and "2 fused" in text
    table = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert table["4.1"] == ["4.1", "leaky_relu", "negative_slope=0.2", "no", "torch.nn.modules.activation.LeakyReLU"]
    assert table["5"] == ["5", "?", "(not", "recognized)", "-", "no", "torch.nn.modules.activation.Softsign"]

    x = torch.randn(5, 3)
    expected = model(x)
    fusedact.patch(model)
    after = inspect_model(model)
    # Same kinds and settings; the three after a biased Linear now add its bias themselves (FoldedBias).
    assert [row[:3] for row in columns(after)] == [row[:3] for row in columns(report)]
    assert [row["fused"] for row in after["activations"]] == [True, True, True, False, True, True]
    assert [row["class"].rpartition(".")[2] for row in after["activations"]] == [
        "FoldedBias",
        "FoldedBias",
        "FoldedBias",
        "Softsign",
        "SiLU",
        "BiasAct",
    ]
    assert after["fused"] == 5
    torch.testing.assert_close(model(x), expected)


def test_inspect_shared_module_and_bare_activation():
    act = nn.Tanh()
    rows = inspect_model(nn.Sequential(nn.Linear(2, 2), act, nn.Linear(2, 2), act))["activations"]
    assert [(row["path"], row["shared_with"]) for row in rows] == [("1", None), ("3", "1")]
    (row,) = inspect_model(nn.GELU())["activations"]
    assert (row["path"], row["kind"], row["params"]) == ("(root)", "gelu", {"approximate": "none"})


# name -> activation module paths, kind, settings, the config's key and value, other activation modules
TRANSFORMERS = {
    "tiny-llama": (["layers.0.mlp.act_fn", "layers.1.mlp.act_fn"], "silu", {}, "hidden_act", "silu", []),
    "tiny-gpt2": (
        ["h.0.mlp.act", "h.1.mlp.act"],
        "gelu",
        {"approximate": "tanh"},
        "activation_function",
        "gelu_new",
        [],
    ),
    "tiny-bert": (
        [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)],
        "gelu",
        {"approximate": "none"},
        "hidden_act",
        "gelu",
        [("pooler.activation", "tanh", {})],
    ),
}


@needs_transformers_models
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_inspect_transformers_models(name):
    paths, kind, params, key, value, others = TRANSFORMERS[name]
    model = load_model(name)
    report = inspect_model(model)
    expected = [(path, kind, params, False) for path in paths] + [(*other, False) for other in others]
    assert columns(report) == expected
    assert report["config"] == [{"key": key, "value": value, "kind": kind, "params": params, "modules": len(paths)}]
    assert report["fused"] == 0

    changes = fusedact.patch(model).changes
    after = inspect_model(model)
    assert [row[:3] for row in columns(after)] == [row[:3] for row in expected]
    assert after["fused"] == len(expected) and all(row["fused"] for row in after["activations"])
    if name == "tiny-llama":  # the gated MLP runs SwiGLU; its act_fn is a fusedact module
        assert [change.action for change in changes] == ["gated_mlp", "gated_mlp", "replace", "replace"]
    else:  # a Linear (or GPT-2's Conv1D) feeds each activation: bias folded into it (GPT-2: the MLP lean too)
        lean = ["lean_mlp"] * len(paths) if name == "tiny-gpt2" else []
        assert [change.action for change in changes] == ["fold_bias"] * len(expected) + lean


@needs_transformers_models
def test_inspect_command(capsys):
    assert cli.main(["inspect", "tiny-bert"]) == 0
    output = capsys.readouterr().out
    assert (
        "BertModel: BertModel, 24,416 parameters; 3 activation modules (2 gelu(approximate=none), 1 tanh), 0 fused"
        in output
    )
    assert "encoder.layer.1.intermediate.intermediate_act_fn  gelu  approximate=none  no" in output
    assert "hidden_act = 'gelu' -> gelu: 2 module(s) above" in output
    assert cli.main(["inspect", "tiny-gpt2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"gelu(approximate=tanh)": 2} and report["parameters"] == 31616


@needs_transformers_models
def test_inspect_config_directory(tmp_path, capsys):
    import transformers

    settings = dict(vocab_size=64, n_embd=16, n_layer=3, n_head=2, n_positions=16, activation_function="relu")
    transformers.GPT2Config(**settings).save_pretrained(tmp_path)
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(row["path"], row["kind"]) for row in report["activations"]] == [
        (f"h.{i}.mlp.act", "relu") for i in range(3)
    ]
    assert report["config"] == [
        {"key": "activation_function", "value": "relu", "kind": "relu", "params": {}, "modules": 3}
    ]


class FunctionalSiLU(nn.Module):
    """Like many Hugging Face models: the config names the activation, and ``forward`` calls it as a function."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(hidden_act="silu")
        self.fc, self.act = nn.Linear(2, 4), nn.ReLU()

    def forward(self, x):
        return torch.nn.functional.silu(self.act(self.fc(x)))


@needs_transformers_models
def test_functional_activation_named_in_the_config(capsys):
    model = FunctionalSiLU()
    report = inspect_model(model)
    assert report["config"] == [{"key": "hidden_act", "value": "silu", "kind": "silu", "params": {}, "modules": 0}]
    assert "hidden_act = 'silu' -> silu: no module of that kind, so the model calls it as a function" in (
        format_inspection(report)
    )
    swapped = swap_model(model, "relu", "gelu")
    assert [entry["key"] for entry in swapped["functional"]] == ["hidden_act"]
    assert "not swapped: config hidden_act = 'silu' is called as a function, not a module" in format_swap(swapped)


MODEL_FILE = """
import torch


def build(width=6):
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ELU(alpha=0.5), torch.nn.Linear(width, 1))


def not_a_model():
    return 42
"""


def test_inspect_module_callable(tmp_path, monkeypatch, capsys):
    (tmp_path / "lab_test_models.py").write_text(MODEL_FILE)
    model = load_model(f"{tmp_path / 'lab_test_models.py'}:build")
    assert columns(inspect_model(model)) == [("1", "elu", {"alpha": 0.5}, False)]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["inspect", "lab_test_models:build", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "Sequential" and report["parameters"] == 2 * 6 + 6 + 6 + 1
    assert [(row["path"], row["kind"], row["params"]) for row in report["activations"]] == [
        ("1", "elu", {"alpha": 0.5})
    ]
    assert cli.main(["inspect", "lab_test_models:not_a_model"]) == 2
    assert "lab_test_models:not_a_model returned int, not a torch.nn.Module" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# swap


def two_unit_model(activation: nn.Module) -> nn.Sequential:
    """x -> (x + 0.5, -x) -> activation: pre-activations of -1.5, 2 (x = -2) and 3.5, -3 (x = 3)."""
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [-1.0]]))
        layer.bias.copy_(torch.tensor([0.5, 0.0]))
    return nn.Sequential(layer, activation)


def test_swap_relu_to_leaky_relu_then_patch():
    model = two_unit_model(nn.ReLU())
    x = torch.tensor([[-2.0], [3.0]])
    torch.testing.assert_close(model(x), torch.tensor([[0.0, 2.0], [3.5, 0.0]]))
    changes = swap(model, "relu", "leaky_relu:negative_slope=0.1")
    assert changes == [
        {
            "path": "1",
            "class": "torch.nn.modules.activation.ReLU",
            "before": "ReLU()",
            "after": "LeakyReLU(negative_slope=0.1)",
        }
    ]
    assert type(model[1]) is fusedact.nn.LeakyReLU
    expected = torch.tensor([[-0.15, 2.0], [3.5, -0.3]])
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(expected, torch.nn.functional.leaky_relu(model[0](x), 0.1))

    # fusedact.patch after the swap: the new activation adds the Linear's bias itself.
    (change,) = fusedact.patch(model).changes
    assert (change.path, change.action) == ("1", "fold_bias")
    assert isinstance(model[1], FoldedBias) and (model[1].activation, model[1].params) == (
        "leaky_relu",
        {"negative_slope": 0.1},
    )
    torch.testing.assert_close(model(x), expected)
    fusedact.unpatch(model)
    assert type(model[0]) is nn.Linear and type(model[1]) is fusedact.nn.LeakyReLU
    torch.testing.assert_close(model(x), expected)


def test_swap_on_a_patched_model_keeps_it_patched():
    model = two_unit_model(nn.ReLU())
    fusedact.patch(model)
    x = torch.tensor([[-2.0], [3.0]])
    (change,) = swap(model, "relu", "gelu_tanh")
    assert (change["before"], change["after"]) == ("ReLU()", "GELU(approximate='tanh')")
    assert isinstance(model[1], FoldedBias) and model[1].activation == "gelu"  # the bias is still folded
    expected = torch.nn.functional.gelu(torch.tensor([[-1.5, 2.0], [3.5, -3.0]]), approximate="tanh")
    torch.testing.assert_close(model(x), expected)
    fusedact.unpatch(model)  # the swapped model, unpatched
    assert type(model[0]) is nn.Linear and type(model[1]) is fusedact.nn.GELU
    torch.testing.assert_close(model(x), expected)


def test_swap_shared_modules_settings_filter_and_bias_act():
    act = nn.GELU(approximate="tanh")
    model = nn.Sequential(nn.Linear(2, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 4), nn.GELU())
    assert swap(model, "gelu:approximate=tanh", "silu") and [type(m).__name__ for m in model[1::2]] == [
        "SiLU",
        "SiLU",
        "GELU",
    ]
    assert model[1] is model[3]  # one new module where there was one
    assert swap(model, "relu", "tanh") == []
    bias_act = fusedact.nn.BiasAct(4, "relu")
    with torch.no_grad():
        bias_act.bias.fill_(-1.0)
    model = nn.Sequential(nn.Linear(2, 4, bias=False), bias_act)
    swap(model, "relu", "elu")
    assert type(model[1]) is fusedact.nn.BiasAct and model[1].bias is bias_act.bias  # the same Parameter
    torch.testing.assert_close(model(torch.zeros(1, 2)), torch.full((1, 4), math.expm1(-1.0)))


def bert_reference(model: nn.Module, activation: nn.Module) -> nn.Module:
    """An unpatched copy of ``model`` with torch's ``activation`` in every BERT MLP."""
    reference = copy.deepcopy(model)
    for layer in reference.encoder.layer:
        layer.intermediate.intermediate_act_fn = copy.deepcopy(activation)
    return reference


@needs_transformers_models
@pytest.mark.parametrize("patch", [False, True])
def test_swap_gelu_to_relu_on_bert(patch):
    torch.manual_seed(0)
    model = load_model("tiny-bert").eval()
    reference = bert_reference(model, nn.ReLU())
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        before = model(input_ids=tokens).last_hidden_state
        expected = reference(input_ids=tokens).last_hidden_state
    report = swap_model(model, "gelu", "relu", patch=patch)
    assert (report["kinds_before"], report["kinds_after"]) == ({"gelu": 2, "tanh": 1}, {"relu": 2, "tanh": 1})
    assert [change["path"] for change in report["changes"]] == TRANSFORMERS["tiny-bert"][0]
    assert report["functional"] == [] and report["repatched"] is False
    if patch:
        assert [change["action"] for change in report["patch"]["changes"]] == ["fold_bias"] * 3
        assert inspect_model(model)["fused"] == 3
    else:
        assert report["patch"] is None and inspect_model(model)["fused"] == 2
    with torch.no_grad():
        after = model(input_ids=tokens).last_hidden_state
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, msg="swapped BERT vs an unpatched BERT with nn.ReLU")


@needs_transformers_models
def test_swap_on_patched_llama_runs_the_new_gated_kernel():
    torch.manual_seed(0)
    model = load_model("tiny-llama").eval()
    reference = copy.deepcopy(model)
    for layer in reference.layers:
        layer.mlp.act_fn = nn.ReLU()
    fusedact.patch(model)
    report = swap_model(model, "silu", "relu")
    assert report["repatched"] and [change["action"] for change in report["patch"]["changes"]] == ["gated_mlp"] * 2
    assert "relu gated kernel" in report["patch"]["changes"][0]["after"]
    tokens = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=tokens).last_hidden_state,
            reference(input_ids=tokens).last_hidden_state,
            msg="swapped, patched Llama (ReGLU kernel) vs an unpatched Llama with nn.ReLU",
        )


@needs_transformers_models
def test_swap_command(capsys):
    argv = ["swap", "tiny-gpt2", "--from", "gelu", "--to", "leaky_relu:negative_slope=0.1", "--patch"]
    assert cli.main(argv) == 0
    output = capsys.readouterr().out
    assert "GPT2Model: gelu -> leaky_relu(negative_slope=0.1), 2 replaced" in output
    assert "h.1.mlp.act  NewGELUActivation()  ->  LeakyReLU(negative_slope=0.1)" in output
    assert "activations before: 2 gelu\nactivations after:  2 leaky_relu" in output
    assert "fusedact.patch (--patch):" in output and output.count("fold_bias") == 2
    assert cli.main(["swap", "tiny-bert", "--from", "gelu", "--to", "relu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kinds_after"] == {"relu": 2, "tanh": 1} and len(report["changes"]) == 2


def test_transformers_without_models_is_a_clear_error(monkeypatch):
    """Where transformers runs no models beside this torch (transformers 5 under torch 2.5), a built-in
    model is a LabError saying so, not transformers' "requires the PyTorch library" from inside."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    with pytest.raises(LabError, match=f"transformers {transformers.__version__} runs no models beside torch"):
        load_model("tiny-bert")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "tiny-lama"], "unknown built-in model 'tiny-lama' (did you mean 'tiny-llama'?)"),
        (["inspect", "no_such_model_anywhere"], "MODEL is a built-in tiny transformers model (tiny-llama,"),
        (["inspect", "no_such_package.models:build"], "cannot import 'no_such_package.models'"),
        pytest.param(
            ["swap", "tiny-bert", "--from", "relu", "--to", "gelu"],
            "no activation of kind 'relu' in BertModel; it has: gelu(approximate=none) x2, tanh x1",
            marks=needs_transformers_models,
        ),
        (
            ["swap", "tiny-bert", "--from", "gelu", "--to", "gelux"],
            "unknown activation 'gelux' (did you mean 'gelu'?); choose from: relu, leaky_relu,",
        ),
        (
            ["swap", "tiny-bert", "--from", "relux", "--to", "gelu"],
            "unknown activation kind 'relux' (did you mean 'relu'?); choose from: relu,",
        ),
        (
            ["swap", "tiny-bert", "--from", "gelu", "--to", "leaky_relu:slope=0.1"],
            "unexpected keyword 'slope' for leaky_relu; it takes: negative_slope",
        ),
        pytest.param(
            ["swap", "tiny-bert", "--from", "gelu", "--to", "swiglu"],
            "swiglu is gated (it halves the last dimension), gelu is not",
            marks=needs_transformers_models,
        ),
    ],
)
def test_inspect_and_swap_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fusedact {argv[0]}: error: ") and message in error


def test_swap_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["swap", "tiny-bert", "--to", "relu"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --from" in capsys.readouterr().err
    with pytest.raises(LabError, match="there is no parent"):
        swap(nn.ReLU(), "relu", "gelu")


def test_timm_inspect_and_swap():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False).eval()
    report = inspect_model(model)
    relus = report["counts"]["relu"]
    assert relus > 5
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected_shape = model(x).shape
    changes = swap(model, "relu", "leaky_relu:negative_slope=0.1")
    assert len(changes) == relus and inspect_model(model)["counts"] == {"leaky_relu(negative_slope=0.1)": relus}
    with torch.no_grad():
        assert model(x).shape == expected_shape
