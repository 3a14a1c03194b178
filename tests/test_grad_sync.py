"""gsmsr.models.grad_sync in two gloo processes: the broadcast weights and the averaged gradients against one process
computing the mean loss over both ranks' batches in float64."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch import nn

from gsmsr.models.grad_sync import average_gradients, broadcast_module

WORLD = 2


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.unused = nn.Linear(2, 2)  # no gradient on any rank
        self.register_buffer('table', torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.table[:3]


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().double()


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{tmp}/store', rank=rank, world_size=WORLD)
    try:
        net = _net(seed=rank)  # as BasicSR seeds ranks: different weights until the broadcast
        broadcast_module(net)
        x = _batch(rank)
        if rank == 1:
            x = x[:3]  # the same loss scale either way: the mean over a rank's samples
        net(x).square().mean().backward()
        average_gradients(net.parameters())
        state, grads = net.state_dict(), {k: p.grad for k, p in net.named_parameters()}
        torch.save((state, grads), f'{tmp}/rank{rank}.pt')  # files: a Manager of tensors can hang
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_both_batches(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)

    reference = _net(seed=0)  # rank 0's weights
    losses = [reference(_batch(0)).square().mean(), reference(_batch(1)[:3]).square().mean()]
    (sum(losses) / WORLD).backward()
    for rank in range(WORLD):
        state, grads = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        for k, v in reference.state_dict().items():
            assert torch.equal(state[k], v), (rank, k)
        for k, p in reference.named_parameters():
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(grads[k], want, rtol=1e-12, atol=1e-14, msg=f'rank {rank}: {k}')


def test_single_process_is_untouched():
    net = _net(seed=0)
    net(_batch(0)).sum().backward()
    before = {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}
    broadcast_module(net)
    average_gradients(net.parameters())  # no process group: nothing to average
    assert all(torch.equal(p.grad, before[k]) for k, p in net.named_parameters() if p.grad is not None)
    assert net.unused.weight.grad is None
