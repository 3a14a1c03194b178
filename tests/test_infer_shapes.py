"""Shapes that reach the network (and GSMNet's compiled blocks) in ``gsmsr infer``: one per video, from a small set
shared by videos of different sizes, so a compiled network compiles once; planned tiles and the tile choice
from free memory (gsmsr.tiling.plan_tiles, gsmsr.memory_plan), and outputs unchanged where tiling is exact."""

from __future__ import annotations

from typing import Dict, List, Set, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_inference import TINY_GSM, InferTestNet, make_frames, quantise, to_lq

from gsmsr.archs import GSMNet
from gsmsr.inference import DEFAULT_NETWORK, _network_call, _stream, upscale_frames
from gsmsr.memory_plan import (
    HEADROOM,
    NET_BYTES_PER_PIXEL,
    NET_BYTES_PER_PIXEL_FRAME,
    NET_FIXED_BYTES,
    SLAB_FRAMES,
    STREAM_WHOLE,
    SWSA_BYTES_PER_PIXEL_FRAME,
    choose_tiling,
    chunk_bytes,
    estimate_peak_bytes,
    whole_chunk_swsa_fits,
)
from gsmsr.tiling import TILE_STEP, accumulate_tiles, plan_tiles, tile_regions, tile_weight_map

CPU = torch.device('cpu')
GiB = 2**30
SIZES = [(36, 40), (180, 320), (360, 640), (540, 960), (720, 1280), (1080, 1920), (2160, 3840), (50, 1000)]


def allowed_side(tile: int, side: int) -> bool:
    """A planned tile side: the whole frame side, or a multiple of TILE_STEP."""
    return tile == side or (tile % TILE_STEP == 0 and tile < side)


# ----------------------------------------------------------------------------------------------- plan_tiles
@pytest.mark.parametrize('height,width', SIZES)
@pytest.mark.parametrize('max_pixels', [10**9, 2 * 10**6, 500_000, 150_000, 65536, 5000])
def test_plan_tiles_sides_cover_and_budget(height, width, max_pixels):
    th, tw = plan_tiles(height, width, max_pixels, 32)
    assert allowed_side(th, height) and allowed_side(tw, width), (th, tw)
    regions = tile_regions(height, width, (th, tw), 32)
    assert {(r.h, r.w) for r in regions} == {(th, tw)}  # edge tiles are full-size, moved inward
    assert tile_weight_map(height, width, 1, (th, tw), 32).min().item() >= 1  # the tiles cover the frame
    smallest = min(min(height, TILE_STEP), height) * min(width, TILE_STEP)
    if max_pixels >= smallest:
        assert th * tw <= max_pixels
    if height * width <= max_pixels:
        assert (th, tw) == (height, width)


def test_plan_tiles_minimises_computed_pixels():
    """Brute force over all tiles with allowed sides: none under the budget computes fewer pixels."""
    height, width, budget, overlap = 300, 500, 40_000, 16

    def cost(th, tw):
        return len(tile_regions(height, width, (th, tw), overlap)) * th * tw

    th, tw = plan_tiles(height, width, budget, overlap)
    for a in [height, *range(64, height, 64)]:
        for b in [width, *range(64, width, 64)]:
            if a * b <= budget and max(a, b) <= 4 * min(a, b):
                assert cost(th, tw) <= cost(a, b), ((th, tw), (a, b))


def test_plan_tiles_depends_on_memory_only_in_steps():
    """Small changes of the free memory do not change the tile (so do not cause a recompilation)."""
    tiles = {plan_tiles(1080, 1920, int(1.3e6 * (1 + d / 100)), 32) for d in range(-3, 4)}
    assert tiles == {(1080, 1024)}


