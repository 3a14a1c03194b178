"""GPU checks of the fast ``gsmsr infer`` path: pinned non-blocking host copies give the sequential path's bytes,
a compiled network compiles nothing after the first chunk (edge tiles, filler tile batches, the moved-back last
chunk), and the tile chosen from free memory stays under its headroom.

python -m pytest -m gpu tests/gpu/test_infer_gpu.py -s
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gsmsr import GSMNet
from gsmsr.inference import _network_call, _stream, upscale_frames, upscale_video
from gsmsr.memory_plan import HEADROOM, choose_tiling, free_device_bytes
from gsmsr.video_io import open_sink, open_source

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
SMALL = dict(upscale=4, prop_depth=2, attn_depth=2, pa_frame=2, embed_dims=48, num_heads=4, spynet_path=None)
CUDA = torch.device('cuda')


def texture_frames(n: int, h: int, w: int) -> list:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h + 8, w + 4 * n + 8, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[4 : 4 + h, 4 * t : 4 * t + w]) for t in range(n)]


def write_pngs(folder: Path, frames: list) -> Path:
    import cv2

    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        assert cv2.imwrite(str(folder / f'{i:05d}.png'), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    return folder


def test_threaded_cuda_output_is_byte_identical(tmp_path):
    torch.manual_seed(0)
    net = GSMNet(**SMALL).to(CUDA).eval()
    src = write_pngs(tmp_path / 'in', texture_frames(9, 70, 90))
    kw = dict(chunk=4, overlap=1, tile=48, tile_overlap=8, precision='bf16')
    upscale_video(str(src), str(tmp_path / 'a'), net, device='cuda', progress=False, tile_batch=2, **kw)
    source = open_source(str(src))
    pairs = list(source)
    source.close()
    sink = open_sink(str(tmp_path / 'b'), 360, 280)
    kw.update(device='cuda', tile_batch=2, frame_count=len(pairs))  # as upscale_video: a folder's count is known
    for frame, (_, tag) in zip(upscale_frames([p[0] for p in pairs], net, **kw), pairs):
        sink.write(frame, tag)
    sink.commit()
    a = {p.name: p.read_bytes() for p in (tmp_path / 'a').iterdir()}
    b = {p.name: p.read_bytes() for p in (tmp_path / 'b').iterdir()}
    assert len(a) == 9 and a == b


def test_compiled_network_compiles_only_in_the_first_chunk():
    """Edge tiles, a short (filled-up) last tile batch and the last chunk moved back: no compilation after the
    first chunk (counted by Dynamo), then none at all for a second video of another length and size."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = GSMNet(**SMALL, compile_blocks=True).to(CUDA).eval()
    call = _network_call(net, 4, 'bf16', CUDA)
    counters = torch._dynamo.utils.counters
    frames_out = []
    after_first_chunk = None
    # 10 frames, chunk 6 / overlap 2: chunks at 0 and 4 (moved back); 100x150 with (64, 64) tiles: 3x3 tiles,
    # batch 2: the fifth call is filled up
    for i, frame in enumerate(_stream(texture_frames(10, 100, 150), call, 4, 6, 2, (64, 64), 16, CUDA, 'x', 2)):
        frames_out.append(frame)
        if i == 0:
            after_first_chunk = sum(counters['stats'].values()), dict(counters['stats'])
    total = sum(counters['stats'].values()), dict(counters['stats'])
    assert len(frames_out) == 10
    assert total == after_first_chunk, (after_first_chunk, total)
    list(_stream(texture_frames(14, 80, 200), call, 4, 6, 2, (64, 64), 16, CUDA, 'x', 2))
    assert (sum(counters['stats'].values()), dict(counters['stats'])) == total


def test_chosen_tile_peak_is_under_headroom(tmp_path):
    """The release network, compiled bf16, 16 frames of 360x640: the tile chosen from free memory and the
    measured peak against HEADROOM of the free memory (the constants of gsmsr.memory_plan are checked here)."""
    net = GSMNet(compile_blocks=True).to(CUDA).eval()
    free = free_device_bytes(CUDA)
    tile, batch = choose_tiling(free, 360, 640, 16, 4, 32)
    src = write_pngs(tmp_path / 'in', texture_frames(16, 360, 640))
    stats = upscale_video(str(src), str(tmp_path / 'out'), net, precision='bf16', device='cuda', progress=False)
    print(f'free {free / 2**30:.1f} GiB, tile {tile} x{batch}, peak {stats.peak_device_bytes / 2**30:.2f} GiB')
    assert stats.tile == tile and stats.tile_batch == batch
    assert stats.peak_device_bytes <= HEADROOM * free
