"""The CUDA-graph dispatcher of the training step on CPU: it must be a transparent pass-through there."""

from __future__ import annotations

import torch

from gsmsr import GSMNet
from gsmsr.models.train_graphs import TrainGraphs, install_train_graphs, uninstall_train_graphs


def test_dispatcher_passes_cpu_calls_to_the_original_forward():
    torch.manual_seed(0)
    net = GSMNet(prop_depth=1, attn_depth=1, embed_dims=16, num_heads=2).train()
    lq = torch.rand(1, 3, 3, 36, 36)
    want = GSMNet.forward(net, lq)
    graphs = install_train_graphs(net)
    assert install_train_graphs(net) is graphs and isinstance(net.forward, TrainGraphs)
    got = net(lq)
    assert torch.equal(got, want) and got.requires_grad
    assert graphs.replays == 0 and not graphs.graphs and not graphs.failed
    assert 'forward' not in net.state_dict() and set(net.state_dict()) == set(
        GSMNet(prop_depth=1, attn_depth=1, embed_dims=16, num_heads=2).state_dict()
    )
    uninstall_train_graphs(net)
    assert 'forward' not in net.__dict__ and torch.equal(net(lq), want)
