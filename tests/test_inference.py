"""Tests for ``gsmsr infer`` (gsmsr.inference, gsmsr.video_io): streaming, blending, formats, bad input.

Most tests use ``InferTestNet``, a cheap network with GSMNet's interface and a small spatio-temporal receptive
field (so chunking and tiling change its output); a few use a tiny random GSMNet end to end.
"""

from __future__ import annotations

import argparse
import functools
import os
import tracemalloc
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import av
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import gsmsr  # noqa: F401  (compat before BasicSR)

# isort: split
from basicsr.metrics import calculate_psnr
from basicsr.utils import tensor2img
from basicsr.utils.registry import ARCH_REGISTRY

from gsmsr.archs import GSMNet
from gsmsr.inference import (
    InputError,
    _BusyMeter,
    _network_call,
    _stream,
    add_arguments,
    load_network,
    run,
    upscale_frames,
    upscale_video,
)
from gsmsr.tiling import forward_chunked, window_starts

TINY_GSM = dict(upscale=4, prop_depth=2, attn_depth=2, pa_frame=1, embed_dims=16, num_heads=4, spynet_path=None)
CPU = torch.device('cpu')


class InferTestNet(nn.Module):
    """(B, T, 3, H, W) -> (B, T, 3, sH, sW): bilinear upsampling plus a residual from two 3x3x3 convs."""

    def __init__(self, upscale: int = 4, width: int = 8):
        super().__init__()
        self.upscale = upscale
        self.body = nn.Sequential(
            nn.Conv3d(3, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, 3 * upscale**2, 3, padding=1)
        )
        self.dtypes = []

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = lq.shape
        s = self.upscale
        res = self.body(lq.transpose(1, 2)).transpose(1, 2)
        self.dtypes.append(res.dtype)
        res = F.pixel_shuffle(res.flatten(0, 1), s).view(b, t, 3, s * h, s * w)
        up = F.interpolate(lq.flatten(0, 1), scale_factor=s, mode='bilinear', align_corners=False)
        return up.view(b, t, 3, s * h, s * w) + 0.2 * res


if 'InferTestNet' not in ARCH_REGISTRY:
    ARCH_REGISTRY.register()(InferTestNet)


# ----------------------------------------------------------------------------------------------- media helpers
def make_frames(n: int, h: int, w: int, seed: int = 0) -> List[np.ndarray]:
    """A smooth random RGB texture moving 1-2 px per frame (compresses well, like real video)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h // 6 + 4, w // 6 + 4, 3)).astype(np.float32)
    base = cv2.resize(noise, (w + 2 * n + 8, h + n + 8), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    return [np.round(base[t : t + h, 2 * t : 2 * t + w] * 255).astype(np.uint8) for t in range(n)]


def write_video(
    path: Path, frames: List[np.ndarray], rate=Fraction(25), audio: bool = False, faststart: bool = False
) -> Path:
    out = av.open(str(path), 'w', options={'movflags': 'faststart'} if faststart else {})
    vs = out.add_stream('libx264', rate=rate, options={'crf': '10'})
    vs.height, vs.width = frames[0].shape[:2]
    vs.pix_fmt = 'yuv420p'
    aus = out.add_stream('aac', rate=8000) if audio else None
    for i, f in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(f, format='rgb24')
        frame.pts = i
        out.mux(vs.encode(frame))
    if aus is not None:
        n = int(8000 * len(frames) / rate)
        tone = (0.3 * np.sin(np.arange(n) * 0.05)).astype(np.float32)[None]
        for k in range(0, n, 1024):
            a = av.AudioFrame.from_ndarray(np.ascontiguousarray(tone[:, k : k + 1024]), format='fltp', layout='mono')
            a.sample_rate, a.pts = 8000, k
            out.mux(aus.encode(a))
        out.mux(aus.encode())
    out.mux(vs.encode())
    out.close()
    return path


def read_video(path: Path):
    """(frames RGB uint8, average rate, audio codec or None, audio packet count)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        rate = v.average_rate
        frames = [f.to_ndarray(format='rgb24') for f in c.decode(v)]
    with av.open(str(path)) as c:
        if not c.streams.audio:
            return frames, rate, None, 0
        a = c.streams.audio[0]
        packets = sum(1 for p in c.demux(a) if p.dts is not None)
        return frames, rate, a.codec_context.name, packets


def write_folder(path: Path, frames: List[np.ndarray], names: Optional[List[str]] = None, ext: str = '.png') -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        name = names[i] if names else f'{i:05d}'
        assert cv2.imwrite(str(path / f'{name}{ext}'), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return path


def read_folder(path: Path) -> List[np.ndarray]:
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(path.glob('*.png'))]


def quantise(y: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) float -> (T, H, W, 3) RGB uint8 with BasicSR's tensor2img (clamp, x255, round)."""
    return np.stack([tensor2img(frame, rgb2bgr=False, min_max=(0, 1)) for frame in y])


