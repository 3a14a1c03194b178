"""GPU check of the implicit warp's fused kernels (compiled) at the network's shape.

    python -m pytest -m gpu tests/gpu/test_implicit_attn_gpu.py -s

The attention and the query-input kernels against the float64 reference at 5 x 180 x 320, C = 192, 8 heads (one
window's call), in fp32 and bf16; then ImplicitWarp with FUSED_ATTENTION on, eager and inside
torch.compile(fullgraph=True), against the module's fp32 reference path.
"""

from __future__ import annotations

import math

import pytest
import torch

from gsmsr.archs import implicit_warp
from gsmsr.archs.implicit_warp import ImplicitWarp, sampling_geometry
from gsmsr.ops.implicit_attn import (
    implicit_attention_ref,
    implicit_attention_triton,
    query_input_ref,
    query_input_triton,
    runs_fused,
)
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
# max abs error / max(1, max |reference|): fp32 differs by summation order and the sines' last bits; bf16 by one
# rounding of the output (2^-8)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
B, C, HEADS, H, W = 5, 192, 8, 180, 320


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1.0))


def _flow(g: torch.Generator) -> torch.Tensor:
    flow = 3 * torch.randn(B, 2, H, W, device='cuda', generator=g)
    flow[:, :, :4, :4] = -50.0  # outside the frame: clamped neighbours
    flow[:, :, -4:, -4:] = 50.0
    return flow


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_match_float64_reference(dtype):
    g = torch.Generator(device='cuda').manual_seed(0)
    q = torch.randn(B, H * W, C, device='cuda', generator=g).to(dtype)
    kv = torch.randn(B, H * W, 2 * C, device='cuda', generator=g).to(dtype)
    pe = 0.5 * torch.randn(4, 2 * C, device='cuda', generator=g)
    index, offset = sampling_geometry(_flow(g), H, W, torch.float32)
    scale = (C // HEADS) ** -0.5
    want = implicit_attention_ref(q.double(), kv.double(), index, pe.double(), HEADS, scale)
    got = implicit_attention_triton(q, kv, index, pe, HEADS, scale)
    err = _err(got, want)
    scaled = offset / (2 + 1e-6) * (2 * math.pi)
    target = torch.randn(1, C, H, W, device='cuda', generator=g).to(dtype).expand(B, C, H, W)
    q_in = query_input_triton(target, scaled)
    q_err = _err(q_in, query_input_ref(target.double(), scaled.double()))
    q_same = _err(q_in, query_input_ref(target, scaled))  # against the eager reference in the same dtype
    print(dtype, f'attention {err:.1e}, query input {q_err:.1e} (vs eager {q_same:.1e})')
    assert got.dtype == q_in.dtype == dtype
    assert not torch.isnan(got).any() and not torch.isnan(q_in).any()
    assert err <= TOL[dtype] and q_err <= TOL[dtype] and q_same <= TOL[dtype]
    if dtype == torch.float32:  # same quotients as eager CUDA (the reciprocal and its correction), sines within 7e-7
        assert q_same <= 1e-6


def _module_and_inputs() -> tuple:
    """ImplicitWarp at the window step's shape, fp32, with no parameter near zero; source, target (one frame expanded
    over the slots, as GSMBlock passes it), flow."""
    g = torch.Generator(device='cuda').manual_seed(1)
    m = ImplicitWarp(C, HEADS).cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.1 * torch.randn(p.shape, device='cuda', generator=g))
    source = torch.randn(B, C, H, W, device='cuda', generator=g)
    target = torch.randn(1, C, H, W, device='cuda', generator=g).expand(B, C, H, W)
    return m, source, target, _flow(g)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_module_fused_eager_and_compiled(dtype, monkeypatch):
    m, source, target, flow = _module_and_inputs()
    assert runs_fused(source)
    with torch.no_grad():
        # the reference path in fp32, not float64: the sine encoding's high frequencies (angles up to ~314 rad) turn
        # fp32's rounding of the sampling positions into ~1e-3 relative error at this size in every fp32 path
        want = m(source, target, flow)
        m.to(dtype)
        inputs = (source.to(dtype), target.to(dtype), flow)
        monkeypatch.setattr(implicit_warp, 'FUSED_ATTENTION', True)
        torch._dynamo.reset()
        eager = m(*inputs)
        compiled = torch.compile(m, fullgraph=True)(*inputs)
    errs = _err(eager, want), _err(compiled, want)
    print(dtype, 'module fused eager / compiled', ' '.join(f'{e:.1e}' for e in errs))
    assert max(errs) <= 2 * TOL[dtype]  # the projections' GEMMs add their own rounding
