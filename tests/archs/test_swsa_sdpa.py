"""SWSA window attention through SDPA (swsa.window_attention_sdpa) against the explicit reference, on CPU.

SDPA runs its math path on CPU, the same values as its fused CUDA kernel up to rounding, so these tests check the
part that is ours: the bias as a mask broadcast over the windows, and the windows that hold several shift regions
(the last along each shifted axis) redone with their region masks. Sizes cover padding, all three axes shifted,
an axis no longer than the window (not shifted), batch 2, and fewer windows than max_windows (and SDPA's
SDPA_MAX_WINDOWS, and the parts of sdpa_part_windows) and more. Also here: the shift mask built from region labels
against the official construction, and its finite -100.0 value kept by the explicit path and SDPA.
"""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
from torch import Tensor

from gsmsr.archs import swsa
from gsmsr.archs.swsa import SHIFT, WINDOW, SWSAGroup, WindowAttention, effective_window, label_mask, shift_labels


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _group(seed: int = 0) -> SWSAGroup:
    torch.manual_seed(seed)
    group = SWSAGroup(48, depth=2, num_heads=2).eval()  # unshifted then shifted; head dim 24 as released
    with torch.no_grad():
        for p in group.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for blk in group.blocks:
            blk.attn.relative_position_bias_table.normal_(0, 1.0)  # a bias that matters
    return group


@pytest.mark.parametrize('size', [(5, 18, 20), (2, 19, 21), (4, 9, 30)])
@pytest.mark.parametrize('max_windows', [1024, 5])
def test_sdpa_swsa_group_matches_explicit(monkeypatch, size, max_windows):
    """With max_windows 5 SDPA runs in slices of windows and the projections in parts of one window plane (a part
    of 2 planes at most: 12 windows): batch 2 then has parts that end the volume along the frames and parts that
    do not."""
    group = _group()
    x = torch.randn(2, 48, *size, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(swsa.WindowAttention, 'max_windows', max_windows)
    monkeypatch.setattr(swsa.WindowAttention, 'sdpa_part_windows', 12 if max_windows == 5 else 65536)
    monkeypatch.setattr(swsa, 'SDPA_MAX_WINDOWS', max_windows)
    calls = []
    sdpa = swsa.window_attention_sdpa
    monkeypatch.setattr(swsa, 'window_attention_sdpa', lambda *a, **k: calls.append(k) or sdpa(*a, **k))
    monkeypatch.setattr(swsa, 'use_sdpa', lambda x: True)
    with torch.no_grad():
        got = group(x)
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: False)
        want = group(x)
    shifted = {i for i, (n, w) in enumerate(zip(size, swsa.WINDOW)) if n > w}
    if max_windows == 1024:  # one call a block
        assert [set(c['shifted_axes']) for c in calls] == [set(), shifted]
    else:
        assert len(calls) > 2
        assert {tuple(c['shifted_axes']) for c in calls if c['grid'][0] == 1} >= {tuple(sorted(shifted - {0}))}
    assert rel_err(got, want) < 2e-6