def to_lq(frames: List[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255).unsqueeze(0).contiguous()


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def test_net_files(tmp_path_factory):
    """Checkpoint + options of a random InferTestNet (registered arch, so the CLI can build it)."""
    root = tmp_path_factory.mktemp('testnet')
    torch.manual_seed(0)
    net = InferTestNet().eval()
    torch.save({'params': net.state_dict()}, root / 'net.pth')
    (root / 'net.yml').write_text(yaml.safe_dump({'network_g': {'type': 'InferTestNet', 'upscale': 4}}))
    return dict(net=net, weights=str(root / 'net.pth'), opt=str(root / 'net.yml'))


@pytest.fixture(scope='module')
def tiny_gsm(tmp_path_factory):
    """Tiny random GSMNet saved with params_ema (the weights to use) and a perturbed params; options file."""
    root = tmp_path_factory.mktemp('gsm')
    torch.manual_seed(0)
    net = GSMNet(**TINY_GSM).eval()
    ema = net.state_dict()
    raw = {k: v + 0.5 if v.is_floating_point() else v for k, v in ema.items()}
    torch.save({'params': raw, 'params_ema': ema}, root / 'gsm.pth')
    (root / 'gsm.yml').write_text(yaml.safe_dump({'network_g': dict(type='GSMNet', **TINY_GSM)}))
    return dict(net=net, weights=str(root / 'gsm.pth'), opt=str(root / 'gsm.yml'), root=root)


@pytest.fixture(scope='module')
def gsm_clip(tiny_gsm):
    """A 3-frame 34x34 MP4 with audio, its decoded frames and the tiny GSMNet's direct forward on them.
    (MP4 output is tested with InferTestNet: the container path does not depend on the network.)"""
    path = write_video(tiny_gsm['root'] / 'clip.mp4', make_frames(3, 34, 34, seed=5), audio=True)
    frames, _, _, _ = read_video(path)
    with torch.no_grad():
        direct = tiny_gsm['net'](to_lq(frames))[0]
    return dict(path=path, frames=frames, direct=direct)


def run_cli(capsys, *argv: str):
    """``gsmsr infer ARGV`` through the subcommand interface the dispatcher uses."""
    parser = argparse.ArgumentParser(prog='gsmsr infer')
    add_arguments(parser)
    code = run(parser.parse_args([*argv, '--no-progress']))
    return code, capsys.readouterr().err


def entries(folder: Path) -> set:
    return set(os.listdir(folder))


# ----------------------------------------------------------------------------------------------- streaming maths
@pytest.mark.parametrize('chunk,tile', [(0, 0), (5, 40), (32, 256)])
def test_one_chunk_one_tile_equals_forward(chunk, tile):
    torch.manual_seed(1)
    net = InferTestNet().eval()
    frames = make_frames(5, 36, 40)
    out = np.stack(list(upscale_frames(frames, net, chunk=chunk, overlap=2, tile=tile, tile_overlap=8)))
    with torch.no_grad():
        ref = quantise(net(to_lq(frames))[0])
    assert out.shape == (5, 144, 160, 3)
    np.testing.assert_array_equal(out, ref)


class ChunkCodeNet(nn.Module):
    """Returns, for a whole call, the index of the call's first frame (frames carry step * index as pixel value)."""

    upscale = 2
    step = 10  # the pixel value of frame i is step * i (coded_frames)

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, lq):
        b, t, c, h, w = lq.shape
        first = round(lq[0, 0, 0, 0, 0].item() * 255 / self.step)
        self.calls.append((first, t, h, w))
        return torch.full((b, t, c, 2 * h, 2 * w), float(first))


def coded_frames(n: int, h: int = 6, w: int = 7, step: int = 10) -> List[np.ndarray]:
    return [np.full((h, w, 3), step * i, np.uint8) for i in range(n)]


@pytest.mark.parametrize('chunk,overlap', [(2, 0), (2, 1), (3, 1), (4, 2), (5, 3), (4, 0)])
def test_chunks_follow_official_plan(chunk, overlap):
    """Whatever the (unknown) length, the streamed chunks are exactly window_starts(T, chunk, overlap)."""
    for t in range(2, 13):
        net = ChunkCodeNet()
        outs = list(_stream(coded_frames(t), _network_call(net, 2, 'fp32', CPU), 2, chunk, overlap, 0, 0, CPU, 'x'))
        assert len(outs) == t
        assert [c[0] for c in net.calls] == window_starts(t, chunk, overlap), t
        assert all(c[1] == min(chunk, t) for c in net.calls)


@pytest.mark.parametrize(
    't,declared,length',
    [
        (13, 13, 8),  # balanced: chunks of 8 at 0, 5 (10 at 0, 3 without the count)
        (13, None, 10),  # unknown: the maximum, as before
        (13, 3, 10),  # declared below the frames read: ignored
        (20, 13, 8),  # more frames than declared: chunks of the balanced length continue over them
        (9, 13, 8),  # fewer: the same
        (7, 13, 7),  # fewer than one chunk: one chunk
    ],
)
def test_frame_count_balances_chunks(t, declared, length):
    """Chunk 10, overlap 2: a declared count sets the chunk length (gsmsr.tiling.chunk_length); the starts follow
    the official rule over the frames actually read, and every frame comes out once."""
    net = ChunkCodeNet()
    call = _network_call(net, 2, 'fp32', CPU)
    outs = list(_stream(coded_frames(t), call, 2, 10, 2, 0, 0, CPU, 'x', frame_count=declared))
    assert len(outs) == t
    assert [c[0] for c in net.calls] == window_starts(t, length, 2) and {c[1] for c in net.calls} == {length}


def test_crossfade_analytic():
    """T=9, chunk 4, overlap 1 -> chunks at 0, 3, 5. Shared frames fade linearly from one chunk to the next."""
    net = ChunkCodeNet()
    outs = list(_stream(coded_frames(9), _network_call(net, 2, 'fp32', CPU), 2, 4, 1, 0, 0, CPU, 'x'))
    got = [o.unique().tolist() for o in outs]
    assert all(len(g) == 1 for g in got)
    expected = [0, 0, 0, (0 + 3) / 2, 3, 3 * 2 / 3 + 5 / 3, 3 / 3 + 5 * 2 / 3, 5, 5]
    assert [g[0] for g in got] == pytest.approx(expected, abs=1e-6)