# ----------------------------------------------------------------------------------------------- memory model
def test_choose_tiling_whole_frame_when_it_fits_and_under_headroom():
    for (h, w), frames in zip(SIZES, [2, 20, 32, 32, 32, 32, 32, 7]):
        for free in (8 * GiB, 40 * GiB, 139 * GiB):
            tile, batch = choose_tiling(free, h, w, frames, 4, 32)
            peak = estimate_peak_bytes(tile, batch, h, w, frames, 4)
            if tile == (h, w):
                assert batch == 1
            smallest = estimate_peak_bytes((min(h, 64), min(w, 64)), 1, h, w, frames, 4)
            if smallest <= HEADROOM * free:  # otherwise nothing fits: the smallest tile
                assert peak <= HEADROOM * free, ((h, w), free, tile, batch)
            n = len(tile_regions(h, w, tile, 32))
            assert n % batch == 0 and choose_tiling(free, h, w, frames, 4, 32) == (tile, batch)  # pure
    assert choose_tiling(139 * GiB, 360, 640, 32, 4, 32) == ((360, 640), 1)
    assert choose_tiling(139 * GiB, 1080, 1920, 32, 4, 32) == ((1080, 1920), 1)  # ~122 of 125 GiB allowed
    assert choose_tiling(22 * GiB, 1080, 1920, 32, 4, 32)[0] != (1080, 1920)


def test_choose_tiling_keeps_a_given_batch_and_shrinks_with_less_memory():
    big, _ = choose_tiling(139 * GiB, 1080, 1920, 32, 4, 32)
    shared, batch = choose_tiling(139 * GiB, 1080, 1920, 32, 4, 32, tile_batch=4)
    small, _ = choose_tiling(24 * GiB, 1080, 1920, 32, 4, 32)
    assert batch == 4 and estimate_peak_bytes(shared, 4, 1080, 1920, 32, 4) <= HEADROOM * 139 * GiB
    assert shared[0] * shared[1] < big[0] * big[1]
    assert small[0] * small[1] < big[0] * big[1]


def test_whole_chunk_swsa_needs_its_frames_transients_under_the_headroom():
    """SWSA over a whole chunk adds (frames - SLAB_FRAMES) pixel-frames of SWSA transients to the estimated peak;
    it is allowed exactly when that sum stays under the headroom. On an H200 (139 GiB): whole 360x640 chunks of 28
    fit, whole 1080p ones do not (the 1080p frame alone takes most of the card)."""
    for (h, w), frames in ((360, 640), 28), ((180, 320), 32), ((1080, 1920), 28):
        peak = estimate_peak_bytes((h, w), 1, h, w, frames, 4)
        extra = h * w * (frames - SLAB_FRAMES) * SWSA_BYTES_PER_PIXEL_FRAME
        need = (peak + extra) / HEADROOM
        assert whole_chunk_swsa_fits(int(need) + 1024, (h, w), 1, h, w, frames, 4)
        assert not whole_chunk_swsa_fits(int(need) - 1024, (h, w), 1, h, w, frames, 4)
        fp32 = estimate_peak_bytes((h, w), 1, h, w, frames, 4, 'fp32')
        assert not whole_chunk_swsa_fits(int((fp32 + extra) / HEADROOM), (h, w), 1, h, w, frames, 4, 'fp32')
    assert whole_chunk_swsa_fits(139 * GiB, (360, 640), 1, 360, 640, 28, 4)
    assert not whole_chunk_swsa_fits(139 * GiB, (1080, 1920), 1, 1080, 1920, 28, 4)
    # A chunk of at most STREAM_WHOLE frames is one SWSA slab of all its frames: counted with or without whole_swsa.
    for frames in (SLAB_FRAMES + 1, STREAM_WHOLE):
        peak = estimate_peak_bytes((360, 640), 1, 360, 640, frames, 4)
        assert peak == estimate_peak_bytes((360, 640), 1, 360, 640, frames, 4, whole_swsa=True)
        slab = estimate_peak_bytes((360, 640), 1, 360, 640, frames, 4) - chunk_bytes(360, 640, frames, 4)
        plain = NET_FIXED_BYTES + 360 * 640 * (NET_BYTES_PER_PIXEL + frames * NET_BYTES_PER_PIXEL_FRAME)
        assert slab - plain == 360 * 640 * (frames - SLAB_FRAMES) * SWSA_BYTES_PER_PIXEL_FRAME
    # no more frames than a slab: nothing beyond the tiling's own estimate
    peak = estimate_peak_bytes((360, 640), 1, 360, 640, SLAB_FRAMES, 4)
    assert whole_chunk_swsa_fits(int(peak / HEADROOM) + 1024, (360, 640), 1, 360, 640, SLAB_FRAMES, 4)


