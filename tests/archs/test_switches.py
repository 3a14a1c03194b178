"""Research switches: defaults are the official network; each switch changes the output the intended way."""

from __future__ import annotations

import pytest
import torch

from gsmsr import GSMNet

BASE = dict(upscale=2, prop_depth=2, attn_depth=1, pa_frame=1, embed_dims=8, num_heads=2)


def _net(**kw) -> GSMNet:
    torch.manual_seed(0)
    net = GSMNet(**{**BASE, **kw}).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def _clip(t=4):
    return torch.rand(1, t, 3, 33, 34, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _record_windows(net: GSMNet):
    """Wrap every GSM block to record (window input, gather flows, output) per call."""
    calls = []
    for layer in net.prop_layers:
        block = layer.stage.mamba_block
        orig = block.forward

        def forward(x, gather, scatter, align, out=None, _orig=orig):  # out: where the streaming sweep wants it
            out = _orig(x, gather, scatter, align, out=out)
            calls.append((x.clone(), gather, out.clone()))
            return out

        block.forward = forward
    return calls


@pytest.fixture(scope='module')
def default_out():
    with torch.no_grad():
        return _net()(_clip())


@pytest.mark.parametrize(
    'kw',
    [
        dict(anchor='last'),
        dict(scatter=False),
        dict(align='bilinear'),
        dict(alternate_direction=False),
        dict(mamba_directions=1),
        dict(flow_compose='geometric', pa_frame=2),
    ],
)
def test_switch_changes_output_and_trains(kw, default_out):
    net = _net(**kw)
    lq = _clip()
    with torch.no_grad():
        out = net(lq)
    ref = default_out if kw.get('pa_frame', 1) == 1 else _net(pa_frame=2)(lq).detach()
    assert (out - ref).abs().max() > 1e-6
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = (net(lq) - 0.5).abs().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_geometric_compose_equals_official_with_one_hop(default_out):
    with torch.no_grad():
        out = _net(flow_compose='geometric')(_clip())
    assert torch.equal(out, default_out)  # K = 3 has no multi-hop flow


def test_scatter_false_writes_only_the_anchor():
    net = _net(scatter=False, prop_depth=1)
    calls = _record_windows(net)
    with torch.no_grad():
        net(_clip())
    # window t (centre anchor, K=3) holds frames t-1, t, t+1. With scatter off, frame t+1 is still the SWSA
    # output when window t runs, i.e. the value window t+1 sees in its centre slot; frame t-1 holds window
    # t-1's anchor output.
    for t in range(1, len(calls) - 1):
        x_t, _, out_t = calls[t]
        x_next, _, _ = calls[t + 1]
        assert torch.equal(x_t[:, :, 2], x_next[:, :, 1])  # frame t+1 untouched by window t
        assert torch.equal(x_next[:, :, 0], out_t[:, :, 1])  # frame t written: the anchor only


def test_scatter_true_writes_every_slot():
    net = _net(prop_depth=1)
    calls = _record_windows(net)
    with torch.no_grad():
        net(_clip())
    x1, _, out1 = calls[1]
    x2, _, _ = calls[2]
    assert torch.equal(x2[:, :, 1], out1[:, :, 2])  # frame 2 rewritten by window 1


def test_anchor_last_aligns_to_newest_frame():
    net = _net(anchor='last', prop_depth=1)
    calls = _record_windows(net)
    targets = []
    net.implicit_align.register_forward_hook(lambda m, inp, out: targets.append(inp[1]))
    with torch.no_grad():
        net(_clip(t=4))
    for (x, gather, _), target in zip(calls, targets):
        assert gather[-1] is None and all(g is not None for g in gather[:-1])
        # every slot is aligned onto the newest frame's grid: the implicit warp's query is the last slot
        assert all(torch.equal(target[i], x[0, :, -1]) for i in range(x.shape[2]))
    # window t holds frames t-2, t-1, t (edge-replicated): window 0 is frame 0 three times
    x0 = calls[0][0]
    assert torch.equal(x0[:, :, 0], x0[:, :, 2]) and torch.equal(x0[:, :, 1], x0[:, :, 2])


def test_bilinear_align_bypasses_implicit_warp():
    net = _net(align='bilinear')
    hits = []
    net.implicit_align.register_forward_hook(lambda *a: hits.append(1))
    with torch.no_grad():
        net(_clip())
    assert hits == []


def test_single_direction_mamba_leaves_backward_branch_unused():
    net = _net(mamba_directions=1).train()
    net(_clip()).mean().backward()
    mamba = net.prop_layers[0].stage.mamba_block.mamba
    assert mamba.x_proj_b.weight.grad is None and mamba.x_proj.weight.grad is not None
