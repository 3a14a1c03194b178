"""The GSM block's scatter warp in one Triton kernel (no autograd).

:meth:`gsmsr.archs.gsm_block.GSMBlock.scatter` warps every slot of the Mamba output m (B, C, K, H, W) but the anchor
back to its own grid: a bilinear backward warp with zero padding (:func:`gsmsr.archs.flow.warp`, BasicSR's
``flow_warp``, align_corners). In PyTorch that stacks the K-1 slots into a channels-first fp32 copy (m is bf16 and
physically channels-last under autocast: (B, H, W, K, C) from the token sequence), samples it with cuDNN's fp32
grid sampler and casts the result back: on an H200 0.11 ms a call for the sampler alone (at bandwidth for fp32
channels-first), plus the copies. Here one program per (pixel block, channel block, batch x slot) reads m where it
is, with its strides (channels-last: each corner is one contiguous channel row, coalesced whatever the flow),
computes the positions and bilinear weights in fp32 as PyTorch's grid sampler does, and writes the slot in m's
dtype, channels-last.

Values: PyTorch's bilinear ``grid_sample`` (align_corners, zeros) of BasicSR's normalised grid, corner by corner in
the same order (north-west, north-east, south-west, south-east), products and sum in fp32, one rounding to m's dtype
at the store; the reference path rounds the same fp32 sum. The sampler's own unnormalisation may round differently
by an ulp of the position (the CPU and CUDA kernels of PyTorch already differ there).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, runs_fused  # noqa: F401  (re-exported)

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test of triton_jit
    tl = None

BLOCK_P = 32
BLOCK_C = 64
NUM_WARPS = 4


def _corner(acc, base, xi, yi, weight, s_xh, s_xw, H, W, mp, mc):
    """acc + weight * x[yi, xi] (zero outside the frame); base: (1, BLOCK_C) pointers of the slot's channels."""
    inside = mp & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    offs = yi.to(tl.int64) * s_xh + xi.to(tl.int64) * s_xw
    val = tl.load(base + offs[:, None], mask=inside[:, None] & mc[None, :], other=0.0)
    return acc + val.to(tl.float32) * weight[:, None]


def _slot_warp_kernel(
    x_ptr,
    f_ptr,
    o_ptr,
    H,
    W,
    C,
    S,
    ANCHOR,
    s_xb,
    s_xc,
    s_xk,
    s_xh,
    s_xw,
    s_fb,
    s_fs,
    s_fc,
    s_fh,
    s_fw,
    s_ob,
    s_oc,
    s_os,
    s_oh,
    s_ow,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Program (pixel block, channel block, batch * S + s): output slot s is source slot s + (s >= ANCHOR)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bs = tl.program_id(2)
    b = (bs // S).to(tl.int64)
    s = bs % S
    k = s + (s >= ANCHOR).to(tl.int32)
    mp = p < H * W
    mc = c < C
    py = p // W
    px = p % W
    flow = f_ptr + b * s_fb + s.to(tl.int64) * s_fs + py.to(tl.int64) * s_fh + px.to(tl.int64) * s_fw
    fx = tl.load(flow, mask=mp, other=0.0).to(tl.float32)
    fy = tl.load(flow + s_fc, mask=mp, other=0.0).to(tl.float32)
    # BasicSR's grid normalised to [-1, 1], then unnormalised as grid_sample does with align_corners
    wm1 = tl.maximum(W - 1, 1).to(tl.float32)
    hm1 = tl.maximum(H - 1, 1).to(tl.float32)
    gx = 2.0 * (px.to(tl.float32) + fx) / wm1 - 1.0
    gy = 2.0 * (py.to(tl.float32) + fy) / hm1 - 1.0
    ix = ((gx + 1.0) / 2.0) * (W - 1).to(tl.float32)
    iy = ((gy + 1.0) / 2.0) * (H - 1).to(tl.float32)
    x0 = tl.floor(ix)
    y0 = tl.floor(iy)
    x1 = x0 + 1.0
    y1 = y0 + 1.0
    base = (x_ptr + b * s_xb + k.to(tl.int64) * s_xk + c.to(tl.int64) * s_xc)[None, :]
    xi0 = x0.to(tl.int32)
    yi0 = y0.to(tl.int32)
    acc = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
    acc = _corner(acc, base, xi0, yi0, (x1 - ix) * (y1 - iy), s_xh, s_xw, H, W, mp, mc)
    acc = _corner(acc, base, xi0 + 1, yi0, (ix - x0) * (y1 - iy), s_xh, s_xw, H, W, mp, mc)
    acc = _corner(acc, base, xi0, yi0 + 1, (x1 - ix) * (iy - y0), s_xh, s_xw, H, W, mp, mc)
    acc = _corner(acc, base, xi0 + 1, yi0 + 1, (ix - x0) * (iy - y0), s_xh, s_xw, H, W, mp, mc)
    out = o_ptr + b * s_ob + s.to(tl.int64) * s_os + c.to(tl.int64)[None, :] * s_oc
    out += (py.to(tl.int64) * s_oh + px.to(tl.int64) * s_ow)[:, None]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=mp[:, None] & mc[None, :])


_KERNELS = LazyKernels(__name__, [_corner, _slot_warp_kernel])


def _empty_slots(m: Tensor, slots: int) -> Tensor:
    """(B, C, slots, H, W) in m's dtype, physically (B, slots, H, W, C): the token order the block continues in."""
    b, c, _, h, w = m.shape
    return m.new_empty(b, slots, h, w, c).permute(0, 4, 1, 2, 3)


def slot_warp_triton(m: Tensor, psi: Tensor, anchor: int) -> Tensor:
    """m: (B, C, K, H, W) any strides, any float dtype; psi: (B, K-1, 2, H, W) flows of the slots other than
    ``anchor``, in slot order; returns (B, C, K-1, H, W) in m's dtype: slot j warped by psi[:, j] (from
    :func:`_empty_slots`)."""
    b, c, k, h, w = m.shape
    if psi.shape != (b, k - 1, 2, h, w) or not 0 <= anchor < k:
        raise ValueError(
            f'slot_warp: m {tuple(m.shape)} needs flows ({b}, {k - 1}, 2, {h}, {w}) and an anchor in [0, {k}); '
            f'got flows {tuple(psi.shape)}, anchor {anchor}'
        )
    out = _empty_slots(m, k - 1)
    if out.numel():
        grid = (-(-h * w // BLOCK_P), -(-c // BLOCK_C), b * (k - 1))
        _KERNELS(interpret_for(m)).slot_warp_kernel[grid](
            m, psi, out, h, w, c, k - 1, anchor, *m.stride(), *psi.stride(), *out.stride(),
            BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


@torch.library.custom_op('gsmsr::slot_warp', mutates_args=())
def slot_warp(m: Tensor, psi: Tensor, anchor: int) -> Tensor:
    """:func:`slot_warp_triton` as one opaque node for ``torch.compile``. No autograd: call it with gradients off."""
    return slot_warp_triton(m, psi, anchor)


@slot_warp.register_fake
def _(m: Tensor, psi: Tensor, anchor: int) -> Tensor:
    return _empty_slots(m, m.shape[2] - 1)


def single_anchor(flows: Sequence[object]) -> int:
    """The index of the one slot without a flow (the anchor), or -1 when there is not exactly one."""
    missing = [i for i, f in enumerate(flows) if f is None]
    return missing[0] if len(missing) == 1 else -1
