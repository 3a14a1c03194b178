"""GPU check of the token-major conv pair (gsmsr.ops.conv_tokens), compiled, at the window step's shape.

    python -m pytest -m gpu tests/gpu/test_conv_tokens_gpu.py -s

x (1, 288000, 384) as the first half of a (1, 288000, 768) in-projection, bf16 and fp32, against the shifted-sum
reference in float64 on the operands rounded as the kernel rounds them.
"""

from __future__ import annotations

import pytest
import torch

from gsmsr.archs.bimamba import causal_conv_silu_tokens
from gsmsr.ops.conv_tokens import conv_silu_pair
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # relative to max(1, |reference|); bf16: the output's rounding


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_pair_matches_shifted_sums_at_network_shape(dtype):
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(1, 288000, 768, device='cuda', generator=g).to(dtype)[..., :384]
    w_f, w_b = (0.5 * torch.randn(384, 1, 4, device='cuda', generator=g) for _ in range(2))
    b_f, b_b = (torch.randn(384, device='cuda', generator=g) for _ in range(2))
    out_f, out_b = conv_silu_pair(x, w_f, b_f, w_b, b_b)
    as_x = lambda t: t.to(dtype).double()  # noqa: E731
    for got, w, b, reverse in ((out_f, w_f, b_f, False), (out_b, w_b, b_b, True)):
        want = causal_conv_silu_tokens(x.double(), as_x(w), as_x(b), reverse)
        err = ((got.double() - want) / want.abs().clamp_min(1.0)).abs().max().item()
        print(dtype, 'reverse' if reverse else 'causal', f'{err:.1e}')
        assert err <= TOL[dtype]
