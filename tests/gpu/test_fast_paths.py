"""GPU checks of the fast paths: the segment-parallel scan and the compiled network, against the faithful path.

python -m pytest -m gpu tests/gpu/test_fast_paths.py -s
"""

from __future__ import annotations

import math

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.ops import cuda_kernel, kernel_status, selective_scan

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_kernel = pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _scan_inputs(length: int, dtype: torch.dtype, dim: int = 384, slow_decay: bool = True):
    g = torch.Generator(device='cuda').manual_seed(length)
    r = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    lo, hi = (1e-3, 0.1) if slow_decay else (0.5, 2.0)
    dt = torch.exp(torch.rand(dim, device='cuda', generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo))
    return dict(
        u=r(1, dim, length).to(dtype),
        delta=(0.5 * r(1, dim, length)).to(dtype),
        A=-torch.arange(1, 17, device='cuda', dtype=torch.float32).repeat(dim, 1),
        B=r(1, 16, length).to(dtype),
        C=r(1, 16, length).to(dtype),
        D=torch.ones(dim, device='cuda'),
        z=r(1, dim, length).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


@needs_kernel
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('segments, slow_decay', [(4, True), (16, True), (16, False)])
def test_segmented_scan_matches_one_pass(dtype, segments, slow_decay):
    inp = _scan_inputs(5 * 64 * 112, dtype, slow_decay=slow_decay)
    with torch.no_grad():
        one = selective_scan(**inp, delta_softplus=True, backend='kernel', segments=1)
        seg = selective_scan(**inp, delta_softplus=True, backend='kernel', segments=segments)
    err = rel_err(seg, one)
    print(f'{dtype} S={segments} slow_decay={slow_decay}: rel {err:.1e}')
    assert err <= (1e-5 if dtype == torch.float32 else 1e-2)


def _nets(**kwargs):
    torch.manual_seed(0)
    cfg = dict(prop_depth=2, attn_depth=2, embed_dims=48, num_heads=4, **kwargs)
    ref = GSMNet(**cfg).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fast = GSMNet(**cfg, compile_blocks=True).cuda()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@needs_kernel
def test_compiled_inference_matches_eager():
    ref, fast = _nets()
    lq = torch.rand(1, 7, 3, 64, 72, device='cuda')
    with torch.no_grad():
        want = ref.eval()(lq)
        got32 = fast.eval()(lq)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            got16 = fast(lq).float()
    e32, e16 = (got32 - want).abs().max().item(), (got16 - want).abs().max().item()
    print(f'compiled fp32 max abs {e32:.1e}, compiled bf16 max abs {e16:.1e}')
    assert e32 <= 1e-4 and e16 <= 2e-2


@needs_kernel
def test_compiled_training_step_matches_eager():
    ref, fast = _nets(use_checkpoint_attn=True, use_checkpoint_ffn=True)
    lq = torch.rand(1, 6, 3, 48, 52, device='cuda')
    res = []
    for net in (ref.train(), fast.train()):
        out = net(lq)
        out.square().mean().backward()
        res.append((out.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])))
    e_out, e_grad = rel_err(res[1][0], res[0][0]), rel_err(res[1][1], res[0][1])
    print(f'compiled training: output rel {e_out:.1e}, all gradients rel {e_grad:.1e}')
    assert e_out <= 1e-5 and e_grad <= 1e-4
