"""Temporal chunking and spatial tiling of a video network's forward pass.

``forward_chunked`` is the official test-time protocol (ARCHITECTURE.md §9), used for validation and
testing. ``tile_regions`` / ``accumulate_tiles`` / ``tile_weight_map`` are its spatial half, shared with the
streaming inference in :mod:`gsmsr.inference`, which blends chunks with its own temporal weights and takes each
frame as soon as its last tile is added (``tile_frames``, on a network that returns its output in pieces of frames).

Blending rule (§9): each tile is an independent network call. For every tile edge that is not an image
border, the outermost ``tile_overlap // 2`` *output* (HR) pixels are dropped, both from the accumulated
output and from the weight map; the rest is averaged. The trim is deliberately not multiplied by the scale
(the official quirk; with the official 144/50 tiles it drops 25 HR px of a 200 HR px overlap).

The only departure from the official script: with ``tile=0`` (or ``chunk=0``) the network sees the whole
frame (or clip) unpadded. The official script reflect-pads that path to multiples of its attention window
(§9); GSMNet needs no divisibility, and an unpadded call keeps "one chunk and one tile" equal to ``net(lq)``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    'window_starts',
    'chunk_length',
    'chunk_count',
    'TileRegion',
    'Tile',
    'tile_sides',
    'tile_regions',
    'tile_weight_map',
    'accumulate_tiles',
    'FrameCall',
    'whole_call',
    'tile_frames',
    'forward_chunked',
    'TILE_STEP',
    'plan_tiles',
]

# A tile: one side for square tiles (0 = whole frame), or (height, width).
Tile = Union[int, Tuple[int, int]]
TILE_STEP = 64  # planned tiles that do not span a whole side are multiples of this (shared compiled shapes)
TILE_MAX_ASPECT = 4  # planned tiles are at most this elongated (or as elongated as the frame): context both ways


def window_starts(length: int, size: int, overlap: int) -> List[int]:
    """Start indices of windows of ``size`` with ``overlap`` covering ``range(length)`` (official rule).

    ``range(0, length - size, size - overlap)`` followed by ``max(0, length - size)``; so the last window is
    aligned with the end. ``size == 0`` or ``size >= length`` gives one window, ``[0]``, of the whole length.
    """
    if size < 0 or overlap < 0:
        raise ValueError(f'window size and overlap must be >= 0, got size={size}, overlap={overlap}')
    if size == 0 or size >= length:
        return [0]
    if overlap >= size:
        raise ValueError(f'overlap ({overlap}) must be smaller than the window size ({size})')
    return list(range(0, length - size, size - overlap)) + [length - size]


def chunk_length(frames: Optional[int], chunk: int, overlap: int) -> int:
    """Frames per temporal chunk of a clip of ``frames`` frames cut into chunks of at most ``chunk`` frames that
    overlap by ``overlap``: the fewest chunks, of one common length (balanced chunks).

    ``n = ceil((frames - overlap) / (chunk - overlap))`` chunks of ``ceil((frames - overlap) / n) + overlap`` frames,
    rounded up to even where that stays within ``chunk`` (GSMNet's SWSA slabs start on even frames, so an odd call
    above one slab gives its last slab one frame more: a second compiled shape). They start at
    ``window_starts(frames, length, overlap)``: n chunks, the last moved back to end on the last frame.
    Example: 100 frames, chunk 32, overlap 4: 4 chunks of 28 (112 frames of work) instead of 4 of 32 (128).
    ``frames`` None (unknown): ``chunk``. ``frames <= chunk``: ``frames`` (one chunk). ``chunk`` 0 (the whole clip
    in one chunk, whatever its length): 0.
    """
    if chunk < 0 or overlap < 0 or (chunk and overlap >= chunk):
        raise ValueError(f'need 0 <= overlap < chunk (or chunk 0), got chunk={chunk}, overlap={overlap}')
    if not chunk or frames is None:
        return chunk
    if frames <= chunk:
        return frames
    n = chunk_count(frames, chunk, overlap)
    length = -(-(frames - overlap) // n) + overlap
    return length + length % 2 if length < chunk else length  # frames > chunk >= length + 1 when it is odd


def chunk_count(frames: int, chunk: int, overlap: int) -> int:
    """The fewest chunks of at most ``chunk`` frames, overlapping by ``overlap``, that cover ``frames`` frames
    (``chunk`` > ``overlap`` >= 0): ``ceil((frames - overlap) / (chunk - overlap))``, 1 when ``frames <= chunk``."""
    return 1 if frames <= chunk else -(-(frames - overlap) // (chunk - overlap))


@dataclass(frozen=True)
class TileRegion:
    """One spatial tile. LR slice ``[y0:y0+h, x0:x0+w]``; of its output (HR, ``s*h x s*w``), the part
    ``[top:s*h-bottom, left:s*w-right]`` is kept and lands at ``[s*y0+top : s*(y0+h)-bottom, ...]``."""

    y0: int
    x0: int
    h: int
    w: int
    top: int
    bottom: int
    left: int
    right: int


def tile_sides(tile: Tile) -> Tuple[int, int]:
    """(tile height, tile width) of a :data:`Tile`; 0 along a side means the whole side."""
    return (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))


def tile_regions(height: int, width: int, tile: Tile, tile_overlap: int) -> List[TileRegion]:
    """The tiles of an LR frame ``height x width``, with the HR trims of §9 (row-major order).

    ``tile``: a side (square tiles) or (height, width). A side smaller than the tile (or a tile side of 0) is one
    tile of the whole side. All tiles have one size: the last row / column is moved inward to end on the border
    (the official rule), overlapping its neighbour more, instead of being smaller. Edges on an image border are
    never trimmed; every inner edge loses ``tile_overlap // 2`` HR pixels.
    """
    trim = tile_overlap // 2
    tile_h, tile_w = tile_sides(tile)
    th = min(tile_h, height) if tile_h else height
    tw = min(tile_w, width) if tile_w else width
    regions = []
    for y0 in window_starts(height, tile_h, tile_overlap):
        for x0 in window_starts(width, tile_w, tile_overlap):
            regions.append(
                TileRegion(
                    y0=y0,
                    x0=x0,
                    h=th,
                    w=tw,
                    top=trim if y0 > 0 else 0,
                    bottom=trim if y0 + th < height else 0,
                    left=trim if x0 > 0 else 0,
                    right=trim if x0 + tw < width else 0,
                )
            )
    return regions


def _hr_slices(r: TileRegion, scale: int):
    """(rows, cols) of the kept output part, in the full HR frame and inside the tile's output."""
    sh, sw = scale * r.h, scale * r.w
    frame = (
        slice(scale * r.y0 + r.top, scale * r.y0 + sh - r.bottom),
        slice(scale * r.x0 + r.left, scale * r.x0 + sw - r.right),
    )
    inner = (slice(r.top, sh - r.bottom), slice(r.left, sw - r.right))
    return frame, inner


