"""Data-parallel training without DistributedDataParallel: weights broadcast once, gradients averaged after backward.

Why not DDP: DDP keeps every parameter's gradient-accumulator node alive from its construction, on the stream that
was current then. Capturing the training backward as a CUDA graph (:mod:`gsmsr.models.train_graphs`) runs it on a
side stream, so autograd makes the default stream wait on the capture, and the capture fails (seen on an H100
with torch 2.11: the fast step then fell back to eager, 2.4x slower, even with one process). DDP's one gain, the
all-reduce overlapping the backward, does not exist for a replayed graph either: its gradients all appear when the
replay ends. One all-reduce of all gradients after ``backward()`` costs what DDP's buckets cost, without the hooks.

Every rank must call these in the same order with the same parameters (as DDP requires too).
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List

import torch
from torch import Tensor, nn
from torch import distributed as dist

__all__ = ['broadcast_module', 'average_gradients']


def broadcast_module(net: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``net`` (in place, as DDP's constructor does:
    BasicSR seeds each rank differently, so freshly built networks differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in itertools.chain(net.parameters(), net.buffers()):
            dist.broadcast(tensor.data, src)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's ``.grad`` by its mean over all ranks, one all-reduce per dtype.

    Every parameter that requires grad takes part; one without a gradient counts as zeros, so ranks agree on the
    buffer's layout even where a parameter went unused on some of them. Afterwards every such parameter has a
    gradient (the mean), as DDP with ``find_unused_parameters`` gives."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if world == 1:
        return
    groups: Dict[torch.dtype, List[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault(p.dtype, []).append(p)
    for group in groups.values():
        flat = torch.cat([_grad_or_zeros(p).reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(world)
        for p, mean in zip(group, flat.split([p.numel() for p in group])):
            if p.grad is None:
                p.grad = mean.view_as(p).clone()
            else:
                p.grad.copy_(mean.view_as(p))


def _grad_or_zeros(p: nn.Parameter) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)
