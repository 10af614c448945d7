"""The lean MLP blocks (``fusedact.mlp``): the fused path's numbers, with less kept for backward.

The fused path is ``F.linear`` -> ``fusedact.gated`` / ``gated_packed`` / ``bias_act`` (the first bias in
the kernel) -> ``F.linear``, differentiated by autograd. The lean blocks run the same kernels and the GEMMs
autograd runs for ``F.linear``, so outputs and every gradient are held to it **bitwise** on every backend
of this machine, for 2-D and 3-D inputs, contiguous, sliced (a row stride of 2H) and transposed, with and
without biases; and to eager PyTorch in float64 (the fallback's fp64 path: 1e-12 relative, test_ops.py's
fp64 tolerance) so that "equal to the fused path" is also "right".

What is kept for backward is counted with ``torch.autograd.graph.saved_tensors_hooks`` (parameters
excluded, each storage once), here per call and in ``bench.saved_memory``'s quick run (the issue's
targets: [T, F] tensors beside x, gated 4 / 3 / 2 for eager / fused / lean, GELU 2 / 2 / 1).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from optional import transformers_with_models
from torch import nn
from torch.utils.checkpoint import checkpoint

import fusedact
from fusedact import mlp as lean

T, H, FF = 12, 24, 40  # tokens, hidden, intermediate: small (the interpreter runs every kernel), all distinct
GATED_ACTIVATIONS = [("silu", {}), ("gelu", {}), ("gelu", {"approximate": "tanh"}), ("relu", {})]
SINGLE_ACTIVATIONS = [("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("relu", {})]
LAYOUTS = ["contiguous", "sliced", "transposed"]
SHAPES = [(T, H), (3, 4, H)]


def _cases(activations):
    """Every layout x shape x bias with the first activation (the GEMMs' side), and every activation on a
    3-D input with biases (the kernels' side): what each part of the block depends on, without the product."""
    first, *others = activations
    layouts = [(*first, layout, shape, bias) for layout in LAYOUTS for shape in SHAPES for bias in (False, True)]
    return layouts + [(*activation, "contiguous", SHAPES[1], True) for activation in others]


def _case_ids(value):
    if isinstance(value, tuple):
        return f"{len(value)}d"
    if isinstance(value, dict):
        return "-".join(f"{k}={v}" for k, v in value.items()) or "default"
    if isinstance(value, bool):
        return "bias" if value else "nobias"
    return str(value)


def _randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)


def _input(shape, layout, seed, dtype=torch.float32, device="cpu"):
    """x of ``shape`` laid out as asked: contiguous, a slice of a twice-as-wide tensor, or a transpose."""
    if layout == "sliced":
        return _randn(*shape[:-1], 2 * shape[-1], seed=seed, dtype=dtype, device=device)[..., : shape[-1]]
    if layout == "transposed":  # 2-D: column-major; 3-D: the two leading dimensions swapped (rows not a view)
        if len(shape) == 2:
            return _randn(shape[1], shape[0], seed=seed, dtype=dtype, device=device).t()
        return _randn(shape[1], shape[0], *shape[2:], seed=seed, dtype=dtype, device=device).transpose(0, 1)
    return _randn(*shape, seed=seed, dtype=dtype, device=device)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _output_and_grads(function, tensors, seed=99):
    leaves = _leaves(*tensors)
    out = function(*leaves)
    grad = _randn(*out.shape, seed=seed, dtype=out.dtype, device=out.device)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _assert_bitwise(actual, expected, what=""):
    (out, grads), (out_ref, grads_ref) = actual, expected
    assert out.dtype == out_ref.dtype and torch.equal(out, out_ref), f"{what} output"
    for index, (grad, grad_ref) in enumerate(zip(grads, grads_ref, strict=True)):
        assert (grad is None) == (grad_ref is None), f"{what} gradient {index}"
        if grad is not None:
            assert grad.dtype == grad_ref.dtype and torch.equal(grad, grad_ref), f"{what} gradient {index}"


def _gated_tensors(shape, layout, bias, device, dtype=torch.float32):
    x = _input(shape, layout, 1, dtype, device)
    weights = [
        _randn(FF, H, seed=2, dtype=dtype, device=device, scale=H**-0.5),
        _randn(FF, H, seed=3, dtype=dtype, device=device, scale=H**-0.5),
        _randn(H, FF, seed=4, dtype=dtype, device=device, scale=FF**-0.5),
    ]
    biases = [_randn(n, seed=5 + i, dtype=dtype, device=device) if bias else None for i, n in enumerate((FF, FF, H))]
    return (x, *weights, *biases)


def fused_gated(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, activation="silu", **params):
    """The fused path the lean gated block must equal: two GEMMs, the gated kernel with both biases, a GEMM."""
    h = fusedact.gated(F.linear(x, gate_weight), F.linear(x, up_weight), gate_bias, up_bias, activation, **params)
    return F.linear(h, down_weight, down_bias)


def fused_packed(x, gate_up_weight, down_weight, gate_up_bias, down_bias, activation="silu", gate_first=True):
    h = fusedact.gated_packed(F.linear(x, gate_up_weight), gate_up_bias, activation, gate_first=gate_first)
    return F.linear(h, down_weight, down_bias)


def fused_mlp(x, fc1_weight, fc2_weight, fc1_bias, fc2_bias, activation="gelu", **params):
    return F.linear(fusedact.bias_act(F.linear(x, fc1_weight), fc1_bias, activation, **params), fc2_weight, fc2_bias)


@pytest.mark.parametrize("activation,params,layout,shape,bias", _cases(GATED_ACTIVATIONS), ids=_case_ids)
def test_gated_mlp_is_bitwise_the_fused_path(activation, params, layout, shape, bias, device):
    tensors = _gated_tensors(shape, layout, bias, device)
    expected = _output_and_grads(lambda *t: fused_gated(*t, activation, **params), tensors)
    actual = _output_and_grads(lambda *t: lean.gated_mlp(*t, activation, **params), tensors)
    _assert_bitwise(actual, expected)


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_up", "up_gate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_packed_gated_mlp_is_bitwise_the_fused_path(gate_first, layout, shape, bias, device):
    x = _input(shape, layout, 1, device=device)
    gate_up_weight = _randn(2 * FF, H, seed=2, device=device, scale=H**-0.5)
    down_weight = _randn(H, FF, seed=4, device=device, scale=FF**-0.5)
    biases = (_randn(2 * FF, seed=5, device=device), _randn(H, seed=6, device=device)) if bias else (None, None)
    tensors = (x, gate_up_weight, down_weight, *biases)
    expected = _output_and_grads(lambda *t: fused_packed(*t, "silu", gate_first), tensors)
    actual = _output_and_grads(lambda *t: lean.gated_mlp_packed(*t, "silu", gate_first), tensors)
    _assert_bitwise(actual, expected)


def _mlp_tensors(shape, layout, bias, device, dtype=torch.float32):
    x = _input(shape, layout, 1, dtype, device)
    fc1 = _randn(FF, H, seed=2, dtype=dtype, device=device, scale=H**-0.5)
    fc2 = _randn(H, FF, seed=3, dtype=dtype, device=device, scale=FF**-0.5)
    biases = (_randn(FF, seed=4, dtype=dtype, device=device), _randn(H, seed=5, dtype=dtype, device=device))
    return (x, fc1, fc2, *(biases if bias else (None, None)))


@pytest.mark.parametrize("activation,params,layout,shape,bias", _cases(SINGLE_ACTIVATIONS), ids=_case_ids)
def test_two_layer_mlp_is_bitwise_the_fused_path(activation, params, layout, shape, bias, device):
    tensors = _mlp_tensors(shape, layout, bias, device)
    expected = _output_and_grads(lambda *t: fused_mlp(*t, activation, **params), tensors)
    actual = _output_and_grads(lambda *t: lean.mlp(*t, activation, **params), tensors)
    _assert_bitwise(actual, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_bitwise_the_fused_path(dtype, device):
    """bf16 / fp16: the recomputed h is the forward's rounding of the fp32 result, bit for bit."""
    tensors = _gated_tensors((3, 4, H), "contiguous", True, device, dtype)
    _assert_bitwise(
        _output_and_grads(lambda *t: lean.gated_mlp(*t, "gelu", approximate="tanh"), tensors),
        _output_and_grads(lambda *t: fused_gated(*t, "gelu", approximate="tanh"), tensors),
    )
    tensors = _mlp_tensors((3, 4, H), "contiguous", True, device, dtype)
    _assert_bitwise(
        _output_and_grads(lambda *t: lean.mlp(*t, "silu"), tensors),
        _output_and_grads(lambda *t: fused_mlp(*t, "silu"), tensors),
    )


def test_float64_equals_eager_pytorch():
    """The same blocks in PyTorch's own ops, float64 (fusedact's fp64 is the fallback): 1e-12 relative."""
    gated = _gated_tensors((3, 4, H), "contiguous", True, "cpu", torch.float64)

    def eager_gated(x, wg, wu, wd, bg, bu, bd):
        return F.linear(F.gelu(F.linear(x, wg, bg), approximate="tanh") * F.linear(x, wu, bu), wd, bd)

    def eager_mlp(x, w1, w2, b1, b2):
        return F.linear(F.silu(F.linear(x, w1, b1)), w2, b2)

    two_layer = _mlp_tensors((3, 4, H), "contiguous", True, "cpu", torch.float64)
    cases = [
        (gated, eager_gated, lambda *t: lean.gated_mlp(*t, "gelu", approximate="tanh")),
        (two_layer, eager_mlp, lambda *t: lean.mlp(*t, "silu")),
    ]
    for tensors, eager, function in cases:
        (out, grads), (out_ref, grads_ref) = _output_and_grads(function, tensors), _output_and_grads(eager, tensors)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)


# --- What is kept for backward -------------------------------------------------------------------------


def _saved_bytes(function, exclude) -> list[int]:
    """Bytes of each storage autograd saves while ``function()`` runs, each once, without ``exclude``'s
    (the weights and biases: not activations)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function()
    return sorted(storages.values())


def test_saved_tensors_are_x_and_the_block_inputs_only(device):
    """Gated: x, gate, up (the fused path also keeps h); two-layer: x and z (the fused path also keeps
    act(z)); a two-layer block whose activation saves its output is the fused path itself: x and act(z)."""
    x_bytes, inner = T * H * 4, T * FF * 4
    x, *parameters = _leaves(*_gated_tensors((T, H), "contiguous", True, device))
    assert _saved_bytes(lambda: lean.gated_mlp(x, *parameters), parameters) == [x_bytes, inner, inner]
    assert _saved_bytes(lambda: fused_gated(x, *parameters), parameters) == [x_bytes, inner, inner, inner]
    packed_weight = _leaves(torch.randn(2 * FF, H, device=device), torch.randn(H, FF, device=device))
    assert _saved_bytes(lambda: lean.gated_mlp_packed(x, *packed_weight), packed_weight) == [x_bytes, 2 * inner]
    x, *parameters = _leaves(*_mlp_tensors((T, H), "contiguous", True, device))
    assert _saved_bytes(lambda: lean.mlp(x, *parameters, "gelu"), parameters) == [x_bytes, inner]
    assert _saved_bytes(lambda: fused_mlp(x, *parameters, "gelu"), parameters) == [x_bytes, inner, inner]
    assert _saved_bytes(lambda: lean.mlp(x, *parameters, "relu"), parameters) == [x_bytes, inner]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_nothing_is_saved_without_grad(mode, device):
    tensors = _leaves(*_gated_tensors((T, H), "contiguous", True, device))
    expected = lean.gated_mlp(*tensors).detach()
    with getattr(torch, mode)():
        saved = _saved_bytes(lambda: lean.gated_mlp(*tensors), ())
        out = lean.gated_mlp(*tensors)
        out_mlp = lean.mlp(*_mlp_tensors((T, H), "contiguous", True, device), "gelu")
    assert saved == [] and not out.requires_grad and not out_mlp.requires_grad
    assert torch.equal(out, expected)


def test_an_inference_tensor_input_with_trainable_weights(device):
    """x made under inference_mode, weights that require grad: kept as a copy (what eager's add keeps)."""
    x, *parameters = _gated_tensors((T, H), "contiguous", True, device)
    with torch.inference_mode():
        frozen_x = x.clone()
    expected = _output_and_grads(lambda *p: lean.gated_mlp(x, *p), parameters)
    actual = _output_and_grads(lambda *p: lean.gated_mlp(frozen_x, *p), parameters)
    _assert_bitwise(actual, expected)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpoint_keeps_only_the_input_and_gives_the_same_gradients(use_reentrant, device):
    """Around a lean block, torch.utils.checkpoint keeps its input alone (nothing saved twice) and the
    recomputation in backward gives the same gradients, bitwise."""
    tensors = _gated_tensors((3, 4, H), "contiguous", True, device)

    def checkpointed(x, *parameters):
        return checkpoint(lambda x: lean.gated_mlp(x, *parameters, "gelu"), x, use_reentrant=use_reentrant)

    _assert_bitwise(
        _output_and_grads(checkpointed, tensors), _output_and_grads(lambda *t: lean.gated_mlp(*t, "gelu"), tensors)
    )
    x, *parameters = _leaves(*tensors)
    assert _saved_bytes(lambda: checkpointed(x, *parameters), parameters) == [x.numel() * 4]


def test_tensor_hooks_see_the_output_and_input_gradients(device):
    x, *parameters = _leaves(*_mlp_tensors((T, H), "contiguous", True, device))
    seen = []
    x.register_hook(lambda grad: seen.append("x"))
    out = lean.mlp(x, *parameters, "gelu")
    out.register_hook(lambda grad: seen.append("out") or 2 * grad)
    out.sum().backward()
    reference_x = x.detach().clone().requires_grad_()
    (2 * fused_mlp(reference_x, *(p.detach() for p in parameters), "gelu")).sum().backward()
    assert seen == ["out", "x"] and torch.equal(x.grad, reference_x.grad)


# --- Double backward ------------------------------------------------------------------------------------


def _small_float64(block):
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    if block == "gated":
        return (randn(2, 3, 4), randn(5, 4), randn(5, 4), randn(4, 5), randn(5), randn(5), randn(4))
    if block == "packed":
        return (randn(3, 4), randn(10, 4), randn(4, 5), randn(10), randn(4))
    return (randn(2, 3, 4), randn(5, 4), randn(4, 5), randn(5), randn(4))


BLOCK_FUNCTIONS = {
    "gated": lambda *t: lean.gated_mlp(*t, "gelu", approximate="tanh"),
    "swiglu": lambda *t: lean.gated_mlp(*t, "silu"),
    "packed": lambda *t: lean.gated_mlp_packed(*t, activation="silu", gate_first=False),
    "mlp": lambda *t: lean.mlp(*t, "gelu"),
    "mlp_silu": lambda *t: lean.mlp(*t, "silu"),
}


@pytest.mark.parametrize("block", BLOCK_FUNCTIONS)
def test_gradgradcheck_float64(block):
    """create_graph=True differentiates the block recomputed in PyTorch ops: PyTorch's second derivatives."""
    inputs = _small_float64(block.split("_")[0] if block != "swiglu" else "gated")
    assert torch.autograd.gradgradcheck(BLOCK_FUNCTIONS[block], inputs)


def test_hessian_vector_product_fp32_matches_float64_eager(device):
    """fp32 on every backend: the gradient of |grad_x|^2 against eager PyTorch in float64 (values O(1),
    sums of at most 40 products: 1e-5 of the largest magnitude covers fp32's roundings with margin)."""
    tensors = _gated_tensors((T, H), "contiguous", True, device)

    def second_order(function, tensors):
        leaves = _leaves(*tensors)
        out = function(*leaves)
        (grad_x,) = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), leaves)

    def eager(x, wg, wu, wd, bg, bu, bd):
        return F.linear(F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), wd, bd)

    actual = second_order(lambda *t: lean.gated_mlp(*t), tensors)
    expected = second_order(eager, [t.double() for t in tensors])
    for grad, grad_ref in zip(actual, expected, strict=True):
        torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-5, atol=1e-5 * grad_ref.abs().max().item())