def tile_weight_map(
    height: int,
    width: int,
    scale: int,
    tile: Tile,
    tile_overlap: int,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """How many tiles contribute to each HR pixel: ``(s*height, s*width)``, every entry >= 1."""
    weight = torch.zeros(scale * height, scale * width, device=device, dtype=dtype)
    for r in tile_regions(height, width, tile, tile_overlap):
        (fy, fx), _ = _hr_slices(r, scale)
        weight[fy, fx] += 1
    return weight


# A network in pieces: x (B, T, C, h, w) -> (frames, out) pairs, out (B, n, C_out, s*h, s*w) the output for
# x[:, frames], the slices consecutive, in order, and covering all T frames (GSMNet.forward_frames).
FrameCall = Callable[[Tensor], Iterable[Tuple[slice, Tensor]]]


def whole_call(net: Callable[[Tensor], Tensor]) -> FrameCall:
    """``net`` (x -> (B, T, C_out, s*h, s*w)) as a :data:`FrameCall` of one piece, computed when it is taken."""

    def pieces(x: Tensor) -> Iterator[Tuple[slice, Tensor]]:
        yield slice(0, x.shape[1]), net(x)

    return pieces


def tile_frames(
    net: FrameCall,
    lq: Tensor,
    scale: int,
    tile: Tile,
    tile_overlap: int,
    acc: Optional[Tensor] = None,
    frame_weight: Optional[Tensor] = None,
    tile_batch: int = 1,
) -> Iterator[Tuple[int, Tensor]]:
    """:func:`accumulate_tiles` for a network in pieces (:data:`FrameCall`), as a generator: yields ``(t, acc)`` as
    soon as the last tile's output for frame t has been added into ``acc`` (frames in order; ``acc`` is the same
    tensor each time). A caller can thus take frame t while the network is still computing later frames of the
    last tile call. Arguments as for :func:`accumulate_tiles`."""
    b, t, _, h, w = lq.shape
    regions = tile_regions(h, w, tile, tile_overlap)
    per_call = max(1, min(tile_batch, len(regions)))
    device = lq.device if acc is None else acc.device
    dtype = torch.promote_types(lq.dtype, torch.float32) if acc is None else acc.dtype
    # moved to the device once: a copy from pageable host memory waits for the device's queue to drain
    weight = None if frame_weight is None else frame_weight.to(device=device, dtype=dtype).view(1, t, 1, 1, 1)
    for i in range(0, len(regions), per_call):
        group = regions[i : i + per_call]
        filler = regions[i - (per_call - len(group)) : i]  # the tiles just before: their outputs are discarded
        th, tw = group[0].h, group[0].w
        done = 0  # frames covered by the pieces so far
        for frames, out in net(torch.cat([lq[..., r.y0 : r.y0 + r.h, r.x0 : r.x0 + r.w] for r in group + filler])):
            n = frames.stop - frames.start
            if (
                out.dim() != 5
                or frames.start != done
                or not 0 < n <= t - done
                or out.shape[:2] != (b * per_call, n)
                or out.shape[-2:] != (scale * th, scale * tw)
            ):
                raise RuntimeError(
                    f'network returned shape {tuple(out.shape)} for frames {frames.start}:{frames.stop} of tiles of '
                    f'shape {(b * per_call, t, lq.shape[2], th, tw)}; expected (B, T, C, {scale}*H, {scale}*W) over '
                    f'the frames in order from {done}'
                )
            if acc is None:
                acc = torch.zeros(b, t, out.shape[2], scale * h, scale * w, device=device, dtype=dtype)
            for j, r in enumerate(group):
                (fy, fx), (iy, ix) = _hr_slices(r, scale)
                part = out[j * b : (j + 1) * b, ..., iy, ix].to(device=device, dtype=dtype)
                if weight is not None:
                    part = part * weight[:, frames]
                acc[:, frames, ..., fy, fx] += part
                del part
            del out
            done = frames.stop
            if i + per_call >= len(regions):  # the last tile call: these frames are complete
                for k in range(frames.start, frames.stop):
                    yield k, acc
        if done != t:
            raise RuntimeError(f'network returned frames 0:{done} of {t}')


def accumulate_tiles(
    net: Callable[[Tensor], Tensor],
    lq: Tensor,
    scale: int,
    tile: Tile,
    tile_overlap: int,
    acc: Optional[Tensor] = None,
    frame_weight: Optional[Tensor] = None,
    tile_batch: int = 1,
) -> Tensor:
    """Add the trimmed outputs of all tiles of ``lq`` into ``acc`` (not yet divided by the weight map).

    lq: (B, T, C, H, W). acc: (B, T, C_out, s*H, s*W) or None, in which case it is allocated on ``lq``'s
    device, in ``lq``'s dtype promoted to at least float32, from the first tile's channel count.
    frame_weight: (T,) multiplies frame t of every tile output (temporal blending); None means 1.
    tile_batch: tiles stacked along the batch axis of one net call (all tiles have one size); more fill a GPU
    better at batch 1 and hold that many tile outputs at a time. Every call gets ``min(tile_batch, tiles)``
    tiles, so a compiled network sees one batch size: a short last group is filled up with repeats of tiles
    already computed, whose outputs are dropped. The result does not depend on it. Returns ``acc``.
    """
    frames = tile_frames(whole_call(net), lq, scale, tile, tile_overlap, acc, frame_weight, tile_batch)
    return deque(frames, maxlen=1)[0][1]  # runs every tile call; acc comes with each frame


def forward_chunked(
    net: Callable[[Tensor], Tensor],
    lq: Tensor,
    scale: int,
    chunk: int = 100,
    chunk_overlap: int = 2,
    tile: Tile = 144,
    tile_overlap: int = 50,
) -> Tensor:
    """Official test-time forward (ARCHITECTURE.md §9): temporal chunks x spatial tiles, averaged.

    lq: (B, T, C, H, W) -> (B, T, C_out, s*H, s*W) on ``lq``'s device (dtype at least float32).
    Chunk starts follow :func:`window_starts`; every chunk gives weight 1 to each of its frames and the
    frames are averaged over chunks. Within a chunk, tiles are blended as in :func:`tile_regions`.
    ``chunk=0`` / ``tile=0``: no chunking / no tiling. Call it under ``torch.no_grad()``.
    """
    if lq.dim() != 5:
        raise ValueError(f'lq must be (B, T, C, H, W), got shape {tuple(lq.shape)}')
    t_total, h, w = lq.shape[1], lq.shape[-2], lq.shape[-1]
    starts = window_starts(t_total, chunk, chunk_overlap)
    length = min(chunk, t_total) if chunk else t_total
    counts = torch.zeros(t_total, dtype=torch.float64)
    out = None
    for t0 in starts:
        clip = lq[:, t0 : t0 + length]
        if out is None:
            first = accumulate_tiles(net, clip, scale, tile, tile_overlap)
            if length == t_total:
                out = first
            else:  # allocated lazily because the output channel count is only known after a net call
                out = first.new_zeros(first.shape[0], t_total, *first.shape[2:])
                out[:, :length] = first
            del first
        else:
            accumulate_tiles(net, clip, scale, tile, tile_overlap, acc=out[:, t0 : t0 + length])
        counts[t0 : t0 + length] += 1
    weight = tile_weight_map(h, w, scale, tile, tile_overlap, device=out.device, dtype=out.dtype)
    counts = counts.to(device=out.device, dtype=out.dtype).view(1, t_total, 1, 1, 1)
    return out.div_(weight).div_(counts)  # two in-place steps: no (T, sH, sW) temporary


def _side_candidates(side: int, tile_overlap: int, step: int) -> List[int]:
    """Tile lengths for one side: the whole side, or a multiple of ``step`` shorter than it (and > the overlap)."""
    return [side] + [m for m in range(step * (side // step), 0, -step) if tile_overlap < m < side]


def plan_tiles(height: int, width: int, max_pixels: int, tile_overlap: int, step: int = TILE_STEP) -> Tuple[int, int]:
    """The tile (height, width) that computes the fewest LR pixels per frame among tiles of at most ``max_pixels``.

    Each tile side is the whole frame side, or a multiple of ``step`` shorter than it, so frames of different sizes
    share tile shapes (and compiled kernels) and the free memory enters only through how many tiles a side needs.
    All tiles of a frame have this one size (:func:`tile_regions` moves the last row/column inward). The whole
    frame when it fits; ties go to fewer tiles, then to taller tiles. Tiles are at most ``TILE_MAX_ASPECT`` (or the
    frame's aspect) elongated. When nothing fits, the smallest tile.
    """
    aspect = max(TILE_MAX_ASPECT, height / width, width / height)
    best, best_key = None, None
    for th in _side_candidates(height, tile_overlap, step):
        rows = len(window_starts(height, th, tile_overlap))
        for tw in _side_candidates(width, tile_overlap, step):
            if max(th, tw) > aspect * min(th, tw):
                continue
            cols = len(window_starts(width, tw, tile_overlap))
            fits = th * tw <= max_pixels
            key = (not fits, th * tw if not fits else rows * th * cols * tw, rows * cols)
            if best_key is None or key < best_key:
                best, best_key = (th, tw), key
    return best
