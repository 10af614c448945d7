"""A patched model under DistributedDataParallel: 2 processes, gloo on CPU, one training step.

Each rank builds the same model (same seed), patches one copy, wraps both copies in DDP and runs a forward
and backward on its own shard of the batch; DDP all-reduces (averages) the gradients. The patched model's
averaged gradients must equal the unpatched model's (fp32, rtol=atol=1e-5 as in test_patch.py), and both
must equal the gradient of the whole batch in one process: fusedact's ops are per-element, so they change
nothing about how DDP shards and reduces. After an SGD step the two models' parameters still agree.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedact

WORLD = 2


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), GatedMLP(), nn.Linear(8, 4), nn.ReLU())


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), target).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    return {"grads": grads, "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # The spawned process inherits the test process's environment (TRITON_INTERPRET=1 without a GPU), so
    # CPU tensors take the same backend there.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, target = batch()
        shard = slice(rank * 3, rank * 3 + 3)
        results = {}
        for label in ("patched", "unpatched"):
            model = build()
            if label == "patched":
                report = fusedact.patch(model)
                assert {change.action for change in report.changes} == {"fold_bias", "gated_mlp", "replace"}
            ddp = nn.parallel.DistributedDataParallel(model)
            results[label] = step(ddp, x[shard], target[shard])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_unpatched(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    whole = step(build(), *batch())  # the whole batch in one process, unpatched
    for results in ranks:
        for label in ("patched", "unpatched"):
            grads = {name.removeprefix("module."): g for name, g in results[label]["grads"].items()}
            params = {name.removeprefix("module."): p for name, p in results[label]["params"].items()}
            assert grads.keys() == whole["grads"].keys()
            for name in grads:
                torch.testing.assert_close(grads[name], whole["grads"][name], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(params[name], whole["params"][name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold_bias", [True, False])
def test_patched_model_deepcopies_for_ddp_style_replicas(fold_bias):
    """DDP and EMA/replica code deep-copy models: a copy of a patched model keeps its own folded biases."""
    model = build()
    fusedact.patch(model, fold_bias=fold_bias)
    replica = copy.deepcopy(model)
    x, _ = batch()
    torch.testing.assert_close(replica(x), model(x))
    with torch.no_grad():
        replica[0].bias.add_(1.0)
    assert not torch.allclose(replica(x), model(x))
