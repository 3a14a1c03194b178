"""Temporal chunking and spatial tiling of a video network's forward pass.

``forward_chunked`` is the official test-time protocol (ARCHITECTURE.md §9), used for validation and
testing. ``tile_regions`` / ``accumulate_tiles`` / ``tile_weight_map`` are its spatial half, shared with the
streaming inference in :mod:`gsmsr.inference`, which blends chunks with its own temporal weights.

Blending rule (§9): each tile is an independent network call. For every tile edge that is not an image
border, the outermost ``tile_overlap // 2`` *output* (HR) pixels are dropped, both from the accumulated
output and from the weight map; the rest is averaged. The trim is deliberately not multiplied by the scale
(the official quirk; with the official 144/50 tiles it drops 25 HR px of a 200 HR px overlap).

The only departure from the official script: with ``tile=0`` (or ``chunk=0``) the network sees the whole
frame (or clip) unpadded. The official script reflect-pads that path to multiples of its attention window
(§9); GSMNet needs no divisibility, and an unpadded call keeps "one chunk and one tile" equal to ``net(lq)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor

__all__ = ['window_starts', 'TileRegion', 'tile_regions', 'tile_weight_map', 'accumulate_tiles', 'forward_chunked']


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


def tile_regions(height: int, width: int, tile: int, tile_overlap: int) -> List[TileRegion]:
    """The tiles of an LR frame ``height x width``, with the HR trims of §9 (row-major order).

    A side smaller than ``tile`` (or ``tile == 0``) is one tile of the whole side. Edges on an image border are
    never trimmed; every inner edge loses ``tile_overlap // 2`` HR pixels.
    """
    trim = tile_overlap // 2
    th, tw = (min(tile, height), min(tile, width)) if tile else (height, width)
    regions = []
    for y0 in window_starts(height, tile, tile_overlap):
        for x0 in window_starts(width, tile, tile_overlap):
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
    tile: int,
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


def accumulate_tiles(
    net: Callable[[Tensor], Tensor],
    lq: Tensor,
    scale: int,
    tile: int,
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
    better at batch 1 and hold that many tile outputs at a time. The result does not depend on it. Returns ``acc``.
    """
    b, t, _, h, w = lq.shape
    regions = tile_regions(h, w, tile, tile_overlap)
    for i in range(0, len(regions), max(1, tile_batch)):
        group = regions[i : i + max(1, tile_batch)]
        out = net(torch.cat([lq[..., r.y0 : r.y0 + r.h, r.x0 : r.x0 + r.w] for r in group]))
        th, tw = group[0].h, group[0].w
        if out.dim() != 5 or out.shape[:2] != (b * len(group), t) or out.shape[-2:] != (scale * th, scale * tw):
            raise RuntimeError(
                f'network returned shape {tuple(out.shape)} for tiles of shape '
                f'{(b * len(group), t, lq.shape[2], th, tw)}; expected (B, T, C, {scale}*H, {scale}*W)'
            )
        if acc is None:
            dtype = torch.promote_types(lq.dtype, torch.float32)
            acc = torch.zeros(b, t, out.shape[2], scale * h, scale * w, device=lq.device, dtype=dtype)
        for j, r in enumerate(group):
            (fy, fx), (iy, ix) = _hr_slices(r, scale)
            part = out[j * b : (j + 1) * b, ..., iy, ix].to(device=acc.device, dtype=acc.dtype)
            if frame_weight is not None:
                part = part * frame_weight.to(device=acc.device, dtype=acc.dtype).view(1, t, 1, 1, 1)
            acc[..., fy, fx] += part
            del part
        del out
    return acc


def forward_chunked(
    net: Callable[[Tensor], Tensor],
    lq: Tensor,
    scale: int,
    chunk: int = 100,
    chunk_overlap: int = 2,
    tile: int = 144,
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
