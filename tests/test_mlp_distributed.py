"""``fusedact.patch`` (lean blocks, folded biases) under FSDP2 and tensor parallelism: 2 processes, gloo on CPU.

The model: two blocks, each ``x + gated_mlp(norm(x))`` (Llama's MLP, with biases) then ``h + fc2(gelu_tanh(
fc1(h)))`` (GPT-2's, as Linear layers), every layer with a random bias; ``fusedact.patch`` with its defaults
folds the gate/up and fc1 biases and puts both MLPs on the lean blocks (``gated_mlp_of`` / ``mlp_of``).
Beside it a transformers tiny Llama with ``mlp_bias=True``. Each variant's loss and every parameter's
gradient must equal the unpatched model's, both the unpatched model under the same parallelism and on the
whole batch in one process (fp32, rtol=atol=1e-5 as test_distributed.py: the fused kernels round once where
eager rounds twice):

- **FSDP2**: ``fully_shard`` per block, then the model, patched before sharding; each rank takes half the
  batch. FSDP2 unshards a block's parameters into plain tensors for its forward, so the lean blocks run
  there (checked: every MLP call was the lean op).
- **Tensor parallelism**, ``ColwiseParallel`` on gate/up/fc1 and ``RowwiseParallel`` on down/fc2, the whole
  batch on each rank, patched before parallelizing. The projections carry TP's hooks and DTensor weights,
  so ``lean_layer`` sends every call through the layers (checked: no lean op ran), and the folded biases,
  DTensors sharded with the columns, reach the kernels as their local shards (``bias_like`` ->
  ``local_bias``; before, the folded bias raised ``gate_bias must have shape (8,)``).
- **Tensor parallelism with DTensor activations** (``use_local_output=False``): fusedact's ops take the
  DTensors, having registered how they shard the first time one met a DTensor (no explicit call).
- fusedact's ops on DTensor activations directly: softmax sharded along another dim than its own (and
  sharded along its own, which DTensor must gather first), bias_act with a bias sharded with its channels.
- The functional ``fusedact.mlp.gated_mlp`` / ``mlp`` with DTensor weights: the plain fused path, whose
  GEMMs DTensor shards.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from optional import transformers_with_models
from torch import nn

import fusedact
from fusedact import mlp as lean

WORLD = 2
H, FF, BATCH = 8, 16, 6
# FSDP2 on CPU tensors: torch 2.5's fully_shard requires CUDA streams.
FSDP2_ON_CPU = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
LEAN_OPS = {"gated_mlp_functionBackward", "mlp_functionBackward"}  # the lean blocks' autograd nodes


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(H, FF), nn.Linear(H, FF), nn.Linear(FF, H)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TwoLayerMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(H, FF), nn.GELU(approximate="tanh"), nn.Linear(FF, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mlp, self.ffn = nn.LayerNorm(H), GatedMLP(), TwoLayerMLP()

    def forward(self, x):
        h = x + self.mlp(self.norm(x))
        return h + self.ffn(h)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _random_biases(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)  # not zero: folding a zero bias would test nothing
    return model


def build() -> Model:
    torch.manual_seed(0)
    return _random_biases(Model())


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, H, generator=generator), torch.randn(BATCH, 3, H, generator=generator)


def build_llama() -> nn.Module:
    """transformers' Llama, 2 layers of width 32, MLP biases on (what ``patch`` folds), eager attention."""
    import transformers

    from fusedact.lab.models import TINY_MODELS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_MODELS["tiny-llama"][1], mlp_bias=True)
    config._attn_implementation = "eager"
    return _random_biases(transformers.LlamaForCausalLM(config))


def llama_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def mlps(model: nn.Module) -> list:
    if isinstance(model, Model):
        return [m for block in model.blocks for m in (block.mlp, block.ffn)]
    return [layer.mlp for layer in model.model.layers]


def patched(model: nn.Module, calls: list) -> nn.Module:
    """``model`` patched with the defaults, every MLP on a lean block; ``calls`` records per MLP call the
    autograd node of its output (a lean op's, or another where the layers were called)."""
    report = fusedact.patch(model)
    lean_changes = [c for c in report.changes if c.action == "lean_mlp" or "lean block" in c.after]
    assert len(lean_changes) == len(mlps(model)), str(report)
    for module in mlps(model):
        module.register_forward_hook(lambda module, inputs, out: calls.append(type(out.grad_fn).__name__))
    return model


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), target)
    loss.backward()
    return {"loss": _full(loss).detach(), "grads": {n: _full(p.grad).detach() for n, p in model.named_parameters()}}


def llama_step(model: nn.Module) -> dict:
    model.zero_grad(set_to_none=True)
    ids = llama_tokens()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {"loss": _full(loss).detach(), "grads": {n: _full(p.grad).detach() for n, p in model.named_parameters()}}


