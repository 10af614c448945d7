"""The lean MLP blocks under FSDP2 and tensor parallelism: 2 processes, gloo on CPU, one training step.

The model: two blocks, each ``x + gated_mlp(norm(x))`` then ``h + fc2(gelu_tanh(fc1(h)))``, every layer
with a random bias; ``fusedact.patch`` folds the gate/up and fc1 biases, and the MLPs' forwards call
``fusedact.mlp.gated_mlp_of`` / ``mlp_of`` (what the lead's patch rule will do). Each variant's loss and
every parameter's gradient must equal the unpatched model's on the whole batch, computed in this process
(fp32, rtol=atol=1e-5 as test_distributed.py: the fused kernels round once where eager rounds twice):

- **FSDP2**: ``fully_shard`` per block, then the model, patched before sharding; each rank takes half the
  batch. FSDP2 unshards a block's parameters into plain tensors for its forward, so the lean blocks run
  there (checked: every MLP call was the lean op).
- **Tensor parallelism**, ``ColwiseParallel`` on gate/up/fc1 and ``RowwiseParallel`` on down/fc2, the whole
  batch on each rank. The projections carry TP's hooks and DTensor weights, so ``lean_layer`` sends every
  call through the layers (checked: no lean op ran), and the folded biases, DTensors sharded with the
  columns, reach the kernels as their local shards (``fusedact.mlp.local_bias``: today's patched forward
  raises there, the README's ``fold_bias=False`` advice).
- **Tensor parallelism with DTensor activations** (``use_local_output=False``): fusedact's ops take the
  DTensors once ``fusedact.mlp.register_dtensor_sharding()`` has told DTensor how they shard.
- The functional ``fusedact.mlp.gated_mlp`` / ``mlp`` with DTensor weights: the plain fused path, whose
  GEMMs DTensor shards.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fusedact
from fusedact import mlp as lean

WORLD = 2
H, FF, BATCH = 8, 16, 6
# FSDP2 on CPU tensors: torch 2.5's fully_shard requires CUDA streams.
FSDP2_ON_CPU = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


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


def build() -> Model:
    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)  # not zero: folding a zero bias would test nothing
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, H, generator=generator), torch.randn(BATCH, 3, H, generator=generator)


def lean_model(calls: list) -> Model:
    """``build()``, patched, its MLPs on the lean entries; ``calls`` records whether each call ran the lean op."""
    model = build()
    fusedact.patch(model)
    for block in model.blocks:
        gated, ffn = block.mlp, block.ffn
        activation, params, gate_bias_of, up_bias_of = gated._fusedact_gated

        def gated_forward(x, m=gated, activation=activation, params=params, of=(gate_bias_of, up_bias_of)):
            out = lean.gated_mlp_of(x, m.gate_proj, m.up_proj, m.down_proj, activation, *of, **params)
            calls.append("mlp_function" in type(out.grad_fn).__name__)
            return out

        def ffn_forward(x, m=ffn):
            out = lean.mlp_of(x, m.fc1, m.fc2, m.act.activation, bias_of=m.act.bias_of, **m.act.params)
            calls.append("mlp_function" in type(out.grad_fn).__name__)
            return out

        gated.forward, ffn.forward = gated_forward, ffn_forward
    return model


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), target)
    loss.backward()

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    return {"loss": full(loss).detach(), "grads": {n: full(p.grad).detach() for n, p in model.named_parameters()}}


def _tensor_parallel(model: Model, mesh, local_outputs: bool) -> None:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    column = ColwiseParallel(use_local_output=local_outputs)
    row = RowwiseParallel() if local_outputs else RowwiseParallel(input_layouts=Shard(-1))
    plan = {name: column for name in ("mlp.gate_proj", "mlp.up_proj", "ffn.fc1")}
    plan.update({name: row for name in ("mlp.down_proj", "ffn.fc2")})
    for block in model.blocks:
        parallelize_module(block, mesh, plan)


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
            model = lean_model(calls)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            results["fsdp2"] = {**step(model, x[shard], target[shard]), "lean_calls": calls}
            dist.all_reduce(results["fsdp2"]["loss"], op=dist.ReduceOp.AVG)

        calls = []
        model = lean_model(calls)
        _tensor_parallel(model, mesh, local_outputs=True)
        results["tensor_parallel"] = {**step(model, x, target), "lean_calls": calls}

        lean.register_dtensor_sharding()
        calls = []
        model = lean_model(calls)
        _tensor_parallel(model, mesh, local_outputs=False)
        results["tensor_parallel_dtensor_activations"] = {**step(model, x, target), "lean_calls": calls}

        results["functional"] = _functional_with_dtensor_weights(mesh)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("lean_distributed")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """The unpatched model on the whole batch, in one process."""
    return step(build(), *batch())


def _assert_matches(result: dict, reference: dict) -> None:
    torch.testing.assert_close(result["loss"], reference["loss"], rtol=1e-5, atol=1e-5)
    assert result["grads"].keys() == reference["grads"].keys()
    for name, grad in result["grads"].items():
        torch.testing.assert_close(grad, reference["grads"][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "variant,lean_ran",
    [
        pytest.param("fsdp2", True, marks=pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on CPU: torch >= 2.6")),
        ("tensor_parallel", False),
        ("tensor_parallel_dtensor_activations", False),
    ],
)
def test_loss_and_gradients_equal_the_unpatched_model(ranks, reference, variant, lean_ran):
    for results in ranks:
        assert results[variant]["lean_calls"] == [lean_ran] * 4  # 2 blocks x (gated, two-layer)
        _assert_matches(results[variant], reference)


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
