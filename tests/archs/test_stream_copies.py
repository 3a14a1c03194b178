"""The streaming schedule's copies outside the compiled blocks (benchmarks/NOTES.md, "Inference, part 7").

Window buffers (``GSMNet.stream_buffers``: each window step writes its result where the next window reads it) and
whole-clip SWSA slabs (``x`` itself, a flip, frames kept as views) give the stacked form's values bit for bit, in
fp32 and under bf16 autocast, compile to as many graphs, and copy about one frame per window instead of K."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gsmsr import GSMNet
from gsmsr.archs.gsm_block import GSMBlock
from gsmsr.archs.swsa import SWSABlock, compile_swsa_blocks

# x2: the schedule and its copies do not depend on the scale, and the x4 upsampler (64-channel convolutions at
# 4H x 4W) was most of a forward's CPU time under bf16 autocast (bf16 conv3d is slow on the CPU)
CFG = dict(upscale=2, prop_depth=3, attn_depth=2, pa_frame=2, embed_dims=16, num_heads=4)


def _net(**kwargs) -> GSMNet:
    torch.manual_seed(0)
    net = GSMNet(**{**CFG, **kwargs}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():  # no branch an exact identity
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def _clip(t: int) -> torch.Tensor:
    return torch.rand(1, t, 3, 36, 40, generator=torch.Generator().manual_seed(1))


def _run(net: GSMNet, lq: torch.Tensor, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=amp):
        return net(lq)


CASES = [
    ({}, 7, None),  # one SWSA slab: natural layers pass x itself, reversed ones a flip; frames kept as views
    ({}, 9, (2, 0)),  # slabs with halos (copied frames)
    ({'scatter': False, 'anchor': 'last'}, 9, (2, 0)),  # windows share only the anchors' results
    ({'alternate_direction': False, 'mamba_directions': 1}, 6, None),
    ({'attn_depth': 0, 'pa_frame': 1}, 5, None),  # no SWSA: the slab must be a copy, since x is written
    ({'align': 'bilinear', 'prop_depth': 2}, 5, None),
]


# bf16 for the two schedules (one slab, slabs with halos), with two layers (one natural, one reversed): the other
# cases vary the structure, not the dtypes (bf16 on the CPU is slow: ~1 min a case with three layers).
@pytest.mark.parametrize(
    'kwargs, t, slab, amp',
    [(*case, False) for case in CASES] + [({**kw, 'prop_depth': 2}, t, sl, True) for kw, t, sl in CASES[:2]],
    ids=[f'{i}-fp32' for i in range(len(CASES))] + ['0-bf16', '1-bf16'],
)
def test_window_buffers_equal_stacked_windows(kwargs, t, slab, amp):
    net = _net(**kwargs)
    if slab:
        net.stream_slab, net.stream_whole = slab
    lq = _clip(t)
    net.stream_buffers = False
    ref = _run(net, lq, amp)
    net.stream_buffers = True
    assert torch.equal(_run(net, lq, amp), ref)


def test_whole_clip_streaming_equals_whole_clip_schedule_bit_for_bit():
    """fp32: x itself, flipped slabs, SWSA frames as views and window buffers give the whole-clip schedule's output
    exactly (three layers: both time orders)."""
    net, lq = _net(), _clip(7)
    out = _run(net, lq, False)
    net.streaming_eval = False
    assert torch.equal(out, _run(net, lq, False))


def test_slab_of_is_the_stack():
    """In x's layout for a whole clip (x's own frames where they can be), channels-last copies for slabs."""
    x = torch.randn(1, 3, 6, 4, 5)
    for stored in (list(range(6)), list(range(5, -1, -1)), [1, 2, 3], [4, 3, 2], [0, 2, 1]):
        for read_only in (True, False):
            for channels_last in (False, True):
                slab = GSMNet.slab_of(x, stored, read_only, channels_last)
                assert torch.equal(slab, torch.stack([x[:, :, i] for i in stored], dim=2))
                view = slab.data_ptr() == x.data_ptr()
                assert view == (read_only and stored == list(range(6)) and not channels_last)
                assert slab.permute(0, 2, 3, 4, 1).is_contiguous() if channels_last else slab.is_contiguous()


def test_shallow_features_a_few_frames_a_call_are_the_whole_conv():
    """conv_first over a clip in steps of frames (the streaming path's, which bounds cuDNN's autotuning workspace)
    gives the one call's values, with a shorter last step, in float64 and under bf16 autocast."""
    net = _net().double()
    lq = _clip(7).double()
    with torch.no_grad():
        whole = net.conv_first(lq.transpose(1, 2))
        for step in (1, 3, 7, 9):
            parts = net.shallow_features(lq, step)
            assert parts.shape == whole.shape and parts.is_contiguous()
            torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
        net.float()
        with torch.autocast('cpu', torch.bfloat16):
            whole, parts = net.conv_first(lq.float().transpose(1, 2)), net.shallow_features(lq.float(), 2)
        assert parts.dtype == whole.dtype == torch.bfloat16
        torch.testing.assert_close(parts, whole)  # bf16 tolerances: the kernel may differ by shape