def _tensor_parallel(model: nn.Module, mesh, local_outputs: bool = True) -> None:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    column = ColwiseParallel(use_local_output=local_outputs)
    row = RowwiseParallel() if local_outputs else RowwiseParallel(input_layouts=Shard(-1))
    if isinstance(model, Model):
        plan = {name: column for name in ("mlp.gate_proj", "mlp.up_proj", "ffn.fc1")}
        plan.update({name: row for name in ("mlp.down_proj", "ffn.fc2")})
        for block in model.blocks:
            parallelize_module(block, mesh, plan)
    else:
        for mlp in mlps(model):
            parallelize_module(mlp, mesh, {"gate_proj": column, "up_proj": column, "down_proj": row})


def _functional_with_dtensor_weights(mesh) -> dict:
    """``fusedact.mlp.gated_mlp`` and ``mlp`` on DTensor weights (column- then row-sharded): the fused path."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(2)
    # weights scaled as a trained layer's (unit-variance outputs): the gradients stay O(1)
    x, down = torch.randn(4, H), torch.randn(H, FF) / FF**0.5
    gate, up = torch.randn(FF, H) / H**0.5, torch.randn(FF, H) / H**0.5
    biases = torch.randn(FF), torch.randn(FF), torch.randn(H)
    placements = [Replicate(), Shard(0), Shard(0), Shard(1), Shard(0), Shard(0), Replicate()]
    tensors = [x, gate, up, down, *biases]
    leaves = [distribute_tensor(t, mesh, [p]).requires_grad_() for t, p in zip(tensors, placements, strict=True)]
    gated = lean.gated_mlp(*leaves, "gelu")
    two_layer = lean.mlp(leaves[0], leaves[1], leaves[3], leaves[4], leaves[6], "gelu", approximate="tanh")
    (gated.full_tensor().square().mean() + two_layer.full_tensor().square().mean()).backward()
    return {
        "inputs": tensors,
        "outputs": [gated.full_tensor().detach(), two_layer.full_tensor().detach()],
        "grads": [t.grad.full_tensor() for t in leaves],
    }


def _ops_on_dtensors(mesh) -> dict:
    """Per case: (placements of x, of the bias), the output and the gradients of x and the bias, in full."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(3)
    x, bias = torch.randn(4, 6, 8), torch.randn(8)
    cases = {
        "softmax, rows sharded": (fusedact.softmax, Shard(0), Replicate()),
        "softmax, its own dim sharded": (fusedact.softmax, Shard(2), Replicate()),
        "log_softmax, rows sharded": (fusedact.log_softmax, Shard(1), Replicate()),
        "gelu, channels sharded": (fusedact.gelu, Shard(2), Shard(0)),
        "gelu, rows sharded": (fusedact.gelu, Shard(0), Replicate()),
    }
    results = {}
    for name, (function, x_placement, bias_placement) in cases.items():
        dx = distribute_tensor(x, mesh, [x_placement]).requires_grad_()
        dbias = distribute_tensor(bias, mesh, [bias_placement]).requires_grad_()
        y = function(dx, dbias) if function is fusedact.gelu else function(dx, dbias, dim=-1)
        y_full = y.full_tensor()
        (y_full * torch.arange(y_full.numel()).view(y_full.shape).sin()).sum().backward()
        results[name] = (y_full.detach(), dx.grad.full_tensor(), dbias.grad.full_tensor())
    return {"x": x, "bias": bias, "cases": results}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # The spawned process inherits TRITON_INTERPRET=1 without a GPU: CPU tensors take the same backend.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        x, target = batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}

        if FSDP2_ON_CPU:
            from torch.distributed.fsdp import fully_shard

            calls = []
            model = patched(build(), calls)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            results["fsdp2"] = {**step(model, x[shard], target[shard]), "calls": calls}
            dist.all_reduce(results["fsdp2"]["loss"], op=dist.ReduceOp.AVG)

        calls = []
        model = patched(build(), calls)
        _tensor_parallel(model, mesh)
        results["tensor_parallel"] = {**step(model, x, target), "calls": calls}
        model = build()
        _tensor_parallel(model, mesh)
        results["tensor_parallel_unpatched"] = step(model, x, target)

        calls = []
        model = patched(build_llama(), calls)
        _tensor_parallel(model, mesh)
        results["llama_tensor_parallel"] = {**llama_step(model), "calls": calls}
        model = build_llama()
        _tensor_parallel(model, mesh)
        results["llama_tensor_parallel_unpatched"] = llama_step(model)

        # Nothing so far gave fusedact's ops a DTensor (local outputs: plain activations, local bias shards).
        results["registered_before_dtensor_activations"] = fusedact.ops._dtensor_sharding
        calls = []
        model = patched(build(), calls)
        _tensor_parallel(model, mesh, local_outputs=False)
        results["tensor_parallel_dtensor_activations"] = {**step(model, x, target), "calls": calls}
        results["registered_after"] = fusedact.ops._dtensor_sharding

        results["ops"] = _ops_on_dtensors(mesh)
        results["functional"] = _functional_with_dtensor_weights(mesh)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    transformers_with_models()
    out = tmp_path_factory.mktemp("lean_distributed")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The unpatched models in one process: ours on the whole batch, the Llama on its tokens."""
    return {"model": step(build(), *batch()), "llama": llama_step(build_llama())}


def _assert_matches(result: dict, reference: dict) -> None:
    torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-5, atol=1e-5, msg=name)


UNPATCHED = {  # the unpatched model's run under the same tensor-parallel plan (local outputs)
    "tensor_parallel": "tensor_parallel_unpatched",
    "tensor_parallel_dtensor_activations": "tensor_parallel_unpatched",
    "llama_tensor_parallel": "llama_tensor_parallel_unpatched",
}


@pytest.mark.parametrize(
    "variant,lean_ran",
    [
        pytest.param("fsdp2", True, marks=pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on CPU: torch >= 2.6")),
        ("tensor_parallel", False),
        ("tensor_parallel_dtensor_activations", False),
        ("llama_tensor_parallel", False),
    ],
)
def test_loss_and_gradients_equal_the_unpatched_model(ranks, reference, variant, lean_ran):
    model = "llama" if variant.startswith("llama") else "model"
    for results in ranks:
        calls = results[variant]["calls"]
        assert len(calls) == (4 if model == "model" else 2) and {name in LEAN_OPS for name in calls} == {lean_ran}
        _assert_matches(results[variant], reference[model])
        if variant in UNPATCHED:  # and the unpatched model under the same plan
            _assert_matches(results[variant], results[UNPATCHED[variant]])


def test_dtensor_sharding_is_registered_when_an_op_first_meets_a_dtensor(ranks):
    for results in ranks:
        assert results["registered_before_dtensor_activations"] is False and results["registered_after"] is True


def test_plain_tensors_never_import_torch_distributed_tensor():
    """The op entries look for DTensors by class name: a process that never makes one never imports
    torch.distributed.tensor (0.6 s), patched models and lean blocks included."""
    code = (
        "import sys, torch, fusedact\n"
        "x = torch.randn(4, 8, requires_grad=True)\n"
        "fusedact.softmax(fusedact.gelu(x, torch.randn(8)), torch.randn(8), dim=-1).sum().backward()\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))\n"
        "assert fusedact.patch(m).changes[-1].action == 'lean_mlp'\n"
        "m(x).sum().backward()\n"
        "print('torch.distributed.tensor' in sys.modules, fusedact.ops._dtensor_sharding)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_ops_take_dtensor_activations(ranks):
    """softmax (never split along its own dim), log_softmax and bias_act on DTensors: PyTorch's values and
    gradients (fp32: one rounding apart, rtol=atol=1e-5)."""
    for results in ranks:
        ops = results["ops"]
        for name, (y, grad_x, grad_bias) in ops["cases"].items():
            x, bias = (t.clone().requires_grad_() for t in (ops["x"], ops["bias"]))
            if name.startswith("gelu"):
                expected = F.gelu(x + bias)
            else:
                expected = (torch.log_softmax if name.startswith("log") else torch.softmax)(x + bias, -1)
            (expected * torch.arange(expected.numel()).view(expected.shape).sin()).sum().backward()
            torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(grad_x, x.grad, rtol=1e-5, atol=1e-5, msg=name)
            torch.testing.assert_close(grad_bias, bias.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_functional_blocks_take_dtensor_weights(ranks):
    """With DTensor weights the functional entries run the plain fused path: the lean block's numbers."""
    for results in ranks:
        functional = results["functional"]
        x, gate, up, down, gate_bias, up_bias, down_bias = (t.requires_grad_() for t in functional["inputs"])
        gated = lean.gated_mlp(x, gate, up, down, gate_bias, up_bias, down_bias, "gelu")
        two_layer = lean.mlp(x, gate, down, gate_bias, down_bias, "gelu", approximate="tanh")
        (gated.square().mean() + two_layer.square().mean()).backward()
        for actual, expected in zip(functional["outputs"], (gated, two_layer), strict=True):
            torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-5)
        expected_grads = [x.grad, gate.grad, up.grad, down.grad, gate_bias.grad, up_bias.grad, down_bias.grad]
        for actual, expected in zip(functional["grads"], expected_grads, strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_local_bias_keeps_plain_and_dtensor_pairs_as_they_are():
    bias, like = torch.randn(4), torch.randn(2, 4)
    assert lean.local_bias(bias, like) is bias and lean.local_bias(None, like) is None
