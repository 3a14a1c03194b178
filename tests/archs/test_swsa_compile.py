"""How ``compile_blocks`` compiles the SWSA blocks (swsa.compile_swsa_blocks), on CPU with the aot_eager backend.

Without autograd the per-token branch runs a few frames at a time. Compiled as part of the whole block forward, that
loop was unrolled into the graph, one copy per slice, so compile time grew with the clip (on CPU 26 s at 4 slices,
68 s at 16; on an H200 ~44 s per SWSA graph for 28-frame chunks). Now the attention residual is one graph per block
kind and the branch one graph for every block (dynamic once a second clip length comes), whatever the clip length;
the values are the eager ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gsmsr.archs import swsa
from gsmsr.archs.swsa import SWSAGroup, compile_swsa_blocks, ffn_frames


@pytest.mark.parametrize(
    'frames,pixels,want',
    [(28, 360 * 640, 1), (20, 180 * 320, 1), (20, 64 * 64, 10), (17, 64 * 64, 1), (6, 100, 6), (1, 10**6, 1)],
)
def test_ffn_frames_divides_the_clip_within_the_token_budget(frames, pixels, want):
    step = ffn_frames(frames, pixels)
    assert step == want and frames % step == 0
    assert step == 1 or step * pixels <= swsa.FFN_TOKENS


def _graphs_with(counter, name: str) -> int:
    return sum(any(name in str(n.target) for n in gm.graph.nodes) for gm in counter.graphs)


def test_compiled_blocks_compile_the_branch_once_for_any_clip_length(monkeypatch):
    """The branch's residual add is in its graph, written into the block's volume in place (a whole clip: the stored
    frames' layout, which the branch's channels-last output does not share)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    eager = SWSAGroup(16, depth=2, num_heads=2).eval()  # unshifted then shifted
    fast = SWSAGroup(16, depth=2, num_heads=2).eval()
    fast.load_state_dict(eager.state_dict())
    h, w = 9, 12
    monkeypatch.setattr(swsa, 'FFN_TOKENS', h * w)  # one frame a slice, as for real frame sizes
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    compile_swsa_blocks(fast.blocks, backend=counter)
    try:
        for t in (6, 10, 14):  # 6, 10, then 14 slices a block
            x = torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(t))
            with torch.no_grad():
                got, want = fast(x.clone()), eager(x.clone())
            assert rel_err(got, want) < 1e-6
        breaks = dict(torch._dynamo.utils.counters['graph_break'])
    finally:
        torch._dynamo.reset()
    assert not breaks
    # the branch: static, then dynamic at the second length (the slices' strides follow the clip's layout); 2 blocks
    # and 30 slices, at most 2 graphs
    assert 1 <= _graphs_with(counter, 'gelu') <= 2
    assert counter.frame_count - _graphs_with(counter, 'gelu') == 2 * 3  # attention: static, per shift and length
    for gm in counter.graphs:  # not unrolled: each graph holds its block's linears once
        linears = sum('function linear' in str(n.target) for n in gm.graph.nodes)
        branch = any('gelu' in str(n.target) for n in gm.graph.nodes)
        assert linears == (3 if branch else 2)
        if branch:  # the residual: an in-place add on the graph's input
            assert any('iadd' in str(n.target) for n in gm.graph.nodes), gm.graph


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_group_consume_frees_its_input_after_the_first_block(monkeypatch):
    """SWSAGroup.consume (the streaming sweep's SWSA call): the input, held by nobody else, is freed before the second
    block runs (the group's peak then holds one volume less), which gets its input to write over; the output is
    forward's."""
    import weakref

    torch.manual_seed(0)
    group = SWSAGroup(16, depth=2, num_heads=4).eval()
    x = torch.randn(1, 16, 4, 16, 16)
    seen = []
    with torch.no_grad():
        want = group(x)
        held = [x.clone()]
        alive = weakref.ref(held[0])
        second = group.blocks[1].forward
        monkeypatch.setattr(
            group.blocks[1], 'forward', lambda t, lab, own: seen.append((alive() is None, own)) or second(t, lab, own)
        )
        got = group.consume(held)
    assert held == [] and seen == [(True, True)] and torch.equal(got, want)