class OpCounter(TorchDispatchMode):
    """Counts aten ops on tensors of at least ``numel`` elements inside ``GSMNet.stream_layer`` (or everywhere, when
    ``depth`` starts at 0) and outside ``GSMBlock`` and ``SWSABlock`` calls (the blocks that ``compile_blocks``
    compiles)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.depth, self.counts = numel, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, out) if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if self.depth == 0 and any(t.numel() >= self.numel for t in tensors):
            self.counts[func.overloadpacket.__name__] += 1
        return out


def _nest(monkeypatch, cls: type, name: str, mode: OpCounter, step: int) -> None:
    """Wrap ``cls.name`` so that ``mode.depth`` moves by ``step`` during its calls."""
    inner = getattr(cls, name)

    def wrapped(*args, **kwargs):
        mode.depth += step
        try:
            return inner(*args, **kwargs)
        finally:
            mode.depth -= step

    monkeypatch.setattr(cls, name, wrapped)


@pytest.fixture
def counter(monkeypatch) -> Iterator[OpCounter]:
    mode = OpCounter(numel=CFG['embed_dims'] * 36 * 40)  # a feature frame
    _nest(monkeypatch, GSMBlock, 'forward', mode, 1)
    _nest(monkeypatch, SWSABlock, 'forward', mode, 1)
    yield mode


@pytest.fixture
def layer_counter(monkeypatch, counter) -> Iterator[OpCounter]:
    """``counter`` inside the propagation layers only."""
    counter.depth = 1
    _nest(monkeypatch, GSMNet, 'stream_layer', counter, -1)
    yield counter


def test_window_buffer_copies_only_the_slots_it_lacks(counter):
    """The last step's output in slots 0..K-1 (fp32), a new frame (bf16): one copy, into slot K, with a cast."""
    c, k = CFG['embed_dims'], 3
    prev = torch.randn(1, c, k + 1, 36, 40)
    frames = [prev[:, :, 1], prev[:, :, 2], torch.randn(1, c, 36, 40).bfloat16()]
    with counter:
        buffer = GSMNet.window_buffer(prev, frames, torch.float32)
    assert buffer is prev and torch.equal(buffer[:, :, 1:], torch.stack(frames, dim=2))
    assert counter.counts['copy_'] == 1
    bf16 = [f.bfloat16() for f in frames]  # a layer's first window under autocast: a new buffer in the asked dtype
    assert GSMNet.window_buffer(prev, bf16, torch.float32) is prev
    assert GSMNet.window_buffer(None, bf16, torch.float32).dtype == torch.float32


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
def test_streaming_copies_about_one_frame_per_window(layer_counter, amp):
    """T = 7, K = 5, anchor 2, one slab, three layers. Window steps: 5 copies in the first window (a new buffer),
    1 more each where a slot is clamped to a clip end (windows 1, 6) and the new frame in windows 1..5: 13 a layer
    (stacked: 35). SWSA inputs: the reversed layer's flip (the natural ones read x); SWSA frames: no copies. Adds:
    one a frame and layer. No stacks or casts of frames."""
    net, lq = _net(), _clip(7)
    with layer_counter:
        _run(net, lq, amp)
    frames = layer_counter.counts
    assert frames['copy_'] == 3 * 13 and frames['flip'] == 1 and frames['add_'] == 3 * 7
    assert not (frames['stack'] or frames['cat'] or frames['clone'] or frames['_to_copy'])


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
def test_window_buffers_keep_the_compiled_graphs(amp):
    """Compiled as ``compile_blocks`` compiles them (Dynamo + AOTAutograd, ``aot_eager``: the out argument is an
    input mutation): as many graphs with window buffers as with stacked windows (window step: one, also under
    autocast, where every window is in the step's fp32 result dtype; SWSA: attention unshifted and shifted, one
    per-token branch), no graph break, the same output. Under bf16 only the window buffers are compiled (the slow
    case on the CPU): their outputs equal the stacked windows' in test_window_buffers_equal_stacked_windows."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from gsmsr.ops import cuda_kernel

    cuda_kernel()  # as GSMNet._compile: the kernel import resolved outside any traced frame
    lq, seen = _clip(5), {}
    try:
        for buffers in (True,) if amp else (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            net = _net(prop_depth=2)
            net.stream_buffers = buffers
            step, attn = CompileCounterWithBackend('aot_eager'), CompileCounterWithBackend('aot_eager')
            for layer in net.prop_layers:
                layer.stage.mamba_block.compile(backend=step, dynamic=False)
            compile_swsa_blocks(net.swsa_blocks(), backend=attn)
            out = _run(net, lq, amp)
            assert torch.equal(_run(net, lq, amp), out)  # a second clip: no new graph
            assert not torch._dynamo.utils.counters['graph_break']
            seen[buffers] = (step.frame_count, attn.frame_count, out)
    finally:
        torch._dynamo.reset()
    assert all(counts[:2] == (1, 3) for counts in seen.values())  # SWSA: two attention graphs, one per-token branch
    if not amp:
        assert torch.equal(seen[True][2], seen[False][2])
