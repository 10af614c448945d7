"""Layers that leave their bias to the fused kernel after them, and the activation that adds it.

Shared by the rules that fold a bias (``bias_folding`` into a single-input activation, ``gated_mlp`` into
the gated kernel). A folded layer's class becomes a subclass of its own that only changes ``forward`` (so
``isinstance(layer, nn.Linear)`` still holds); its bias ``Parameter`` stays where it was, under the same
``state_dict`` key, and the kernel reads it from the layer on every call.
"""

import ast
import functools
from typing import Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import nn as fnn
from .source import function_tree, is_docstring, self_attribute


def class_key(cls: type) -> str:
    """``"module.QualName"`` of a class: how classes are named here without importing their packages."""
    return f"{cls.__module__}.{cls.__qualname__}"


# Row-wise kinds that take a bias along their own dim (folded only where that is the layer's bias dim).
ROW_WISE = {"softmax": F.softmax, "log_softmax": F.log_softmax}


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor, without importing torch.distributed.tensor (0.6 s) for tensors that are not."""
    if type(t).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_bias(bias: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """``bias`` as a kernel on ``like`` adds it. Under tensor parallelism a column-parallel layer's bias is a
    ``DTensor`` sharded along its output features (``Shard(0)``) while ``like``, the layer's local output
    (``ColwiseParallel``'s default), holds this rank's columns: the kernel adds the bias's local shard
    (``to_local``: its gradient goes back as a ``Shard(0)`` DTensor, complete on each rank for its own
    columns, since every rank computed all rows of them). Any other bias is returned as it is (a DTensor
    ``like`` takes a DTensor bias: ``fusedact.mlp.register_dtensor_sharding``, which fusedact's ops call the
    first time they see a DTensor).

        >>> gate = gate_proj(x)  # ColwiseParallel: this rank's columns, a plain tensor
        >>> h = fusedact.swiglu(gate, up, fusedact.mlp.local_bias(gate_proj.bias, gate))
    """
    if bias is None or is_dtensor(like) or not is_dtensor(bias):
        return bias
    from torch.distributed.tensor import Shard

    if all(placement == Shard(0) or placement.is_replicate() for placement in bias.placements):
        local = bias.to_local()
        if local.shape[-1:] == like.shape[-1:]:
            return local
    return bias


def bias_like(layer: nn.Module, input: Tensor) -> Optional[Tensor]:
    """``layer``'s bias as the kernel after it adds it to ``input``: in ``input``'s dtype (under autocast the
    bias-free GEMM returns bf16/fp16 while the bias Parameter stays fp32, and the layer itself would have
    cast it; the cast is differentiable) and, under tensor parallelism, its local shard (``local_bias``)."""
    bias = layer.bias
    if bias is None:
        return None
    return local_bias(bias if bias.dtype == input.dtype else bias.to(input.dtype), input)


class FoldedBias(nn.Module):
    """An activation that adds the bias of the layer feeding it, in the fused kernel.

    Made by ``fusedact.patch``: the layer (``bias_of``) skips its own bias, and this module reads that
    ``Parameter`` from it on every call. It holds the layer in a tuple, not as a submodule, so the
    ``state_dict`` keeps the bias under the layer's key only.
    """

    def __init__(self, activation: str, params: dict, bias_of: nn.Module, dim: int = -1) -> None:
        super().__init__()
        self.activation = activation
        self.params = dict(params)
        self.dim = dim
        self._bias_of = (bias_of,)

    @property
    def bias_of(self) -> nn.Module:
        return self._bias_of[0]

    def forward(self, input: Tensor) -> Tensor:
        bias = bias_like(self._bias_of[0], input)
        if self.activation in ROW_WISE:  # a classifier's Linear -> Softmax(dim=-1): the bias along the row
            return ROW_WISE[self.activation](input, bias, dim=self.dim)
        return F.bias_act(input, bias, self.activation, dim=self.dim, **self.params)

    def extra_repr(self) -> str:
        settings = "".join(f", {key}={value!r}" for key, value in self.params.items())
        return f"{self.activation}{settings}, bias of {type(self.bias_of).__bases__[0].__name__}, dim={self.dim}"


class FoldedXIELU(fnn.XIELU):
    """``FoldedBias`` for an activation with learned parameters: xIELU adding the bias of the layer feeding it
    in the fused kernel, with its learned coefficients (their gradients reduced in the same backward).

    Made by ``fusedact.patch`` on the activation's own ``alpha_p``/``alpha_n`` Parameters and ``beta``/``eps``
    buffers (``XIELU.sharing``), so the ``state_dict`` keeps them under the activation's keys; the layer
    (``bias_of``) is held as ``FoldedBias`` holds it, its bias read on every call.
    """

    activation, dim = "xielu", -1  # as FoldedBias names its activation (its settings are its tensors)

    @classmethod
    def of(cls, activation: nn.Module, bias_of: nn.Module) -> "FoldedXIELU":
        folded = cls.sharing(activation)
        folded._bias_of = (bias_of,)
        return folded

    @property
    def params(self) -> dict:
        return {}

    @property
    def bias_of(self) -> nn.Module:
        return self._bias_of[0]

    def forward(self, input: Tensor) -> Tensor:
        return self.with_bias(input, bias_like(self._bias_of[0], input))

    def extra_repr(self) -> str:
        return f"xielu, bias of {type(self.bias_of).__bases__[0].__name__}, dim={self.dim}"


# Activations patch made that add the bias of the layer before them.
FOLDED = (FoldedBias, FoldedXIELU)


class LinearBiasInActivation(nn.Linear):
    """``nn.Linear`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.nn.functional.linear(input, self.weight)


class Conv1dBiasInActivation(nn.Conv1d):
    """``nn.Conv1d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


class Conv2dBiasInActivation(nn.Conv2d):
    """``nn.Conv2d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


class Conv3dBiasInActivation(nn.Conv3d):
    """``nn.Conv3d`` whose bias the next activation adds (``fusedact.patch``)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, None)


def _hf_conv1d_without_bias(self, x: Tensor) -> Tensor:
    # transformers' Conv1D (GPT-2): addmm(bias, x, weight) with weight [in, out]; here without the bias.
    return (x.reshape(-1, x.size(-1)) @ self.weight).view(*x.shape[:-1], self.nf)


@functools.cache
def _hf_conv1d_class(cls: type) -> type:
    return type(f"{cls.__name__}BiasInActivation", (cls,), {"forward": _hf_conv1d_without_bias})


def _weight_matmul_forward(self, input: Tensor) -> Tensor:
    # What a FalconLinear-style forward computes when its bias is None (the same matmul, not F.linear).
    return input @ self.weight.T


def _adds_bias_last(tree: ast.FunctionDef) -> bool:
    """``forward(self, x)`` is ``h = x @ self.weight.T; if self.bias is None: return h; return h + self.bias``
    (transformers' ``FalconLinear``): the bias is added last, after the bias-free ``x @ self.weight.T``."""
    if len(tree.args.args) != 2 or tree.args.vararg or tree.args.kwarg or tree.args.kwonlyargs:
        return False
    self_name, x_name = (arg.arg for arg in tree.args.args)
    body = [statement for statement in tree.body if not is_docstring(statement)]
    if len(body) != 3 or not isinstance(body[0], ast.Assign) or len(body[0].targets) != 1:
        return False
    h = body[0].targets[0]
    product = body[0].value
    if not (
        isinstance(h, ast.Name)
        and isinstance(product, ast.BinOp)
        and isinstance(product.op, ast.MatMult)
        and isinstance(product.left, ast.Name)
        and product.left.id == x_name
        and isinstance(product.right, ast.Attribute)
        and product.right.attr == "T"
        and self_attribute(product.right.value, self_name) == "weight"
    ):
        return False
    test, last = body[1], body[2]
    early = f"if {self_name}.bias is None:\n    return {h.id}"
    return (
        isinstance(test, ast.If)
        and ast.dump(test) == ast.dump(ast.parse(early).body[0])
        and isinstance(last, ast.Return)
        and ast.dump(last.value) == ast.dump(ast.parse(f"{h.id} + {self_name}.bias", mode="eval").body)
    )


@functools.cache
def _linear_subclass(cls: type) -> Optional[type]:
    """The bias-skipping class for a subclass of ``nn.Linear`` that is still a Linear: one that does not
    override ``forward``, or whose ``forward`` the code shows adds the bias last (``_adds_bias_last``)."""
    if cls.forward is nn.Linear.forward:
        forward = LinearBiasInActivation.forward
    else:
        tree = function_tree(cls.forward)
        if tree is None or not _adds_bias_last(tree):
            return None
        forward = _weight_matmul_forward
    return type(f"{cls.__name__}BiasInActivation", (cls,), {"forward": forward})


def bias_skipping_class(layer: nn.Module) -> Optional[tuple[type, int]]:
    """The class ``layer`` becomes when its bias is folded, and the dim the bias runs along; None for a
    layer that cannot leave its bias (a class not known to add it last, as these do)."""
    cls = type(layer)
    static = {
        nn.Linear: (LinearBiasInActivation, -1),
        nn.Conv1d: (Conv1dBiasInActivation, -2),  # channels counted from the end: unbatched input works
        nn.Conv2d: (Conv2dBiasInActivation, -3),
        nn.Conv3d: (Conv3dBiasInActivation, -4),
    }
    if cls in static:
        return static[cls]
    if class_key(cls) == "transformers.pytorch_utils.Conv1D":
        return _hf_conv1d_class(cls), -1
    if isinstance(layer, nn.Linear):  # a subclass (one already skipping its bias reads as none of these)
        subclass = _linear_subclass(cls)
        return None if subclass is None else (subclass, -1)
    return None
