"""SWSA window attention: the FlexAttention path against the explicit reference, on CPU.

FlexAttention runs eagerly on CPU through its unfused reference (the same ``score_mod`` the fused CUDA kernel
inlines), so these tests check the bias gather, the shift mask from region labels, the window-to-labels mapping and
the gradients through the captured bias. The fused kernel itself is checked in tests/gpu/test_swsa_flex.py.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor

from gsmsr.archs import swsa
from gsmsr.archs.swsa import SHIFT, WINDOW, SWSAGroup, WindowAttention, effective_window, label_mask, shift_labels

pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5}


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def flex_path(monkeypatch):
    """Route window attention through FlexAttention on CPU tensors. CPU flex refuses inputs that require grad
    (its unfused reference has a backward, the device check predates it), so that check is lifted here."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, '_validate_device', lambda *args: None)
    monkeypatch.setattr(swsa, 'use_flex', lambda x: True)


def _official_mask(padded: Tuple[int, int, int], ws, ss) -> Tensor:
    """The official construction: a float region map, windowed, -100.0 where two tokens' regions differ."""
    img = torch.zeros(1, *padded, 1)
    cnt = 0
    for d in (slice(-ws[0]), slice(-ws[0], -ss[0]), slice(-ss[0], None)) if ss[0] else (slice(None),):
        for h in (slice(-ws[1]), slice(-ws[1], -ss[1]), slice(-ss[1], None)) if ss[1] else (slice(None),):
            for w in (slice(-ws[2]), slice(-ws[2], -ss[2]), slice(-ss[2], None)) if ss[2] else (slice(None),):
                img[:, d, h, w, :] = cnt
                cnt += 1
    win = swsa.window_partition(img, ws).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize('size', [(3, 19, 21), (1, 16, 24), (2, 5, 12), (6, 32, 32)])
