"""A copy between two layouts of feature frames, channels-last and channel-first, in one Triton kernel (no autograd).

On clips cut into slabs (longer than ``stream_whole``), the streaming schedule moves frames between SWSA's slabs,
which are channels-last (the token order its blocks work in), and the propagation's channel-first features
(:meth:`GSMNet.stream_layer <gsmsr.archs.gsmnet_arch.GSMNet.stream_layer>`): about three frame copies a frame and
layer (the slab with its halos, the kept frames); the reconstruction copies its input channels-last once. (A whole
clip's SWSA reads the stored frames and its output keeps their layout.) PyTorch's eager copy walks the destination
in its order and reads the source across its layout, with no tiling: for frames of 192 channels each 32-byte sector
it loads gives one element to the warp that asked. Here a program copies a (channel block, position block) tile,
loaded along the source's contiguous axis and stored along the destination's; Triton converts between the two
register layouts through shared memory.

Values: a copy, with the destination's dtype conversion (``Tensor.copy_``'s rounding: both are one IEEE cast).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, runs_fused

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test of triton_jit
    tl = None

BLOCK_C = 64
BLOCK_N = 64
NUM_WARPS = 4

Layout = Tuple[int, int, int, int, int, int, int, int]  # (B, C, D, N) and their strides


def _layout_copy_kernel(
    src_ptr,
    dst_ptr,
    C,
    D,
    N,
    s_sb,
    s_sc,
    s_sd,
    s_sn,
    d_sb,
    d_sc,
    d_sd,
    d_sn,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (position block, channel block, batch * D + d). A stride of 1 is specialised by Triton, which tells
    its coalescing pass the contiguous axis of each side."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bd = tl.program_id(2)
    b = (bd // D).to(tl.int64)
    d = (bd % D).to(tl.int64)
    mask = (c < C)[:, None] & (n < N)[None, :]
    c64 = c.to(tl.int64)[:, None]
    n64 = n.to(tl.int64)[None, :]
    v = tl.load(src_ptr + b * s_sb + d * s_sd + c64 * s_sc + n64 * s_sn, mask=mask)
    tl.store(dst_ptr + b * d_sb + d * d_sd + c64 * d_sc + n64 * d_sn, v.to(dst_ptr.dtype.element_ty), mask=mask)


_KERNELS = LazyKernels(__name__, [_layout_copy_kernel])


def _layout(t: Tensor) -> Optional[Layout]:
    """A (B, C, H, W) or (B, C, D, H, W) tensor as (B, C, D, N = H W) with strides, where H and W are one axis."""
    if t.dim() == 4:
        (b, c, h, w), (sb, sc, sh, sw) = t.shape, t.stride()
        d, sd = 1, 0
    elif t.dim() == 5:
        (b, c, d, h, w), (sb, sc, sd, sh, sw) = t.shape, t.stride()
    else:
        return None
    if h > 1 and w > 1 and sh != w * sw:
        return None
    return b, c, d, h * w, sb, sc, sd, sw if w > 1 else sh


def transposes(dst: Tensor, src: Tensor) -> bool:
    """Whether ``dst.copy_(src)`` is a copy that :func:`copy_frames` tiles: same (B, C, [D,] H, W) shape, H and W one
    axis on both sides, and the channels contiguous on one side while the positions are on the other."""
    if dst.shape != src.shape or dst.numel() == 0:
        return False
    a, b = _layout(src), _layout(dst)
    if a is None or b is None:
        return False
    return (a[5] == 1 and b[7] == 1 and a[1] > 1) or (b[5] == 1 and a[7] == 1 and b[1] > 1)


def copy_frames(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` for feature frames or volumes (B, C, [D,] H, W); where one side is channels-last and the other
    channel-first (:func:`transposes`), the tensors are on the GPU and autograd does not record the copy, one tiled
    kernel. Returns dst."""
    recorded = torch.is_grad_enabled() and src.requires_grad
    if recorded or not (transposes(dst, src) and runs_fused(src)):
        return dst.copy_(src)
    b, c, d, n, *src_strides = _layout(src)
    dst_strides = _layout(dst)[4:]
    grid = (-(-n // BLOCK_N), -(-c // BLOCK_C), b * d)
    _KERNELS(interpret_for(src)).layout_copy_kernel[grid](
        src, dst, c, d, n, *src_strides, *dst_strides, BLOCK_C=BLOCK_C, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS
    )
    return dst


def contiguous_frames(t: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """``t.contiguous(memory_format=memory_format)`` through :func:`copy_frames`."""
    if t.is_contiguous(memory_format=memory_format):
        return t
    return copy_frames(torch.empty_like(t, memory_format=memory_format), t)
