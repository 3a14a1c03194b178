"""GPU checks (run on a CUDA machine with ``pip install .[cuda]``): mamba-ssm kernels vs the PyTorch path.

    python -m pytest -m gpu tests/gpu -s
Skips cleanly without CUDA or mamba-ssm.
"""

from __future__ import annotations

import time

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.ops import cuda_kernel, kernel_status, selective_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_kernel = pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@needs_kernel
@pytest.mark.parametrize('length', [37, 4096, 20000])
def test_selective_scan_kernel_matches_reference(length):
    g = torch.Generator(device='cuda').manual_seed(length)
    b, d, n = 2, 64, 16
    r = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    inp = dict(
        u=r(b, d, length),
        delta=0.5 * r(b, d, length),
        A=-torch.rand(d, n, device='cuda', generator=g) * 3,
        B=r(b, n, length),
        C=r(b, n, length),
        D=r(d),
        z=r(b, d, length),
        delta_bias=0.3 * r(d),
    )
    outs, grads = [], []
    for backend in ('kernel', 'ref'):
        x = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y = selective_scan(**x, delta_softplus=True, backend=backend)
        gy = torch.randn(y.shape, device='cuda', generator=torch.Generator(device='cuda').manual_seed(1))
        outs.append(y)
        grads.append(torch.autograd.grad(y, list(x.values()), gy))
    errs = {'out': rel_err(outs[0], outs[1])}
    errs.update({f'd{k}': rel_err(a, b) for k, a, b in zip(inp, grads[0], grads[1])})
    print(f'L={length}', ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) <= 1e-4, errs


@needs_kernel
def test_gsmnet_kernel_path_matches_reference_path():
    torch.manual_seed(0)
    cfg = dict(upscale=4, prop_depth=2, attn_depth=2, pa_frame=2, embed_dims=32, num_heads=4)
    ref = GSMNet(**cfg, scan_backend='ref').cuda().train()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ker = GSMNet(**cfg, scan_backend='kernel').cuda().train()
    ker.load_state_dict(ref.state_dict())
    lq = torch.rand(1, 5, 3, 48, 52, device='cuda')
    res = []
    for net in (ref, ker):
        out = net(lq)
        out.square().mean().backward()
        res.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    err_out = rel_err(res[1][0], res[0][0])
    names = list(res[0][1])
    err_all = rel_err(
        torch.cat([res[1][1][n].flatten() for n in names]), torch.cat([res[0][1][n].flatten() for n in names])
    )
    # implicit_align.k.bias shifts all four logits of a pixel equally: its exact gradient is 0, so only
    # rounding noise (~1e-14) remains there and a relative error is meaningless.
    per_param = sorted(
        ((rel_err(res[1][1][n], res[0][1][n]), n) for n in names if n != 'implicit_align.k.bias'), reverse=True
    )
    print(
        f'GSMNet kernel vs ref: output rel {err_out:.1e}, all gradients rel {err_all:.1e}, '
        f'worst single tensor {per_param[0][0]:.1e} ({per_param[0][1]})'
    )
    assert err_out <= 1e-4 and err_all <= 1e-4
    assert per_param[0][0] <= 1e-3


def test_release_config_forward_180x320():
    net = GSMNet().cuda().eval()
    lq = torch.rand(1, 5, 3, 180, 320, device='cuda')
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        net(lq)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = net(lq)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(
        f'release config, 5x180x320 LR, fp32: {dt / 5 * 1e3:.0f} ms/frame, '
        f'peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, {torch.cuda.get_device_name()}'
    )
    assert out.shape == (1, 5, 3, 720, 1280) and torch.isfinite(out).all()
