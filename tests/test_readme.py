"""Every ```python snippet of README.md runs as written (issue 11: the "Use" example failed on its last line).

The snippets are found anew on every run, so one added to the README is tested without touching this file.
The rules, which are the README's side of the contract:

- Snippets run in README order, in one namespace, as a reader pastes them into one Python session: a later
  snippet may use what an earlier one made (``torch``, ``fusedact``, ``gate``, ``up``).
- Without a CUDA GPU the device is rewritten, and nothing else: ``device="cuda"`` (or ``'cuda'``) becomes
  ``device="cpu"`` and ``.cuda()`` becomes ``.cpu()``. With a GPU the snippets run exactly as written.
- CPU tensors run the PyTorch fallback (``fusedact.set_cpu_backend("torch")``): the README's sizes (a
  1.6M-element feature map) would take minutes in the Triton interpreter, whose numerics tests/test_ops.py
  checks on small tensors.
- A snippet right after the line ``<!-- not-run: REASON -->`` cannot run as written on a machine without a
  network. Where this file has a substitute for REASON (``SUBSTITUTES``), the snippet runs with it:
  ``downloads weights``: ``from_pretrained`` builds a tiny random-weight model of the same family (Llama,
  GPT-2, BERT, T5, ViT: ``fusedact.lab.models.TINY_MODELS``) with the dtype asked for, so nothing is
  downloaded. Any other REASON skips the snippet, and the skip says why.
- A snippet passes when it ran to its last line: the test appends a statement to it and checks that statement
  ran; an empty snippet fails.

Also here: the README's base install (``pip install -e .``: torch and triton, no numpy) imports quietly.

About 5 s, most of it importing transformers for the patch example and a fresh interpreter for the import.
"""

import ast
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from optional import transformers_with_models

import fusedact
from fusedact.lab.models import TINY_MODELS

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPOSITORY, "README.md")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.*?)\s*-->$")
SENTINEL = "__readme_snippet_ran__"


@dataclass
class Snippet:
    line: int  # of the opening fence, counted from 1
    section: str  # the nearest heading above it
    code: str
    not_run: Optional[str]  # the reason of a `<!-- not-run: ... -->` marker right above the fence

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.section})"


def readme_snippets(text: str) -> list[Snippet]:
    """The ```python blocks of ``text`` with their line, section and not-run marker."""
    lines = text.splitlines()
    snippets, section, index = [], "top", 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.strip() == "```python":
            end = next((later for later in range(index + 1, len(lines)) if lines[later].strip() == "```"), len(lines))
            above = next((lines[earlier].strip() for earlier in range(index - 1, -1, -1) if lines[earlier].strip()), "")
            marker = NOT_RUN.match(above)
            snippets.append(
                Snippet(index + 1, section, "\n".join(lines[index + 1 : end]) + "\n", marker and marker["reason"])
            )
            index = end
        index += 1
    return snippets


def for_this_machine(code: str) -> str:
    """The device rewrite of the module docstring, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return code
    code = re.sub(r"""device=(["'])cuda\1""", 'device="cpu"', code)
    return code.replace(".cuda()", ".cpu()")


# ---------------------------------------------------------------------------------------------------
# Substitutes for what a snippet cannot do offline


# A word in a hub model id -> the built-in tiny model of that family.
FAMILIES = {"llama": "tiny-llama", "gpt2": "tiny-gpt2", "bert": "tiny-bert", "t5": "tiny-t5", "vit": "tiny-vit"}


@contextlib.contextmanager
def tiny_from_pretrained():
    """``from_pretrained(name, ...)`` of the Auto classes and of every model class: a random-weight tiny model of
    ``name``'s family in the dtype asked for (``dtype=`` or ``torch_dtype=``), nothing downloaded."""
    transformers = transformers_with_models()
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def tiny(cls, name, *args, **kwargs):
        family = next((family for family in FAMILIES if family in str(name).lower().replace("-", "")), None)
        if family is None:
            pytest.skip(f"no tiny substitute for {name!r}: its family is none of {sorted(FAMILIES)}")
        class_name, settings = TINY_MODELS[FAMILIES[family]]
        config = getattr(transformers, class_name)(**settings)
        model = cls.from_config(config) if issubclass(cls, _BaseAutoModelClass) else cls(config)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return model.to(dtype) if isinstance(dtype, torch.dtype) else model

    importlib.import_module("transformers.models.auto.modeling_auto")  # the Auto classes, made before the patch
    # Each Auto class holds its own copy of the method (transformers copies it in when it makes the class).
    classes, owners = [_BaseAutoModelClass, transformers.PreTrainedModel], []
    while classes:
        cls = classes.pop()
        owners += [cls] if "from_pretrained" in cls.__dict__ else []
        classes += cls.__subclasses__()
    saved = {owner: owner.__dict__["from_pretrained"] for owner in owners}
    try:
        for owner in saved:
            owner.from_pretrained = classmethod(tiny)
        yield
    finally:
        for owner, original in saved.items():
            owner.from_pretrained = original


SUBSTITUTES = {"downloads weights": tiny_from_pretrained}


# ---------------------------------------------------------------------------------------------------
# Running them


@dataclass
class Outcome:
    ran: bool = False
    error: Optional[BaseException] = None
    skipped: Optional[str] = None
    output: str = ""


def run_snippet(snippet: Snippet, namespace: dict) -> Outcome:
    outcome = Outcome()
    code = for_this_machine(snippet.code)
    tree = ast.parse(code, snippet.name)
    if not tree.body:
        outcome.error = AssertionError(f"{snippet.name} has no statement to run")
        return outcome
    # The appended statement runs only once every statement above it has.
    tree.body.append(ast.parse(f"{SENTINEL} = {snippet.line}").body[0])
    namespace.pop(SENTINEL, None)
    if snippet.not_run is not None and snippet.not_run not in SUBSTITUTES:
        outcome.skipped = f"{snippet.name} is marked not-run ({snippet.not_run}) and has no offline substitute"
        return outcome
    substitute = SUBSTITUTES[snippet.not_run]() if snippet.not_run is not None else contextlib.nullcontext()
    output = io.StringIO()
    try:
        with substitute, contextlib.redirect_stdout(output):
            exec(compile(tree, snippet.name, "exec"), namespace)
    except pytest.skip.Exception as skip:
        outcome.skipped = f"{snippet.name}: {skip}"
    except Exception as error:  # reported by the snippet's own test
        outcome.error = error
    outcome.ran = namespace.get(SENTINEL) == snippet.line
    outcome.output = output.getvalue()
    return outcome


with open(README) as _file:
    SNIPPETS = readme_snippets(_file.read())


@pytest.fixture(scope="module")
def outcomes():
    """Every snippet run once, in order, in one namespace (the first rule of the module docstring)."""
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")
    namespace: dict = {"__name__": "__readme__"}
    try:
        yield namespace, [run_snippet(snippet, namespace) for snippet in SNIPPETS]
    finally:
        fusedact.set_cpu_backend(previous)


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[snippet.name for snippet in SNIPPETS])
def test_readme_snippet_runs(index, outcomes):
    _, results = outcomes
    outcome, snippet = results[index], SNIPPETS[index]
    if outcome.skipped:
        print(outcome.skipped)
        pytest.skip(outcome.skipped)
    if outcome.error is not None:
        raise AssertionError(f"{snippet.name} failed as written:\n{for_this_machine(snippet.code)}") from outcome.error
    assert outcome.ran, f"{snippet.name} did not reach its last line"