# --- torch.compile, the registered ops -------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_fullgraph_is_bitwise_eager():
    """The registered ops (fake impls, autograd formulas) trace without graph breaks; aot_eager then runs
    the same implementations, so the results are the eager blocks' bitwise."""
    cases = [
        (BLOCK_FUNCTIONS["gated"], _gated_tensors((3, 4, H), "sliced", True, "cpu")),
        (BLOCK_FUNCTIONS["packed"], (_input((T, H), "contiguous", 1), torch.randn(2 * FF, H), torch.randn(H, FF))),
        (BLOCK_FUNCTIONS["mlp"], _mlp_tensors((3, 4, H), "contiguous", True, "cpu")),
    ]
    for function, tensors in cases:
        compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
        _assert_bitwise(_output_and_grads(compiled, tensors), _output_and_grads(function, tensors))
    mlp, _ = _patched()  # the layer entry too: its checks of classes and hooks trace
    x = _randn(3, 4, H, seed=1)
    compiled = torch.compile(lambda x: lean_forward(mlp, x), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), lean_forward(mlp, x))


def test_opcheck_the_registered_ops():
    """Schema, fake implementations (shapes and strides of every output), autograd registration."""
    x = torch.randn(3, 4, H, requires_grad=True)
    wg, wu, wd = (torch.randn(FF, H, requires_grad=True), torch.randn(FF, H, requires_grad=True), torch.randn(H, FF))
    bg, bd = torch.randn(FF, requires_grad=True), torch.randn(H)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(
        lean.gated_mlp_op, (x, wg.t(), wu.t(), wd.t(), bg, None, bd, "swish", 1.0, 0.0), test_utils=checks
    )
    out, gate, up = lean.gated_mlp_op(x, wg.t(), wu.t(), wd.t(), bg, None, bd, "swish", 1.0, 0.0)
    detached = [t.detach() for t in (x, gate, up, wg.t(), wu.t(), wd.t(), bg)]
    args = (torch.randn_like(out), *detached, None, bd, "swish", 1.0, 0.0, [True, True, False, True, True, False, True])
    torch.library.opcheck(lean.gated_mlp_backward_op, args, test_utils=checks)
    wgu = torch.randn(2 * FF, H, requires_grad=True)
    torch.library.opcheck(lean.gated_mlp_packed_op, (x, wgu.t(), wd.t(), None, bd, "relu", 0.0, 0.0, False))
    out, gate_up = lean.gated_mlp_packed_op(x, wgu.t(), wd.t(), None, bd, "relu", 0.0, 0.0, False)
    args = (torch.randn_like(out), x.detach(), gate_up.detach(), wgu.detach().t(), wd.t(), None, bd, "relu", 0.0, 0.0)
    torch.library.opcheck(lean.gated_mlp_packed_backward_op, (*args, False, [True] * 5), test_utils=checks)
    torch.library.opcheck(lean.mlp_op, (x, wg.t(), wd.t(), bg, bd, "gelu", 0.0, 0.0))
    out, z = lean.mlp_op(x, wg.t(), wd.t(), bg, bd, "gelu", 0.0, 0.0)
    args = (torch.randn_like(out), x.detach(), z.detach(), wg.detach().t(), wd.t(), bg.detach(), bd, "gelu", 0.0, 0.0)
    torch.library.opcheck(lean.mlp_backward_op, (*args, [True, False, True, True, True]), test_utils=checks)


