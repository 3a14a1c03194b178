"""Depthwise 3x3x3 conv + bias + exact GELU on channels-last volumes, in Triton, forward and backward.

The GSM block's MLP (``MlpDW``) runs fc1 -> depthwise Conv3d (zero padding 1, groups = channels, bias) over
(K frames, H, W) -> GELU -> fc2 on tokens that are a channels-last (B, K, H, W, C) volume. cuDNN's depthwise 3-D
conv wants NCDHW (a transposed copy each way) and Inductor's fused 27-shift sum is ~35x above the memory floor
at GSM's shape, so this module has its own stencil kernel (speed: benchmarks/bench_dwconv.py).

Forward kernel, one program per (tile of BLOCK_H x BLOCK_W pixels, block of BLOCK_C channels, batch): it walks the
frames, loads each input frame's 9 in-plane shifts of its tile once (neighbouring shifts overlap, so most loads hit
L1) and adds them, with the weights of the three temporal taps, to the three output frames that read this input
frame. Output frame k is complete once input frame k + 1 is in, so the program keeps only three fp32 accumulators
(frames k - 1, k, k + 1) and 9 shifted loads per element instead of 27. Loads and stores are vectors along C. The
tap rows are a loop and the tap columns unrolled, so masks and offsets are not recomputed per tap; the taps are
zero-padded per channel block and loaded unmasked at constant offsets; interior tiles run a copy without masks;
bf16 x is widened from int32 channel pairs; the GELU is one exp2, one reciprocal and a polynomial instead of erff.
Why, in numbers: the docstring of :class:`DWConvConfig`, benchmarks/sass_stencil.py and benchmarks/NOTES.md.

The epilogue has three modes: ``conv + bias``, ``gelu(conv + bias)`` and, for the backward, the pre-activation
gradient ``g * gelu'(conv + bias)`` with ``conv + bias`` recomputed rather than saved (one activation less in
memory). The input gradient is the same stencil on that gradient with the spatially flipped weight and no bias;
the weight and bias gradients come from a second kernel whose programs each sum ``g * shifted x`` over a range of
pixel tiles and write one (32, BLOCK_C) partial (27 taps, bias, padding); the host adds the partials in a fixed
order (deterministic, no atomics).

On CUDA tensors the kernels are compiled, on CPU tensors interpreted (:mod:`gsmsr.ops.triton_jit`), which is how
the CPU tests check them. Everything is accumulated in fp32; outputs are in the input's dtype.

:func:`dwconv3d_gelu` is the function the network calls: a ``torch.library`` custom op (one node in a
``torch.compile`` graph, fake tensors for tracing, the Triton backward) on CUDA, the PyTorch reference elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, triton, triton_available

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test of triton_jit
    tl = None

# epilogue modes of the stencil kernel
MODE_CONV, MODE_GELU, MODE_GELU_GRAD = 0, 1, 2
_TAB_ROWS = 32  # rows of a weight-gradient partial: 27 taps (dk, dh, dw row-major), the bias, 4 rows of padding


@dataclass(frozen=True)
class DWConvConfig:
    """Tile sizes and launch parameters; only speed depends on them. Block sizes must be powers of two.

    Measured on an H200 (``benchmarks/bench_dwconv.py --dtypes bf16 --variants all``, (1, 5, 180, 320, 768), ms a
    call, forward / forward without GELU / backward): the default, 4 x 8 pixels x 32 channels and 2 warps, 0.99 /
    0.95 / 5.03; the same at 64 channels and 4 warps 1.11 / 1.08 / 5.19, without its register cap 1.27, with erff
    for the GELU 1.33; the previous default (a 9-tap loop, erff, 64 channels, 4 warps) 1.38 / 1.11 / 5.65; a copy
    0.22. In the network (bench_gsm, 20 x 180 x 320, bf16) the 64-channel version ran 50.7 and 51.5 ms a frame
    against 51.9 and 51.6 for the previous default (noise ~1 ms). The weight gradient with 4 warps took 5.7 ms for
    the whole bf16 backward against 6.7 with 8 (previous kernel).

    Offline (``benchmarks/sass_stencil.py``, sm_90a SASS of the bf16 GELU forward): 75 instructions an output
    element against the previous kernel's 132, 128 registers with 24 bytes spilled, an issue floor of 0.495 ms at
    either tile. The prediction drawn from it, 0.6-0.75 ms at 64 channels (the previous kernel's ratio of measured
    time to its issue floor applied to ~0.47), missed: 1.11 measured, so at that tile the kernel is not
    issue-bound. The tap-row loop, its unmasked interior copy and the bf16 pairs gained 3 % (1.11 -> 1.08 without
    the GELU), the GELU 16 %, the 32-channel, 2-warp tile another 11 % (one run, in which two rows of identical
    code differed by 12 %; the tile won all three passes). The offline model counts the same instructions a warp
    and warps a scheduler at both tiles, so the tile's gain is outside it: likely latency (twice the programs an SM,
    each half the size).
    """

    block_h: int = 4
    block_w: int = 8
    block_c: int = 32
    num_warps: int = 2
    num_stages: int = 2
    wgrad_block_h: int = 4
    wgrad_block_w: int = 8
    wgrad_block_c: int = 64
    wgrad_num_warps: int = 4
    wgrad_groups: int = 0  # programs per channel block and batch in the weight gradient (0: ~4 programs per SM)
    bf16_pairs: bool = True  # read bf16 x as int32 channel pairs (cheaper widening; _load_row_shift) where C is even
    maxnreg: int = 128  # register cap a thread for the stencil (0: the compiler's choice, 138 at the default tile)

    def __post_init__(self) -> None:
        for name in ('block_h', 'block_w', 'block_c', 'num_warps', 'wgrad_block_h', 'wgrad_block_w', 'wgrad_block_c'):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f'DWConvConfig.{name} must be a power of two, got {value}')
        if self.block_c < 2:  # the kernel splits a channel block into pairs
            raise ValueError(f'DWConvConfig.block_c must be at least 2, got {self.block_c}')


DEFAULT_CONFIG = DWConvConfig()
# What the custom ops (the network's calls) run with; read at every call, since the op is opaque to torch.compile,
# so a benchmark can swap configurations without recompiling the graphs around it.
OP_CONFIG: DWConvConfig = DEFAULT_CONFIG


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------


def dwconv3d_gelu_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool = True) -> Tensor:
    """gelu(depthwise_conv3d(x) + bias), or without the GELU; zero padding 1 on K, H and W.

    x: (B, K, H, W, C) channels-last; weight: (C, 1, 3, 3, 3); bias: (C,) or None. Returns (B, K, H, W, C),
    contiguous, in x's dtype (weight and bias are cast to it, as ``nn.Conv3d`` under autocast would).
    """
    w = weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv3d(x.permute(0, 4, 1, 2, 3), w, b, padding=1, groups=x.shape[-1]).permute(0, 2, 3, 4, 1)
    return (F.gelu(y) if gelu else y).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies: plain functions, jitted (or interpreted) by LazyKernels. Pixel tiles are flattened to BLOCK_P =
# BLOCK_H * BLOCK_W rows of a (BLOCK_P, BLOCK_C) tensor; offsets within a frame fit int32 (H * W * C < 2^31),
# frame offsets are int64.
# ---------------------------------------------------------------------------------------------------------------


def _tile_coords(tile, n_wblocks, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Row and column of every pixel of pixel tile ``tile`` (tiles row-major over the frame)."""
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    hh = (tile // n_wblocks) * BLOCK_H + p // BLOCK_W
    ww = (tile % n_wblocks) * BLOCK_W + p % BLOCK_W
    return hh, ww


def _load_shifted(ptr, frame, hh, ww, cc, mc, H, W, C, dh, dw, valid):
    """(BLOCK_P, BLOCK_C) fp32 tile of frame ``frame`` at pixels (hh + dh - 1, ww + dw - 1); zero outside."""
    h = hh + (dh - 1)
    w = ww + (dw - 1)
    mp = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    offs = (h * W + w)[:, None] * C + cc[None, :]
    base = ptr + frame.to(tl.int64) * H * W * C
    return tl.load(base + offs, mask=(mp[:, None] & mc[None, :]) & valid, other=0.0).to(tl.float32)


def _rcp(x):
    """1 / x as one MUFU.RCP (rcp.approx.ftz, about 1 ulp); ``1.0 / x`` compiles to div.full, whose range checks
    (x beyond 2^126 or subnormal) add 6 instructions. For normal x only."""
    return tl.inline_asm_elementwise('rcp.approx.ftz.f32 $0, $1;', '=r,r', [x], dtype=tl.float32, is_pure=True, pack=1)


class _Interpreted:
    """Interpreter stand-ins for the compiled-only helpers above (same names: see LazyKernels)."""

    def _rcp(x):
        return 1.0 / x


def _normal_tail(x):
    """(Q(|x|), exp(-x^2 / 2)) with Q(t) = P(N(0, 1) > t) = exp(-t^2 / 2) k P7(k), k = 1 / (1 + p t): one EX2, one
    RCP and 7 FMAs instead of erff's two polynomials and their per-element coefficient selects. P7 was fitted to
    the Mills ratio for relative error on t in [0, 14]: max relative error of Q 1.2e-6 for t < 3 (the float64
    check in tests/ops/test_dwconv3d.py), 8e-6 out to t = 13 where exp's argument loses digits; erff's
    1 + erf(x / sqrt 2) loses more than that for x < -3 by cancellation."""
    t = tl.abs(x)
    k = _rcp(1.0 + 0.36225438117980957 * t)
    poly = 0.04805383458733559 * k - 0.18004916608333588
    poly = poly * k + 0.17608116567134857
    poly = poly * k + 0.02910695970058441
    poly = poly * k + 0.13939808309078217
    poly = poly * k + 0.14280492067337036
    poly = poly * k + 0.14460456371307373
    e = tl.math.exp2(x * (x * -0.7213475204444817))  # exp(-x^2 / 2); 0.72... = 1 / (2 ln 2)
    return e * (k * poly), e


def _epilogue(acc, bias, g_ptr, y_ptr, frame, hh, ww, cc, mc, H, W, C, MODE: tl.constexpr):
    """Store conv + bias (MODE 0), its GELU (1) or g * GELU'(conv + bias) (2) for one output frame; the GELU from
    :func:`_normal_tail` (Phi(x) = 1 - Q(x) for x >= 0, Q(-x) below)."""
    pre = acc + bias[None, :]
    offs = (hh * W + ww)[:, None] * C + cc[None, :]
    base = frame.to(tl.int64) * H * W * C
    m = ((hh < H) & (ww < W))[:, None] & mc[None, :]
    if MODE == 0:
        out = pre
    elif MODE == 1:
        q, _ = _normal_tail(pre)
        out = tl.maximum(pre, 0.0) - tl.abs(pre) * q  # x Phi(x) = relu(x) - |x| Q(|x|)
    else:
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        # GELU'(x) = Phi(x) + x phi(x); 0.3989... = 1 / sqrt(2 pi)
        q, e = _normal_tail(pre)
        out = g * (tl.where(pre >= 0.0, 1.0 - q, q) + pre * 0.3989422804014327 * e)
    tl.store(y_ptr + base + offs, out.to(y_ptr.dtype.element_ty), mask=m)


def _load_row_shift(xr, offs, offs2, mp, mc, mc2, MASKED: tl.constexpr, PAIRS: tl.constexpr):
    """fp32 (BLOCK_P, BLOCK_C) tile at ``xr + offs``, zero where pixel mask mp or channel mask mc is false (not
    MASKED: no mask). PAIRS: x is bf16 with an even C, read as int32 channel pairs at ``offs2`` (mask mc2); a
    bf16 is the top half of its fp32, so widening costs one shift or one AND a channel instead of a shift and a
    byte permute for the odd ones. The channels come back in order (join + reshape keep values in their thread)."""
    if PAIRS:
        xp = xr.to(tl.pointer_type(tl.int32))
        if MASKED:
            xi = tl.load(xp + offs2, mask=mp[:, None] & mc2[None, :], other=0)
        else:
            xi = tl.load(xp + offs2)
        lo = (xi << 16).to(tl.float32, bitcast=True)
        hi = (xi & -65536).to(tl.float32, bitcast=True)  # -65536 = 0xffff0000
        return tl.reshape(tl.join(lo, hi), (offs.shape[0], offs.shape[1]))
    else:
        if MASKED:
            return tl.load(xr + offs, mask=mp[:, None] & mc[None, :], other=0.0).to(tl.float32)
        else:
            return tl.load(xr + offs).to(tl.float32)


def _rows_frames(
    x_ptr,
    wp,
    bias,
    g_ptr,
    y_ptr,
    bidx,
    c0,
    K,
    H,
    W,
    C,
    hh,
    ww,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PAIRS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The frame loop of :func:`_stencil_rows_kernel` for the tile (hh, ww) and channels c0 + [0, BLOCK_C). Not
    MASKED: every shifted load is inside the volume, so no masks and no zeroing of masked-off registers."""
    cc = c0 + tl.arange(0, BLOCK_C)
    mc = cc < C
    cc2 = c0 // 2 + tl.arange(0, BLOCK_C // 2)  # channel pairs
    mc2 = cc2 < C // 2
    offs = (hh * W + ww)[:, None] * C + cc[None, :]  # the tile in its frame; the shifts add scalars to it
    offs2 = (hh * W + ww)[:, None] * (C // 2) + cc2[None, :]
    zero = tl.full(offs.shape, 0.0, tl.float32)
    cur = zero  # output frame kin - 1: has inputs kin - 2 and kin - 1, completed by input kin (its dk = 2 tap)
    nxt = zero  # output frame kin: has input kin - 1
    for kin in range(0, K):
        frame = bidx * K + kin
        xf = x_ptr + frame.to(tl.int64) * H * W * C
        new = zero  # output frame kin + 1: input kin is its dk = 0 tap
        for dh in range(0, 3):
            h = hh + (dh - 1)
            mh = (h >= 0) & (h < H)
            xr = xf + (dh - 1) * (W * C)
            wr = wp + dh * (3 * BLOCK_C)
            for dw in tl.static_range(3):
                w = ww + (dw - 1)
                xs = _load_row_shift(xr + (dw - 1) * C, offs, offs2, mh & (w >= 0) & (w < W), mc, mc2, MASKED, PAIRS)
                cur += xs * tl.load(wr + (18 * BLOCK_C + dw * BLOCK_C))[None, :]
                nxt += xs * tl.load(wr + (9 * BLOCK_C + dw * BLOCK_C))[None, :]
                new += xs * tl.load(wr + dw * BLOCK_C)[None, :]
        if kin > 0:  # a branch, not a store mask: the GELU of the frame before the first is not computed
            _epilogue(cur, bias, g_ptr, y_ptr, frame - 1, hh, ww, cc, mc, H, W, C, MODE)
        cur = nxt
        nxt = new
    _epilogue(cur, bias, g_ptr, y_ptr, bidx * K + K - 1, hh, ww, cc, mc, H, W, C, MODE)


def _stencil_rows_kernel(
    x_ptr,
    wt_ptr,
    b_ptr,
    g_ptr,
    y_ptr,
    K,
    H,
    W,
    C,
    n_wblocks,
    n_cblocks,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    EVEN_C: tl.constexpr,
    PAIRS: tl.constexpr,
):
    """y = epilogue(depthwise 3x3x3 conv of x with wt + b) over all K frames of one pixel tile and channel block of
    batch element program_id(1). x, g, y: (B, K, H, W, C) contiguous; wt is blocked by channel block, (n_cblocks,
    27, BLOCK_C) fp32 zero-padded, so a block's taps are loaded unmasked at constant offsets. The taps' rows (dh)
    are a loop and their columns (dw) unrolled: column masks and the tile's offsets are loop-invariant, a row costs
    one mask and one pointer step. Interior tiles (no shifted pixel outside the frame; EVEN_C: C is a multiple of
    BLOCK_C) take a copy of the frame loop without masks. PAIRS: see _load_row_shift."""
    pid = tl.program_id(0)
    bidx = tl.program_id(1)
    pid_c = pid % n_cblocks
    tile = pid // n_cblocks
    hh, ww = _tile_coords(tile, n_wblocks, H, W, BLOCK_H, BLOCK_W)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < C
    if HAS_BIAS:
        bias = tl.load(b_ptr + cc, mask=mc, other=0.0)
    else:
        bias = tl.full((BLOCK_C,), 0.0, tl.float32)
    wp = wt_ptr + pid_c * (27 * BLOCK_C) + tl.arange(0, BLOCK_C)
    c0 = pid_c * BLOCK_C
    h0 = (tile // n_wblocks) * BLOCK_H
    w0 = (tile % n_wblocks) * BLOCK_W
    if (h0 > 0) & (h0 + BLOCK_H < H) & (w0 > 0) & (w0 + BLOCK_W < W) & EVEN_C:
        _rows_frames(x_ptr, wp, bias, g_ptr, y_ptr, bidx, c0, K, H, W, C, hh, ww, MODE, BLOCK_C, PAIRS, False)
    else:
        _rows_frames(x_ptr, wp, bias, g_ptr, y_ptr, bidx, c0, K, H, W, C, hh, ww, MODE, BLOCK_C, PAIRS, True)


def _wgrad_kernel(
    x_ptr,
    g_ptr,
    part_ptr,
    K,
    H,
    W,
    C,
    n_wblocks,
    n_tiles,
    tiles_per_prog,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial weight and bias gradients of one channel block (program_id(0)) over tiles_per_prog pixel tiles
    (group program_id(1)) and all frames of batch element program_id(2). x, g: (B, K, H, W, C) contiguous; g is
    the pre-activation gradient. Writes part[batch, group] (32, C) fp32: row dk*9 + dh*3 + dw is
    sum g[k, h, w] * x[k + dk - 1, h + dh - 1, w + dw - 1], row 27 is sum g, rows 28-31 are zero."""
    pid_c = tl.program_id(0)
    grp = tl.program_id(1)
    bidx = tl.program_id(2)
    n_groups = tl.num_programs(1)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = cc < C
    rows = tl.arange(0, 32)
    zero = tl.full((BLOCK_H * BLOCK_W, BLOCK_C), 0.0, tl.float32)
    tab = tl.full((32, BLOCK_C), 0.0, tl.float32)
    gsum = zero
    for it in range(0, tiles_per_prog):
        tile = grp * tiles_per_prog + it
        valid = tile < n_tiles
        hh, ww = _tile_coords(tile, n_wblocks, H, W, BLOCK_H, BLOCK_W)
        for t in tl.static_range(9):
            a0 = zero  # input kin against output kin + 1 (dk = 0)
            a1 = zero  # against output kin (dk = 1)
            a2 = zero  # against output kin - 1 (dk = 2)
            g_prev = zero
            g_cur = _load_shifted(g_ptr, bidx * K, hh, ww, cc, mc, H, W, C, 1, 1, valid)
            for kin in range(0, K):
                frame = bidx * K + kin
                g_next = _load_shifted(g_ptr, frame + 1, hh, ww, cc, mc, H, W, C, 1, 1, valid & (kin + 1 < K))
                xs = _load_shifted(x_ptr, frame, hh, ww, cc, mc, H, W, C, t // 3, t % 3, valid)
                a0 += g_next * xs
                a1 += g_cur * xs
                a2 += g_prev * xs
                if t == 0:
                    gsum += g_cur
                g_prev = g_cur
                g_cur = g_next
            tab += tl.where(rows[:, None] == t, tl.reduce(a0, 0, SUM_OP)[None, :], 0.0)  # noqa: F821
            tab += tl.where(rows[:, None] == 9 + t, tl.reduce(a1, 0, SUM_OP)[None, :], 0.0)  # noqa: F821
            tab += tl.where(rows[:, None] == 18 + t, tl.reduce(a2, 0, SUM_OP)[None, :], 0.0)  # noqa: F821
    tab += tl.where(rows[:, None] == 27, tl.reduce(gsum, 0, SUM_OP)[None, :], 0.0)  # noqa: F821
    base = (bidx * n_groups + grp).to(tl.int64) * 32 * C
    tl.store(part_ptr + base + rows[:, None] * C + cc[None, :], tab, mask=mc[None, :])


_KERNELS = LazyKernels(
    __name__,
    [
        _tile_coords,
        _load_shifted,
        _rcp,
        _normal_tail,
        _epilogue,
        _load_row_shift,
        _rows_frames,
        _stencil_rows_kernel,
        _wgrad_kernel,
    ],
    interpreted=[_Interpreted._rcp],
)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _check(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 5 or weight.shape != (x.shape[-1], 1, 3, 3, 3):
        raise ValueError(f'expected x (B, K, H, W, C) and weight (C, 1, 3, 3, 3), got {x.shape} and {weight.shape}')
    if x.shape[2] * x.shape[3] * x.shape[4] >= 2**31:
        raise ValueError(f'one frame of {x.shape} has more than 2^31 elements')


def _taps(weight: Tensor) -> Tensor:
    """(C, 1, 3, 3, 3) -> (27, C) fp32 contiguous, taps (dk, dh, dw) row-major."""
    return weight.reshape(weight.shape[0], 27).t().float().contiguous()


def stencil_launch(
    shape: Tuple[int, int, int, int, int],
    dtype: torch.dtype,
    mode: int,
    has_bias: bool,
    cfg: DWConvConfig,
    x_aligned: bool = True,
) -> Tuple[str, Tuple[int, int], Tuple[int, ...], Dict[str, object]]:
    """(kernel name in _KERNELS, grid, integer arguments, keyword arguments) of the stencil for an x of ``shape``
    (B, K, H, W, C) and ``dtype``; the pointers come first. Shared with benchmarks/sass_stencil.py, which compiles
    the same specialisation. Channel pairs only for bf16 with an even C, and x_aligned: x on a 4-byte boundary
    (they are int32 loads; a view can start mid-word)."""
    batch, k, h, w, c = shape
    n_wblocks = triton.cdiv(w, cfg.block_w)
    n_cblocks = triton.cdiv(c, cfg.block_c)
    grid = (n_cblocks * n_wblocks * triton.cdiv(h, cfg.block_h), batch)
    kwargs = dict(MODE=mode, HAS_BIAS=has_bias, BLOCK_H=cfg.block_h, BLOCK_W=cfg.block_w, BLOCK_C=cfg.block_c)
    pairs = cfg.bf16_pairs and dtype == torch.bfloat16 and c % 2 == 0 and x_aligned
    kwargs.update(EVEN_C=c % cfg.block_c == 0, PAIRS=pairs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg:
        kwargs['maxnreg'] = cfg.maxnreg
    return 'stencil_rows_kernel', grid, (k, h, w, c, n_wblocks, n_cblocks), kwargs


def _block_taps(taps: Tensor, block_c: int) -> Tensor:
    """(27, C) -> (ceil(C / block_c), 27, block_c), zero-padded: the layout the stencil reads."""
    n_cblocks = triton.cdiv(taps.shape[1], block_c)
    padded = F.pad(taps, (0, n_cblocks * block_c - taps.shape[1]))
    return padded.view(27, n_cblocks, block_c).transpose(0, 1).contiguous()


def _stencil(
    x: Tensor, taps: Tensor, bias: Optional[Tensor], g: Optional[Tensor], mode: int, cfg: DWConvConfig
) -> Tensor:
    """Launch the stencil kernel; x (and g) (B, K, H, W, C) contiguous, taps (27, C) fp32, bias (C,) fp32 or None."""
    y = torch.empty_like(x)
    aligned = x.data_ptr() % 4 == 0
    name, grid, ints, kwargs = stencil_launch(tuple(x.shape), x.dtype, mode, bias is not None, cfg, aligned)
    kernel = getattr(_KERNELS(interpret_for(x)), name)
    taps = _block_taps(taps, cfg.block_c)
    pointers = (x, taps, taps if bias is None else bias, x if g is None else g, y)
    kernel[grid](*pointers, *ints, **kwargs)
    return y


def _wgrad_groups(x: Tensor, n_cblocks: int, n_tiles: int, cfg: DWConvConfig) -> int:
    if cfg.wgrad_groups:
        return min(cfg.wgrad_groups, n_tiles)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(n_tiles, math.ceil(4 * sms / (n_cblocks * x.shape[0]))))


def dwconv3d_gelu_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool = True, config: DWConvConfig = DEFAULT_CONFIG
) -> Tensor:
    """Same as :func:`dwconv3d_gelu_ref` (fp32 weights and accumulation), through the Triton kernel.

    x: (B, K, H, W, C); weight: (C, 1, 3, 3, 3); bias: (C,) or None. Returns (B, K, H, W, C) in x's dtype.
    """
    _check(x, weight)
    b = None if bias is None else bias.float().contiguous()
    return _stencil(x.contiguous(), _taps(weight), b, None, MODE_GELU if gelu else MODE_CONV, config)


def dwconv3d_gelu_backward_triton(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    gelu: bool = True,
    config: DWConvConfig = DEFAULT_CONFIG,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients (dx, dweight, dbias) of :func:`dwconv3d_gelu_triton` for the output gradient dout.

    dout, x: (B, K, H, W, C). dx is in x's dtype, dweight and dbias in their parameters' dtypes (dbias None when
    bias is None). The pre-activation gradient is held in dout's dtype.
    """
    _check(x, weight)
    x = x.contiguous()
    dout = dout.contiguous().to(x.dtype)
    cfg = config
    b = None if bias is None else bias.float().contiguous()
    if gelu:
        g = _stencil(x, _taps(weight), b, dout, MODE_GELU_GRAD, cfg)
    else:
        g = dout
    dx = _stencil(g, _taps(weight.flip(2, 3, 4)), None, None, MODE_CONV, cfg)

    batch, k, h, w, c = x.shape
    n_wblocks = triton.cdiv(w, cfg.wgrad_block_w)
    n_tiles = n_wblocks * triton.cdiv(h, cfg.wgrad_block_h)
    n_cblocks = triton.cdiv(c, cfg.wgrad_block_c)
    groups = _wgrad_groups(x, n_cblocks, n_tiles, cfg)
    part = torch.empty(batch, groups, _TAB_ROWS, c, device=x.device, dtype=torch.float32)
    _KERNELS(interpret_for(x)).wgrad_kernel[(n_cblocks, groups, batch)](
        x,
        g,
        part,
        k,
        h,
        w,
        c,
        n_wblocks,
        n_tiles,
        triton.cdiv(n_tiles, groups),
        BLOCK_H=cfg.wgrad_block_h,
        BLOCK_W=cfg.wgrad_block_w,
        BLOCK_C=cfg.wgrad_block_c,
        num_warps=cfg.wgrad_num_warps,
    )
    tab = part.sum((0, 1))
    # copies, not views of tab: a custom op's outputs may not alias each other
    dweight = tab[:27].t().contiguous().view(weight.shape).to(weight.dtype)
    dbias = None if bias is None else tab[27].clone().to(bias.dtype)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------------------------
# Autograd op
# ---------------------------------------------------------------------------------------------------------------


def dwconv3d_gelu_backward_ref(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool = True
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients (dx, dweight, dbias) of :func:`dwconv3d_gelu_ref` in PyTorch ops, the way the Triton backward forms
    them (no autograd: a custom op's implementation runs below it). dout, x: (B, K, H, W, C)."""
    c = x.shape[-1]
    g = dout.to(x.dtype)
    if gelu:
        g = torch.ops.aten.gelu_backward(g, dwconv3d_gelu_ref(x, weight, bias, gelu=False))
    g_cf = g.permute(0, 4, 1, 2, 3)
    dx = F.conv3d(g_cf, weight.flip(2, 3, 4).to(x.dtype), padding=1, groups=c).permute(0, 2, 3, 4, 1).contiguous()
    dweight = torch.nn.grad.conv3d_weight(x.permute(0, 4, 1, 2, 3), weight.shape, g_cf, padding=1, groups=c)
    dbias = None if bias is None else g.sum((0, 1, 2, 3)).to(bias.dtype)
    return dx, dweight.to(weight.dtype), dbias


@torch.library.custom_op('gsmsr::dwconv3d_gelu', mutates_args=())
def _dwconv3d_gelu_op(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool) -> Tensor:
    if x.is_cuda:
        return dwconv3d_gelu_triton(x, weight, bias, gelu, OP_CONFIG)
    return dwconv3d_gelu_ref(x, weight, bias, gelu)


@_dwconv3d_gelu_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op('gsmsr::dwconv3d_gelu_backward', mutates_args=())
def _dwconv3d_gelu_backward_op(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, gelu: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    if x.is_cuda:
        return dwconv3d_gelu_backward_triton(dout, x, weight, bias, gelu, OP_CONFIG)
    return dwconv3d_gelu_backward_ref(dout, x, weight, bias, gelu)


@_dwconv3d_gelu_backward_op.register_fake
def _(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, gelu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    fmt = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=fmt),
        torch.empty_like(weight, memory_format=fmt),
        torch.empty_like(bias, memory_format=fmt),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, gelu = inputs
    ctx.save_for_backward(x, weight, bias)  # not the output: the backward recomputes conv + bias
    ctx.gelu = gelu


def _backward(ctx, dout: Tensor):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _dwconv3d_gelu_backward_op(dout, x, weight, bias, ctx.gelu)
    return dx, dweight, dbias, None


_dwconv3d_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def dwconv3d_gelu(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool = True) -> Tensor:
    """gelu(depthwise 3x3x3 conv(x) + bias) on channels-last x (B, K, H, W, C); weight (C, 1, 3, 3, 3), bias (C,).

    On CUDA the fused Triton kernels (forward and backward) behind a custom op, so ``torch.compile`` keeps the
    caller in one graph; elsewhere :func:`dwconv3d_gelu_ref` with PyTorch's autograd.
    """
    if x.is_cuda and triton_available():
        return _dwconv3d_gelu_op(x, weight, bias, gelu)
    return dwconv3d_gelu_ref(x, weight, bias, gelu)
