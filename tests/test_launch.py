"""Every kernel launch goes through ``fusedact._triton.launch``, under the device guard of its tensors.

A model split over two GPUs calls fusedact with cuda:1's tensors while cuda:0 is current; Triton launches
on the current device and its current stream, so without the guard the kernel would run in the wrong
context. That needs two GPUs to see (``test_second_gpu`` below, skipped otherwise); on one machine these
tests prove the structure that makes it right: no launcher calls a kernel except through ``launch``
(read from the source), and every kernel that actually runs does so inside the guard (watched at run time
through the interpreter, with the device the guard was given).
"""

import ast
import contextlib
import os
from pathlib import Path

import pytest
import torch

import fusedact
from fusedact import _triton

TORCH_EXT = Path(fusedact.__file__).parent


def _subscripted_name(node: ast.Subscript) -> str:
    value = node.value
    return value.id if isinstance(value, ast.Name) else value.attr if isinstance(value, ast.Attribute) else ""


def _kernel_calls(tree: ast.AST):
    """(enclosing function name, line) of every ``<...kernel...>[grid](...)`` call in a module (fusedact's
    kernels are all named ``*_kernel``; the run-time test below catches a launch under any other name)."""

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Subscript)
                and "kernel" in _subscripted_name(child.func)
            ):
                yield function, child.lineno
            yield from visit(child, name)

    yield from visit(tree, None)


def test_only_launch_calls_kernels():
    """The source of fusedact: a Triton kernel is called (``kernel[grid](...)``) in ``launch`` only."""
    calls = []
    for path in sorted(TORCH_EXT.rglob("*.py")):
        for function, line in _kernel_calls(ast.parse(path.read_text())):
            calls.append((path.relative_to(TORCH_EXT).as_posix(), function, line))
    assert calls, "no kernel call found at all: the check lost track of the launchers"
    outside = [call for call in calls if call[:2] != ("_triton.py", "launch")]
    assert not outside, f"kernel calls outside _triton.launch (no device guard): {outside}"


def _every_op(device):
    """Forward and backward of every op family, with biases, on small tensors."""
    x = torch.randn(3, 8, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    fusedact.gelu(x, bias).sum().backward()
    fusedact.gelu(x).sum().backward()
    image = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    channel_bias = torch.randn(3, device=device, requires_grad=True)
    slope = torch.full((3,), 0.25, device=device, requires_grad=True)
    fusedact.prelu(image, slope, channel_bias).sum().backward()
    gate, up = (torch.randn(3, 8, device=device, requires_grad=True) for _ in range(2))
    fusedact.swiglu(gate, up, bias, bias).sum().backward()
    fusedact.swiglu_packed(torch.randn(3, 16, device=device, requires_grad=True)).sum().backward()
    fusedact.softmax(x, bias).sum().backward()
    fusedact.log_softmax(torch.randn(2, 9000, device=device, requires_grad=True)).sum().backward()


@pytest.mark.skipif(_triton is None or not fusedact.ops._KERNELS_INTERPRETED, reason="needs the interpreter")
def test_every_kernel_runs_inside_the_guard(monkeypatch):
    """Each kernel that runs (any op, forward and backward) runs inside ``device_guard`` for its tensors."""
    import triton.runtime.interpreter as interpreter

    guarded = []  # the devices of the guards currently entered
    launches = []
    # (every interpreted launch runs a GridExecutor: Triton 3.1's ``kernel[grid]`` builds one directly,
    # later versions through InterpretedFunction.run)
    real_guard, real_run = _triton.device_guard, interpreter.GridExecutor.__call__

    @contextlib.contextmanager
    def recording_guard(device):
        guarded.append(device)
        with real_guard(device):
            yield
        guarded.pop()

    def watched_run(self, *args, **kwargs):
        launches.append((self.fn.__name__, list(guarded)))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(_triton, "device_guard", recording_guard)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", watched_run)
    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("triton")
    try:
        _every_op("cpu")
    finally:
        fusedact.set_cpu_backend(previous)
    names = {name for name, _ in launches}
    expected = {"bias_act_fwd_kernel", "bias_act_bwd_kernel", "gated_fwd_kernel", "gated_bwd_kernel",
                "softmax_fwd_kernel", "softmax_bwd_kernel", "softmax_bwd_row_sums_kernel"}  # fmt: skip
    assert names == expected, f"kernels that ran: {sorted(names)}"
    unguarded = [name for name, devices in launches if devices != [torch.device("cpu")]]
    assert not unguarded, f"launched outside a device guard for their tensors: {unguarded}"


def test_guard_is_free_for_the_current_device():
    """No context switch where none is needed (the common single-GPU case costs nothing)."""
    assert isinstance(_triton.device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: every op's results and gradients equal the same ops' on
    cuda:0, bit for bit (run this on any machine with two GPUs: ``pytest tests/test_launch.py -k second``)."""
    results = {}
    for index in (0, 1):
        torch.manual_seed(0)
        device = torch.device("cuda", index)
        with torch.cuda.device(0):  # cuda:0 stays current throughout
            x = torch.randn(64, 4096, device=device, dtype=torch.bfloat16, requires_grad=True)
            bias = torch.randn(4096, device=device, dtype=torch.bfloat16, requires_grad=True)
            y = fusedact.gelu(x, bias)
            packed = fusedact.swiglu_packed(torch.cat([x, x], -1))
            probabilities = fusedact.softmax(x, bias)
            (y.float().sum() + packed.float().sum() + probabilities.float().sum()).backward()
            torch.cuda.synchronize(device)
        results[index] = [t.detach().cpu() for t in (y, packed, probabilities, x.grad, bias.grad)]
    for on_first, on_second in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(on_second, on_first, rtol=0, atol=0)


def test_launch_cache_convention():
    """Triton 3.3 and later launch compiled kernels with every bound argument (the cache's convention), so
    the cache is on for CUDA tensors; older Triton (3.1) passes only the runtime arguments, and every
    call goes through Triton. CPU tensors (the interpreter) never use it."""
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    takes_bound_args = _triton.LaunchCache.launcher_takes_bound_args()
    if version >= (3, 3) or version < (3, 2):  # (3.2 not read)
        assert takes_bound_args == (version >= (3, 3)), f"Triton {triton.__version__}'s launch convention changed"
    assert _triton.LAUNCH_CACHE.enabled == (takes_bound_args and os.environ.get("FUSEDACT_LAUNCH_CACHE") != "0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_launch_cache_bitwise():
    """Every op, forward and backward, twice through the cache (the second call a cached launch) and once
    through Triton's own launch: bitwise the same."""
    results, original = [], _triton.LAUNCH_CACHE.enabled
    for enabled in (False, True, True):
        _triton.LAUNCH_CACHE.enabled = enabled
        try:
            torch.manual_seed(0)
            x = torch.randn(64, 760, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            bias = torch.randn(760, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            outputs = [fusedact.gelu(x, bias), fusedact.swiglu_packed(torch.cat([x, x], -1)), fusedact.softmax(x, bias)]
            sum(o.float().sum() for o in outputs).backward()
            results.append([t.detach().clone() for t in (*outputs, x.grad, bias.grad)])
        finally:
            _triton.LAUNCH_CACHE.enabled = original
    for other in results[1:]:
        for expected, actual in zip(results[0], other, strict=True):
            assert torch.equal(expected, actual)
