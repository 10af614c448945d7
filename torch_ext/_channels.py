"""Where the channels of a per-channel bias (or PReLU slope) lie in the [M, N] matrix the kernels address.

The bias runs along one dimension ``dim`` of ``x`` (``C = x.shape[dim]``; ``inner`` = the product of the
dimensions after it). Three layouts, chosen from shape and strides alone, so a fake tensor under
``torch.compile`` gets the same answer as the real one:

- ``inner == 1`` (the bias on the last dimension, the Linear case): ``[M, C]``, channels along the columns.
- channels in rows: ``x`` views as ``[outer * C, inner]`` with unit column stride (a contiguous NCHW conv
  output): row ``r`` is channel ``r % C``.
- channels-last: ``x`` with ``dim`` moved last views as ``[M, C]`` with the channels adjacent in memory
  (``torch.channels_last``, or a transposed ``[C, M]``): columns again, and the output keeps that memory
  format, as PyTorch's elementwise ops do.

Anything else is copied once into the rows layout: never a wrong answer.
"""

import math

import torch
from torch import Tensor


def _inner(x: Tensor, dim: int) -> int:
    return math.prod(x.shape[dim + 1 :])


def _can_view(t: Tensor, *shape: int) -> bool:
    try:
        t.view(*shape)
    except (RuntimeError, ValueError):  # eager tensors raise the first, fake/meta tensors the second
        return False
    return True


def channels_along_rows(x: Tensor, dim: int) -> bool:
    """Whether the kernels address ``x`` as ``[outer * C, inner]`` (bias per row) rather than ``[M, C]``."""
    if x.dim() == 0:
        return False
    inner = _inner(x, dim)
    if inner == 1:
        return False
    if _can_view(x, -1, inner) and x.view(-1, inner).stride(1) == 1:
        return True
    return not _channels_last(x, dim)


def _channels_last(x: Tensor, dim: int) -> bool:
    """Whether ``x`` with ``dim`` moved last views as ``[M, C]`` with the channels adjacent in memory (a
    permuted ``x`` whose channels are not innermost is not: it is copied into the rows layout, and its
    result is contiguous)."""
    moved = x.movedim(dim, -1)
    num_channels = x.shape[dim]
    return _can_view(moved, -1, num_channels) and (num_channels == 1 or moved.view(-1, num_channels).stride(1) == 1)


def output_is_contiguous(x: Tensor, dim: int) -> bool:
    """Whether the result for ``x`` is contiguous (else it is channels-last, like ``x``)."""
    return x.dim() == 0 or _inner(x, dim) == 1 or channels_along_rows(x, dim)


def empty_output(x: Tensor, dim: int) -> Tensor:
    """An uninitialised tensor like ``x`` for the result: channels-last inputs give a channels-last result,
    everything else a contiguous one. Its channel matrix (``channel_matrix``) is always contiguous."""
    if not output_is_contiguous(x, dim):
        moved = x.movedim(dim, -1)
        return torch.empty(moved.shape, dtype=x.dtype, device=x.device).movedim(-1, dim)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def channel_matrix(t: Tensor, dim: int, along_rows: bool) -> Tensor:
    """``t`` as the [M, N] matrix of the layout (a view with its own strides, or one copy if none exists)."""
    if t.dim() == 0:
        return t.view(1, 1)
    if dim == t.dim() - 1:  # the bias along the last dimension (a Linear's): [M, N] directly
        try:
            return t.view(-1, t.shape[-1])
        except (RuntimeError, ValueError):  # (fake and meta tensors raise the second)
            return t.reshape(-1, t.shape[-1])
    if along_rows:
        inner = _inner(t, dim)
        return t.view(-1, inner) if _can_view(t, -1, inner) else t.reshape(-1, inner)
    moved = t.movedim(dim, -1)
    num_channels = t.shape[dim]
    return moved.view(-1, num_channels) if _can_view(moved, -1, num_channels) else moved.reshape(-1, num_channels)


def channel_shape(x: Tensor, dim: int) -> list[int]:
    """The shape a ``[C]`` bias takes to broadcast along ``dim`` of ``x`` (``[C, 1, 1]`` for NCHW)."""
    shape = [1] * x.dim()
    if x.dim():
        shape[dim] = -1
    return shape


def reduce_to_channels(t: Tensor, dim: int) -> Tensor:
    """Sum ``t`` over every dimension but ``dim`` (a new tensor, never a view of ``t``)."""
    if t.dim() <= 1:
        return t.reshape(-1).clone()
    return t.sum(dim=[d for d in range(t.dim()) if d != dim])