def test_memory_model_frames_follow_the_release_network():
    """The model's SWSA frame counts are the release GSMNet's streaming schedule (slab plus a halo each side)."""
    net = GSMNet(**{k: v for k, v in DEFAULT_NETWORK.items() if k != 'type'})
    depth = len(net.prop_layers[0].stage.attn_blocks.blocks)
    assert SLAB_FRAMES == net.stream_slab + 2 * (depth + depth % 2)
    assert STREAM_WHOLE == net.stream_whole


def test_choose_tiling_batches_small_tiles():
    """Little memory per tile but enough for several: small tiles go several per call, dividing the count."""
    tile, batch = choose_tiling(12 * GiB, 360, 640, 4, 4, 32)
    n = len(tile_regions(360, 640, tile, 32))
    assert n % batch == 0
    if tile[0] * tile[1] < 180 * 320:
        assert batch > 1


# ----------------------------------------------------------------------------------------------- shapes per video
class ShapeNet:
    """Records the input shape of every call; output: nearest upsampling of sin(x) (pointwise, so tiling is exact)."""

    upscale = 2

    def __init__(self):
        self.shapes: List[Tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        b, t, c, h, w = x.shape
        y = F.interpolate(torch.sin(3 * x).flatten(0, 1), scale_factor=2, mode='nearest')
        return y.view(b, t, c, 2 * h, 2 * w)


@pytest.mark.parametrize('tile_batch', [1, 3])
def test_one_shape_per_video_from_a_fixed_set(tile_batch):
    """Several sizes and frame counts (with a last, shorter stride) through the streamer with planned tiles: every
    call of a video has the same shape, and tile sides come from {whole side} + multiples of 64."""
    chunk, overlap = 6, 2
    seen: Set[Tuple[int, ...]] = set()
    for (h, w), t in [((100, 150), 7), ((100, 150), 13), ((130, 150), 9), ((100, 300), 6), ((70, 400), 11)]:
        net = ShapeNet()
        tile = plan_tiles(h, w, 9000, 8)
        frames = make_frames(t, h, w, seed=t)
        call = _network_call(net, 2, 'fp32', CPU)
        out = list(_stream(frames, call, 2, chunk, overlap, tile, 8, CPU, 'x', tile_batch))
        assert len(out) == t
        shapes = set(net.shapes)
        assert len(shapes) == 1, shapes
        (b, length, _, th, tw) = shapes.pop()
        assert length == min(chunk, t) and b == min(tile_batch, len(tile_regions(h, w, tile, 8)))
        assert allowed_side(th, h) and allowed_side(tw, w)
        seen.add((th, tw))
    assert len(seen) < 5  # different sizes share tile shapes


def test_planned_tiles_and_filler_batches_are_exact():
    """A pointwise network: planned rectangular tiles with a filled-up last batch equal the whole-frame output."""
    torch.manual_seed(0)
    lq = torch.rand(1, 3, 3, 100, 170, dtype=torch.float64)
    net = ShapeNet()
    tile = plan_tiles(100, 170, 7000, 8)
    assert tile != (100, 170) and len(tile_regions(100, 170, tile, 8)) % 4
    acc = accumulate_tiles(net, lq, 2, tile, 8, tile_batch=4)
    out = acc / tile_weight_map(100, 170, 2, tile, 8, dtype=torch.float64)
    torch.testing.assert_close(out, net(lq), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------- GSMNet blocks
def block_inputs(net: GSMNet) -> Dict[str, Set[Tuple]]:
    """Replace the modules ``compile_blocks`` compiles by recorders of their input signatures (tensor shapes and
    strides, which compiled graphs guard on, nested in the flow lists) that return their input: the streaming
    schedule around them, which decides those shapes, runs for real, but cheaply. Returns module name ->
    signatures seen."""
    seen: Dict[str, Set[Tuple]] = {}

    def signature(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.stride()
        if isinstance(value, (list, tuple)):
            return tuple(signature(v) for v in value)
        return None

    def recorder(name: str):
        def forward(x, *args, **kwargs):  # kwargs: the window step's out (a slot view of the next window's buffer)
            seen[name].add(signature((x, *args, *kwargs.values())))
            return x

        return forward

    for i, layer in enumerate(net.prop_layers):
        named = [(f'mamba{i}', layer.stage.mamba_block)]
        named += [(f'swsa{i}.{j}', blk) for j, blk in enumerate(layer.stage.attn_blocks.blocks)]
        for name, module in named:
            seen[name] = set()
            module.forward = recorder(name)
    return seen


def test_compiled_blocks_see_one_shape_per_block():
    """GSMNet's streaming schedule over videos of several lengths (a last chunk moved back; a clip shorter than a
    chunk, of even length; balanced chunks shorter than the maximum, from a known frame count) and sizes, with one
    planned tile size: each block that ``compile_blocks`` compiles sees one input signature, the same for all these
    videos. (A call of odd length T above the SWSA slab gives the last slab one frame more, since slabs start on
    even frames: a second SWSA shape. Chunks have the even default length 32 or a balanced length rounded up to
    even; only clips shorter than a chunk can be odd.)"""
    torch.manual_seed(0)
    # x2: the shapes that reach the blocks do not depend on the scale, and the x4 upsampler after them (64-channel
    # convolutions at 4H x 4W) was most of this test's CPU time
    net = GSMNet(**{**TINY_GSM, 'upscale': 2}).eval()
    # calls of up to stream_whole (20) frames run SWSA once over the whole call, one shape per length; these
    # chunks are shorter (CPU time), so that is turned off to see the slabs that longer chunks use
    net.stream_whole = 0
    seen = block_inputs(net)
    slab = net.stream_slab + 2 * (2 + 2 % 2)  # SWSA frames per call: slab plus the halo of attn_depth 2
    signatures = None
    # (size, frames, declared frame count, frames per network call): chunk 14, overlap 2
    videos = [((40, 72), 16, None, 14), ((40, 72), 23, None, 14), ((48, 60), 12, None, 12)]
    videos += [((40, 72), 22, 22, 12), ((48, 60), 27, 27, 12)]  # balanced: chunks at 0, 10 / at 0, 10, 15
    net_call = _network_call(net, 2, 'fp32', CPU)
    lengths: Set[int] = set()

    def call(x: torch.Tensor) -> torch.Tensor:  # records the frames per network call
        lengths.add(x.shape[1])
        return net_call(x)

    for (h, w), t, count, length in videos:
        for s in [*seen.values(), lengths]:
            s.clear()
        frames = make_frames(t, h, w, seed=t)
        out = list(_stream(frames, call, 2, 14, 2, (40, 40), 8, CPU, 'x', frame_count=count))
        assert len(out) == t and lengths == {length} and length >= slab
        assert all(len(s) == 1 for s in seen.values()), {k: v for k, v in seen.items() if len(v) != 1}
        current = {k: next(iter(v)) for k, v in seen.items()}
        assert signatures is None or current == signatures
        signatures = current
    assert signatures['swsa0.0'][0][0] == (1, slab, 40, 40, 16)  # (B, T, H, W, C) slabs of a fixed length
    assert signatures['mamba0'][0][0] == (1, 16, 3, 40, 40)  # (B, C, K, H, W) windows


def test_whole_frame_plan_equals_direct_forward():
    """The plan for a frame that fits is the frame itself; one chunk and that tile give the network's forward."""
    torch.manual_seed(1)
    net = InferTestNet().eval()
    frames = make_frames(4, 36, 50, seed=3)
    tile = plan_tiles(36, 50, 10**6, 32)
    assert tile == (36, 50)
    out = np.stack(list(upscale_frames(frames, net, chunk=32, tile=tile, tile_overlap=32)))
    with torch.no_grad():
        ref = quantise(net(to_lq(frames))[0])
    np.testing.assert_array_equal(out, ref)
