"""Tile size and tiles per call for ``gsmsr infer`` from the free GPU memory (a measure-free model).

Peak device memory of one streamed chunk of ``T`` frames of ``H x W`` LR pixels, tiles of ``h x w``, ``b`` tiles
per network call, scale ``s``:

* the chunk's buffers, exact: the fp32 HR accumulator (``T * 3 * s^2 * H * W * 4`` bytes), the weight map
  (``s^2 * H * W * 4``) and the LR chunk on the device (uint8 upload, then float32);
* one network call on ``b * h * w`` LR pixels: ``NET_FIXED_BYTES + b*h*w * (NET_BYTES_PER_PIXEL +
  T * NET_BYTES_PER_PIXEL_FRAME)``. The per-pixel term is what the streaming schedule holds whatever ``T`` is
  (an SWSA slab of ``stream_slab + 2*halo`` frames, or a whole chunk of up to ``stream_whole``; the K-frame window
  step); the per-pixel-frame term grows with the chunk (features, flows, the HR output of the call and its weighted
  copy). SWSA over more frames than a slab adds ``SWSA_BYTES_PER_PIXEL_FRAME`` for each frame beyond it.

The constants are for the compiled bf16 path (the GPU default); fp32 and the eager path scale them.
:func:`choose_tiling` takes the largest tile under ``HEADROOM`` of the free memory that computes the fewest
pixels (:func:`gsmsr.tiling.plan_tiles`): the whole frame when it fits. Where whole frames fit with room to spare,
:func:`whole_chunk_swsa_fits` says whether SWSA can also run over the whole chunk instead of in slabs.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from gsmsr.tiling import plan_tiles, tile_regions

__all__ = [
    'HEADROOM',
    'NET_FIXED_BYTES',
    'NET_BYTES_PER_PIXEL',
    'NET_BYTES_PER_PIXEL_FRAME',
    'FILL_PIXELS',
    'SLAB_FRAMES',
    'STREAM_WHOLE',
    'SWSA_BYTES_PER_PIXEL_FRAME',
    'chunk_bytes',
    'call_bytes',
    'estimate_peak_bytes',
    'choose_tiling',
    'whole_chunk_swsa_fits',
    'free_device_bytes',
]

KiB, GiB = 1024, 1024**3
HEADROOM = 0.90  # the estimated peak stays under this share of the free memory

# Fitted to three peaks of the compiled bf16 path on an H200 (benchmarks/NOTES.md, 2026-12-02): bench_gsm at
# 20 x 180 x 320 (5.05 GiB) and 100 x 180 x 320 (6.92), gsmsr infer on whole 360 x 640 frames in chunks of 28
# (14.60, of which 1.26 the chunk's buffers). The three agree on ~38 KiB per LR pixel and ~440 bytes per pixel-frame
# with 2.5 GiB fixed; rounded up, the model over-estimates each of them by 3-4 %.
NET_FIXED_BYTES = 5 * GiB // 2  # weights, workspaces, the allocator's share that does not scale with the call
NET_BYTES_PER_PIXEL = 40 * KiB  # per LR pixel of a call, independent of T: SWSA slab and window step
NET_BYTES_PER_PIXEL_FRAME = 448  # per LR pixel and frame of a call: bf16 features, flows, fp32 HR output
FILL_PIXELS = 180 * 320  # LR pixels per call from which the GPU is busy; smaller tiles are batched to this
# SWSA over more frames than a slab (a chunk of at most STREAM_WHOLE frames is one slab; whole_chunk_swsa_fits
# raises that to the chunk): per LR pixel and frame beyond a slab's. Fitted with gsmsr infer on an H200 (NOTES,
# 2026-12-04), since SWSA writes its windows and its merge over its input: whole 360 x 640 chunks of 28 peaked at
# 16.07 GiB (slab model 15.24: 0.32 KiB a pixel-frame beyond 16), whole 1080 x 1920 frames in one chunk of 20 at
# 99.03 (the model with this constant 111.0) and two chunks of 22 in slabs at 103.17 (model 109.6). Rounded up.
SWSA_BYTES_PER_PIXEL_FRAME = KiB // 2
SLAB_FRAMES = 16  # frames an SWSA slab spans with the release config (GSMNet.stream_slab + 2 * halo)
STREAM_WHOLE = 20  # GSMNet.stream_whole: chunks of at most this many frames run SWSA once over the whole chunk
# Multipliers of the two per-pixel terms for the other paths: fp32 from bench_gsm's compiled fp32 row (9.01 against
# 5.05 GiB at 20 x 180 x 320, H200); the eager one a placeholder, not measured yet.
FP32_FACTOR = 2.6  # fp32 features and activations
EAGER_FACTOR = 1.5  # the eager path keeps more intermediates alive than the fused, compiled blocks


def chunk_bytes(height: int, width: int, frames: int, scale: int) -> int:
    """Device bytes of a chunk's own buffers: fp32 HR accumulator, weight map, LR upload (uint8 and float32)."""
    hr = scale * scale * height * width
    return frames * 3 * hr * 4 + hr * 4 + frames * 3 * height * width * (1 + 4)


