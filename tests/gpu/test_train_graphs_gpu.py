"""GPU checks of the CUDA-graphed training step (gsmsr.models.train_graphs) against the same step without graphs.

python -m pytest -m gpu tests/gpu/test_train_graphs_gpu.py -s
"""

from __future__ import annotations

import copy

import pytest
import torch

from gsmsr import GSMNet
from gsmsr.models.train_graphs import install_train_graphs
from gsmsr.ops import cuda_kernel, kernel_status

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA'),
    pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}'),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize('dtype', [None, torch.bfloat16], ids=['fp32', 'bf16'])
def test_graphed_step_matches_the_step_without_graphs(dtype):
    torch.manual_seed(0)
    cfg = dict(prop_depth=2, attn_depth=1, embed_dims=32, num_heads=4, use_checkpoint_attn=True)
    ref = GSMNet(**cfg, use_checkpoint_ffn=True, use_checkpoint_mlp=True).cuda().train()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net = copy.deepcopy(ref)
    graphs = install_train_graphs(net, warmup=2)
    g = torch.Generator(device='cuda').manual_seed(1)
    for step in range(3):  # capture, then two replays on new data
        lq = torch.rand(1, 5, 3, 64, 64, device='cuda', generator=g)
        gt = torch.rand(1, 5, 3, 256, 256, device='cuda', generator=g)
        results = []
        for m in (ref, net):
            m.zero_grad(set_to_none=True)
            with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
                out = m(lq)
            loss = (out.float() - gt).abs().mean()
            loss.backward()
            results.append((out.detach().float(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        (want, want_g), (got, got_g) = results
        tol = 1e-5 if dtype is None else 2e-2
        assert rel_err(got, want) < tol, step
        assert want_g.keys() == got_g.keys()
        # each gradient against the largest gradient norm: some are zero up to rounding (the implicit warp's key
        # bias shifts all logits of a query equally), and the kernels' atomics round differently run to run
        scale = max(float(g.double().norm()) for g in want_g.values())
        errs = {n: float((got_g[n].double() - want_g[n].double()).norm()) / scale for n in want_g}
        worst = max(errs, key=errs.get)
        print(f'{dtype} step {step}: output {rel_err(got, want):.2e}, worst gradient {worst} {errs[worst]:.2e}')
        assert errs[worst] < tol, (step, worst)
    assert not graphs.failed and len(graphs.graphs) == 1 and graphs.replays == 3
    # gradients kept from the last step could alias the graph's buffers: refused, not silently doubled
    with pytest.raises(RuntimeError, match='zero_grad'):
        with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            net(lq)
    # eval / no-grad calls run the original forward
    with torch.no_grad():
        net.eval()(torch.rand(1, 5, 3, 64, 64, device='cuda'))
    assert graphs.replays == 3
