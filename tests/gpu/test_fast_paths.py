"""GPU checks of the fast paths: the compiled network against the eager (faithful) one.

python -m pytest -m gpu tests/gpu/test_fast_paths.py -s
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.ops import cuda_kernel, kernel_status

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_kernel = pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}')


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _nets(fast_kwargs: Optional[dict] = None, **kwargs):
    torch.manual_seed(0)
    cfg = dict(prop_depth=2, attn_depth=2, embed_dims=48, num_heads=4, **kwargs)
    ref = GSMNet(**cfg).cuda()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fast = GSMNet(**cfg, compile_blocks=True, **(fast_kwargs or {})).cuda()
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


@needs_kernel
def test_fast_training_step_matches_the_faithful_step():
    """The fast step of the option files (bf16 autocast, compiled window step, CUDA graphs, MLP checkpointing)
    against the faithful fp32 step, on the capture and on a replay: output and every gradient within bf16 rounding
    (each gradient against the largest gradient norm, as in test_train_graphs_gpu.py)."""
    from gsmsr.models.train_graphs import install_train_graphs

    ref, fast = _nets({'use_checkpoint_mlp': True}, use_checkpoint_attn=True, use_checkpoint_ffn=True)
    graphs = install_train_graphs(fast, warmup=2)
    g = torch.Generator(device='cuda').manual_seed(1)
    for step in range(2):
        lq = torch.rand(1, 6, 3, 48, 48, device='cuda', generator=g)
        gt = torch.rand(1, 6, 3, 192, 192, device='cuda', generator=g)
        res = []
        for net, dtype in ((ref.train(), None), (fast.train(), torch.bfloat16)):
            net.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
                out = net(lq)
            (out.float() - gt).abs().mean().backward()
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            res.append((out.detach().float(), grads))
        (want, want_g), (got, got_g) = res
        assert want_g.keys() == got_g.keys()
        scale = max(float(v.double().norm()) for v in want_g.values())
        errs = {n: float((got_g[n].double() - want_g[n].double()).norm()) / scale for n in want_g}
        worst = max(errs, key=errs.get)
        print(f'fast step {step}: output rel {rel_err(got, want):.1e}, worst gradient {worst} {errs[worst]:.1e}')
        assert rel_err(got, want) <= 2e-2 and errs[worst] <= 5e-2, (step, worst)
    assert not graphs.failed and graphs.replays == 2


PRECOMPILED_CHILD = """
import sys, time, torch
from gsmsr import GSMNet
folder, weights, lq, out = sys.argv[1:]
net = GSMNet(prop_depth=2, attn_depth=2, embed_dims=48, num_heads=4, compile_blocks=True).cuda().eval()
net.load_state_dict(torch.load(weights))
net.precompile_dir = folder
x = torch.load(lq)
with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
    start = time.perf_counter()
    y = net(x).float()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    start = time.perf_counter()
    net(x)
    torch.cuda.synchronize()
print(f'first forward {first:.2f} s, then {time.perf_counter() - start:.2f} s')
torch.save(y, out)
for fn in net.precompiled:
    print(fn.name, '|'.join(fn.events))
"""


def test_precompiled_blocks_match_compiled_and_load_in_a_fresh_process(tmp_path):
    """GSMNet.precompile_dir on CUDA (bf16): the precompiled blocks give the eager network's output within bf16
    rounding (the bar of test_compiled_inference_matches_eager; not against torch.compile's network, which would
    compile everything once more), and a new process loads every one of them and gives the same output (prints its
    load times and first-forward time with -s)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ref, fast = _nets()
    lq = torch.rand(1, 7, 3, 64, 72, device='cuda')
    fast.precompile_dir = str(tmp_path / 'aot')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        want = ref.eval()(lq).float()
        got = fast.eval()(lq).float()
    events = '\n'.join(f'{fn.name}: {"; ".join(fn.events)}' for fn in fast.precompiled)
    print(events)
    assert all(not e.startswith('fallback') for fn in fast.precompiled for e in fn.events), events
    err = (got - want).abs().max().item()
    assert err <= 2e-2, f'max abs {err:.2e} against the eager network'
    torch.save(fast.state_dict(), tmp_path / 'w.pth')
    torch.save(lq, tmp_path / 'lq.pt')
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([root, os.environ.get('PYTHONPATH', '')])}
    args = [str(tmp_path / n) for n in ('aot', 'w.pth', 'lq.pt', 'out.pt')]
    proc = subprocess.run(
        [sys.executable, '-c', PRECOMPILED_CHILD, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    # the functions this clip used (the window step, SWSA's attention in whichever pieces it ran, the per-token
    # residual): every one loaded, none compiled again; the others list no event
    used = [ln.split(' ', 1) for ln in proc.stdout.splitlines() if ln.startswith('gsmsr.archs') and ' ' in ln.strip()]
    names = {name for name, _ in used}
    assert {'gsmsr.archs.gsm_block.GSMBlock.forward', 'gsmsr.archs.swsa.ffn_residual'} <= names, proc.stdout
    assert any('swsa.SWSABlock' in n or 'WindowAttention' in n for n in names), proc.stdout
    assert all(e.startswith('loaded') for _, events in used for e in events.split('|')), proc.stdout
    # the same compiled code, up to one bf16 rounding step: the eager convolutions around the blocks may pick other
    # cuDNN algorithms in another process (H200: 0.4 % of the values one step of 2^-9 apart)
    torch.testing.assert_close(torch.load(tmp_path / 'out.pt'), got, rtol=0, atol=2**-8)
