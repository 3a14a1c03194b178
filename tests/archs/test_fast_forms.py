"""The compile-friendly forms that ``GSMNet(compile_blocks=True)`` uses, against the eager ops (float64, grads).

On a GPU these forms run inside ``torch.compile`` (tests/gpu/test_fast_paths.py compares the compiled network
with the eager one); here each is checked directly, since compiling the network on a 2-core CPU takes minutes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gsmsr.archs.bimamba import causal_conv_silu, causal_conv_silu_shifted
from gsmsr.archs.gsm_block import depthwise_conv3d_cl


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), [x.grad for x in xs]


def test_depthwise_conv3d_shifted_sum_matches_conv3d():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 9, 6, generator=g, dtype=torch.float64)  # (B, K, H, W, C)
    w = torch.randn(6, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    want, gw = _grads(
        lambda x, w, b: F.conv3d(x.permute(0, 4, 1, 2, 3), w, b, padding=1, groups=6).permute(0, 2, 3, 4, 1), x, w, b
    )
    got, gg = _grads(depthwise_conv3d_cl, x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(gg, gw):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_causal_conv_shifted_sum_matches_conv1d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 37, generator=g, dtype=torch.float64)
    w = torch.randn(8, 1, 4, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    want, gw = _grads(causal_conv_silu, x, w, b)
    got, gg = _grads(causal_conv_silu_shifted, x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(gg, gw):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