def test_mixed_windows_are_the_last_along_each_shifted_axis():
    """The premise of window_attention_sdpa: a window holds tokens of several regions only where it is the last
    along an axis with a shift."""
    size = (6, 24, 40)
    ws, ss = swsa.effective_window(size, swsa.WINDOW, swsa.SHIFT)
    grid = tuple(n // w for n, w in zip(size, ws))
    labels = swsa.shift_labels(size, ws, ss, 'cpu').view(*grid, -1)
    mixed = (labels != labels[..., :1]).any(-1)
    last = torch.zeros(grid, dtype=torch.bool)
    last[-1], last[:, -1], last[:, :, -1] = True, True, True
    assert torch.equal(mixed, last)


def test_compiled_block_traces_sdpa_in_one_graph(monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    group = _group()
    x = torch.randn(1, 48, 5, 18, 20, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(swsa, 'use_sdpa', lambda x: True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    blk = group.blocks[1]
    t = x.permute(0, 2, 3, 4, 1).contiguous()
    ws, ss = swsa.effective_window((5, 18, 20), swsa.WINDOW, swsa.SHIFT)
    labels = swsa.shift_labels((6, 24, 24), ws, ss, 'cpu')
    with torch.no_grad():
        got = torch.compile(blk, backend=counter, fullgraph=True)(t.clone(), labels)
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: False)
        want = blk(t.clone(), labels)
    assert counter.frame_count == 1
    nodes = [n for gm in counter.graphs for n in gm.graph.nodes]
    assert any('scaled_dot_product_attention' in str(n.target) for n in nodes)
    assert rel_err(got, want) < 2e-6


def test_large_volumes_attend_in_parts_compiled_piece_by_piece(monkeypatch, windows_and_merged):
    """A volume that SDPA attends in parts runs as three pieces (windows, parts, merge), each compiled on its own:
    a part's graph serves every part of its kind, and the whole residual is never compiled. The last part of a
    volume shifted along the frames (shifted there too) runs eagerly. Same values as the explicit path and the eager
    pieces."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from gsmsr.archs.swsa import compile_swsa_blocks

    group = _group()
    x = torch.randn(1, 48, 12, 18, 20, generator=torch.Generator().manual_seed(3))  # 6 x 3 x 3 windows, padded
    monkeypatch.setattr(swsa.WindowAttention, 'sdpa_part_windows', 20)  # 2 planes of 9 windows a part: 3 parts
    with torch.no_grad():
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: False)
        want = group(x)
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: True)
        assert group.blocks[1].sdpa_parts(x.permute(0, 2, 3, 4, 1)) == [(0, 0, 2), (0, 2, 4), (0, 4, 6)]
        with windows_and_merged() as held:
            eager = group(x)
        assert len(held) == 4 and held[0] is held[1] and held[2] is held[3]  # outputs over the windows: one volume
        torch._dynamo.reset()
        counter = CompileCounterWithBackend('aot_eager')
        compile_swsa_blocks(group.blocks, backend=counter)
        names = []
        for blk in group.blocks:
            blk.attend = lambda *a: names.append('attend')  # never called over such a volume
        got = group(x)
    assert names == []
    # unshifted: windows, part, merge; shifted: windows, the parts before the last, merge; the per-token branch
    assert counter.frame_count == 3 + 3 + 1
    assert rel_err(got, want) < 2e-6 and rel_err(eager, want) < 2e-6


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


def test_shift_mask_keeps_the_finite_value(monkeypatch):
    """-100.0, not -inf: with scores spanning hundreds, masked pairs still carry weight. The explicit path keeps that
    value, and so does SDPA (its windows of several regions are redone with the bias plus their region mask)."""
    torch.manual_seed(0)
    attn = WindowAttention(48, 2).double()
    size = (3, 19, 21)  # padding, all three axes shifted
    ws, ss = effective_window(size, WINDOW, SHIFT)
    padded = tuple(-(-n // s) * s for n, s in zip(size, ws))
    labels = shift_labels(padded, ws, ss, 'cpu')
    nw, n = labels.shape
    grid = (2, *(p // w for p, w in zip(padded, ws)))  # batch 2: window i uses labels[i % nW]
    x = 40.0 * torch.randn(2 * nw, n, 48, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: True)
        got = attn(x, labels, grid, (0, 1, 2))
        monkeypatch.setattr(swsa, 'use_sdpa', lambda x: False)
        ref = attn(x, labels, grid, (0, 1, 2))

        # the same attention with an infinite mask: far from ref, so this input tells the mask values apart
        def hard_core(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, labels: Tensor, scale: float) -> Tensor:
            s = (q * scale) @ k.transpose(-2, -1) + bias
            return s.masked_fill(label_mask(labels, s.dtype).unsqueeze(1) != 0, float('-inf')).softmax(-1) @ v

        hard = attn._attend(x, attn.position_bias(n), labels.repeat(2, 1), hard_core)
        plain = attn._attend(x, attn.position_bias(n), None, swsa.window_attention_ref)  # no shift mask at all
    assert rel_err(hard, ref) > 1e-3
    assert rel_err(plain, ref) > 1e-3
    assert rel_err(got, ref) < 1e-12
