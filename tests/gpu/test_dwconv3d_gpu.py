"""GPU check of the Triton depthwise conv + bias + GELU (compiled kernels) at a moderately large shape.

    python -m pytest -m gpu tests/gpu/test_dwconv3d_gpu.py -s

Against the float64 reference (F.conv3d on CUDA) for the output and every gradient; then the op inside
torch.compile(fullgraph=True), and the GSM MLP on CUDA (the kernel) against the same module in float64 on the CPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gsmsr.ops.dwconv3d import (
    DEFAULT_CONFIG,
    DWConvConfig,
    dwconv3d_gelu,
    dwconv3d_gelu_backward_triton,
    dwconv3d_gelu_ref,
    dwconv3d_gelu_triton,
    triton_available,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
# max abs error / max |reference|: fp32 only differs in summation order; bf16 outputs and dx are bf16-rounded
# (2^-8), and the backward holds g * GELU' in bf16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# the default tiles, and others that leave partial tiles at 45 x 70 x 200 (C = 200 is no multiple of 16: every
# tile takes the masked copy)
CONFIGS = {
    'default': DEFAULT_CONFIG,
    'c64-w4-no-pairs': dataclasses.replace(DEFAULT_CONFIG, block_c=64, num_warps=4, bf16_pairs=False, maxnreg=0),
    'wide': DWConvConfig(block_h=8, block_w=8, block_c=128, num_warps=8, wgrad_block_c=32, wgrad_groups=7),
}


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0))


def _inputs(dtype: torch.dtype, shape=(2, 5, 45, 70, 200)):
    g = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(*shape, device='cuda', generator=g).to(dtype)
    w = 0.2 * torch.randn(shape[-1], 1, 3, 3, 3, device='cuda', generator=g)
    b = 0.1 * torch.randn(shape[-1], device='cuda', generator=g)
    dout = torch.randn(*shape, device='cuda', generator=g).to(dtype)
    return x, w, b, dout


@pytest.mark.parametrize('config', list(CONFIGS))
@pytest.mark.parametrize('gelu', [True, False])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_kernels_match_float64_reference(dtype, gelu, config):
    cfg = CONFIGS[config]
    x, w, b, dout = _inputs(dtype)
    xs, ws, bs = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    want = dwconv3d_gelu_ref(xs, ws, bs, gelu)
    rx, rw, rb = torch.autograd.grad(want, (xs, ws, bs), dout.double())
    y = dwconv3d_gelu_triton(x, w, b, gelu, cfg)
    dx, dw, db = dwconv3d_gelu_backward_triton(dout, x, w, b, gelu, cfg)
    errs = {'out': _err(y, want.detach()), 'dx': _err(dx, rx), 'dw': _err(dw, rw), 'db': _err(db, rb)}
    print(dtype, 'gelu' if gelu else 'conv', config, ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    assert y.dtype == dx.dtype == dtype and dw.dtype == db.dtype == torch.float32
    assert not any(torch.isnan(t).any() for t in (y, dx, dw, db))
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_interior_tiles(dtype):
    """The default compiled (inline rcp, bf16 pairs, interior tiles unmasked: C = 96, 36 x 40 pixels) against the
    float64 reference and the masked, channel-by-channel path (64-channel blocks, no pairs): fp32 within summation
    order, bf16 within one output rounding."""
    x, w, b, dout = _inputs(dtype, shape=(1, 5, 36, 40, 96))
    xs, ws, bs = x.double().requires_grad_(), w.double().requires_grad_(), b.double().requires_grad_()
    want = dwconv3d_gelu_ref(xs, ws, bs)
    rx, rw, rb = torch.autograd.grad(want, (xs, ws, bs), dout.double())
    y = dwconv3d_gelu_triton(x, w, b, True, DEFAULT_CONFIG)
    dx, dw, db = dwconv3d_gelu_backward_triton(dout, x, w, b, True, DEFAULT_CONFIG)
    errs = {'out': _err(y, want.detach()), 'dx': _err(dx, rx), 'dw': _err(dw, rw), 'db': _err(db, rb)}
    print(dtype, ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) <= TOL[dtype], errs
    masked = dataclasses.replace(DEFAULT_CONFIG, block_c=64, num_warps=4, bf16_pairs=False)
    base = dwconv3d_gelu_triton(x, w, b, True, masked)
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-18  # one bf16 ulp; fp32: FMA contraction may differ
    torch.testing.assert_close(y.double(), base.double(), rtol=rtol, atol=1e-5)


def test_op_under_compile_matches_eager():
    x, w, b, dout = _inputs(torch.bfloat16, shape=(1, 3, 20, 33, 96))

    def fn(x, w, b):
        return dwconv3d_gelu(x * 2, w, b) + 1

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = f(xs, ws, bs)
        results.append([y.detach(), *torch.autograd.grad(y, (xs, ws, bs), dout)])
    for got, want in zip(*results):  # the same kernels run in both; only the pointwise ops around them may differ
        torch.testing.assert_close(got, want)


def test_mlp_on_cuda_matches_float64_cpu():
    from gsmsr.archs.gsm_block import MlpDW

    torch.manual_seed(0)
    k, h, w, dim = 3, 24, 40, 32
    mlp = MlpDW(dim, 4 * dim).double()
    x = torch.randn(2, k * h * w, dim, dtype=torch.float64)
    want = mlp(x, k, h, w)
    got = mlp.float().cuda()(x.float().cuda(), k, h, w)
    assert _err(got, want.cuda()) <= 1e-5