def _path_factor(precision: str, compiled: bool) -> float:
    """Multiplier of the per-pixel terms for the path that runs (the constants are the compiled bf16 path's)."""
    return (FP32_FACTOR if precision == 'fp32' else 1.0) * (1.0 if compiled else EAGER_FACTOR)


def call_bytes(
    pixels: int, frames: int, precision: str = 'bf16', compiled: bool = True, whole_swsa: bool = False
) -> int:
    """Peak bytes of one network call on ``pixels`` LR pixels (all tiles of the call) of ``frames`` frames; SWSA
    spans the whole call with ``whole_swsa``, else slabs (one, for at most ``STREAM_WHOLE`` frames)."""
    factor = _path_factor(precision, compiled)
    swsa = frames if whole_swsa or frames <= STREAM_WHOLE else SLAB_FRAMES
    per_frame = frames * NET_BYTES_PER_PIXEL_FRAME + max(0, swsa - SLAB_FRAMES) * SWSA_BYTES_PER_PIXEL_FRAME
    return NET_FIXED_BYTES + int(factor * pixels * (NET_BYTES_PER_PIXEL + per_frame))


def _call_pixels(tile: Tuple[int, int], tile_batch: int, height: int, width: int) -> int:
    """LR pixels of one network call: ``tile_batch`` tiles, each side at most the frame's."""
    return tile_batch * min(tile[0], height) * min(tile[1], width)


def estimate_peak_bytes(
    tile: Tuple[int, int],
    tile_batch: int,
    height: int,
    width: int,
    frames: int,
    scale: int,
    precision: str = 'bf16',
    compiled: bool = True,
    whole_swsa: bool = False,
) -> int:
    """Estimated peak device bytes of streaming ``frames``-frame chunks of ``height x width`` in ``tile`` tiles."""
    pixels = _call_pixels(tile, tile_batch, height, width)
    return chunk_bytes(height, width, frames, scale) + call_bytes(pixels, frames, precision, compiled, whole_swsa)


def choose_tiling(
    free_bytes: int,
    height: int,
    width: int,
    frames: int,
    scale: int,
    tile_overlap: int,
    precision: str = 'bf16',
    compiled: bool = True,
    tile_batch: Optional[int] = None,
) -> Tuple[Tuple[int, int], int]:
    """(tile (h, w), tiles per call) whose estimated peak is at most ``HEADROOM * free_bytes``.

    A pure function of its arguments. The tile computes the fewest pixels under that budget (the whole frame
    when it fits, see :func:`gsmsr.tiling.plan_tiles`); tiles smaller than ``FILL_PIXELS`` are batched up to
    it where memory allows, in a batch that divides the tile count (no filler tiles). A given ``tile_batch`` is
    kept and shares the budget. When even the smallest tile does not fit, the smallest tile (the run may then
    fail with the usual out-of-memory message).
    """
    budget = HEADROOM * free_bytes - chunk_bytes(height, width, frames, scale)
    per_pixel = call_bytes(1, frames, precision, compiled) - NET_FIXED_BYTES
    max_pixels = max(0, int((budget - NET_FIXED_BYTES) // max(per_pixel, 1)))
    if tile_batch is not None:
        return plan_tiles(height, width, max_pixels // tile_batch, tile_overlap), tile_batch
    tile = plan_tiles(height, width, max_pixels, tile_overlap)
    tiles = len(tile_regions(height, width, tile, tile_overlap))
    area = tile[0] * tile[1]
    batch = 1
    for b in range(2, min(tiles, math.ceil(FILL_PIXELS / area)) + 1):
        if b * area <= max_pixels and tiles % b == 0:
            batch = b
    return tile, batch


def whole_chunk_swsa_fits(
    free_bytes: int,
    tile: Tuple[int, int],
    tile_batch: int,
    height: int,
    width: int,
    frames: int,
    scale: int,
    precision: str = 'bf16',
    compiled: bool = True,
) -> bool:
    """Whether the SWSA groups can run once over each whole ``frames``-frame chunk (``GSMNet.stream_whole`` raised
    to the chunk) with the estimated peak still under ``HEADROOM`` of the free memory. Slabs recompute a halo on
    each side (16 frames for every 8 kept), so a whole chunk saves SWSA work at the cost of its frames' transients."""
    peak = estimate_peak_bytes(tile, tile_batch, height, width, frames, scale, precision, compiled, whole_swsa=True)
    return peak <= HEADROOM * free_bytes


def free_device_bytes(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on a CUDA device (free memory plus the allocator's unused cache);
    None elsewhere."""
    if device.type != 'cuda':
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
