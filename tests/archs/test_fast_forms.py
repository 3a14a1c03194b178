"""The compile-friendly forms that ``GSMNet(compile_blocks=True)`` uses, against the eager ops (float64, grads).

On a GPU these forms run inside ``torch.compile`` (tests/gpu/test_fast_paths.py compares the compiled network
with the eager one); here each is checked directly, since compiling the network on a 2-core CPU takes minutes.
"""

from __future__ import annotations

import torch

from gsmsr.archs.bimamba import causal_conv_silu, causal_conv_silu_shifted


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), [x.grad for x in xs]


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
