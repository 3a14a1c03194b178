"""GPU checks of SWSA's fused FlexAttention path: compiled SWSA blocks (as ``compile_blocks`` compiles them) against
the eager explicit path, forward and backward, fp32 and bf16 autocast.

python -m pytest -m gpu tests/gpu/test_swsa_flex_gpu.py -s

The flex path is off by default (``swsa.FLEX_ATTENTION``) and never taken in fp32; these tests force it on
(:func:`flex_everywhere`) to check the fused kernel's values in both precisions.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor

from gsmsr.archs import swsa
from gsmsr.archs.swsa import SWSAGroup

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


@pytest.fixture(autouse=True)
def flex_everywhere(monkeypatch):
    monkeypatch.setattr(swsa, 'use_flex', lambda x: x.is_cuda and torch.compiler.is_compiling())


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _groups(checkpoint: bool) -> Tuple[SWSAGroup, SWSAGroup, list]:
    """An eager reference group and a copy whose blocks are compiled in place; the compiled graphs are recorded."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = SWSAGroup(192, depth=2, num_heads=8, use_checkpoint_attn=checkpoint).cuda().train()  # head dim 24
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = copy.deepcopy(ref)
    counter = CompileCounterWithBackend('inductor')
    for blk in fast.blocks:
        blk.compile(backend=counter)
    return ref, fast, counter.graphs


def _run(group: SWSAGroup, x: Tensor, g: Tensor, dtype: Optional[torch.dtype]) -> Tuple[Tensor, Dict[str, Tensor]]:
    xi = x.clone().requires_grad_(True)
    with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        out = group(xi)
    params = dict(group.named_parameters())
    grads = torch.autograd.grad(out.float(), [xi, *params.values()], g)
    return out.detach().float(), dict(zip(['x', *params], grads))


def _uses_flex(graphs: list) -> bool:
    # modules(): inside a checkpointed region flex sits in a subgraph
    return any('flex_attention' in m.code for gm in graphs for m in gm.modules() if hasattr(m, 'code'))


# (3, 40, 44): padding, n = 128, 2x(2x5x6) windows; (1, 36, 36): T = 1 windows (n = 64); (2, 5, 20): H shorter
# than the window (n = 80)
@pytest.mark.parametrize('size', [(3, 40, 44), (1, 36, 36), (2, 5, 20)])
def test_compiled_flex_group_fp32(size):
    ref, fast, graphs = _groups(checkpoint=False)
    x = torch.randn(2, 192, *size, device='cuda')
    g = torch.randn_like(x)
    out, grads = _run(fast, x, g, None)
    assert _uses_flex(graphs), 'the compiled blocks did not take the FlexAttention path'
    want, want_grads = _run(ref, x, g, None)
    errs = {name: rel_err(grads[name], w) for name, w in want_grads.items()}
    worst = max(errs, key=errs.get)
    print(f'\nfp32 {size}: out rel {rel_err(out, want):.1e}, worst grad {worst} {errs[worst]:.1e}')
    assert rel_err(out, want) < 1e-4
    for name, err in errs.items():
        assert err < 5e-4, (name, err)
    with torch.no_grad():  # the inference graph (no logsumexp output, in-place FFN)
        assert rel_err(fast(x), ref(x)) < 1e-4


@pytest.mark.parametrize('checkpoint', [False, True])
def test_compiled_flex_group_bf16(checkpoint):
    """bf16 autocast: the compiled flex group is no further from the fp32 reference than the eager bf16 explicit
    group (plus a small margin), outputs and every gradient."""
    ref, fast, graphs = _groups(checkpoint)
    x = torch.randn(2, 192, 3, 40, 44, device='cuda')
    g = torch.randn_like(x)
    out, grads = _run(fast, x, g, torch.bfloat16)
    assert _uses_flex(graphs), 'the compiled blocks did not take the FlexAttention path'
    base, base_grads = _run(ref, x, g, torch.bfloat16)
    want, want_grads = _run(ref, x, g, None)
    e_fast, e_base = rel_err(out, want), rel_err(base, want)
    print(f'\nbf16 ckpt={checkpoint}: out rel flex {e_fast:.1e}, explicit {e_base:.1e}')
    assert e_fast < 2 * e_base + 1e-3
    for name, w in want_grads.items():
        e_fast, e_base = rel_err(grads[name], w), rel_err(base_grads[name], w)
        print(f'  grad {name}: flex {e_fast:.1e}, explicit {e_base:.1e}')
        assert e_fast < 2 * e_base + 2e-3, name


def test_flex_core_matches_reference_compiled():
    """The bare cores at the release shape (many windows, 8 heads, n = 128, head dim 24), shifted, fp32:
    compiled flex against the explicit reference, output and the q, k, v and bias gradients."""
    torch.manual_seed(0)
    w, heads, n, d = 2 * 230, 8, 128, 24
    q, k, v = (torch.randn(w, heads, n, d, device='cuda', requires_grad=True) for _ in range(3))
    bias = torch.randn(heads, n, n, device='cuda', requires_grad=True)
    labels = torch.randint(0, 4, (230, n), device='cuda', dtype=torch.int32)
    g = torch.randn(w, heads, n, d, device='cuda')
    flex = torch.compile(swsa.window_attention_flex, dynamic=False)
    out = flex(q, k, v, bias, labels, d**-0.5)
    want = swsa.window_attention_ref(q, k, v, bias, labels, d**-0.5)
    got_grads = torch.autograd.grad(out, (q, k, v, bias), g)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), g)
    assert rel_err(out, want) < 1e-5
    for name, a, b in zip('qkvb', got_grads, want_grads):
        assert rel_err(a, b) < 1e-4, name


def test_compiled_flex_group_new_sizes():
    """New input sizes recompile the blocks with dynamic shapes (as the T-slabs of GSMNet do): the symbolic window
    count reaches the score_mod's ``b % nW``. fp32, forward and input gradient at each size."""
    ref, fast, graphs = _groups(checkpoint=False)
    for size in [(3, 40, 44), (5, 40, 44), (3, 48, 52), (2, 33, 41)]:
        x = torch.randn(1, 192, *size, device='cuda')
        g = torch.randn_like(x)
        out, grads = _run(fast, x, g, None)
        want, want_grads = _run(ref, x, g, None)
        print(f'\n{size}: out rel {rel_err(out, want):.1e}, x grad rel {rel_err(grads["x"], want_grads["x"]):.1e}')
        assert rel_err(out, want) < 1e-4
        assert rel_err(grads['x'], want_grads['x']) < 5e-4
    assert _uses_flex(graphs)