# --- Autocast -------------------------------------------------------------------------------------------


def test_autocast_bf16_is_bitwise_the_fused_path():
    """Under CPU autocast every GEMM runs in bf16 as F.linear's would (x, weights and the down bias cast),
    a folded bias is cast to the GEMM output's dtype as fusedact.patch casts it, and fp32 weights get fp32
    gradients through the casts."""
    tensors = _gated_tensors((3, 4, H), "contiguous", True, "cpu")

    def fused_autocast(x, wg, wu, wd, bg, bu, bd):
        gate, up = F.linear(x, wg), F.linear(x, wu)
        return F.linear(fusedact.gated(gate, up, bg.to(gate.dtype), bu.to(up.dtype)), wd, bd)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = _output_and_grads(lean.gated_mlp, tensors)
        expected = _output_and_grads(fused_autocast, tensors)
    assert actual[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in actual[1])
    _assert_bitwise(actual, expected)


# --- Layers: the lean block where it computes what the layers would, the layers elsewhere -----------------


class GatedMLP(nn.Module):
    """Llama's MLP as transformers writes it (fusedact.patch proves it from this forward)."""

    def __init__(self, bias=True):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, FF, bias=bias), nn.Linear(H, FF, bias=bias)
        self.down_proj = nn.Linear(FF, H, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def lean_forward(mlp: nn.Module, x):
    """What a patched gated MLP runs (patching.gated_mlp._lean_gated_mlp_forward), called by hand."""
    activation, params, gate_bias_of, up_bias_of = mlp._fusedact_gated
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return lean.gated_mlp_of(x, *projections, activation, gate_bias_of, up_bias_of, **params)


class LoRA(nn.Module):
    """A LoRA-style wrapper put around a projection after patching: its own forward must run."""

    def __init__(self, base: nn.Module, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _patched(seed=0, bias=True, lean_mlp=True):
    torch.manual_seed(seed)
    mlp = GatedMLP(bias)
    original = copy.deepcopy(mlp)
    fusedact.patch(mlp, lean_mlp=lean_mlp)
    return mlp, original


def _grads(module, run, x):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = run(x)
    out.backward(_randn(*out.shape, seed=7))
    return out.detach(), {name: p.grad for name, p in module.named_parameters()}, x.grad


def test_a_patched_mlp_runs_lean_and_bitwise_the_patched_forward():
    """``fusedact.patch`` puts the MLP on the lean block (its own forward is ``gated_mlp_of``), bitwise the
    forward ``patch(lean_mlp=False)`` gives it (the fused path), keeping x, gate and up only."""
    mlp, _ = _patched()
    fused, _ = _patched(lean_mlp=False)
    x = _randn(3, 4, H, seed=1)
    assert lean.lean_layer(mlp.gate_proj, mlp._fusedact_gated[2], True)
    assert type(mlp(x.requires_grad_()).grad_fn).__name__ == "gated_mlp_functionBackward"  # the lean op
    for run in (mlp, lambda x: lean_forward(mlp, x)):
        out, grads, grad_x = _grads(mlp, run, x)
        out_ref, grads_ref, grad_x_ref = _grads(fused, fused, x)
        assert torch.equal(out, out_ref) and torch.equal(grad_x, grad_x_ref)
        assert all(torch.equal(grads[name], grads_ref[name]) for name in grads_ref)
    for run in (mlp, lambda x: lean_forward(mlp, x)):
        saved = _saved_bytes(lambda run=run: run(x.requires_grad_()), list(mlp.parameters()))
        assert saved == [x.numel() * 4, 12 * FF * 4, 12 * FF * 4]
    assert len(_saved_bytes(lambda: fused(x.requires_grad_()), list(fused.parameters()))) == 4  # x, gate, up, h


def test_hooks_and_wrappers_make_the_layers_run():
    """A forward pre-hook on a projection, a LoRA-style wrapper put around one after patching: the lean block
    cannot see what they do, so the layers themselves are called (the patched forward), and the result is
    the unpatched module's with the same hook or wrapper (fp32: rtol=atol=1e-5, as test_integration.py)."""
    x = _randn(3, 4, H, seed=1)
    calls = []

    def scale_input(module, inputs):
        calls.append(module)
        return (2 * inputs[0],)

    for change in ("hook", "lora"):
        mlp, original = _patched()
        for module in (mlp, original):
            if change == "hook":
                module.up_proj.register_forward_pre_hook(scale_input)
            else:
                torch.manual_seed(3)
                module.gate_proj = LoRA(module.gate_proj)
        assert not lean.lean_layer(mlp.up_proj if change == "hook" else mlp.gate_proj, mlp._fusedact_gated[3], True)
        out, grads, grad_x = _grads(mlp, lambda x, mlp=mlp: lean_forward(mlp, x), x)
        out_ref, grads_ref, grad_x_ref = _grads(original, original, x)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_x, grad_x_ref, rtol=1e-5, atol=1e-5)
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert len(calls) == 2  # the hook ran, in the patched module and in the original

    class MyLinear(nn.Linear):
        pass

    layer = MyLinear(H, FF, bias=False)
    assert lean.lean_layer(nn.Linear(H, FF, bias=False), None, True)
    assert not lean.lean_layer(layer, None, True)
    assert not lean.lean_layer(nn.Linear(H, FF), None, True)  # its bias is its own GEMM's
    assert lean.lean_layer(nn.Linear(FF, H), None, False)


def test_a_global_module_hook_makes_the_layers_run():
    mlp, _ = _patched()
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert not lean.lean_layer(mlp.down_proj, None, False)
    finally:
        handle.remove()
    assert lean.lean_layer(mlp.down_proj, None, False)


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit"])
def test_tiny_models_with_lean_mlps_are_bitwise_the_patched_models(name):
    """transformers' Llama (gated), GPT-2 (Conv1D layers, tanh GELU) and ViT (GELU), patched, then their
    MLPs on the lean blocks (as bench.saved_memory wires them): loss and every gradient bitwise the patched
    model's, and the patched model is the unpatched one's to fp32 rounding (test_integration.py)."""
    transformers_with_models()
    from bench import saved_memory

    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")  # the models' kernels on the fallback (the interpreter is slow)
    try:
        results = {}
        for variant in ("fused", "lean"):
            model = saved_memory.make_model(name, variant, saved_memory.QUICK, torch.float32, "cpu")
            loss = model(**saved_memory.model_batch(name, saved_memory.QUICK, torch.float32, "cpu")).loss
            loss.backward()
            results[variant] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    finally:
        fusedact.set_cpu_backend(previous)
    (loss, grads), (loss_ref, grads_ref) = results["lean"], results["fused"]
    assert torch.equal(loss, loss_ref) and grads.keys() == grads_ref.keys()
    for key in grads:
        assert torch.equal(grads[key], grads_ref[key]), key


def test_saved_memory_benchmark_quick_meets_the_targets():
    """``python -m bench.saved_memory --quick``: per block, the [T, F] tensors kept beside x (issue 15's
    targets), and per model, exactly one or two [T, F] tensors per layer fewer than eager / fused."""
    transformers_with_models()
    from bench import saved_memory

    previous = fusedact.get_cpu_backend()
    fusedact.set_cpu_backend("torch")
    try:
        result = saved_memory.run(quick=True, device="cpu", dtype=torch.float32, steps=1)
    finally:
        fusedact.set_cpu_backend(previous)
    units = {(r["block"], r["variant"]): r["intermediate_tensors"] for r in result["blocks"]}
    assert units == {
        ("gated", "eager"): 4, ("gated", "fused"): 3, ("gated", "lean"): 2, ("gated", "checkpoint"): 0,
        ("gelu", "eager"): 2, ("gelu", "fused"): 2, ("gelu", "lean"): 1, ("gelu", "checkpoint"): 0,
    }  # fmt: skip
    ratios = {(r["block"], r["variant"]): r["ratio_to_eager"] for r in result["blocks"]}
    assert ratios[("gated", "lean")] == pytest.approx(8 / 15)  # (H + 2 * 3.5 H) / (H + 4 * 3.5 H)
    assert ratios[("gelu", "lean")] == pytest.approx(5 / 9)  # (H + 4 H) / (H + 2 * 4 H)
    saved = {(r["model"], r["variant"]): r["saved_bytes"] for r in result["models"]}
    q = saved_memory.QUICK
    layers, tokens = q.model["layers"], q.sequences * q.sequence_length
    one = {
        "llama": tokens * q.model["intermediate"] * 4,
        "gpt2": tokens * 4 * q.model["hidden"] * 4,
        "vit": q.sequences * ((q.image_size // 8) ** 2 + 1) * 4 * q.model["hidden"] * 4,
    }  # one [T, F] fp32 tensor per model
    assert saved["llama", "eager"] - saved["llama", "fused"] == layers * one["llama"]
    for name in ("llama", "gpt2", "vit"):
        assert saved[name, "fused"] - saved[name, "lean"] == layers * one[name], name
    assert saved["vit", "eager"] == saved["vit", "fused"]
    assert all(r["loss_minus_eager"] == 0 or abs(r["loss_minus_eager"]) < 1e-5 for r in result["models"])


# --- Input handling -----------------------------------------------------------------------------------


def test_empty_and_one_dimensional_inputs(device):
    """No tokens: an empty output and zero weight and bias gradients; a 1-D x is one row, as in F.linear."""
    for shape in [(0, H), (2, 0, H), (H,)]:
        tensors = _gated_tensors((T, H), "contiguous", True, device)
        x = _randn(*shape, seed=1, device=device)
        expected = _output_and_grads(fused_gated, (x, *tensors[1:]))
        actual = _output_and_grads(lean.gated_mlp, (x, *tensors[1:]))
        _assert_bitwise(actual, expected, str(shape))
        tensors = _mlp_tensors((T, H), "contiguous", True, device)
        _assert_bitwise(
            _output_and_grads(lambda *t: lean.mlp(*t, "gelu"), (x, *tensors[1:])),
            _output_and_grads(lambda *t: fused_mlp(*t, "gelu"), (x, *tensors[1:])),
            str(shape),
        )


def _ones(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype)


BAD_INPUTS = [
    (lambda: lean.gated_mlp([1.0], _ones(FF, H), _ones(FF, H), _ones(H, FF)), TypeError, "x must be a torch.Tensor"),
    (lambda: lean.gated_mlp(_ones(()), _ones(FF, H), _ones(FF, H), _ones(H, FF)), ValueError, "at least one dim"),
    (lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H + 1), _ones(FF, H), _ones(H, FF)), ValueError, "gate_weight must"),
    (lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H), _ones(FF + 1, H), _ones(H, FF)), ValueError, "up_weight must"),
    (lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H), _ones(FF, H), _ones(H, FF + 1)), ValueError, "down_weight"),
    (
        lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H), _ones(FF, H), _ones(H, FF), _ones(FF + 1)),
        ValueError,
        "gate_bias must have shape",
    ),
    (
        lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H, dtype=torch.float64), _ones(FF, H), _ones(H, FF)),
        TypeError,
        "gate_weight dtype",
    ),
    (lambda: lean.gated_mlp(_ones(3, H), _ones(FF, H), _ones(FF, H), None), TypeError, "down_weight must be a torch"),
    (lambda: lean.gated_mlp_packed(_ones(3, H), _ones(FF + 1, H), _ones(H, FF)), ValueError, "gate_up_weight must"),
    (lambda: lean.mlp(_ones(3, H), _ones(FF, H), _ones(H, FF), None, _ones(H + 1)), ValueError, "fc2_bias must"),
    (lambda: lean.mlp(_ones(3, H), _ones(FF, H), _ones(H, FF), activation="softsign"), ValueError, "unknown activ"),
    (lambda: lean.mlp(_ones(3, H), _ones(FF, H), _ones(H, FF), activation="gelu", beta=2), TypeError, "unexpected"),
    (lambda: lean.mlp(torch.ones(3, H, dtype=torch.int32), _ones(FF, H), _ones(H, FF)), TypeError, "x must be float"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
