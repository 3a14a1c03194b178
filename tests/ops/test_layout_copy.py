"""The tiled copy between channels-last and channel-first frames (gsmsr.ops.layout_copy), in the interpreter, against
``Tensor.copy_``: the same values bit for bit (a copy, or one IEEE cast), except that the interpreter narrows fp32 to
bf16 by truncation where compiled Triton rounds to nearest even (tests/gpu/test_layout_copy_gpu.py: bit for bit)."""

from __future__ import annotations

import pytest
import torch

from gsmsr.ops import layout_copy as ops
from gsmsr.ops.layout_copy import contiguous_frames, copy_frames, transposes

CL = torch.channels_last_3d


@pytest.fixture
def forced(monkeypatch):
    """The kernel on CPU tensors (interpreted), and a count of its launches."""
    launches = []
    monkeypatch.setattr(ops, 'runs_fused', lambda x: launches.append(x.shape) or True)
    return launches


def _volume(shape, dtype, channels_last, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else CL) if channels_last else x


@pytest.mark.parametrize('shape', [(2, 70, 9, 11), (1, 70, 3, 9, 11), (1, 5, 1, 33)])
@pytest.mark.parametrize('src_dtype, dst_dtype', [(torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize('src_cl', [True, False])
def test_copy_matches_copy_(forced, shape, src_dtype, dst_dtype, src_cl):
    """Both directions, casts, channel and position counts that are no multiple of the tiles."""
    src = _volume(shape, src_dtype, src_cl)
    dst = _volume(shape, dst_dtype, not src_cl, seed=1)
    want = torch.empty_like(dst).copy_(src)
    assert transposes(dst, src)
    assert copy_frames(dst, src) is dst
    assert forced
    if dst_dtype.itemsize < src_dtype.itemsize:  # the interpreter truncates: at most an ulp (2^-7 relative) off
        torch.testing.assert_close(dst, want, rtol=2**-7, atol=0)
    else:
        assert torch.equal(dst, want)


def test_into_a_window_slot_and_from_a_slab_frame(forced):
    """The stream's copies: a channels-last frame of a volume into a slot of a channel-first (B, C, K+1, H, W) buffer
    (no unit stride outside the slot's rows), and a slab's frame out into a new contiguous frame."""
    volume = _volume((1, 24, 4, 10, 12), torch.bfloat16, True)
    buffer = torch.zeros(1, 24, 6, 10, 12)
    copy_frames(buffer[:, :, 3], volume[:, :, 1])
    assert torch.equal(buffer[:, :, 3], volume[:, :, 1].float())
    assert not buffer[:, :, [0, 1, 2, 4, 5]].any()
    frame = contiguous_frames(volume[:, :, 2])
    assert frame.is_contiguous() and torch.equal(frame, volume[:, :, 2])
    assert len(forced) == 2
    assert contiguous_frames(frame) is frame  # already contiguous: no copy
    volume = contiguous_frames(frame.unsqueeze(2), torch.channels_last_3d)  # a (B, C, 1, H, W) volume, channels-last
    assert volume.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(volume[:, :, 0], frame)
    assert contiguous_frames(volume, torch.channels_last_3d) is volume


def test_other_copies_are_plain_copies(forced):
    """Same layouts, H and W not one axis (a crop), other shapes or one channel: ``copy_`` itself."""
    a, b = _volume((1, 8, 5, 6), torch.float32, False), _volume((1, 8, 5, 6), torch.float32, False, seed=1)
    crop = _volume((1, 8, 7, 9), torch.float32, True)[:, :, 1:6, 2:8]
    cases = [(a, b), (a, crop), (a, b[:, :, :, :1].expand(1, 8, 5, 6)), (_volume((1, 1, 5, 6), torch.float32, True),
             _volume((1, 1, 5, 6), torch.float32, False))]  # fmt: skip
    for dst, src in cases:
        assert not transposes(dst, src)
        copy_frames(dst, src)
        assert torch.equal(dst, src)
    assert not forced
    assert not transposes(torch.empty(1, 8, 5, 6), torch.empty(1, 8, 6, 5))


def test_autograd_records_a_plain_copy(forced):
    src = _volume((1, 8, 5, 6), torch.float32, True).requires_grad_()
    dst = copy_frames(torch.empty(1, 8, 5, 6), src)
    dst.sum().backward()
    assert not forced and torch.equal(src.grad, torch.ones_like(src))
    with torch.no_grad():
        copy_frames(torch.empty(1, 8, 5, 6), src)
    assert forced


def test_network_streams_through_the_kernel(forced):
    """The tiny GSMNet's streaming forward on slabs (a clip longer than ``stream_whole``) and on a whole clip, in fp32
    and under bf16 autocast, with the kernel (interpreted) for every transposing copy: the output of the plain copies,
    bit for bit. On a whole clip no frame is copied across layouts in the propagation: SWSA reads the features where
    they are and its output keeps their layout."""
    from gsmsr.archs.gsmnet_arch import GSMNet

    torch.manual_seed(0)
    net = GSMNet(upscale=4, prop_depth=2, attn_depth=2, pa_frame=1, embed_dims=16, num_heads=4).eval()
    lq = torch.rand(1, 9, 3, 36, 40, generator=torch.Generator().manual_seed(8))
    for whole in (4, 20):
        net.stream_whole, net.stream_slab = whole, 2
        launches = 0
        for bf16 in (False, True):
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                got = net(lq)
                launches += len(forced)
                ops.runs_fused = lambda x: False
                want = net(lq)
                ops.runs_fused = lambda x: forced.append(x.shape) or True
            assert torch.equal(got, want)
            forced.clear()
        # a whole clip: only the reconstruction's input, one step of 9 frames a pass (fp32, bf16)
        assert launches > 2 if whole < 9 else launches == 2
