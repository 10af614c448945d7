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
