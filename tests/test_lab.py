"""The activation lab (``fusedact inspect | swap | experiment | plot``): commands end to end on tiny settings,
and the numbers they report checked against what they must be."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fusedact
from fusedact.lab import cli
from fusedact.lab.experiment import ExperimentConfig, loss_spikiness, run_experiment, spirals
from fusedact.lab.plots import plot_activations
from fusedact.lab.specs import LabError, parse_activation

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
        ("relu:slope=0.1", "unexpected keyword"),
        ("elu:alpha", "expected key=value"),
    ],
)
def test_parse_activation_errors(text, message):
    with pytest.raises(LabError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_activation(text)


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


def test_python_dash_m_fusedact():
    completed = run_cli("--help")
    assert completed.returncode == 0
    for command in ("inspect", "swap", "experiment", "plot"):
        assert command in completed.stdout
    completed = run_cli("plot", "gelux")
    assert completed.returncode == 2
    assert "fusedact plot: error: unknown activation 'gelux' (did you mean 'gelu'?)" in completed.stderr