class FakeEvent:
    """A timing CUDA event on a fake clock: recorded when made; completed only once synchronised, unless the clock
    says the GPU keeps up with the host. Counts the elapsed times read before the end of the stream."""

    def __init__(self, clock: SimpleNamespace) -> None:
        self.clock, self.t, self.synced = clock, clock.t, False

    def query(self) -> bool:
        return self.clock.gpu_keeps_up or self.synced

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.query(), 'read before the event completed'
        self.clock.reads += 1
        return 1e3 * (end.t - self.t)


@pytest.mark.parametrize('gpu_keeps_up', [True, False])
def test_gpu_busy_counts_the_gaps_between_calls_as_idle(gpu_keeps_up):
    """12 frames in chunks of 4, each read taking 0.25 s; the first chunk compiles (10 s), the others take 2 s.
    Reads 8-11 fall between chunks 1 and 2: steady calls 13-15 and 15-17 over the window 12-17 -> 4 / 5."""
    clock = SimpleNamespace(t=0.0, gpu_keeps_up=gpu_keeps_up, reads=0)
    meter = _BusyMeter(lambda: FakeEvent(clock))
    seconds = iter([10.0, 2.0, 2.0])
    call = _network_call(InferTestNet(upscale=2).eval(), 2, 'fp32', CPU)

    def net(x: torch.Tensor) -> torch.Tensor:
        clock.t += next(seconds)
        return call(x)

    def frames():
        for frame in make_frames(12, 8, 10):
            clock.t += 0.25
            yield frame

    outs = list(_stream(frames(), meter.wrap(net), 2, 4, 0, 0, 0, CPU, 'x', frame_count=12, on_chunk=meter.chunk_done))
    assert len(outs) == 12 and meter.steady_chunks == 2
    assert clock.reads == (2 if gpu_keeps_up else 0)  # spans are read while streaming only once they have completed
    assert meter.busy() == pytest.approx(0.8)


def test_gpu_busy_needs_a_steady_chunk():
    meter = _BusyMeter(lambda: FakeEvent(SimpleNamespace(t=0.0, gpu_keeps_up=True, reads=0)))
    call = meter.wrap(_network_call(InferTestNet(upscale=2).eval(), 2, 'fp32', CPU))
    outs = list(_stream(make_frames(5, 8, 10), call, 2, 0, 0, 0, 0, CPU, 'x', on_chunk=meter.chunk_done))
    assert len(outs) == 5 and meter.steady_chunks == 0 and meter.busy() is None  # one chunk: nothing steady
    assert _BusyMeter.for_device(CPU) is None  # off CUDA: no number


