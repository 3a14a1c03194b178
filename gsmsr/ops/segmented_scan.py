"""Segment-parallel selective scan for inference: a long sequence cut into segments that run as a batch.

Why: mamba-ssm's kernel runs one thread block per (batch, channel) that walks the whole sequence. GSM scans batch
1 x 384 channels over ~300k tokens: about three blocks per SM, so the GPU mostly waits on latency. Cut into S
segments, the same kernel sees S x 384 blocks. Each segment starts from a zero state; the true state entering
segment s is then known from the kernel's own segment-end states (``h_end``) and decays (``a_prod``)::

    H_0 = 0,   H_{s+1} = a_prod_s * H_s + h_end_s                                  (a short loop over S)

and since the recurrence is linear the missing contribution of ``H_s`` to every output of segment s is::

    y_t += silu(z_t) * sum_n C[n, t] * exp(A[d, n] * sum_{seg start <= r <= t} delta_r) * H_s[d, n]

:func:`segment_fixup_ref` is that formula in PyTorch; :func:`segment_fixup` is one Triton pass over the
segments, which stops early once every decay in its tile has underflowed to exactly zero (the sum of delta only
grows, so nothing later can change: the early exit is exact). Forward only: training keeps one segment, whose
saved chunk states the kernel's backward needs.

Measured on an H200 (benchmarks/bench_scan.py, L = 288,000, D = 384, slowly decaying states): 9.8 ms against
4.3 ms for one pass in fp32, so it is opt-in. The fix-up evaluates ``exp`` for every (channel, state, token) until
the decay underflows, which with slow decays is the whole segment: more arithmetic than the scan itself.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def carry_states(a_prod: Tensor, h_end: Tensor) -> Tensor:
    """State entering each segment from per-segment decays and zero-start end states, both (batch, S, D, N)."""
    carried = [torch.zeros_like(h_end[:, 0])]
    for s in range(h_end.shape[1] - 1):
        carried.append(a_prod[:, s] * carried[-1] + h_end[:, s])
    return torch.stack(carried, dim=1)


def segment_fixup_ref(
    y: Tensor,
    h_in: Tensor,
    delta: Tensor,
    A: Tensor,
    C: Tensor,
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tensor:
    """Readable reference of the correction. y, delta, z: (batch, D, L); h_in: (batch, S, D, N) state entering
    each of S equal segments; A: (D, N); C: (batch, N, L). Returns the corrected y (new tensor)."""
    batch, dim, length = y.shape
    seg = h_in.shape[1]
    dt = torch.promote_types(y.dtype, torch.float32)
    d = delta.to(dt) + (delta_bias.to(dt)[:, None] if delta_bias is not None else 0)
    d = F.softplus(d) if delta_softplus else d
    cum = d.view(batch, dim, seg, -1).cumsum(-1)  # (b, D, S, Ls)
    decay = torch.exp(A.to(dt)[None, :, None, :, None] * cum.unsqueeze(3))  # (b, D, S, N, Ls)
    c = C.to(dt).view(batch, 1, C.shape[1], seg, -1).transpose(2, 3)  # (b, 1, S, N, Ls)
    corr = (decay * c * h_in.to(dt).permute(0, 2, 1, 3).unsqueeze(-1)).sum(3).reshape(batch, dim, length)
    if z is not None:
        corr = corr * F.silu(z.to(dt))
    return (y.to(dt) + corr).to(y.dtype)


if triton is not None:

    @triton.jit
    def _fixup_kernel(
        y_ptr,
        h_ptr,
        delta_ptr,
        bias_ptr,
        A_ptr,
        C_ptr,
        z_ptr,
        n_seg,
        Dm,
        seg_len,
        N,
        s_yb,
        s_yd,
        s_db,
        s_dd,
        s_zb,
        s_zd,
        s_cb,
        s_cn,
        s_hb,
        s_hs,
        s_hd,
        HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // (n_seg - 1)
        s = 1 + pid % (n_seg - 1)  # segment 0 starts from the true (zero) state
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < Dm
        mask_dn = mask_d[:, None] & (offs_n[None, :] < N)
        LOG2E: tl.constexpr = 1.4426950408889634
        a2 = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
        h = tl.load(h_ptr + b * s_hb + s * s_hs + offs_d[:, None] * s_hd + offs_n[None, :], mask=mask_dn, other=0.0).to(
            tl.float32
        )
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        cum = tl.zeros([BLOCK_D], dtype=tl.float32)
        start = s * seg_len
        t0 = 0
        alive = tl.max(tl.max(tl.abs(h), axis=1), axis=0) > 0.0
        while (t0 < seg_len) & alive:
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < seg_len
            m2 = mask_d[:, None] & mask_t[None, :]
            dl = tl.load(
                delta_ptr + b * s_db + offs_d[:, None] * s_dd + start + offs_t[None, :], mask=m2, other=0.0
            ).to(tl.float32)
            if HAS_BIAS:
                dl = dl + bias[:, None]
            if SOFTPLUS:
                dl = tl.where(dl <= 20.0, tl.log(1.0 + tl.exp(dl)), dl)
            dl = tl.where(m2, dl, 0.0)
            cs = tl.cumsum(dl, axis=1) + cum[:, None]  # (D, T)
            decay = tl.exp2(a2[:, :, None] * cs[:, None, :])  # (D, N, T)
            c = tl.load(
                C_ptr + b * s_cb + offs_n[:, None] * s_cn + start + offs_t[None, :],
                mask=(offs_n[:, None] < N) & mask_t[None, :],
                other=0.0,
            ).to(tl.float32)  # (N, T)
            corr = tl.sum(decay * h[:, :, None] * c[None, :, :], axis=1)  # (D, T)
            if HAS_Z:
                zz = tl.load(
                    z_ptr + b * s_zb + offs_d[:, None] * s_zd + start + offs_t[None, :], mask=m2, other=0.0
                ).to(tl.float32)
                corr = corr * zz / (1.0 + tl.exp(-zz))
            yp = y_ptr + b * s_yb + offs_d[:, None] * s_yd + start + offs_t[None, :]
            yv = tl.load(yp, mask=m2, other=0.0).to(tl.float32)
            tl.store(yp, (yv + corr).to(y_ptr.dtype.element_ty), mask=m2)
            cum = tl.max(cs, axis=1)  # delta >= 0 after softplus, so the last column is the max
            left = tl.exp2(a2 * cum[:, None]) * tl.abs(h)
            alive = tl.max(tl.max(left, axis=1), axis=0) > 0.0
            t0 += BLOCK_T


def segment_fixup(
    y: Tensor,
    h_in: Tensor,
    delta: Tensor,
    A: Tensor,
    C: Tensor,
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    block_d: int = 16,
    block_t: int = 64,
) -> Tensor:
    """In-place Triton version of :func:`segment_fixup_ref` (CUDA tensors, or any with TRITON_INTERPRET=1).

    The early exit relies on delta >= 0, so without softplus it falls back to the reference."""
    batch, dim, length = y.shape
    n_seg, nstate = h_in.shape[1], A.shape[1]
    interpret = os.environ.get('TRITON_INTERPRET', '0') == '1'
    if n_seg < 2:
        return y
    if triton is None or not delta_softplus or not (y.is_cuda or interpret):
        return y.copy_(segment_fixup_ref(y, h_in, delta, A, C, z, delta_bias, delta_softplus))
    for t in (y, delta, C) + ((z,) if z is not None else ()):
        if t.stride(-1) != 1:
            raise ValueError(f'segment_fixup needs unit stride along L, got strides {t.stride()}')
    h_in = h_in.float().contiguous()
    A = A.float().contiguous()
    zz = z if z is not None else y
    grid = (batch * (n_seg - 1), triton.cdiv(dim, block_d))
    _fixup_kernel[grid](
        y,
        h_in,
        delta,
        delta_bias if delta_bias is not None else A,
        A,
        C,
        zz,
        n_seg,
        dim,
        length // n_seg,
        nstate,
        y.stride(0),
        y.stride(1),
        delta.stride(0),
        delta.stride(1),
        zz.stride(0),
        zz.stride(1),
        C.stride(0),
        C.stride(1),
        h_in.stride(0),
        h_in.stride(1),
        h_in.stride(2),
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus,
        BLOCK_D=block_d,
        BLOCK_N=triton.next_power_of_2(nstate),
        BLOCK_T=block_t,
        num_warps=4,
    )
    return y


def choose_segments(
    batch: int, dim: int, length: int, blocks_wanted: int, min_len: int = 4096, max_segments: int = 64
) -> int:
    """Segments per sequence: the smallest divisor S of ``length`` with batch * S * dim >= blocks_wanted, keeping
    segments at least ``min_len`` tokens; 1 when splitting is not worth it."""
    fits = [s for s in range(2, max_segments + 1) if length % s == 0 and length // s >= min_len]
    if batch * dim >= blocks_wanted or not fits:
        return 1
    # no divisor reaching the target: the largest that fits
    return next((s for s in fits if batch * s * dim >= blocks_wanted), fits[-1])
