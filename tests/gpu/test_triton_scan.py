"""GPU check of the Triton selective scan at GSM's shape (B = 1, D = 384, N = 16, L = 200000), compiled kernels.

    python -m pytest -m gpu tests/gpu/test_triton_scan.py -s
Baseline: mamba-ssm's ``selective_scan_fn`` when importable, else the PyTorch scan. Skips without CUDA + Triton.
"""

from __future__ import annotations

import math

import pytest
import torch

from gsmsr.ops import cuda_kernel, selective_scan, selective_scan_ref
from gsmsr.ops.selective_scan_triton import selective_scan_triton, triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
# relative L2 error bounds: float32 differs only in summation order; bf16 outputs/gradients are rounded to bf16
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_triton_scan_matches_baseline_at_gsm_shape(dtype):
    batch, dim, state, length = 1, 384, 16, 200_000
    g = torch.Generator(device='cuda').manual_seed(0)
    r = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, device='cuda', generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inp = dict(
        u=r(batch, dim, length).to(dtype),
        delta=(0.5 * r(batch, dim, length)).to(dtype),
        A=-torch.arange(1, state + 1, device='cuda', dtype=torch.float32).repeat(dim, 1),
        B=r(batch, state, length).to(dtype),
        C=r(batch, state, length).to(dtype),
        D=torch.ones(dim, device='cuda'),
        z=r(batch, dim, length).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )
    baseline = (lambda **k: selective_scan(**k, backend='kernel')) if cuda_kernel() else selective_scan_ref
    gy = torch.randn(batch, dim, length, device='cuda', generator=g).to(dtype)
    outs, grads = [], []
    for scan in (selective_scan_triton, baseline):
        x = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y = scan(**x, delta_softplus=True)
        outs.append(y.detach())
        grads.append(torch.autograd.grad(y, list(x.values()), gy))
        del x, y
    errs = {'out': rel_err(outs[0], outs[1])}
    errs.update({f'd{k}': rel_err(a, b) for k, a, b in zip(inp, grads[0], grads[1])})
    print(f'{dtype} vs {getattr(baseline, "__module__", baseline)}:', ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) <= REL_TOL[dtype], errs


def test_gsmnet_with_triton_scan_matches_reference_scan():
    from gsmsr import GSMNet

    torch.manual_seed(0)
    cfg = dict(prop_depth=2, attn_depth=2, embed_dims=48, num_heads=4)
    ref = GSMNet(**cfg, scan_backend='ref').cuda().eval()
    tri = GSMNet(**cfg, scan_backend='triton').cuda().eval()
    tri.load_state_dict(ref.state_dict())
    lq = torch.rand(1, 5, 3, 64, 64, device='cuda')
    with torch.no_grad():
        outs = {'triton': tri(lq), 'ref': ref(lq)}
    err = rel_err(outs['triton'], outs['ref'])
    print(f'GSMNet triton vs ref scan: {err:.1e}')
    assert err <= 1e-5
