"""GPU check of the scatter warp kernel (gsmsr.ops.slot_warp), compiled, at the window step's shape.

    python -m pytest -m gpu tests/gpu/test_slot_warp_gpu.py -s

m (1, 192, 5, 180, 320) laid out as GSMBlock.mamba_mix returns it, anchor 2, fp32 and bf16: against the warp it
replaces (cuDNN's grid sampler on a channels-first fp32 copy, then the cast) and against float64.
"""

from __future__ import annotations

import pytest
import torch

from gsmsr.archs.flow import warp
from gsmsr.ops.slot_warp import slot_warp
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
# relative to max(1, max |reference|). bf16: its rounding. fp32: sample positions near x = 320 carry ~3e-5 px of
# rounding (both paths), times the randn slopes; the bar is the replaced path's own gap to float64, with slack.
TOL = {torch.float32: 2e-4, torch.bfloat16: 2**-8}


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_slot_warp_at_network_shape(dtype):
    g = torch.Generator(device='cuda').manual_seed(0)
    m = torch.randn(1, 180, 320, 5, 192, device='cuda', generator=g).to(dtype).permute(0, 4, 3, 1, 2)
    psi = 3 * torch.randn(1, 4, 2, 180, 320, device='cuda', generator=g)
    psi[:, :, :, :4, :4] = -50.0  # outside the frame
    got = slot_warp(m, psi, 2)
    slots = (0, 1, 3, 4)
    want = torch.stack([warp(m[:, :, i], psi[:, j]).to(dtype) for j, i in enumerate(slots)], dim=2)
    want64 = torch.stack([warp(m[:, :, i].double(), psi[:, j].double()) for j, i in enumerate(slots)], dim=2)
    errs = _err(got, want), _err(got, want64)
    own = _err(want, want64)
    print(dtype, f'against the replaced path {errs[0]:.1e}, against float64 {errs[1]:.1e} (replaced path: {own:.1e})')
    assert max(errs) <= TOL[dtype]
    if dtype == torch.float32:
        assert errs[1] <= 2 * own + 1e-6