def crossfade_reference(call, lq, scale, chunk, overlap, tile, tile_overlap):
    """Literal streaming reference with T known: each chunk tiled officially, then a linear cross-fade over
    the frames that consecutive chunks share (configurations where at most two chunks cover a frame). ``call``: the
    network in pieces of frames (``_network_call``), joined here into whole outputs."""

    def net(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([piece for _, piece in call(x)], 1)

    t = lq.shape[1]
    starts = window_starts(t, chunk, overlap)
    length = min(chunk, t)
    outs = [forward_chunked(net, lq[:, s : s + length], scale, 0, 0, tile, tile_overlap)[0] for s in starts]
    frames = []
    for f in range(t):
        cover = [k for k, s in enumerate(starts) if s <= f < s + length]
        assert len(cover) <= 2
        if len(cover) == 1:
            k = cover[0]
            frames.append(outs[k][f - starts[k]])
        else:
            a, b = cover
            n = starts[a] + length - starts[b]
            wb = (f - starts[b] + 1) / (n + 1)
            frames.append((1 - wb) * outs[a][f - starts[a]] + wb * outs[b][f - starts[b]])
    return torch.stack(frames)


@pytest.mark.parametrize('t,chunk,overlap', [(7, 3, 1), (10, 4, 1), (8, 5, 2), (6, 4, 1)])
def test_stream_matches_reference(t, chunk, overlap):
    torch.manual_seed(2)
    net = InferTestNet(upscale=2).eval()
    frames = make_frames(t, 20, 26, seed=t)
    call = _network_call(net, 2, 'fp32', CPU)
    got = torch.stack(list(_stream(frames, call, 2, chunk, overlap, 16, 6, CPU, 'x')))
    with torch.no_grad():
        ref = crossfade_reference(call, to_lq(frames), 2, chunk, overlap, 16, 6)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


def test_small_chunks_and_tiles_stay_close():
    """Chunks of 4 and tiles of 24 with a net of receptive radius 2: close to the direct forward, and the
    blended overlaps are closer than hard cuts at the same chunk and tile size."""
    torch.manual_seed(3)
    net = InferTestNet().eval()
    frames = make_frames(8, 36, 44)
    with torch.no_grad():
        ref = quantise(net(to_lq(frames))[0]).astype(int)
    blended = np.stack(list(upscale_frames(frames, net, chunk=4, overlap=2, tile=24, tile_overlap=12)))
    cut = np.stack(list(upscale_frames(frames, net, chunk=4, overlap=0, tile=24, tile_overlap=0)))
    diff, cut_diff = np.abs(blended - ref), np.abs(cut - ref)
    assert 0 < diff.max() <= 24 and diff.mean() < 1.0
    assert diff.mean() < 0.75 * cut_diff.mean()


def test_tile_batch_gives_the_same_frames(tiny_gsm):
    """Several tiles per call of the real (tiny) GSMNet: the same output frames as one tile per call."""
    frames = make_frames(2, 34, 44, seed=7)
    kw = dict(chunk=0, tile=34, tile_overlap=8)  # two tiles side by side
    one = np.stack(list(upscale_frames(frames, tiny_gsm['net'], **kw)))
    batched = np.stack(list(upscale_frames(frames, tiny_gsm['net'], tile_batch=2, **kw)))
    assert np.abs(batched.astype(int) - one).max() <= 1  # float rounding of a batched matmul, then quantised
    with pytest.raises(InputError, match='tile-batch 0'):
        list(upscale_frames(frames, tiny_gsm['net'], tile_batch=0, **kw))


def test_frames_taken_as_the_network_reconstructs_them(tiny_gsm, monkeypatch):
    """The real (tiny) GSMNet reconstructing a frame at a time (forward_frames in one-frame pieces): each finished
    frame comes out before the next piece is computed, and the frames equal those of whole-chunk outputs, over two
    chunks (5 frames, chunk 3, overlap 1: chunks at 0 and 2; frame 2 waits for the second chunk)."""
    frames = make_frames(5, 34, 44, seed=8)
    net = tiny_gsm['net']
    kw = dict(scale=4, chunk=3, overlap=1, tile=0, tile_overlap=0, device=CPU, name='x')
    whole = torch.stack(list(_stream(frames, _network_call(net, 4, 'fp32', CPU), **kw)))
    monkeypatch.setattr(net, 'stream_frame_pixels', 1)
    pieces = _network_call(net, 4, 'fp32', CPU)
    log: List[str] = []

    def logged(x: torch.Tensor):
        for frames_done, out in pieces(x):
            log.append(f'piece {frames_done.stop - frames_done.start}')
            yield frames_done, out

    got = []
    for frame in _stream(frames, logged, **kw):
        log.append('frame')
        got.append(frame)
    assert log == ['piece 1', 'frame'] * 2 + ['piece 1'] + ['piece 1', 'frame'] * 3
    torch.testing.assert_close(torch.stack(got), whole, rtol=0, atol=1e-5)


def test_stream_keeps_autograd_off_only_while_it_runs():
    """Between frames the caller's autograd state holds, also while a stream stopped early is still alive (a
    traceback can keep it so after a writer error); the network still runs without autograd."""
    net = InferTestNet(upscale=2).eval()
    grad_seen: List[bool] = []
    call = _network_call(net, 2, 'fp32', CPU)

    def recorded(x: torch.Tensor):
        grad_seen.append(torch.is_grad_enabled())
        yield from call(x)

    stream = _stream(make_frames(4, 8, 10), recorded, 2, 0, 0, 0, 0, CPU, 'x')
    frame = next(stream)
    assert torch.is_grad_enabled() and not frame.requires_grad and grad_seen == [False]


def test_host_memory_does_not_grow_with_length():
    """Frames held by the streamer (read but not yet returned) and traced numpy memory: N vs 2N frames."""
    torch.manual_seed(4)
    net = InferTestNet(upscale=2, width=4).eval()
    texture = make_frames(1, 64, 64)[0]
    chunk, overlap = 4, 1

    def measure(n: int):
        state = dict(read=0, done=0, most=0)

        def frames():
            for i in range(n):
                state['read'] += 1
                state['most'] = max(state['most'], state['read'] - state['done'])
                yield texture + np.uint8(i % 7)  # a fresh 12 KiB array per frame

        tracemalloc.start()
        for _ in upscale_frames(frames(), net, chunk=chunk, overlap=overlap, tile=0):
            state['done'] += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return state, peak

    s1, p1 = measure(20)
    s2, p2 = measure(40)
    assert (s1['done'], s2['done']) == (20, 40)
    assert s1['most'] <= 2 * chunk - overlap and s2['most'] <= 2 * chunk - overlap
    # Holding all frames would add 20 * 12 KiB = 240 KiB for the longer video.
    assert p2 - p1 < 36 * 1024, (p1, p2)


class MinSizeNet(InferTestNet):
    def forward(self, lq):
        assert lq.shape[-2] >= 33 and lq.shape[-1] >= 33, lq.shape
        return super().forward(lq)


def test_small_frames_are_padded_and_cropped():
    torch.manual_seed(5)
    net = MinSizeNet().eval()
    frames = make_frames(3, 20, 25)
    out = np.stack(list(upscale_frames(frames, net, chunk=0, tile=0)))
    lq = to_lq(frames)
    padded = F.pad(lq[0], (0, 8, 0, 13), mode='replicate')[None]
    with torch.no_grad():
        ref = quantise(net(padded)[0, :, :, :80, :100])
    assert out.shape == (3, 80, 100, 3)
    np.testing.assert_array_equal(out, ref)


def test_bf16_runs_under_autocast_and_stays_close():
    torch.manual_seed(6)
    net = InferTestNet().eval()
    frames = make_frames(3, 36, 36)
    fp32 = np.stack(list(upscale_frames(frames, net, chunk=0, tile=0))).astype(int)
    net.dtypes.clear()
    bf16 = np.stack(list(upscale_frames(frames, net, chunk=0, tile=0, precision='bf16'))).astype(int)
    assert net.dtypes == [torch.bfloat16]
    assert np.abs(bf16 - fp32).max() <= 8


@pytest.mark.parametrize(
    'frames,match',
    [
        ([np.zeros((36, 36, 3), np.uint8)], 'at least 2'),
        ([], 'has 0 frame'),
        ([np.zeros((36, 36, 3), np.uint8), np.zeros((36, 40, 3), np.uint8)], 'frame 1 is 36x40'),
        ([np.zeros((36, 36), np.uint8)] * 2, 'expected'),
    ],
)
def test_upscale_frames_bad_input(frames, match):
    with pytest.raises(InputError, match=match):
        list(upscale_frames(frames, InferTestNet(), chunk=0, tile=0))


# ----------------------------------------------------------------------------------------------- files and CLI
@pytest.mark.parametrize('ext', ['.mp4', '.mkv', '.avi'])
def test_cli_video_to_video(tmp_path, capsys, test_net_files, ext):
    src = write_video(tmp_path / 'in.mp4', make_frames(5, 36, 40), rate=Fraction(24000, 1001), audio=True)
    out = tmp_path / f'out{ext}'
    code, err = run_cli(
        capsys,
        str(src),
        '-o',
        str(out),
        '--weights',
        test_net_files['weights'],
        '-opt',
        test_net_files['opt'],
        '--chunk',
        '3',
        '--overlap',
        '1',
        '--tile',
        '24',
        '--tile-overlap',
        '8',
    )
    assert code == 0, err
    frames, rate, audio, packets = read_video(out)
    in_frames, in_rate, in_audio, in_packets = read_video(src)
    assert len(frames) == 5 and frames[0].shape == (144, 160, 3)
    assert rate == in_rate == Fraction(24000, 1001)
    assert (audio, packets) == (in_audio, in_packets) and packets > 0
    assert '5 frames 36x40 -> 144x160' in err
    assert entries(tmp_path) == {'in.mp4', f'out{ext}'}
    assert out.stat().st_mode & 0o777 == src.stat().st_mode & 0o777  # not left private like a temp file
    # Same frames in the same order, up to lossy encoding: each is closest to its own expected frame.
    expected = list(upscale_frames(in_frames, test_net_files['net'], chunk=3, overlap=1, tile=24, tile_overlap=8))
    psnr = np.array([[calculate_psnr(f, e, crop_border=0) for e in expected] for f in frames])
    assert psnr.diagonal().min() > 25 and (psnr.argmax(axis=1) == np.arange(5)).all(), psnr


def test_cli_folder_to_folder_and_video(tmp_path, capsys, test_net_files):
    frames = make_frames(4, 36, 38)
    names = ['frame2', 'frame10', 'frame1', 'frame3']  # natural order: 1, 2, 3, 10
    src = write_folder(tmp_path / 'in', frames, names=names)
    common = ['--weights', test_net_files['weights'], '-opt', test_net_files['opt'], '--chunk', '0', '--tile', '0']
    code, err = run_cli(capsys, str(src), '-o', str(tmp_path / 'out'), *common)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(n + '.png' for n in names)
    assert (tmp_path / 'out').stat().st_mode & 0o777 == src.stat().st_mode & 0o777
    ordered = [frames[names.index(n)] for n in ('frame1', 'frame2', 'frame3', 'frame10')]
    with torch.no_grad():
        ref = quantise(test_net_files['net'](to_lq(ordered))[0])
    for k, n in enumerate(('frame1', 'frame2', 'frame3', 'frame10')):
        got = cv2.cvtColor(cv2.imread(str(tmp_path / 'out' / f'{n}.png')), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(got, ref[k])
    code, err = run_cli(capsys, str(src), '-o', str(tmp_path / 'out.mp4'), '--fps', '30', *common)
    assert code == 0, err
    video, rate, audio, _ = read_video(tmp_path / 'out.mp4')
    assert len(video) == 4 and video[0].shape == (144, 152, 3) and rate == 30 and audio is None


def test_api_upscale_video(tmp_path, test_net_files):
    src = write_folder(tmp_path / 'in', make_frames(3, 36, 36))
    stats = upscale_video(
        str(src), str(tmp_path / 'out'), test_net_files['net'], chunk=2, overlap=1, tile=0, device='cpu', progress=False
    )
    assert (stats.frames, stats.in_size, stats.out_size) == (3, (36, 36), (144, 144))
    assert stats.peak_host_bytes > 0 and stats.peak_device_bytes is None
    assert len(read_folder(tmp_path / 'out')) == 3


@pytest.mark.parametrize('kind', ['folder', 'mp4', 'mkv'])
def test_upscale_video_balances_chunks_when_the_count_is_known(tmp_path, kind):
    """13 frames, chunk 10, overlap 2: a folder or an MP4 (which declares its frame count) is cut into chunks of 8
    at 0 and 5 (16 frames of work); an MKV (no count) into chunks of 10 at 0 and 3 (20). Every frame written once."""
    frames = coded_frames(13, 6, 8)
    src = write_folder(tmp_path / 'in', frames) if kind == 'folder' else write_video(tmp_path / f'in.{kind}', frames)
    net = ChunkCodeNet()
    stats = upscale_video(str(src), str(tmp_path / 'out'), net, chunk=10, overlap=2, tile=0, progress=False)
    length, starts = (10, [0, 3]) if kind == 'mkv' else (8, [0, 5])
    assert [(c[0], c[1]) for c in net.calls] == [(s, length) for s in starts]
    written = sorted(os.listdir(tmp_path / 'out'))
    assert stats.frames == 13 and len(written) == 13
    if kind == 'folder':
        assert written == sorted(f'{i:05d}.png' for i in range(13))


class StreamWholeNet(ChunkCodeNet):
    """ChunkCodeNet with GSMNet's ``stream_whole`` class setting; records the value each call sees."""

    stream_whole = 20

    def forward(self, lq):
        self.seen = getattr(self, 'seen', []) + [self.stream_whole]
        return super().forward(lq)


@pytest.mark.parametrize('free_gib, tile, whole', [(139, None, True), (139, 4, False), (None, None, False)])
def test_upscale_video_runs_swsa_over_whole_chunks_where_memory_allows(tmp_path, monkeypatch, free_gib, tile, whole):
    """24 frames, one chunk: with the free memory of a large card and whole frames, the run raises the network's
    stream_whole to the chunk (24) and puts the class value back after; tiled frames, or no free-memory figure (the
    CPU), keep the slabs. (The free memory is faked: on the CPU there is none to read.)"""
    from gsmsr import inference

    monkeypatch.setattr(inference, 'free_device_bytes', lambda device: None if free_gib is None else free_gib << 30)
    src = write_folder(tmp_path / 'in', coded_frames(24, 8, 8))
    net = StreamWholeNet()
    stats = upscale_video(
        str(src), str(tmp_path / 'out'), net, chunk=32, overlap=4, tile=tile, tile_overlap=1, progress=False
    )
    assert stats.frames == 24 and stats.swsa_whole_chunk is whole
    assert net.seen == [24 if whole else 20] * len(net.calls)
    assert 'stream_whole' not in net.__dict__ and net.stream_whole == 20


@pytest.mark.parametrize(
    'free_gib, frames, size, tile, expected',
    [
        (139, 100, (360, 640), None, 52),  # 2 chunks of 52 instead of 4 of 28
        (139, 60, (360, 640), None, 60),  # one chunk: the single forward pass
        (139, 100, (720, 1280), None, 32),  # 64 frames would wait too long for the first frame
        (139, 40, (1080, 1920), None, 32),  # 40 whole frames do not fit: two chunks either way
        (16, 100, (360, 640), None, 32),  # a small card: whole frames fit at 32, not at 52
        (139, 100, (360, 640), 256, 32),  # a tile given: the chunk stays as it was
        (None, 100, (360, 640), None, 32),  # no free-memory figure (the CPU)
    ],
)
def test_plan_chunk_takes_longer_chunks_of_whole_frames_where_memory_allows(
    monkeypatch, free_gib, frames, size, tile, expected
):
    """--chunk left to choose: the shortest maximum up to AUTO_CHUNK_MAX that makes the fewest balanced chunks of
    whole frames fitting the memory plan, within the first-frame pixel bound (it is then the chunks' length);
    otherwise DEFAULT_CHUNK. A given --chunk is kept. (The free memory is faked: on the CPU there is none to read.)"""
    from gsmsr import inference
    from gsmsr.tiling import chunk_count

    monkeypatch.setattr(inference, 'free_device_bytes', lambda device: None if free_gib is None else free_gib << 30)
    plan = functools.partial(inference._plan_chunk, overlap=4, scale=4, precision='bf16', compiled=True, device=CPU)
    got = plan(None, tile, frames, *size)
    assert got == expected
    if expected > inference.DEFAULT_CHUNK:
        assert chunk_count(frames, got, 4) < chunk_count(frames, inference.DEFAULT_CHUNK, 4)
        assert chunk_count(frames, got - 1, 4) > chunk_count(frames, got, 4) or got == frames
    assert plan(24, tile, frames, *size) == 24


def test_upscale_video_chooses_the_chunk_from_memory(tmp_path, monkeypatch):
    """100 frames, --chunk left to choose, whole frames and a large card: 2 balanced chunks of 52 (at 0 and 48);
    without a free-memory figure (the CPU), DEFAULT_CHUNK's 4 chunks of 28. Every frame written once."""
    from gsmsr import inference

    src = write_folder(tmp_path / 'in', coded_frames(100, 8, 8, step=1))
    for free_gib, calls in ((139, [(0, 52), (48, 52)]), (None, [(0, 28), (24, 28), (48, 28), (72, 28)])):
        free = None if free_gib is None else free_gib << 30
        monkeypatch.setattr(inference, 'free_device_bytes', lambda device, free=free: free)
        net = ChunkCodeNet()
        net.step = 1
        out = tmp_path / f'out-{free_gib}'
        stats = upscale_video(str(src), str(out), net, overlap=4, tile=None, tile_overlap=1, progress=False)
        assert [(c[0], c[1]) for c in net.calls] == calls
        assert stats.frames == 100 and len(os.listdir(out)) == 100 and stats.chunk == calls[0][1]


def test_cli_balanced_chunks_equal_the_same_layout(tmp_path, capsys, test_net_files):
    """``gsmsr infer`` on a 13-frame folder with --chunk 10 --overlap 2: chunks of 8 at 0 and 5, so the output is
    the streamed output of chunk 8 (frame count unknown there) and the literal cross-faded reference of that layout,
    and differs from chunks of 10."""
    frames = make_frames(13, 36, 40, seed=13)
    src = write_folder(tmp_path / 'in', frames)
    net = test_net_files['net']
    args = ['--weights', test_net_files['weights'], '-opt', test_net_files['opt']]
    args += ['--tile', '24', '--tile-overlap', '8']
    code, err = run_cli(capsys, str(src), '-o', str(tmp_path / 'out'), '--chunk', '10', '--overlap', '2', *args)
    assert code == 0, err
    got = np.stack(read_folder(tmp_path / 'out'))
    kw = dict(overlap=2, tile=24, tile_overlap=8)
    same_layout = np.stack(list(upscale_frames(frames, net, chunk=8, **kw)))
    np.testing.assert_array_equal(got, same_layout)
    with torch.no_grad():
        ref = quantise(crossfade_reference(_network_call(net, 4, 'fp32', CPU), to_lq(frames), 4, 8, 2, 24, 8))
    assert np.abs(got.astype(int) - ref).max() <= 1  # float summation order, then quantised
    assert (got != np.stack(list(upscale_frames(frames, net, chunk=10, **kw)))).any()


def test_existing_output_needs_force(tmp_path, capsys, test_net_files):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    out = tmp_path / 'out.mp4'
    out.write_bytes(b'keep me')
    args = [str(src), '-o', str(out), '--weights', test_net_files['weights'], '-opt', test_net_files['opt']]
    code, err = run_cli(capsys, *args)
    assert code == 2 and 'out.mp4: output exists (use --force' in err
    assert out.read_bytes() == b'keep me'
    code, err = run_cli(capsys, *args, '--force')
    assert code == 0, err
    assert len(read_video(out)[0]) == 2
    # A folder output is replaced only if it holds nothing but images.
    folder = tmp_path / 'frames'
    (folder / 'sub').mkdir(parents=True)
    code, err = run_cli(capsys, str(src), '-o', str(folder), '--force', *args[3:])
    assert code == 2 and 'refusing to overwrite' in err and (folder / 'sub').is_dir()
    (folder / 'sub').rmdir()
    write_folder(folder, make_frames(5, 8, 8))
    code, err = run_cli(capsys, str(src), '-o', str(folder), '--force', *args[3:])
    assert code == 0, err
    assert len(os.listdir(folder)) == 2
    assert entries(tmp_path) == {'in', 'out.mp4', 'frames'}


def bad_inputs(tmp: Path):
    """name -> (input path, output name, expected message fragment)."""
    cases = {}
    cases['missing'] = (tmp / 'nope.mp4', 'o.mp4', 'nope.mp4: no such file')
    # Fixed bytes: random ones occasionally parse as some audio-only container.
    (tmp / 'garbage.mp4').write_bytes(b'this is not a video file\n' * 120)
    cases['not a video'] = (tmp / 'garbage.mp4', 'o.mp4', 'garbage.mp4: cannot open as a video')
    good = write_video(tmp / 'good.mp4', make_frames(12, 36, 40), faststart=True).read_bytes()
    (tmp / 'cut.mp4').write_bytes(good[: len(good) * 6 // 10])
    cases['truncated'] = (tmp / 'cut.mp4', 'o.mp4', 'cut.mp4: decoded only')
    write_video(tmp / 'one.mp4', make_frames(1, 36, 40))
    cases['one frame video'] = (tmp / 'one.mp4', 'o.mp4', 'at least 2')
    write_folder(tmp / 'single', make_frames(1, 36, 36))
    cases['one frame folder'] = (tmp / 'single', 'o', 'at least 2')
    (tmp / 'empty').mkdir()
    cases['empty folder'] = (tmp / 'empty', 'o', 'empty: folder contains no image files')
    write_folder(tmp / 'mixed', make_frames(2, 36, 36))
    write_folder(tmp / 'mixed', make_frames(1, 36, 40), names=['00002'])
    cases['mixed sizes'] = (tmp / 'mixed', 'o', '00002.png: image is 36x40 but')
    write_folder(tmp / 'badimg', make_frames(2, 36, 36))
    (tmp / 'badimg' / '00002.png').write_bytes(b'not a png')
    cases['corrupt image'] = (tmp / 'badimg', 'o.mp4', '00002.png: cannot read image')
    cases['unknown output type'] = (tmp / 'good.mp4', 'o.gif', "o.gif: unknown output type '.gif'")
    cases['output is input'] = (tmp / 'good.mp4', 'good.mp4', 'good.mp4: output is the same as the input')
    return cases


def test_cli_bad_inputs(tmp_path, capsys, test_net_files):
    for name, (src, out_name, message) in bad_inputs(tmp_path).items():
        before = entries(tmp_path)
        code, err = run_cli(
            capsys,
            str(src),
            '-o',
            str(tmp_path / out_name),
            '--weights',
            test_net_files['weights'],
            '-opt',
            test_net_files['opt'],
            '--chunk',
            '2',
            '--overlap',
            '0',
        )
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert entries(tmp_path) == before, name


def test_failure_midway_leaves_no_output(tmp_path, capsys, test_net_files):
    """A frame that fails to decode after frames were already written: no output and no temporary left."""
    src = write_folder(tmp_path / 'in', make_frames(8, 36, 36))
    good = (src / '00006.png').read_bytes()
    (src / '00006.png').write_bytes(good[: len(good) // 2])  # header intact, data cut
    for out in ('out.mp4', 'out'):
        code, err = run_cli(
            capsys,
            str(src),
            '-o',
            str(tmp_path / out),
            '--weights',
            test_net_files['weights'],
            '-opt',
            test_net_files['opt'],
            '--chunk',
            '2',
            '--overlap',
            '0',
            '--tile',
            '0',
        )
        assert code == 2 and '00006.png: cannot decode image' in err, err
        assert entries(tmp_path) == {'in'}


def test_cli_bad_arguments_and_checkpoints(tmp_path, capsys, test_net_files, tiny_gsm):
    src = write_folder(tmp_path / 'in', make_frames(2, 36, 36))
    out = str(tmp_path / 'out')
    torch.save({'params': test_net_files['net'].state_dict()}, tmp_path / 'other.pth')
    sd = dict(tiny_gsm['net'].state_dict())
    sd.pop('conv_first.weight')
    sd['extra.weight'] = torch.zeros(1)
    torch.save({'params': sd}, tmp_path / 'broken.pth')
    (tmp_path / 'corrupt.pth').write_bytes(b'\x00' * 100)
    (tmp_path / 'bad.yml').write_text('network_g: [unclosed')
    cases = [
        (['--weights', str(tmp_path / 'other.pth'), '-opt', tiny_gsm['opt']], 'other.pth: checkpoint does not fit'),
        (['--weights', str(tmp_path / 'broken.pth'), '-opt', tiny_gsm['opt']], 'conv_first.weight'),
        (['--weights', str(tmp_path / 'broken.pth'), '-opt', tiny_gsm['opt']], 'extra.weight'),
        (['--weights', str(tmp_path / 'corrupt.pth'), '-opt', tiny_gsm['opt']], 'corrupt.pth: '),
        (['--weights', str(tmp_path / 'none.pth'), '-opt', tiny_gsm['opt']], 'none.pth: no such checkpoint'),
        (['-opt', tiny_gsm['opt']], 'no weights'),
        (['--weights', tiny_gsm['weights'], '-opt', str(tmp_path / 'bad.yml')], 'bad.yml: invalid YAML'),
        (['--weights', tiny_gsm['weights'], '-opt', tiny_gsm['opt'], '--chunk', '1'], '--chunk 1'),
        (['--weights', tiny_gsm['weights'], '-opt', tiny_gsm['opt'], '--overlap', '40'], '--overlap 40'),
        (['--weights', tiny_gsm['weights'], '-opt', tiny_gsm['opt'], '--tile-overlap', '300'], '--tile-overlap'),
        (['--weights', tiny_gsm['weights'], '-opt', tiny_gsm['opt'], '--device', 'cuda:7'], 'cuda:7'),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, str(src), '-o', out, *argv)
        assert code == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert entries(tmp_path) == {'in', 'other.pth', 'broken.pth', 'corrupt.pth', 'bad.yml'}


def test_load_network_prefers_ema(tiny_gsm):
    net = load_network(tiny_gsm['weights'], tiny_gsm['opt'])
    ref = tiny_gsm['net'].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------------------------- tiny GSMNet
def test_gsmnet_mp4_to_png_equals_direct_forward(tmp_path, capsys, tiny_gsm, gsm_clip):
    """One chunk and one tile (the defaults cover 3 frames of 34x34): output == direct forward, 8-bit."""
    code, err = run_cli(
        capsys,
        str(gsm_clip['path']),
        '-o',
        str(tmp_path / 'out'),
        '--weights',
        tiny_gsm['weights'],
        '-opt',
        tiny_gsm['opt'],
        '--device',
        'cpu',
    )
    assert code == 0, err
    got = np.stack(read_folder(tmp_path / 'out'))
    assert got.shape == (3, 136, 136, 3)
    np.testing.assert_array_equal(got, quantise(gsm_clip['direct']))


def test_gsmnet_chunked_stays_close(tiny_gsm, gsm_clip):
    out = np.stack(list(upscale_frames(gsm_clip['frames'], tiny_gsm['net'], chunk=2, overlap=1, tile=0)))
    diff = np.abs(out.astype(int) - quantise(gsm_clip['direct']).astype(int))
    # Measured: mean 0.21, max 2 (the random residual itself is about 7 levels from bilinear).
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


def test_compile_phases_keep_the_runs_calls_of_costly_phases(monkeypatch):
    """The stats' compile_phases: each phase's calls made after the run started, for the phases that took at least
    COMPILE_PHASE_MIN_S in them; bench_infer lists the costliest first."""
    import sys

    import torch._dynamo.utils as dynamo_utils

    from gsmsr import inference

    metrics = {'inductor_compile': [3.0], 'tiny': [0.1]}
    monkeypatch.setattr(dynamo_utils, 'compilation_time_metrics', metrics)
    before = inference._compile_phases()
    metrics['inductor_compile'] += [1.25, 0.5]
    metrics['tiny'].append(0.2)
    metrics['new_phase'] = [0.6]
    phases = inference._compile_phases_since(before)
    assert phases == {'inductor_compile': [1.25, 0.5], 'new_phase': [0.6]}
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    monkeypatch.delitem(sys.modules, 'bench_infer', raising=False)
    from bench_infer import compile_phase_rows

    rows = compile_phase_rows({'compile_phases': phases})
    assert [(r['phase'], r['calls'], r['total_s'], r['first_calls_s']) for r in rows] == [
        ('inductor_compile', '2', '1.75', '1.25 0.50'),
        ('new_phase', '1', '0.60', '0.60'),
    ]


def test_kernels_are_compiled_ahead_until_a_run_has_done_it(tmp_path, monkeypatch):
    """On CUDA the first chunk's kernels are compiled ahead (in threads) unless the marker of an earlier run with the
    same call shape, precision, switches and caches is there; the marker is per call shape."""
    from gsmsr import compile_cache, inference

    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    monkeypatch.setattr(compile_cache, 'cache_key', lambda device: {'gpu': 'a GPU'})  # no CUDA here to ask
    asked: List[tuple] = []
    net = SimpleNamespace(compile_kernels_ahead=lambda shape: asked.append(tuple(shape)) or True)
    cuda = torch.device('cuda')  # only its type is read
    shape = (1, 52, 3, 360, 640)
    done = inference._kernels_done(shape, 'fp32', cuda)
    assert inference._compile_kernels_ahead(net, shape, 'fp32', cuda, done)
    done.set()
    again = inference._kernels_done(shape, 'fp32', cuda)  # a later run's
    assert again.path == done.path and not inference._compile_kernels_ahead(net, shape, 'fp32', cuda, again)
    other = (1, 52, 3, 360, 648)
    assert inference._compile_kernels_ahead(net, other, 'fp32', cuda, inference._kernels_done(other, 'fp32', cuda))
    assert not inference._compile_kernels_ahead(net, shape, 'fp32', CPU, None)  # CUDA only
    assert asked == [shape, other]


def test_triton_digest_is_computed_in_the_background():
    """The first Triton kernel of a CUDA run needs the digest of Triton's files; `gsmsr infer` starts it early in a
    thread, and Triton's own cached function then returns it."""
    triton_cache = pytest.importorskip('triton.runtime.cache')
    from gsmsr import inference

    triton_cache.triton_key.cache_clear()
    thread = inference._hash_triton_in_background()
    thread.join(120)
    assert not thread.is_alive() and triton_cache.triton_key.cache_info().currsize == 1
    assert triton_cache.triton_key.cache_info().misses == 1
    triton_cache.triton_key()
    assert triton_cache.triton_key.cache_info().hits == 1