@pytest.mark.parametrize('width,max_windows,steps', [(48, 8, [6] * 15), (56, 2, [2] * 52 + [1])])
def test_explicit_steps_run_from_eager_code_each_compiled_on_its_own(
    monkeypatch, windows_and_merged, width, max_windows, steps
):
    """Without autograd and SDPA, a volume of more windows than one step of the explicit path runs as pieces
    (windows, one step after the other, merge), each compiled on its own: traced as one graph, Inductor computed every
    step's scores before the first softmax. Steps are equal where a divisor of the window count allows (one graph a
    kind), else a shorter last one adds one. Same values as the eager blocks in one step."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    group = SWSAGroup(16, depth=2, num_heads=2).eval()
    x = torch.randn(1, 16, 6, 40, width, generator=torch.Generator().manual_seed(1))  # 3 x 5 x 6 or 7 windows
    with torch.no_grad():
        want = group(x)  # one step: 512 windows
        monkeypatch.setattr(swsa.WindowAttention, 'max_windows', max_windows)
        chunks = group.blocks[1].window_chunks(x.permute(0, 2, 3, 4, 1))
        assert [e - s for s, e in chunks] == steps and chunks[-1][1] == sum(steps)
        with windows_and_merged() as held:
            eager = group(x)
        assert len(held) == 4 and held[0] is held[1] and held[2] is held[3]  # steps over the windows: one volume
        torch._dynamo.reset()
        counter = CompileCounterWithBackend('aot_eager')
        try:
            compile_swsa_blocks(group.blocks, backend=counter)
            for blk in group.blocks:
                monkeypatch.setattr(blk, 'attend', lambda *a: pytest.fail('the whole residual was called'))
            got = group(x)
        finally:
            torch._dynamo.reset()
    # unshifted: windows, step(s), merge; shifted: the same with labels; one per-token branch
    kinds = len(set(steps))
    assert counter.frame_count == 2 * (2 + kinds) + 1
    assert rel_err(eager, want) < 1e-6 and rel_err(got, want) < 1e-6


@pytest.mark.parametrize('sdpa', [False, True])
def test_block_writes_over_an_input_it_is_given(monkeypatch, sdpa):
    """Over a volume of several SDPA parts or explicit steps, a block given its input (``own``) returns that tensor,
    written over (the merge holds no third volume for its result); not given it, or given one that is not contiguous,
    the block leaves it as it was and merges into a new contiguous volume. Same values either way."""
    from gsmsr.archs.swsa import SHIFT, WINDOW, SWSABlock, effective_window, shift_labels

    torch.manual_seed(0)
    blk = SWSABlock(16, 2, SHIFT).eval()
    monkeypatch.setattr(swsa, 'use_sdpa', lambda x: sdpa)
    monkeypatch.setattr(swsa.WindowAttention, 'sdpa_part_windows', 20)  # 3 parts of 2 x 3 x 3 windows
    monkeypatch.setattr(swsa.WindowAttention, 'max_windows', 8)  # 9 steps of 6 windows
    x = torch.randn(1, 12, 18, 20, 16)  # (B, D, H, W, C), padded
    ws, ss = effective_window(x.shape[1:4], WINDOW, SHIFT)
    labels = shift_labels(tuple(-(-n // s) * s for n, s in zip(x.shape[1:4], ws)), ws, ss, x.device)
    assert len(blk.sdpa_parts(x) if sdpa else blk.window_chunks(x)) == (3 if sdpa else 9)
    with torch.no_grad():
        kept = x.clone()
        want = blk(kept, labels)
        given = x.clone()
        got = blk(given, labels, own=True)
        # a whole clip as SWSA gets it: the stored (B, C, D, H, W) frames seen as (B, D, H, W, C), channels strided;
        # the merge writes a new contiguous volume
        stored = x.permute(0, 4, 1, 2, 3).contiguous().permute(0, 2, 3, 4, 1)
        strided = blk(stored, labels, own=True)
    assert torch.equal(kept, x) and want is not kept
    assert got is given and torch.equal(got, want)
    assert torch.equal(stored, x) and strided.is_contiguous() and torch.equal(strided, want)
