"""GPU checks of the fast paths: the compiled network against the eager (faithful) one.

python -m pytest -m gpu tests/gpu/test_fast_paths.py -s
"""

from __future__ import annotations

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.ops import cuda_kernel, kernel_status

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_kernel = pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


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
