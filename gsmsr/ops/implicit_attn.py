"""The implicit warp's inference pieces in Triton: the query input and the 2x2 neighbour attention (no autograd).

:class:`gsmsr.archs.implicit_warp.ImplicitWarp` (ARCHITECTURE.md §5.3) projects every source pixel once to k|v rows
``kv_src`` (B, HW, 2C), gathers each target pixel's four clamped neighbours by a flat ``index`` (B, HW, 4), adds the
per-neighbour constant ``kv_pe`` (4, 2C) and mixes the four values with a per-head softmax over the four scores of
the projected query. In PyTorch (and under Inductor) that materialises the gathered (B, HW, 4, 2C) tensor, the
scores and the softmax. Here:

* :func:`implicit_attention_triton`: one program per block of target pixels and all heads loads q, gathers the
  four k rows, forms the 4 x heads scores ``(q * scale) . k`` and their softmax in fp32 in registers, then gathers
  the four v rows and writes the mix, (B, HW, C) in q's dtype. Heads are a (heads, head_dim) tile padded to
  powers of two (C = 192, 8 heads: 8 x 32 lanes, 24 used).
* :func:`query_input_triton`: ``target`` (B, C, H, W, any strides: a stride-0 batch of an expanded frame is read
  once a slot) transposed to (B, HW, C) plus the sine encoding of the scaled sub-pixel offsets, in target's dtype.
  The encoding is the reference's, channel for channel: the argument ``v / divisor`` is the IEEE-rounded quotient
  (as PyTorch divides; from the divisor's reciprocal and one correction), its multiple of 2 pi is taken off in two
  Cody-Waite steps (the first exact, the second within 4e-9 for the arguments here, < 300 rad), and the hardware's
  approximate sine or cosine (within 2^-20.5 on [-pi, pi]) is taken of the remainder. Like the reference, the
  encoding is rounded to target's dtype before the add.

Offline (sm_90a, bf16, C = 192, 8 heads, default tiles): the attention kernel 128 registers, no spills, no shared
memory, ~400 warp instructions a target pixel; the query-input kernel 63 registers, ~0.7 warp instructions an
output element.

:func:`implicit_attention_ref` and :func:`query_input_ref` are the module's reference math, for the tests. On CUDA
tensors the kernels are compiled, on CPU tensors interpreted (:mod:`gsmsr.ops.triton_jit`). The network calls
:func:`implicit_attention` and :func:`query_input`, ``torch.library`` custom ops (one node each in a
``torch.compile`` graph, fake tensors for tracing), without autograd: the module runs them only with gradients off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, runs_fused, triton

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test of triton_jit
    tl = None


@dataclass(frozen=True)
class ImplicitAttnConfig:
    """Tile sizes and launch parameters; only speed depends on them. Block sizes must be powers of two."""

    block_p: int = 16  # target pixels a program of the attention kernel
    num_warps: int = 4
    pe_block_p: int = 64  # pixels x channels a program of the query-input kernel
    pe_block_c: int = 64
    pe_num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ('block_p', 'num_warps', 'pe_block_p', 'pe_block_c', 'pe_num_warps'):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f'ImplicitAttnConfig.{name} must be a power of two, got {value}')


DEFAULT_CONFIG = ImplicitAttnConfig()
# What the custom ops run with; read at every call (the ops are opaque to torch.compile), so a benchmark can swap it.
OP_CONFIG: ImplicitAttnConfig = DEFAULT_CONFIG


# ---------------------------------------------------------------------------------------------------------------
# Reference (the module's math)
# ---------------------------------------------------------------------------------------------------------------


def implicit_attention_ref(q: Tensor, kv_src: Tensor, index: Tensor, kv_pe: Tensor, num_heads: int, scale: float):
    """q (B, HW, C), kv_src (B, HW, 2C) k|v rows, index (B, HW, 4) flat source pixels, kv_pe (4, 2C) -> (B, HW, C).

    out[b, p, head] = sum_j softmax_j((q[b, p, head] * scale) . k_j) v_j with k_j|v_j = kv_src[b, index[b, p, j]]
    + kv_pe[j]; the ops of :meth:`gsmsr.archs.implicit_warp.ImplicitWarp.forward`."""
    b, n, c = q.shape
    kv = torch.gather(kv_src, 1, index.reshape(b, -1, 1).expand(-1, -1, 2 * c)).view(b, n, 4, 2 * c)
    kv = kv + kv_pe.to(kv.dtype)
    hd = c // num_heads
    qh = q.view(b, n, 1, num_heads, hd)
    k, v = kv.view(b, n, 4, 2, num_heads, hd).unbind(3)
    attn = ((qh * scale) * k).sum(-1).softmax(dim=2)  # (B, HW, 4, heads)
    return (attn.unsqueeze(-1) * v).sum(2).reshape(b, n, c)


def query_input_ref(target: Tensor, scaled: Tensor) -> Tensor:
    """target (B, C, H, W), scaled (B, HW, 2) sub-pixel offsets times 2 pi / (2 + 1e-6) -> (B, HW, C) in target's
    dtype: the transposed target plus the sine encoding of (row, col) (the module's math)."""
    from gsmsr.archs.implicit_warp import sine_encoding

    c = target.shape[1]
    pe = sine_encoding(scaled[..., 0], scaled[..., 1], c)
    return target.flatten(2).transpose(1, 2) + pe.to(target.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies: plain functions, jitted (or interpreted) by LazyKernels
# ---------------------------------------------------------------------------------------------------------------


def _sin_approx(x):
    """sin x as one MUFU.SIN (sin.approx.f32: within 2^-20.9 for |x| <= pi); tl.sin compiles to libdevice's sinf,
    whose large-argument reduction (Payne-Hanek, a local-memory table) is dead code after the kernel's own."""
    return tl.inline_asm_elementwise('sin.approx.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)


def _cos_approx(x):
    """cos x as one MUFU.COS (cos.approx.f32: within 2^-20.5 for |x| <= pi)."""
    return tl.inline_asm_elementwise('cos.approx.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)


def _div_rn(x, d, r):
    """x / d rounded to nearest, for r = 1 / d rounded to nearest (a per-channel constant here): Markstein's
    correction of x * r, three instructions instead of div.rn's Newton iterations and slow-path branch. Checked
    against IEEE division for 2.2e6 arguments in [0, pi] and every divisor of the encoding (C = 192): no difference.
    Assumes no overflow or underflow."""
    q = x * r
    return tl.fma(tl.fma(-q, d, x), r, q)


class _Interpreted:
    """Interpreter stand-ins for the compiled-only helpers above (same names: see LazyKernels)."""

    def _div_rn(x, d, r):
        return x / d  # numpy's float32 division, IEEE-rounded

    def _sin_approx(x):
        return tl.sin(x)

    def _cos_approx(x):
        return tl.cos(x)


def _attn_kernel(
    q_ptr,
    kv_ptr,
    idx_ptr,
    pe_ptr,
    out_ptr,
    HW,
    scale,
    C: tl.constexpr,
    HEADS: tl.constexpr,
    HD: tl.constexpr,
    HEADS_P: tl.constexpr,
    HD_P: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[b, p] = per-head softmax-weighted mix of the four gathered v rows, for BLOCK_P pixels of batch element
    program_id(1). q, out: (B, HW, C); kv: (B, HW, 2C); idx: (B, HW, 4) int; pe: (4, 2C). All contiguous.

    Tiles are (BLOCK_P, HEADS_P, HD_P), channel = head * HD + d. Loads are unmasked: padded lanes read channel
    (head mod HEADS) * HD + d mod HD of their row (real data, contiguous in runs of gcd(HD_P, HD)), pixels past the
    end read the last pixel's row; only q's padded lanes are zeroed, which keeps them out of the scores, and only
    real lanes are stored (masked loads would zero every register of every tile first)."""
    bidx = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mp = p < HW
    hh = tl.arange(0, HEADS_P)
    dd = tl.arange(0, HD_P)
    ch = ((hh % HEADS)[:, None] * HD + (dd % HD)[None, :])[None, :, :]  # (1, HEADS_P, HD_P), in the row
    mc = ((hh[:, None] < HEADS) & (dd[None, :] < HD))[None, :, :]
    row = bidx * HW + tl.minimum(p, HW - 1)  # (BLOCK_P,) int64
    # kv_pe's rows are loaded at the tiles' full shape (same address in every pixel row, L1 hits): a (1, HEADS_P,
    # HD_P) load gets a layout of its own, and its broadcast a conversion through shared memory
    pe_offs = ch + (p * 0)[:, None, None]
    q = tl.load(q_ptr + row[:, None, None] * C + ch).to(tl.float32) * scale
    q = tl.where(mc, q, 0.0)
    # the four neighbours' source rows, then their scores
    src0 = bidx * HW + tl.load(idx_ptr + row * 4).to(tl.int64)
    src1 = bidx * HW + tl.load(idx_ptr + row * 4 + 1).to(tl.int64)
    src2 = bidx * HW + tl.load(idx_ptr + row * 4 + 2).to(tl.int64)
    src3 = bidx * HW + tl.load(idx_ptr + row * 4 + 3).to(tl.int64)
    k0 = tl.load(kv_ptr + src0[:, None, None] * (2 * C) + ch).to(tl.float32)
    k0 += tl.load(pe_ptr + pe_offs).to(tl.float32)
    s0 = tl.reduce(q * k0, 2, SUM_OP)  # noqa: F821  (BLOCK_P, HEADS_P)
    k1 = tl.load(kv_ptr + src1[:, None, None] * (2 * C) + ch).to(tl.float32)
    k1 += tl.load(pe_ptr + 2 * C + pe_offs).to(tl.float32)
    s1 = tl.reduce(q * k1, 2, SUM_OP)  # noqa: F821
    k2 = tl.load(kv_ptr + src2[:, None, None] * (2 * C) + ch).to(tl.float32)
    k2 += tl.load(pe_ptr + 4 * C + pe_offs).to(tl.float32)
    s2 = tl.reduce(q * k2, 2, SUM_OP)  # noqa: F821
    k3 = tl.load(kv_ptr + src3[:, None, None] * (2 * C) + ch).to(tl.float32)
    k3 += tl.load(pe_ptr + 6 * C + pe_offs).to(tl.float32)
    s3 = tl.reduce(q * k3, 2, SUM_OP)  # noqa: F821
    # softmax over the four neighbours, as torch forms it: exp(s - max) / sum
    mx = tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3))
    e0 = tl.exp(s0 - mx)
    e1 = tl.exp(s1 - mx)
    e2 = tl.exp(s2 - mx)
    e3 = tl.exp(s3 - mx)
    den = (e0 + e1) + (e2 + e3)
    a0 = (e0 / den)[:, :, None]
    a1 = (e1 / den)[:, :, None]
    a2 = (e2 / den)[:, :, None]
    a3 = (e3 / den)[:, :, None]
    v = tl.load(kv_ptr + src0[:, None, None] * (2 * C) + C + ch).to(tl.float32)
    v += tl.load(pe_ptr + C + pe_offs).to(tl.float32)
    acc = a0 * v
    v = tl.load(kv_ptr + src1[:, None, None] * (2 * C) + C + ch).to(tl.float32)
    v += tl.load(pe_ptr + 3 * C + pe_offs).to(tl.float32)
    acc += a1 * v
    v = tl.load(kv_ptr + src2[:, None, None] * (2 * C) + C + ch).to(tl.float32)
    v += tl.load(pe_ptr + 5 * C + pe_offs).to(tl.float32)
    acc += a2 * v
    v = tl.load(kv_ptr + src3[:, None, None] * (2 * C) + C + ch).to(tl.float32)
    v += tl.load(pe_ptr + 7 * C + pe_offs).to(tl.float32)
    acc += a3 * v
    m = mp[:, None, None] & mc
    tl.store(out_ptr + row[:, None, None] * C + ch, acc.to(out_ptr.dtype.element_ty), mask=m)


def _query_pe_kernel(
    t_ptr,
    s_ptr,
    div_ptr,
    out_ptr,
    HW,
    W,
    stride_tb,
    stride_tc,
    stride_th,
    stride_tw,
    C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[b, p, c] = target[b, c, p] + E_c, for a (BLOCK_P pixels, BLOCK_C channels) tile of batch element
    program_id(2). E_c = sin (even c mod C/2) or cos (odd) of s[b, p, c >= C/2] / div[c mod C/2], rounded to out's
    dtype first. target: (B, C, H, W) strided; s: (B, HW, 2) fp32 contiguous; out: (B, HW, C) contiguous."""
    bidx = tl.program_id(2).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mp = p < HW
    mc = cc < C
    m = mp[:, None] & mc[None, :]
    hp = p // W
    wp = p - hp * W
    t_offs = (hp.to(tl.int64) * stride_th + wp.to(tl.int64) * stride_tw)[:, None] + cc.to(tl.int64)[None, :] * stride_tc
    t = tl.load(t_ptr + bidx * stride_tb + t_offs, mask=m, other=0.0).to(tl.float32)
    row = bidx * HW + p
    sy = tl.load(s_ptr + row * 2, mask=mp, other=0.0)
    sx = tl.load(s_ptr + row * 2 + 1, mask=mp, other=0.0)
    i = cc % (C // 2)
    divisor = tl.load(div_ptr + i, mask=mc, other=1.0)[None, :]
    recip = tl.load(div_ptr + C // 2 + i, mask=mc, other=1.0)[None, :]
    v = tl.where((cc < C // 2)[None, :], sy[:, None], sx[:, None])
    arg = _div_rn(v, divisor, recip)  # the IEEE quotient, as torch divides
    n = tl.floor(arg * 0.15915494309189535 + 0.5)  # nearest multiple of 2 pi
    # 2 pi = 6.28125 + 0.0019353071795864769 + O(1e-11): n * 6.28125 and the first difference are exact (n < 2^7)
    r = (arg - n * 6.28125) - n * 0.0019353071795864769
    pe = tl.where((i % 2 == 1)[None, :], _cos_approx(r), _sin_approx(r))
    pe = pe.to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference adds the encoding in target's dtype
    out = t + pe
    tl.store(out_ptr + row[:, None] * C + cc[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


_KERNELS = LazyKernels(
    __name__,
    [_sin_approx, _cos_approx, _div_rn, _attn_kernel, _query_pe_kernel],
    interpreted=[_Interpreted._sin_approx, _Interpreted._cos_approx, _Interpreted._div_rn],
)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def implicit_attention_triton(
    q: Tensor,
    kv_src: Tensor,
    index: Tensor,
    kv_pe: Tensor,
    num_heads: int,
    scale: float,
    config: ImplicitAttnConfig = DEFAULT_CONFIG,
) -> Tensor:
    """Same as :func:`implicit_attention_ref` (fp32 scores, softmax and mix), through one Triton kernel.

    q (B, HW, C); kv_src (B, HW, 2C); index (B, HW, 4) integer, every entry in [0, HW); kv_pe (4, 2C) (or (1, 4,
    2C)), any float dtype, added in fp32. Returns (B, HW, C) contiguous in the promoted dtype of q and kv_src."""
    b, n, c = q.shape
    if c % num_heads or kv_src.shape != (b, n, 2 * c) or index.shape != (b, n, 4) or kv_pe.numel() != 8 * c:
        raise ValueError(
            f'expected q (B, HW, C), kv_src (B, HW, 2C), index (B, HW, 4), kv_pe (4, 2C) and C divisible by '
            f'num_heads ({num_heads}), got {tuple(q.shape)}, {tuple(kv_src.shape)}, {tuple(index.shape)}, '
            f'{tuple(kv_pe.shape)}'
        )
    out = torch.empty(b, n, c, device=q.device, dtype=torch.promote_types(q.dtype, kv_src.dtype))
    if out.numel() == 0:
        return out
    hd = c // num_heads
    grid = (triton.cdiv(n, config.block_p), b)
    _KERNELS(interpret_for(q)).attn_kernel[grid](
        q.contiguous(),
        kv_src.contiguous(),
        index.contiguous(),
        kv_pe.contiguous(),
        out,
        n,
        float(scale),
        C=c,
        HEADS=num_heads,
        HD=hd,
        HEADS_P=_next_pow2(num_heads),
        HD_P=_next_pow2(hd),
        BLOCK_P=config.block_p,
        num_warps=config.num_warps,
    )
    return out


_DIVISORS: Dict[Tuple[int, torch.device], Tensor] = {}


def _divisors(dim: int, device: torch.device) -> Tensor:
    """(dim,) float32: the encoding's dim / 2 divisors (formed on ``device``, as the reference forms them), then
    their reciprocals rounded to nearest. Cached per device."""
    from gsmsr.archs.implicit_warp import pe_divisors  # the module imports this one

    key = (dim, device)
    if key not in _DIVISORS:
        div = pe_divisors(dim, device)
        _DIVISORS[key] = torch.cat([div, (1 / div.double()).float()])
    return _DIVISORS[key]


def query_input_triton(target: Tensor, scaled: Tensor, config: ImplicitAttnConfig = DEFAULT_CONFIG) -> Tensor:
    """Same as :func:`query_input_ref`, through one Triton kernel. target (B, C, H, W) with any strides (C even),
    scaled (B, HW, 2) float32. Returns (B, HW, C) contiguous in target's dtype."""
    b, c, h, w = target.shape
    if c % 2 or scaled.shape != (b, h * w, 2):
        raise ValueError(
            f'expected target (B, C, H, W) with C even and scaled (B, HW, 2), got {tuple(target.shape)}, '
            f'{tuple(scaled.shape)}'
        )
    out = torch.empty(b, h * w, c, device=target.device, dtype=target.dtype)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(h * w, config.pe_block_p), triton.cdiv(c, config.pe_block_c), b)
    _KERNELS(interpret_for(target)).query_pe_kernel[grid](
        target,
        scaled.float().contiguous(),
        _divisors(c, target.device),
        out,
        h * w,
        w,
        *target.stride(),
        C=c,
        BLOCK_P=config.pe_block_p,
        BLOCK_C=config.pe_block_c,
        num_warps=config.pe_num_warps,
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Custom ops (inference only)
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op('gsmsr::implicit_attention', mutates_args=())
def implicit_attention(q: Tensor, kv_src: Tensor, index: Tensor, kv_pe: Tensor, num_heads: int, scale: float) -> Tensor:
    """:func:`implicit_attention_triton` as one opaque node for ``torch.compile`` (interpreted on CPU tensors). No
    autograd: call it with gradients off."""
    return implicit_attention_triton(q, kv_src, index, kv_pe, num_heads, scale, OP_CONFIG)


@implicit_attention.register_fake
def _(q: Tensor, kv_src: Tensor, index: Tensor, kv_pe: Tensor, num_heads: int, scale: float) -> Tensor:
    return q.new_empty(q.shape, dtype=torch.promote_types(q.dtype, kv_src.dtype))


@torch.library.custom_op('gsmsr::implicit_query_input', mutates_args=())
def query_input(target: Tensor, scaled: Tensor) -> Tensor:
    """:func:`query_input_triton` as one opaque node for ``torch.compile`` (interpreted on CPU tensors). No autograd:
    call it with gradients off."""
    return query_input_triton(target, scaled, OP_CONFIG)


@query_input.register_fake
def _(target: Tensor, scaled: Tensor) -> Tensor:
    b, c, h, w = target.shape
    return target.new_empty(b, h * w, c)


__all__ = [
    'DEFAULT_CONFIG',
    'ImplicitAttnConfig',
    'implicit_attention',
    'implicit_attention_ref',
    'implicit_attention_triton',
    'query_input',
    'query_input_ref',
    'query_input_triton',
    'runs_fused',
]
