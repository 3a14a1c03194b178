"""Selective scan forward (Mamba-1, inference) in Triton: a sequential, register-resident token loop with the
sequence split into segments, for batch 1 and very long sequences.

Recurrence per batch b, channel d, state n (``dt = softplus(delta + delta_bias)``)::

    h_t = exp(dt_t A[d, n]) h_{t-1} + dt_t u_t B[b, n, t],   y_t = sum_n C[b, n, t] h_t + D[d] u_t,
    out_t = y_t * silu(z_t)

Why this shape of kernel: mamba-ssm's kernel gives each channel one thread block that runs a block-wide scan per
state and 2048-token chunk, so at batch 1 and L ~ 300k it is bound by synchronisation latency, not arithmetic.
Here each thread owns one channel and keeps its N states in registers as N separate [BLOCK_D] vectors (a tuple
unrolled with ``tl.static_range``), and walks the tokens in order: per token and state one exp2, one multiply for
``dt * A``, two FMAs and a multiply; no shuffles, no shared memory, y is summed inside the thread. The only
parallelism left is over channels, too little at batch 1 (384 channels = 384 threads), so the sequence is cut
into S segments, three launches:

1. *summary* (program per channel block x segment < S-1 x batch): walk the segment from h = 0 and store its end
   state ``hs`` (B, S-1, D, N) and its dt sum ``dsum`` (B, S-1, D): the segment's decay is ``exp(A * dsum)``.
2. *carry* (program per block of (channel, state) lanes x batch): ``H_{s+1} = exp(A dsum_s) H_s + hs_s``, written
   over ``hs`` in place, so ``hs[s - 1]`` becomes the state entering segment s.
3. *output* (program per channel block x segment x batch): walk the segment from its true start state, write out.

``reverse=True`` walks time from the end (``h_t = exp(dt_t A) h_{t+1} + ...``, BiMamba's backward branch without
flipping its operands): the same cut, segments, tiles and the tokens in a tile taken last first, carries in walking
order.

Tokens are read in tiles of TOKEN_TILE: u, delta, z as a [BLOCK_D, TILE] tile (each thread loads its channel's
TILE contiguous tokens in one vector load) and every row of B and C as a broadcast [BLOCK_D, TILE] tile (all
threads load the same bytes; L1 serves them). The tiles are split into per-token [BLOCK_D] columns with
``tl.reshape`` + ``tl.split`` (free register renames: the tile's second axis sits inside one thread), which cuts
the per-token load instructions by TILE and lets the loads of a tile be issued ahead of the arithmetic. The
output is joined back into a tile and stored in one vector store per thread. The token loop runs over the tile
index, so that a tile's start ``i * TILE`` is a multiple of TILE the compiler sees (it drops ``tl.multiple_of`` on
a loop counter, and then loads the tiles as 2-byte scalars transposed through shared memory; sm_90a SASS,
``benchmarks/sass_scan.py``). The output pass may use its own tile, channel block, warps and register cap (it
holds more registers than the summary); segment lengths are multiples of both tiles, and the last segment's
ragged end is walked with a tile of one token.

With ``stages`` > 1 the tile loop is software-pipelined (``tl.range(..., num_stages)``): every load becomes an async
copy into shared memory issued tiles ahead, and the values are read from shared memory where they are used. Each
token's B|C row is then one copy for the whole warp (:func:`_row_staged`).

All arithmetic is float32 whatever the input dtype; the output has u's dtype. Decays are ``exp2(dt * A log2 e)``
(log2 e folded into A once); the softplus is ``max(x, 0) + log1p(exp(-|x|))`` with log1p as a polynomial
(:func:`_softplus`): one special-function (MUFU) op, the exp, and FMA-pipe instructions. No autograd here; with
``return_states=True`` the forward also returns the state entering each segment (the carries above), from which the
backward (:mod:`gsmsr.ops.seq_scan_triton_bwd`) restarts any segment. CUDA tensors run compiled kernels and CPU
tensors Triton's interpreter (slow; for tests), see :mod:`gsmsr.ops.triton_jit`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, tl

# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies: plain functions, jitted (or interpreted) lazily by LazyKernels below.
# ---------------------------------------------------------------------------------------------------------------


def _log1p_poly(t):
    """log1p(t) for t in [0, 1] as t (1 + t Q(t)), Q of degree 7 fitted for relative error on [0, 1] (3.3e-8 in
    float64, at most 1.7 ulp with float32 FMAs): FMA-pipe instructions only."""
    q = 5.365764256566763e-3 * t - 3.0069127678871155e-2
    q = q * t + 7.920923829078674e-2
    q = q * t - 1.3754135370254517e-1
    q = q * t + 1.915377974510193e-1
    q = q * t - 2.4857187271118164e-1
    q = q * t + 3.332132399082184e-1
    q = q * t - 4.9999648332595825e-1
    return t * (q * t + 1.0)


def _softplus(x):
    """torch's softplus as ``max(x, 0) + log1p(t)``, ``t = exp(-|x|)`` in (0, 1]: one MUFU op (the exp) and ~12
    FMA-pipe instructions (:func:`_log1p_poly`), where libdevice's log made the softplus ~37 instructions a token
    (offline SASS: 139 -> 118 a warp-token in the output pass, 116 -> 97 in the summary; 11.02 against 11.38
    ms/frame of scan in the network's profile on an H100, benchmarks/NOTES.md). For x > 20, t < 2.1e-9 is below half
    an ulp of x, so the sum is x exactly, as torch returns (its threshold). Infinities and NaN propagate as in
    torch."""
    return tl.maximum(x, 0.0) + _log1p_poly(tl.exp(-tl.abs(x)))


def _columns(x, BLOCK_D: tl.constexpr, TILE: tl.constexpr):
    """(BLOCK_D, TILE) tile -> tuple of TILE (BLOCK_D,) columns, in order (TILE <= 32). Repeated even/odd splits:
    after a level with m parts, part r holds the columns j with j % m == r."""
    parts = (x,)
    if TILE == 1:
        parts = (tl.reshape(x, (BLOCK_D,)),)
    for level in tl.static_range(5):
        if TILE >> level >= 2:
            evens = ()
            odds = ()
            for i in tl.static_range(1 << level):
                if TILE >> level == 2:
                    e, o = tl.split(parts[i])
                else:
                    e, o = tl.split(tl.reshape(parts[i], (BLOCK_D, TILE >> (level + 1), 2)))
                evens = evens + (e,)
                odds = odds + (o,)
            parts = evens + odds
    return parts


def _tile(cols, BLOCK_D: tl.constexpr, TILE: tl.constexpr):
    """Inverse of :func:`_columns`: tuple of TILE (BLOCK_D,) columns -> (BLOCK_D, TILE) tile."""
    parts = cols
    if TILE == 1:
        parts = (tl.reshape(cols[0], (BLOCK_D, 1)),)
    for level in tl.static_range(5):
        if TILE >> level >= 2:
            joined = ()
            for i in tl.static_range(TILE >> (level + 1)):
                pair = tl.join(parts[i], parts[i + (TILE >> (level + 1))])  # (BLOCK_D, [2**level,] 2)
                if level > 0:
                    pair = tl.reshape(pair, (BLOCK_D, 2 << level))
                joined = joined + (pair,)
            parts = joined
    return parts[0]


def _row(ptr, BLOCK_D: tl.constexpr, NP: tl.constexpr):
    """NP contiguous fp32 values at the scalar pointer ``ptr``, loaded by every thread (a broadcast) in
    16-byte pieces -> tuple of NP (BLOCK_D,) vectors. Pieces of 4 keep each load inside one thread."""
    vals = ()
    for c in tl.static_range(NP // 4):
        piece = tl.broadcast_to((ptr + 4 * c + tl.arange(0, 4))[None, :], (BLOCK_D, 4))
        vals = vals + _columns(tl.load(piece), BLOCK_D, 4)
    return vals


def _row_staged(ptr, BLOCK_D: tl.constexpr, NP: tl.constexpr):
    """:func:`_row` for a pipelined loop (``tl.range(..., num_stages)``): one 1-D load, which the pipeliner turns
    into an async copy of the row into shared memory, read back by broadcast shared loads where the values are used.
    (Outside a pipelined loop the compiler would stage it through shared memory synchronously, with a barrier.)"""
    row = tl.load(ptr + tl.arange(0, NP))
    return _columns(tl.broadcast_to(row[None, :], (BLOCK_D, NP)), BLOCK_D, NP)


def _walk(
    h,
    dsum,
    A2,
    u_row,
    dt_row,
    z_row,
    o_row,
    bc_row,
    lo,
    hi,
    bias,
    d_skip,
    md,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    SUMMARY: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Walk tokens [lo, hi) (both multiples of TILE) from the states h (tuple of N (BLOCK_D,) fp32), from hi - 1
    down to lo when REVERSE. Summary: also sums dt into dsum, writes nothing. Otherwise stores out. Returns
    (h, dsum). u_row, dt_row, z_row, o_row: (BLOCK_D,) pointers at token 0 of each channel; bc_row: scalar pointer
    at token 0 of this batch's packed B|C rows (2 NP fp32 per token, B in the first NP). STAGES: software pipelining
    of the tile loop (1: none). SOFTPLUS: dt = :func:`_softplus` of delta (+ bias), else delta (+ bias) itself."""
    offs = tl.arange(0, TILE)[None, :]
    mask = md[:, None]
    # over the tile index: t0 = i * TILE is a multiple of TILE the compiler sees, so the tile loads are vectors
    for k in tl.range(lo // TILE, hi // TILE, num_stages=STAGES):
        i = k
        if REVERSE:  # the same tiles, last first
            i = (lo + hi) // TILE - 1 - k
        t0 = i * TILE
        us = _columns(tl.load(u_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        ds = _columns(tl.load(dt_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        if HAS_Z and not SUMMARY:
            zs = _columns(tl.load(z_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        ys = ()
        # tokens of the tile in walking order: 0 .. TILE-1, or TILE-1 .. 0 in reverse
        for j in tl.static_range(REVERSE * (TILE - 1), TILE - REVERSE * (TILE + 1), 1 - 2 * REVERSE):
            if STAGES > 1:  # B and C in one copy: 2 NP = 32 lanes (NP lanes would take branches around it)
                bcs = _row_staged(bc_row + (t0 + j) * (2 * NP), BLOCK_D, 2 * NP)
                bs, cs = bcs[:NP], bcs[NP:]
            else:
                bs = _row(bc_row + (t0 + j) * (2 * NP), BLOCK_D, NP)
                if not SUMMARY:
                    cs = _row(bc_row + (t0 + j) * (2 * NP) + NP, BLOCK_D, NP)
            u = us[j].to(tl.float32)
            dt = ds[j].to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                dt = _softplus(dt)
            dtu = dt * u
            if SUMMARY:
                dsum = dsum + dt
            new_h = ()
            y = tl.full([BLOCK_D], 0.0, tl.float32)
            for n in tl.static_range(N):
                hn = tl.exp2(dt * A2[n]) * h[n] + dtu * bs[n]
                new_h = new_h + (hn,)
                if not SUMMARY:
                    y = y + cs[n] * hn
            h = new_h
            if not SUMMARY:
                if HAS_D:
                    y = y + d_skip * u
                if HAS_Z:
                    z = zs[j].to(tl.float32)
                    y = y * (z / (1.0 + tl.exp(-z)))
                ys = (y,) + ys if REVERSE else ys + (y,)  # ys[j] is token t0 + j either way
        if not SUMMARY:
            out = _tile(ys, BLOCK_D, TILE).to(o_row.dtype.element_ty)
            tl.store(o_row[:, None] + t0 + offs, out, mask=mask)
    return h, dsum


def _scan_kernel(
    u_ptr,
    dt_ptr,
    z_ptr,
    o_ptr,
    bc_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    hs_ptr,
    dsum_ptr,
    Dm,
    L,
    seg_len,
    n_carry,
    s_ub,
    s_ud,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_ob,
    s_od,
    s_ad,
    s_an,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    SUMMARY: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program (channel block, segment s, batch). SUMMARY: segment s (< S-1) from h = 0, stores hs[b, s] (D, N)
    and dsum[b, s] (D,). Otherwise: starts from hs[b, s-1] (the carried state; zero for s = 0) and stores out
    over the segment. bc: (B, L, 2 NP) fp32, B then C (zero-padded states); hs: (B, n_carry, D, N),
    dsum: (B, n_carry, D), both contiguous fp32.

    REVERSE: time walks from the end. s counts segments in walking order: it is the segment S-1-s of the sequence
    (the same cut, the ragged one walked first), so hs, dsum and the carry kernel stay in walking order."""
    pid_d = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < Dm
    d64 = offs_d.to(tl.int64)
    A2 = ()
    h = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A_ptr + offs_d * s_ad + n * s_an, mask=md, other=0.0) * 1.4426950408889634,)
        if SUMMARY:
            h = h + (tl.full([BLOCK_D], 0.0, tl.float32),)
        else:
            carry = hs_ptr + ((b * n_carry + s - 1) * Dm + d64) * N + n
            h = h + (tl.load(carry, mask=md & (s > 0), other=0.0),)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    seg = n_carry - s if REVERSE else s
    lo = seg * seg_len
    hi = tl.minimum(lo + seg_len, L)
    full = lo + (hi - lo) // TILE * TILE
    u_row = u_ptr + b * s_ub + d64 * s_ud
    dt_row = dt_ptr + b * s_tb + d64 * s_td
    z_row = z_ptr + b * s_zb + d64 * s_zd
    o_row = o_ptr + b * s_ob + d64 * s_od
    bc_row = bc_ptr + b * L * (2 * NP)
    dsum = tl.full([BLOCK_D], 0.0, tl.float32)
    if REVERSE and TILE > 1:  # ragged end first (the last segment only: segment lengths are multiples of TILE)
        h, dsum = _walk(
            h, dsum, A2, u_row, dt_row, z_row, o_row, bc_row, full, hi, bias, d_skip, md,
            N, NP, BLOCK_D, 1, SUMMARY, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, 1,
        )  # fmt: skip
    h, dsum = _walk(
        h, dsum, A2, u_row, dt_row, z_row, o_row, bc_row, lo, full, bias, d_skip, md,
        N, NP, BLOCK_D, TILE, SUMMARY, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, STAGES,
    )  # fmt: skip
    if not REVERSE and TILE > 1:  # ragged end (the last segment only, as segment lengths are multiples of TILE)
        h, dsum = _walk(
            h, dsum, A2, u_row, dt_row, z_row, o_row, bc_row, full, hi, bias, d_skip, md,
            N, NP, BLOCK_D, 1, SUMMARY, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, REVERSE, 1,
        )  # fmt: skip
    if SUMMARY:
        base = (b * n_carry + s) * Dm + d64
        tl.store(dsum_ptr + base, dsum, mask=md)
        for n in tl.static_range(N):
            tl.store(hs_ptr + base * N + n, h[n], mask=md)


def _carry_kernel(
    hs_ptr,
    dsum_ptr,
    A_ptr,
    Dm,
    n_carry,
    s_ad,
    s_an,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
):
    """Program (block of BLOCK (channel, state) lanes, batch): over segments s in order,
    ``H = exp(A dsum[b, s]) H + hs[b, s]`` from H = 0, stored over hs[b, s] (then the state entering s + 1).
    Loads of SEG_BLOCK segments are issued before their dependent FMAs."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lanes = pid * BLOCK + tl.arange(0, BLOCK)
    ml = lanes < Dm * N
    d = lanes // N
    A2 = tl.load(A_ptr + d * s_ad + (lanes % N) * s_an, mask=ml, other=0.0) * 1.4426950408889634
    h = tl.full([BLOCK], 0.0, tl.float32)
    for s0 in range(0, n_carry, SEG_BLOCK):
        decays = ()
        ends = ()
        for j in tl.static_range(SEG_BLOCK):
            row = b * n_carry + s0 + j
            m = ml & (s0 + j < n_carry)
            decays = decays + (tl.exp2(A2 * tl.load(dsum_ptr + row * Dm + d, mask=m, other=0.0)),)
            ends = ends + (tl.load(hs_ptr + row * Dm * N + lanes, mask=m, other=0.0),)
        for j in tl.static_range(SEG_BLOCK):
            h = decays[j] * h + ends[j]
            tl.store(hs_ptr + (b * n_carry + s0 + j) * Dm * N + lanes, h, mask=ml & (s0 + j < n_carry))


def _pointwise_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """y = :func:`_softplus` (x) elementwise over n fp32 values, as the kernels compute it: for tests."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + offs, _softplus(x), mask=m)


_KERNELS = LazyKernels(
    __name__,
    [
        _log1p_poly, _softplus, _pointwise_kernel, _columns, _tile, _row, _row_staged, _walk, _scan_kernel,
        _carry_kernel,
    ],
)  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------

MIN_SEGMENT = 512  # tokens: below this the summary and carry overheads outweigh more parallelism


def choose_segments(
    batch: int,
    dim: int,
    length: int,
    block_d: int,
    num_warps: int,
    sm_count: int,
    warps_per_sm: int,
    min_segment: int = MIN_SEGMENT,
) -> int:
    """Segments per sequence so that the output launch has about ``warps_per_sm`` warps per SM, with segments of
    at least ``min_segment`` tokens."""
    programs = batch * -(-dim // block_d)
    wanted = -(-warps_per_sm * sm_count // (programs * num_warps))
    return max(1, min(wanted, length // min_segment))


def check_operands(
    fn: str,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *optional,
    **powers_of_two,
):
    """ValueError naming ``fn`` unless u, delta and the (batch, D, L) operands among ``optional`` share a shape, A
    is (D, N), B and C (batch, N, L), all on u's device and every keyword value is a power of two."""
    for name, value in powers_of_two.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f'{fn}: {name} must be a power of two, got {value}')
    batch, dim, length = u.shape
    n_state = A.shape[1]
    same = [t for t in (delta, *optional) if t is not None and t.dim() == 3]
    if any(t.shape != u.shape for t in same):
        raise ValueError(f'{fn}: u, delta (and z, dout) must have one shape (batch, D, L), got u {tuple(u.shape)}')
    if B.shape != (batch, n_state, length) or C.shape != (batch, n_state, length) or A.shape[0] != dim:
        raise ValueError(
            f'{fn}: expected A (D, N), B and C (batch, N, L); got u {tuple(u.shape)}, '
            f'A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}'
        )
    if any(t.device != u.device for t in (delta, A, B, C, *optional) if t is not None):
        raise ValueError(f'{fn}: all tensors must be on one device')


def unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with unit stride along its last axis (copied only when it has not); None stays None."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def pack_bc(B: Tensor, C: Tensor, n_pad: int) -> Tensor:
    """B, C (batch, N, L) -> (batch, L, 2 n_pad) fp32, token-major: B in columns [0, N), C in [n_pad, n_pad + N),
    zeros in the padding. One token's values are one contiguous row, which every thread of a program loads with a
    few broadcast loads, already converted."""
    batch, n_state, length = B.shape
    alloc = torch.empty if n_pad == n_state else torch.zeros  # only padded states need their zeros written
    bc = alloc(batch, length, 2 * n_pad, device=B.device, dtype=torch.float32)
    bc[:, :, :n_state] = B.transpose(1, 2)
    bc[:, :, n_pad : n_pad + n_state] = C.transpose(1, 2)
    return bc


def _split(length: int, segments: int, tile: int) -> Tuple[int, int]:
    """(segment length, segment count): lengths a multiple of ``tile``, the last segment possibly shorter."""
    seg_len = -(-length // max(segments, 1))
    seg_len = max(tile, -(-seg_len // tile) * tile)
    return seg_len, -(-length // seg_len)


def selective_scan_fwd_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    segments: Optional[int] = None,
    block_d: int = 32,
    num_warps: int = 1,
    # 3.0 ms at L = 288k bf16 on an H200 against 3.1 (2), 4.0 (4), 4.6 (1); timed before the loop over tile indices
    token_tile: int = 8,
    # at 128 registers a thread an SM keeps 16 one-warp programs resident: 16 per SM is one whole wave (1.91 ms at
    # L = 288k bf16 on an H200 against 2.04 at 12, 2.20 at 20 and 1.97 at 24, all capped at 128)
    warps_per_sm: int = 16,
    out: Optional[Tensor] = None,
    return_states: bool = False,
    out_tile: Optional[int] = None,
    # 128 registers a thread: left alone the compiler takes ~90 and issues the B|C loads just before their use
    # (sm_90a SASS); at 128 they are issued well ahead and an SM still holds 16 one-warp programs. 1.91 ms at
    # L = 288k bf16 on an H200 against 3.09 uncapped (at 12 per SM; the former token-index loop, uncapped: 2.35)
    out_maxnreg: Optional[int] = 128,
    out_warps: Optional[int] = None,
    sum_maxnreg: Optional[int] = 128,
    reverse: bool = False,
    stages: int = 1,
) -> Union[Tensor, Tuple[Tensor, Tensor, int]]:
    """Selective scan forward, no autograd; semantics and shapes of
    :func:`gsmsr.ops.selective_scan_ref.selective_scan_ref`.

    u, delta, z: (batch, D, L), any float dtype, unit stride along L (else copied); B, C: (batch, N, L), any strides; A:
    (D, N), D, delta_bias: (D,), used as float32. Returns (batch, D, L) in u's dtype with ``torch.empty_like(u)``'s
    strides (those of the custom op's fake result), or written into ``out`` if given (u's shape and dtype, any strides;
    through a copy when out's L stride is not 1).

    segments: pieces each sequence is cut into (None: enough for about ``warps_per_sm`` warps per SM in the output
    launch, at least MIN_SEGMENT tokens each; 1 on CPU tensors). block_d: channels per program (a power of two;
    one per thread when ``block_d == 32 * num_warps``). token_tile: tokens per tile of loads (a power of two).
    Segment lengths are rounded up to a multiple of max(token_tile, out_tile), so fewer segments than asked may run.

    Output pass only (None: as the summary pass): out_tile, its token tile (a power of two); out_warps, its
    num_warps (a power of two), with ``32 * out_warps`` channels per program.

    stages: software-pipelining depth of both passes' tile loop (1: none). At 2 or more, the compiler turns the u,
    delta, z tile loads and the B|C rows into async copies into shared memory, issued ``stages - 1`` tiles ahead of
    their use: the loads' latency leaves the token loop, which Nsight Compute found waiting on them (benchmarks/
    NOTES.md), at ~2 KB of shared memory a stage and program. Same values: the same float operations in the same
    order (only where the operands wait changes).

    out_maxnreg, sum_maxnreg: register caps of the output and summary launches on CUDA (None: the compiler's
    choice; ignored by the interpreter). They change no result (the same float instructions), only register
    allocation: how many programs an SM holds and how far ahead of their use loads are issued.

    return_states: also return what the backward (:mod:`gsmsr.ops.seq_scan_triton_bwd`) needs to restart any
    segment: ``(out, states, seg_len)`` with states (batch, max(S - 1, 1), D, N) fp32, ``states[:, s - 1]`` the
    state entering segment s (the carries the forward computes anyway; unused and unwritten when S = 1), and
    seg_len the segment length (S = ceil(L / seg_len)).

    reverse: time walks from the end, ``h_t = exp(dt_t A) h_{t+1} + dt_t u_t B_t`` (y, D and the gate as above):
    ``scan(x.flip(-1) for each x).flip(-1)`` without the copies, the same float operations token by token. The
    sequence is cut as without reverse, segments walked last first, so the result is that bit for bit when L is a
    multiple of the segment length (one segment included), else to float rounding (the flipped sequence is cut at
    other tokens, so its carried states sum other groups). With return_states, ``states[:, s - 1]`` enters the
    s-th segment walked (S - 1 - s in the sequence).
    """
    out_tile = token_tile if out_tile is None else out_tile
    out_block_d, out_warps = (block_d, num_warps) if out_warps is None else (32 * out_warps, out_warps)
    check_operands(
        'selective_scan_fwd_triton', u, delta, A, B, C, D, z, delta_bias,
        block_d=block_d, token_tile=token_tile, num_warps=num_warps, out_tile=out_tile, out_warps=out_warps,
    )  # fmt: skip
    if stages < 1:
        raise ValueError(f'selective_scan_fwd_triton: stages must be at least 1, got {stages}')
    batch, dim, length = u.shape
    n_state = A.shape[1]

    # the custom op's fake result is empty_like(u): under torch.compile the real one must have its strides
    if out is None:
        out = torch.empty_like(u)
    elif out.shape != u.shape or out.dtype != u.dtype:
        raise ValueError("selective_scan_fwd_triton: out must have u's shape and dtype")
    # the tile loads and store need unit L stride
    u, delta, z = unit_stride(u), unit_stride(delta), unit_stride(z)
    res = out if out.stride(2) == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    A = A.float()
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    if length == 0 or batch == 0 or dim == 0:
        empty = torch.zeros(batch, 1, dim, n_state, device=u.device, dtype=torch.float32)
        return (out, empty, max(length, 1)) if return_states else out
    if segments is None:
        sms = torch.cuda.get_device_properties(u.device).multi_processor_count if u.is_cuda else 0
        segments = choose_segments(batch, dim, length, out_block_d, out_warps, sms, warps_per_sm) if sms else 1
    # both passes walk whole tiles up to the last segment (tiles are powers of two: the larger is a multiple)
    seg_len, n_seg = _split(length, segments, max(token_tile, out_tile))
    n_carry = n_seg - 1
    hs = torch.empty(batch, max(n_carry, 1), dim, n_state, device=u.device, dtype=torch.float32)
    dsum = torch.empty(batch, max(n_carry, 1), dim, device=u.device, dtype=torch.float32)

    # B and C packed token-major in fp32, (batch, L, 2 NP): one token's 2N values are one contiguous row that every
    # thread loads with a few 16-byte broadcast loads from one base address, already converted
    n_pad = -(-n_state // 4) * 4
    bc = pack_bc(B, C, n_pad)

    interpret = interpret_for(u)
    k = _KERNELS(interpret)
    zz = z if z is not None else u  # placeholders for absent operands: never read (constexpr flags)
    common = (
        hs,
        dsum,
        dim,
        length,
        seg_len,
        n_carry,
        *u.stride()[:2],
        *delta.stride()[:2],
        *zz.stride()[:2],
        *res.stride()[:2],
        *A.stride(),
    )
    ptrs = (u, delta, zz, res, bc, A, D if D is not None else A, delta_bias if delta_bias is not None else A)
    flags = dict(
        N=n_state,
        NP=n_pad,
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        REVERSE=bool(reverse),
        STAGES=stages,
    )
    summary_flags = dict(BLOCK_D=block_d, TILE=token_tile, num_warps=num_warps)
    out_flags = dict(BLOCK_D=out_block_d, TILE=out_tile, num_warps=out_warps)
    for launch, cap in ((summary_flags, sum_maxnreg), (out_flags, out_maxnreg)):
        if cap and not interpret:
            launch['maxnreg'] = cap
    with torch.cuda.device(u.device) if u.is_cuda else nullcontext():
        if n_carry:
            k.scan_kernel[(-(-dim // block_d), n_carry, batch)](*ptrs, *common, SUMMARY=True, **summary_flags, **flags)
            lanes = 128
            k.carry_kernel[(-(-dim * n_state // lanes), batch)](
                hs, dsum, A, dim, n_carry, *A.stride(), N=n_state, BLOCK=lanes, SEG_BLOCK=8, num_warps=4
            )
        k.scan_kernel[(-(-dim // out_block_d), n_seg, batch)](*ptrs, *common, SUMMARY=False, **out_flags, **flags)
    if res is not out:
        out.copy_(res)
    return (out, hs, seg_len) if return_states else out


def kernel_softplus(x: Tensor) -> Tensor:
    """softplus elementwise as the scan kernels compute it (:func:`_softplus`) as float32, on x's device (compiled on
    CUDA, interpreted on CPU): to check its accuracy."""
    x = x.float().contiguous()
    y = torch.empty_like(x)
    if x.numel():
        block = 1024 if x.is_cuda else 1 << 16  # the interpreter pays per program, not per element
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            _KERNELS(interpret_for(x)).pointwise_kernel[(-(-x.numel() // block),)](x, y, x.numel(), BLOCK=block)
    return y