def test_the_readme_has_snippets_where_expected():
    """The extraction itself: the Use section's examples are found, the patch example carries its marker."""
    sections = [snippet.section for snippet in SNIPPETS]
    assert sections.count("Use") >= 2, sections
    (patch,) = [snippet for snippet in SNIPPETS if "from_pretrained(" in snippet.code]
    assert patch.not_run == "downloads weights"
    assert all(snippet.not_run in (None, *SUBSTITUTES) for snippet in SNIPPETS if "from_pretrained(" in snippet.code)


def test_marker_and_device_rules():
    text = "# T\n\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU cluster -->\n```python\ny = 2\n```\n"
    text += "```bash\nz\n```\n"
    first, second = readme_snippets(text)
    assert (first.line, first.section, first.code, first.not_run) == (3, "T", "x = 1\n", None)
    assert (second.line, second.not_run) == (8, "needs a GPU cluster")
    outcome = run_snippet(second, {})
    assert outcome.skipped and "needs a GPU cluster" in outcome.skipped and not outcome.ran
    broken = run_snippet(readme_snippets("```python\nx = 1\nraise ValueError('no')\n```\n")[0], {})
    assert isinstance(broken.error, ValueError) and not broken.ran
    if not torch.cuda.is_available():
        assert for_this_machine('t = torch.zeros(2, device="cuda").cuda()') == 't = torch.zeros(2, device="cpu").cpu()'


def test_use_example_backward_fills_both_gradients(outcomes):
    """The line the issue was about: after the Use example, ``x.grad`` and ``b.grad`` hold the gradient of
    ``sum(gelu(x + b))``, and the bias gradient is the column sum of the input's (dz/db broadcasts dz/dx = 1).

    bf16: each of x.grad's elements is rounded once, b.grad is summed in fp32 and rounded once, so the two
    sums of 8 rows differ by at most a few bf16 ulps of the sum (2^-8 relative each): rtol 2^-6."""
    namespace, _ = outcomes
    x, b = namespace.get("x"), namespace.get("b")
    assert x is not None and x.grad is not None and b.grad is not None
    torch.testing.assert_close(b.grad.float(), x.grad.float().sum(0), rtol=2**-6, atol=2**-6)
    z = x.detach().double() + b.detach().double()
    reference = 0.5 * (1 + torch.erf(z / 2**0.5)) + z * torch.exp(-z * z / 2) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(x.grad.double(), reference, rtol=2**-7, atol=2**-7)  # bf16: 1 ulp is 2^-8 relative


# Run first in a fresh interpreter: numpy cannot be imported, as on the base install (numpy is no dependency).
WITHOUT_NUMPY = """
import importlib.abc, sys

class NoNumpy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoNumpy())
"""


def test_base_install_imports_quietly_without_numpy():
    """``import fusedact`` without numpy prints nothing (torch's own import warns "Failed to initialize NumPy";
    fusedact imports it quietly, which also quiets an ``import torch`` after it), and the library works: gelu
    with a bias and its backward on CPU match PyTorch's ``F.gelu(x + b)`` in float32 (the same erf formula in
    both: 1e-6)."""
    check = """
import fusedact  # first, as isort orders them and as the README's Use example does
import torch

x = torch.linspace(-4, 4, 24).reshape(3, 8).requires_grad_(True)
b = torch.linspace(-1, 1, 8).requires_grad_(True)
fusedact.gelu(x, b).sum().backward()
x_ref, b_ref = x.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
expected = torch.nn.functional.gelu(x_ref + b_ref)
expected.sum().backward()
torch.testing.assert_close(fusedact.gelu(x, b), expected, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-6, atol=1e-6)
assert "numpy" not in sys.modules
print("fusedact ran without numpy")
"""
    environment = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "PYTHONWARNINGS")}
    completed = subprocess.run(
        [sys.executable, "-W", "default", "-c", WITHOUT_NUMPY + check],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "fusedact ran without numpy\n"
    assert completed.stderr == "", completed.stderr
