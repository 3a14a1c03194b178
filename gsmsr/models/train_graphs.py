"""The training forward and backward of a network replayed as CUDA graphs.

A GSMNet training step at the recipe's size (16 x 64 x 64 LR) launches tens of thousands of small kernels from
Python: 64 sequential window steps per forward, their backward, SpyNet, the flow chains. Compiled, the GPU then
waits for the host about two thirds of the step (benchmarks/NOTES.md). Capturing the forward and the backward
once (``torch.cuda.make_graphed_callables``) and replaying them takes the host out of the loop; the kernels, and
so the numbers, are the ones the eager/compiled step runs.

:func:`install_train_graphs` replaces the network's ``forward`` on the instance by a dispatcher. A call in training
mode with autograd on, on CUDA, replays the graph captured for its input signature (shape, dtype, device, autocast
dtype), capturing it on first sight; anything else (eval, no grad, CPU, a signature beyond ``max_graphs``, or a
capture that failed) runs the original forward. Wrappers that call ``net(...)`` (BasicSR's model) need no change;
gradients reach ``.grad`` through autograd as usual, so the averaging over ranks, ``fix_flow`` zeroing, clipping
and the optimiser see the same gradients. Not under DDP: its gradient-accumulator nodes make the capture fail
(:mod:`gsmsr.models.grad_sync`).

Constraints of a captured step: inputs of the captured shape (training crops are); autocast, when on, without its
weight cache (``GSMModel`` opens it so); no host synchronisation inside the network; gradients set to None before
each step (``zero_grad()``'s default), since autograd may adopt the graph's gradient buffers as ``.grad``.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor, nn

logger = logging.getLogger('basicsr')

Signature = Tuple[Tuple[int, ...], torch.dtype, torch.device, Optional[torch.dtype]]


def _autocast_dtype() -> Optional[torch.dtype]:
    return torch.get_autocast_dtype('cuda') if torch.is_autocast_enabled('cuda') else None


class _Forward(nn.Module):
    """The network's original forward as a module of its own (what ``make_graphed_callables`` captures)."""

    def __init__(self, net: nn.Module, forward: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.net = net
        self._forward = forward

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x)


class TrainGraphs:
    """Dispatches ``net(x)`` to a captured CUDA graph pair or the original forward (see the module docstring)."""

    def __init__(self, net: nn.Module, warmup: int = 3, max_graphs: int = 2) -> None:
        self.net = net
        self.original = net.forward
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: Dict[Signature, Callable[[Tensor], Tensor]] = {}
        self.failed: Set[Signature] = set()
        self.replays = 0

    def signature(self, x: Tensor) -> Signature:
        return tuple(x.shape), x.dtype, x.device, _autocast_dtype()

    def __call__(self, x: Tensor) -> Tensor:
        if not (self.net.training and torch.is_grad_enabled() and x.is_cuda) or x.requires_grad:
            return self.original(x)
        key = self.signature(x)
        graphed = self.graphs.get(key)
        if graphed is None:
            if key in self.failed or len(self.graphs) >= self.max_graphs:
                return self.original(x)
            graphed = self.capture(x, key)
            if graphed is None:
                return self.original(x)
        if any(p.grad is not None for p in self.net.parameters()):
            # the replayed backward hands out its own gradient buffers, which autograd may adopt as .grad: adding
            # into a .grad kept from the last step would then add the buffer to itself
            raise RuntimeError(
                'CUDA-graphed training step: call zero_grad(set_to_none=True) before each step '
                '(gradient accumulation across steps is not supported with train.cuda_graph)'
            )
        self.replays += 1
        return graphed(x)

    def capture(self, x: Tensor, key: Signature) -> Optional[Callable[[Tensor], Tensor]]:
        if torch.is_autocast_enabled('cuda') and torch.is_autocast_cache_enabled():
            raise RuntimeError('CUDA-graphed training needs autocast with cache_enabled=False')
        module = _Forward(self.net, self.original).train()
        try:
            graphed = torch.cuda.make_graphed_callables(
                module, (x.detach().clone(),), num_warmup_iters=self.warmup, allow_unused_input=True
            )
        except Exception as err:  # e.g. a host sync inside the network: train on, without graphs
            self.failed.add(key)
            torch.cuda.synchronize()
            logger.warning(
                f'CUDA graph capture of the training step failed for input {tuple(x.shape)} '
                f'({type(err).__name__}: {str(err).splitlines()[0][:200]}); this shape runs without graphs.'
            )
            return None
        torch.cuda.empty_cache()  # the warm-up iterations' activations, now cached outside the graph pool
        self.graphs[key] = graphed
        logger.info(f'Captured the training forward/backward of input {tuple(x.shape)} as CUDA graphs.')
        return graphed


def install_train_graphs(net: nn.Module, warmup: int = 3, max_graphs: int = 2) -> TrainGraphs:
    """Route ``net``'s training forward through :class:`TrainGraphs` (idempotent); returns the dispatcher."""
    current = net.__dict__.get('forward')
    if isinstance(current, TrainGraphs):
        return current
    graphs = TrainGraphs(net, warmup, max_graphs)
    net.forward = graphs  # instance attribute: nn.Module.__call__ looks it up before the class's forward
    return graphs


def uninstall_train_graphs(net: nn.Module) -> None:
    """Restore the class's forward (captured graphs are released)."""
    if isinstance(net.__dict__.get('forward'), TrainGraphs):
        del net.forward
