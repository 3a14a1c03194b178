"""The scatter warp kernel (gsmsr.ops.slot_warp) against the warp it replaces, in the interpreter.

The reference is :func:`gsmsr.archs.flow.warp` (BasicSR's flow_warp: grid_sample, bilinear, zeros, align_corners)
of each non-anchor slot, in float64 for the error bound and in the kernel's dtype for the path it replaces. m is laid
out as GSMBlock.mamba_mix returns it (physically (B, H, W, K, C)); the flows move pixels by a few pixels, and past
every border (zero padding, partly outside corners). Shapes cover a partial pixel block (13 x 11 = 143 pixels against
32), a partial channel block (C = 70 against 64), batch 2, K = 5 with the anchor in the middle and at either end.

Tolerances, max abs error relative to max(1, max |reference|): fp32 1e-5 against float64 (positions rounded in
fp32: ~1e-5 of a pixel at these sizes, times the features' differences between neighbours); bf16 one rounding of
the output, 2^-7 (the interpreter truncates).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from gsmsr.archs.flow import warp
from gsmsr.ops.slot_warp import single_anchor, slot_warp, slot_warp_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


def _inputs(b: int, c: int, k: int, h: int, w: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(b, h, w, k, c, generator=g).to(dtype).permute(0, 4, 3, 1, 2)  # (B, C, K, H, W) view
    psi = 3 * torch.randn(b, k - 1, 2, h, w, generator=g)
    psi[:, :, :, :2, :2] = -20.0  # wholly outside
    psi[:, :, 0, -2:, :] = 0.5  # the last columns: partly outside
    return m, psi


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('anchor', [0, 2, 4])
def test_slot_warp_matches_flow_warp(dtype, anchor):
    m, psi = _inputs(2, 70, 5, 13, 11, dtype)
    got = slot_warp(m, psi, anchor)
    assert got.shape == (2, 70, 4, 13, 11) and got.dtype == dtype
    assert got.permute(0, 2, 3, 4, 1).is_contiguous()  # channels-last slots, as the fake says
    slots = [i for i in range(5) if i != anchor]
    want64 = torch.stack([warp(m[:, :, i].double(), psi[:, j].double()) for j, i in enumerate(slots)], dim=2)
    want = torch.stack([warp(m[:, :, i], psi[:, j]).to(dtype) for j, i in enumerate(slots)], dim=2)
    assert _err(got, want64) <= TOL[dtype]
    assert _err(got, want) <= TOL[dtype]


def test_channels_first_source_and_fake():
    m, psi = _inputs(1, 8, 3, 6, 9, torch.float32, seed=1)
    m = m.contiguous()  # channels-first: other strides, same values
    want = torch.stack([warp(m[:, :, i], psi[:, j]) for j, i in enumerate((0, 2))], dim=2)
    assert _err(slot_warp(m, psi, 1), want) <= TOL[torch.float32]
    opcheck(slot_warp, (m, psi, 1), test_utils='test_faketensor')


def test_single_anchor_and_bad_flows():
    assert single_anchor([1, None, 2]) == 1 and single_anchor([None, None]) == -1 and single_anchor([1]) == -1
    m, psi = _inputs(1, 4, 3, 5, 5, torch.float32)
    with pytest.raises(ValueError, match=r'm \(1, 4, 3, 5, 5\) needs flows \(1, 2, 2, 5, 5\)'):
        slot_warp_triton(m, psi[:, :1], 0)


def test_network_with_the_switch(monkeypatch):
    """The tiny GSMNet without autograd, FUSED_SCATTER on (kernel interpreted, forced on CPU) against off: the window
    steps' scatters go through the kernel; float32 rounding apart. Under torch.compile (aot_eager) the kernel is one
    node a scatter (anchor 3 here) and the output the same."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from gsmsr.archs import gsm_block
    from gsmsr.archs.gsmnet_arch import GSMNet
    from gsmsr.ops import slot_warp as ops

    torch.manual_seed(0)
    net = GSMNet(upscale=4, prop_depth=1, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4, spynet_path=None)
    lq = torch.rand(1, 3, 3, 36, 40, generator=torch.Generator().manual_seed(8))
    anchors = []
    monkeypatch.setattr(ops, 'runs_fused', lambda x: True)
    original = ops.slot_warp
    monkeypatch.setattr(ops, 'slot_warp', lambda m, psi, a: anchors.append(a) or original(m, psi, a))
    monkeypatch.setattr(gsm_block, 'FUSED_SCATTER', True)
    with torch.no_grad():
        got = net.eval()(lq)
        assert anchors
        monkeypatch.setattr(gsm_block, 'FUSED_SCATTER', False)
        want = net(lq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    block = next(m for m in net.modules() if isinstance(m, gsm_block.GSMBlock))
    m = torch.randn(1, 16, 5, 6, 7)
    flows = [torch.randn(1, 2, 6, 7) if i != 3 else None for i in range(5)]
    counter = CompileCounterWithBackend('aot_eager')
    monkeypatch.setattr(gsm_block, 'FUSED_SCATTER', True)
    monkeypatch.setattr(ops, 'slot_warp', original)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(block.scatter, backend=counter, fullgraph=True)(m, flows)
        monkeypatch.setattr(gsm_block, 'FUSED_SCATTER', False)
        eager = block.scatter(m, flows)
    nodes = [n for gm in counter.graphs for n in gm.graph.nodes]
    assert sum(n.target is torch.ops.gsmsr.slot_warp.default for n in nodes) == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
