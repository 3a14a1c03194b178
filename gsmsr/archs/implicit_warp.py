"""Implicit warp: flow-guided 2x2 cross-attention resampling, the GSM gather alignment (ARCHITECTURE.md §5.3).

For every target pixel the source is read at ``p + flow(p)``: the four integer neighbours of that point are
keys/values (with a positional encoding of their offset in the 2x2 cell), the target feature plus an encoding
of the sub-pixel offset is the query, and the output is the per-head attention mix of the four values.
One module is shared by all propagation layers.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gsmsr.ops import implicit_attn

# Without autograd on CUDA: the query input (transpose + sine encoding + add) and the neighbour attention (gather,
# scores, softmax, mix) as two Triton kernels (gsmsr.ops.implicit_attn) instead of the PyTorch ops below, which
# materialise the gathered (B, HW, 4, 2C) tensor. Same values up to float rounding. -1.5 ms/frame in the compiled
# bf16 network on an H200 (benchmarks/NOTES.md); bench_gsm's ``--variants iwarp=0`` times the PyTorch ops.
FUSED_ATTENTION = True

PE_TEMPERATURE = 0.01
NEIGHBOURS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, col) offsets


def pe_divisors(dim: int, device: torch.device, temperature: float = PE_TEMPERATURE) -> Tensor:
    """The sine encoding's (dim / 2,) float32 frequency divisors, computed in float32 as the official code does."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(i, 2, rounding_mode='floor') / half)


def sine_encoding(y: Tensor, x: Tensor, dim: int, temperature: float = PE_TEMPERATURE) -> Tensor:
    """Interleaved sin/cos encoding of (y, x) positions: (...), (...) -> (..., dim), y half first.

    The frequency divisors are computed in float32 (as the official code does) and divided by, not multiplied
    by their reciprocal, to keep float64 results bit-faithful.
    """
    divisor = pe_divisors(dim, y.device, temperature)

    def encode(v: Tensor) -> Tensor:
        p = v[..., None] / divisor
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((encode(y), encode(x)), dim=-1)


def window_position_bias(dim: int) -> Tensor:
    """(1, 4, dim) float32 key encoding of the four neighbour offsets, scaled to [0, 2pi/(1+1e-6)]."""
    offsets = torch.tensor(NEIGHBOURS, dtype=torch.float32)
    scaled = offsets / (1 + 1e-6) * (2 * math.pi)
    return sine_encoding(scaled[:, 0], scaled[:, 1], dim).unsqueeze(0)


def sampling_geometry(flow: Tensor, height: int, width: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Where each target pixel reads the source.

    flow: (B, 2, H, W), channel 0 = x. Returns ``index`` (B, H*W, 4) int64 flat indices of the four clamped
    neighbours and ``offset`` (B, H*W, 2) sub-pixel (row, col) offsets in [0, 1), in ``dtype``.
    """
    b = flow.shape[0]
    rows = torch.arange(height, dtype=dtype, device=flow.device)
    cols = torch.arange(width, dtype=dtype, device=flow.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing='ij'), dim=-1)  # (H, W, 2) row, col
    pos = grid + flow.to(dtype).permute(0, 2, 3, 1).flip(-1)  # (B, H, W, 2)
    base = torch.floor(pos)
    offset = (pos - base).reshape(b, -1, 2)
    base = base.long().reshape(b, -1, 2)
    r = torch.cat([base[..., :1], base[..., :1], base[..., :1] + 1, base[..., :1] + 1], dim=-1)  # NEIGHBOURS order
    c = torch.cat([base[..., 1:], base[..., 1:] + 1, base[..., 1:], base[..., 1:] + 1], dim=-1)
    return r.clamp_(0, height - 1) * width + c.clamp_(0, width - 1), offset


class ImplicitWarp(nn.Module):
    """Keys ``q``, ``k``, ``v``, buffers ``position_bias`` and ``window_idx_offset`` match the official module."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.register_buffer('position_bias', window_position_bias(dim))
        self.register_buffer('window_idx_offset', torch.tensor(NEIGHBOURS, dtype=torch.int64))
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, source: Tensor, target: Tensor, flow: Tensor) -> Tensor:
        """source, target: (B, C, H, W); flow: (B, 2, H, W) on the target grid. Returns (B, C, H, W)."""
        b, c, h, w = source.shape
        # geometry never below fp32: a bf16 grid cannot even address pixel 257
        index, offset = sampling_geometry(flow, h, w, torch.promote_types(source.dtype, torch.float32))
        # k(src_j + P_j) = (W_k src)_j + (W_k P_j + b_k): project every source pixel once, then gather its four
        # neighbours, instead of projecting each pixel four times (ARCHITECTURE.md §10.3; equal up to rounding)
        src = source.flatten(2).transpose(1, 2)  # (B, HW, C)
        kv_src = F.linear(src, torch.cat([self.k.weight, self.v.weight]))  # (B, HW, 2C)
        kv_pe = torch.cat([self.k(self.position_bias), self.v(self.position_bias)], dim=-1)  # (1, 4, 2C)
        if FUSED_ATTENTION and not torch.is_grad_enabled() and implicit_attn.runs_fused(source):
            scaled = offset / (2 + 1e-6) * (2 * math.pi)  # the reference's ops: the kernel encodes the same angles
            q = self.q(implicit_attn.query_input(target, scaled))
            out = implicit_attn.implicit_attention(q, kv_src, index, kv_pe[0], self.num_heads, self.scale)
            # (B, HW, C) rows: the view below has the reference's strides, and the caller (GSMBlock.mamba_mix) reads
            # whole channel rows of it in token order
            return out.transpose(1, 2).reshape(b, c, h, w)
        kv = torch.gather(kv_src, 1, index.view(b, -1, 1).expand(-1, -1, 2 * c)).view(b, h * w, 4, 2 * c)
        kv = kv + kv_pe.to(kv.dtype)
        scaled = offset / (2 + 1e-6) * (2 * math.pi)
        q_in = target.flatten(2).transpose(1, 2) + sine_encoding(scaled[..., 0], scaled[..., 1], c).to(target.dtype)
        hd = c // self.num_heads
        q = self.q(q_in).view(b, h * w, 1, self.num_heads, hd)
        k, v = kv.view(b, h * w, 4, 2, self.num_heads, hd).unbind(3)
        attn = ((q * self.scale) * k).sum(-1).softmax(dim=2)  # (B, HW, 4, heads)
        out = (attn.unsqueeze(-1) * v).sum(2)  # (B, HW, heads, hd)
        return out.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
