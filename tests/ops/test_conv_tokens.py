"""The token-major conv pair (gsmsr.ops.conv_tokens) against the shifted-sum reference it replaces, in the interpreter.

The reference is :func:`gsmsr.archs.bimamba.causal_conv_silu_tokens` in float64 on the operands rounded as the kernel
rounds them (weights and biases to x's dtype), the compiled form's arithmetic. Shapes cover a ragged token block
(L = 45 against 32), a partial channel block (D = 70 against 64), batch 2, x as a slice of a wider projection, and a
sequence shorter than the kernel (L = 2 < K = 4: every tap but one reads padding).

Tolerances, max abs error relative to max(1, |reference|) elementwise: fp32 1e-6 (fp32 sums of four products); bf16
1e-2 (the output's rounding: to nearest on GPU, truncated by the interpreter, one ulp 2^-7 relative).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from gsmsr.archs.bimamba import causal_conv_silu_tokens
from gsmsr.ops.conv_tokens import conv_silu_pair, conv_silu_pair_triton

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _operands(batch: int, length: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, length, 2 * dim, generator=g).to(dtype)
    weights = [torch.randn(dim, 1, 4, generator=g) for _ in range(2)]
    biases = [torch.randn(dim, generator=g) for _ in range(2)]
    return xz[..., :dim], weights, biases  # x: the in-projection's first half, row stride 2D


def _reference(x, weight, bias, reverse):
    as_x = lambda t: t.to(x.dtype).double()  # noqa: E731
    return causal_conv_silu_tokens(x.double(), as_x(weight), as_x(bias), reverse)


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want) / want.abs().clamp_min(1.0)).abs().max().item()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 45, 70), (1, 2, 8), (1, 64, 64)])
def test_pair_matches_shifted_sums(dtype, shape):
    x, (w_f, w_b), (b_f, b_b) = _operands(*shape, dtype)
    out_f, out_b = conv_silu_pair(x, w_f, b_f, w_b, b_b)
    assert out_f.shape == out_b.shape == x.shape and out_f.dtype == out_b.dtype == dtype
    assert out_f.is_contiguous() and out_b.is_contiguous()
    assert _err(out_f, _reference(x, w_f, b_f, False)) <= TOL[dtype]
    assert _err(out_b, _reference(x, w_b, b_b, True)) <= TOL[dtype]


def test_fake_tensor_and_compiled_graph():
    x, (w_f, w_b), (b_f, b_b) = _operands(1, 37, 24, torch.float32, seed=1)
    opcheck(conv_silu_pair, (x, w_f, b_f, w_b, b_b), test_utils='test_faketensor')
    compiled = torch.compile(lambda *a: conv_silu_pair(*a), backend='aot_eager', fullgraph=True)
    for got, want in zip(compiled(x, w_f, b_f, w_b, b_b), conv_silu_pair(x, w_f, b_f, w_b, b_b)):
        assert torch.equal(got, want)


def test_bad_weights_name_the_shapes():
    x, (w_f, w_b), (b_f, b_b) = _operands(1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=r'x \(1, 8, 16\).*\(12, 1, 4\)'):
        conv_silu_pair_triton(x, w_f[:12], b_f, w_b, b_b)