def test_labels_give_the_official_shift_mask(size):
    ws, ss = effective_window(size, WINDOW, SHIFT)
    padded = tuple(-(-n // s) * s for n, s in zip(size, ws))
    got = label_mask(shift_labels(padded, ws, ss, 'cpu'), torch.float32)
    assert torch.equal(got, _official_mask(padded, ws, ss))


def _windows(size: Tuple[int, int, int], shifted: bool) -> Tuple[int, Optional[Tensor], int]:
    """Tokens per window, region labels (None when unshifted) and windows per sample of a volume of ``size``."""
    ws, ss = effective_window(size, WINDOW, SHIFT if shifted else (0, 0, 0))
    padded = tuple(-(-n // s) * s for n, s in zip(size, ws))
    labels = shift_labels(padded, ws, ss, 'cpu')
    return labels.shape[1], (labels if any(ss) else None), labels.shape[0]


def _attn_and_grads(attn: WindowAttention, x: Tensor, labels, g: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    x = x.clone().requires_grad_(True)
    out = attn(x, labels)
    params = dict(attn.named_parameters())
    grads = torch.autograd.grad(out, [x, *params.values()], g)
    return out.detach(), dict(zip(['x', *params], grads))


# (3, 19, 21): padding, 2x8x8 windows (n = 128); (1, 19, 21): T = 1 windows (n = 64); (2, 5, 12): H shorter than
# the window (n = 80, the top-left slice of the bias index)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shifted', [False, True])
@pytest.mark.parametrize('size', [(3, 19, 21), (1, 19, 21), (2, 5, 12)])
def test_flex_window_attention_matches_explicit(monkeypatch, flex_path, dtype, shifted, size):
    torch.manual_seed(0)
    attn = WindowAttention(48, 2).to(dtype)  # head dim 24 as in the release config
    with torch.no_grad():
        attn.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
    n, labels, nw = _windows(size, shifted)
    batch = 2  # batch > nW: window i uses labels[i % nW]
    x = torch.randn(batch * nw, n, 48, dtype=dtype)
    g = torch.randn(batch * nw, n, 48, dtype=dtype)
    out, grads = _attn_and_grads(attn, x, labels, g)
    monkeypatch.setattr(swsa, 'use_flex', lambda x: False)
    ref, ref_grads = _attn_and_grads(attn, x, labels, g)
    assert rel_err(out, ref) < TOL[dtype]
    for name, ref_grad in ref_grads.items():
        assert rel_err(grads[name], ref_grad) < GRAD_TOL[dtype], name
    if labels is not None:  # the mask matters here: without it the outputs differ
        with torch.no_grad():
            plain = attn._attend(x, attn.position_bias(n), None, swsa.window_attention_ref)
        assert rel_err(plain, ref) > 1e-3


@pytest.mark.parametrize('size', [(3, 19, 21), (1, 16, 24)])
def test_flex_swsa_group_matches_explicit(monkeypatch, flex_path, size):
    """Two blocks (unshifted, shifted) with padding and batch 2, float64: outputs and parameter/input gradients."""
    torch.manual_seed(0)
    group = SWSAGroup(48, depth=2, num_heads=2).double().train()
    with torch.no_grad():
        for p in group.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 48, *size, dtype=torch.float64)
    g = torch.randn_like(x)

    def run() -> Tuple[Tensor, Dict[str, Tensor]]:
        xi = x.clone().requires_grad_(True)
        out = group(xi)
        params = dict(group.named_parameters())
        grads = torch.autograd.grad(out, [xi, *params.values()], g)
        return out.detach(), dict(zip(['x', *params], grads))

    out, grads = run()
    monkeypatch.setattr(swsa, 'use_flex', lambda x: False)
    ref, ref_grads = run()
    assert rel_err(out, ref) < 1e-12
    for name, ref_grad in ref_grads.items():
        assert rel_err(grads[name], ref_grad) < 1e-10, name


def test_flex_is_only_taken_on_cuda_inside_a_compiled_graph():
    x = torch.randn(2, 64, 8)
    assert not swsa.use_flex(x)
    seen = []

    def probe(t: Tensor) -> Tensor:
        seen.append(swsa.use_flex(t))
        return t + 1

    torch.compile(probe, backend='eager')(x)
    assert seen == [False]  # compiling, but a CPU tensor


def test_flex_keeps_the_finite_mask_value(monkeypatch, flex_path):
    """-100.0, not -inf: with scores spanning hundreds, masked pairs still carry weight, and flex must match that."""
    torch.manual_seed(0)
    attn = WindowAttention(48, 2).double()
    n, labels, nw = _windows((3, 19, 21), shifted=True)
    x = 40.0 * torch.randn(2 * nw, n, 48, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x, labels)
        monkeypatch.setattr(swsa, 'use_flex', lambda x: False)
        ref = attn(x, labels)

        # the same attention with an infinite mask: far from ref, so this input tells the mask values apart
        def hard_core(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, labels: Tensor, scale: float) -> Tensor:
            s = (q * scale) @ k.transpose(-2, -1) + bias
            return s.masked_fill(label_mask(labels, s.dtype).unsqueeze(1) != 0, float('-inf')).softmax(-1) @ v

        hard = attn._attend(x, attn.position_bias(n), labels.repeat(2, 1), hard_core)
    assert rel_err(hard, ref) > 1e-3
    assert rel_err(out, ref) < 1e-12


def test_compiled_blocks_trace_the_flex_path(monkeypatch, flex_path):
    """The blocks compiled as ``compile_blocks`` does (here with the aot_eager backend, so FlexAttention runs its
    reference on CPU), with checkpointing as in the release config: the graphs hold flex, and outputs and gradients
    match the eager explicit path."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(swsa, 'use_flex', lambda x: torch.compiler.is_compiling())  # the CUDA condition lifted
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = SWSAGroup(48, depth=2, num_heads=2, use_checkpoint_attn=True, use_checkpoint_ffn=True).double().train()
    fast = copy.deepcopy(ref)
    counter = CompileCounterWithBackend('aot_eager')
    for blk in fast.blocks:
        blk.compile(backend=counter)
    x = torch.randn(2, 48, 3, 19, 21, dtype=torch.float64)
    outs, grads = [], []
    for group in (fast, ref):
        xi = x.clone().requires_grad_(True)
        outs.append(group(xi))
        grads.append(torch.autograd.grad(outs[-1].square().sum(), [xi, *group.parameters()]))
    # (inside the checkpointed region flex sits in a subgraph)
    assert any('flex_attention' in m.code for gm in counter.graphs for m in gm.modules() if hasattr(m, 'code'))
    assert rel_err(outs[0], outs[1]) < 1e-12
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10
