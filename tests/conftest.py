"""Test setup: which backends run the tests on this machine.

Without a GPU, ``TRITON_INTERPRET=1`` is set before fusedact (and so Triton's ``@jit``) is first imported,
so the Triton kernels themselves run on CPU tensors through Triton's interpreter. With a GPU the kernels
run compiled on CUDA tensors and the interpreter is left off.

Backends, each a parameter of the ``device`` fixture (which yields the device to put tensors on):
- ``"torch"``: CPU tensors through the PyTorch fallback;
- ``"triton-interpreter"``: CPU tensors through the Triton kernels, interpreted (no GPU present);
- ``"cuda"``: CUDA tensors through the compiled Triton kernels (GPU present).
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedact  # noqa: E402

HAS_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
if HAS_INTERPRETER and fusedact.ops.interpreter_problem():
    # Never test through an interpreter that gives wrong answers: say so loudly instead of skipping quietly.
    raise pytest.UsageError(f"fusedact's kernels cannot be tested here: {fusedact.ops.interpreter_problem()}")
BACKENDS = ["torch"] + (["triton-interpreter"] if HAS_INTERPRETER else []) + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=BACKENDS)
def device(request):
    """Yields the device to put tensors on, with fusedact's CPU backend set for the backend under test."""
    name = request.param
    previous = fusedact.get_cpu_backend()
    if name == "torch":
        fusedact.set_cpu_backend("torch")
    elif name == "triton-interpreter":
        fusedact.set_cpu_backend("triton")
    yield "cuda" if name == "cuda" else "cpu"
    fusedact.set_cpu_backend(previous)


def _subnormals_flushed() -> bool:
    return bool(torch.tensor(1e-39) * 1.0 == 0)


# PyTorch 2.5's inductor builds its CPU code with -ffast-math, whose library sets flush-to-zero in the
# thread that loads it (newer PyTorch's does not), and threads started later inherit it: every later test
# would see subnormal inputs and results flushed to 0, PyTorch's own ops too. The intra-op threads start
# now, before any test compiles (one parallel op), and the fixture below resets the main thread.
torch.full((1 << 20,), 1.0).sum()


@pytest.fixture(autouse=True)
def _keep_subnormals():
    """Subnormals stay as they were after every test (see above)."""
    flushed = _subnormals_flushed()
    yield
    if _subnormals_flushed() != flushed:
        torch.set_flush_denormal(flushed)
