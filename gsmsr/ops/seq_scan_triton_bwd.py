"""Selective scan backward (Mamba-1) in Triton: the companion of :mod:`gsmsr.ops.seq_scan_triton`, same design
(one thread per channel, its N states in registers, a sequential token loop, the sequence cut into segments).

Math per batch b, channel d, state n, with ``a_t = exp(dt_t A)``, ``h_t = a_t h_{t-1} + dt_t u_t B_t`` and the
incoming gradient g = dL/dout::

    dy_t = g_t silu(z_t),   dz_t = g_t y_t silu'(z_t)
    lam_t = C_t dy_t + a_{t+1} lam_{t+1}                          (dL/dh_t, a reverse recurrence)
    dC_t = sum_d dy_t h_t,  dB_t = sum_d lam_t dt_t u_t            (sums over channels)
    du_t = dt_t sum_n lam_t B_t + D dy_t,  dD = sum_t dy_t u_t
    d(dt)_t = sum_n lam_t (A a_t h_{t-1} + B_t u_t),  dA = sum_t dt_t lam_t a_t h_{t-1}
    ddelta_t = d(dt)_t sigmoid(delta_t + bias) (softplus; else d(dt)_t),  dbias = sum_t ddelta_t

The reverse walk needs h_{t-1}. Dividing h_t by a_t is unstable (a_t underflows for fast-forgetting states), so
the states are recomputed forwards from checkpoints. The forward (``return_states=True``) hands over the state
entering each of its S segments; the backward uses the same segments and three launches:

1. *summary* (program per channel block x segment s >= 1 x batch): walk segment s in reverse from lam = 0 (needs
   only a_t and C_t dy_t, no h) and store ``P_s = a_lo lam_lo`` (what the segment passes to its left neighbour
   when nothing comes from its right) and the segment's dt sum (its total decay is ``exp(A dsum)``).
2. *carry*: the forward's carry kernel on the segments in reverse order: ``R_{s-1} = P_s + exp(A dsum_s) R_s``
   (R_{S-1} = 0), the ``a_{hi} lam_{hi}`` entering segment s from the right.
3. *main* (program per channel block x segment x batch): (a) walk the segment forwards from its start state and
   store the state at every TILE-th token (a checkpoint) in a scratch buffer (B, L/TILE, N, D) fp32 (N-major so
   each checkpoint store is one coalesced row per state; 252 MB at L = 20,480, D = 384, N = 16, TILE = 2, written
   and read once: ~0.1 ms of HBM traffic on an H200 if none of it stayed in the 50 MB L2, overlapped with the
   arithmetic; each program re-reads its latest checkpoints right after writing them);
   (b) walk the tiles in reverse: recompute the tile's TILE states from its checkpoint into registers (TILE x N
   per thread), then run the reverse recurrence through the tile, token by token. Per token each thread has
   everything for du, ddelta, dz (written as [BLOCK_D, TILE] tiles, one vector store per thread), and
   accumulates dA, dD, dbias in registers (written once per program as per-segment partials, summed by torch
   afterwards: deterministic, no atomics). dB and dC need sums over channels: per token the program sums its
   BLOCK_D channels and stores a partial per channel block, (D/BLOCK_D, B, L, 2 NP) fp32, which torch sums
   afterwards (deterministic; 12 partials at D = 384, 31 MB).

The channel sums of dB and dC (2N = 32 values per token, over the 32 lanes of a warp) are the one place threads
talk. One ``tl.reduce`` per column costs 32 x 5 shuffles per token, plus a shared-memory round trip and a barrier
to spread the replicated result for the store; recursive halving (:func:`_lane_sum`, exchanges with ``tl.gather``,
which Triton lowers to warp shuffles) costs 31 shuffles and leaves total j in lane j, ready for one coalesced
store. Compiled for sm_90a at N = 16, bf16: 31 shuffles per token, no shared memory, no barriers.

Why one thread per channel with all N states (and not N split across lanes): the per-token sums over states (y,
du, d(dt)) stay inside the thread, and the recurrences need no communication; only dB and dC cross lanes, and
they do in any layout (they sum over channels). The cost is registers: the tile's states (TILE + 1) x N, lam,
dA and A (3N), the B and C rows (2N) and the dB|dC columns (2N). From ptxas (sm_90a, Triton 3.8, N = 16, bf16):
TILE = 4 takes 255 registers (132 bytes spilled), so an SM holds 8 one-warp programs; TILE = 2 fits a cap of 168
registers with 72 bytes spilled, so an SM holds 12 (the default, ``maxnreg=168``: the forward's output pass was
latency-bound at low occupancy, benchmarks/NOTES.md), for ~11 % more instructions per token (~190 in the
checkpoint walk and ~560 in the reverse walk at TILE = 2, ~150 and ~520 at TILE = 4) and twice the checkpoint
traffic. TILE = 8 spills ~500 bytes.

Conventions as in the forward: fp32 arithmetic whatever the input dtype, decays as ``exp2(dt * A log2 e)``,
``tl.reduce(x, axis, SUM_OP)`` instead of ``tl.sum`` (the interpreter), kernel bodies as plain functions jitted
lazily by :class:`gsmsr.ops.triton_jit.LazyKernels`; CPU tensors run Triton's interpreter (slow; for tests).
N is limited to 16 (the per-column reduction builds a [BLOCK_D, 2 NP] tile, at most 32 columns).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple

import torch
from torch import Tensor

from gsmsr.ops.seq_scan_triton import (
    _carry_kernel,
    _columns,
    _log1p_poly,
    _row,
    _tile,
    check_operands,
    pack_bc,
    unit_stride,
)
from gsmsr.ops.triton_jit import LazyKernels, interpret_for, tl

# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies: plain functions, jitted (or interpreted) lazily by LazyKernels below.
# ---------------------------------------------------------------------------------------------------------------


def _dt_and_slope(x, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """x: raw delta column (fp32). Returns (dt, d dt / d delta); SOFTPLUS as in the forward (dt = the forward's
    softplus, :func:`gsmsr.ops.seq_scan_triton._softplus`, the same float operations). Its ``t = exp(-|x|)`` is
    shared with the sigmoid, sigmoid(x) = 1 / (1 + t) for x >= 0 and t / (1 + t) below: one MUFU op a token for
    both. One return statement (no early returns in Triton functions)."""
    if HAS_BIAS:
        x = x + bias
    dt = x
    slope = tl.full(x.shape, 1.0, tl.float32)
    if SOFTPLUS:
        t = tl.exp(-tl.abs(x))
        dt = tl.maximum(x, 0.0) + _log1p_poly(t)
        r = 1.0 / (1.0 + t)
        slope = tl.where(x >= 0.0, r, t * r)
    return dt, slope


def _dy_of(g, z, HAS_Z: tl.constexpr):
    """(dL/dy, dL/dy per unit of y for dz): with z, (g silu(z), g silu'(z)) with silu'(z) = s (1 + z (1 - s)),
    s = sigmoid(z); without, (g, g)."""
    dy = g
    dzf = g
    if HAS_Z:
        sg = 1.0 / (1.0 + tl.exp(-z))
        dy = g * z * sg
        dzf = g * sg * (1.0 + z * (1.0 - sg))
    return dy, dzf


def _lane_sum(v, idx, BLOCK_D: tl.constexpr, K: tl.constexpr):
    """Sums over the BLOCK_D channels of K columns (tuple of K (BLOCK_D,) vectors, K a power of two), by
    recursive halving: at each exchange distance m (BLOCK_D/2, ..., 1) every element keeps half of its columns
    and adds the partner's (element ``idx ^ m``) copy of that half, so each exchange moves half as many values as
    the one before (K - 1 exchanges in all for K = BLOCK_D, against K log2(BLOCK_D) for a reduction per column).
    ``tl.gather`` within a warp lowers to shuffles, without shared memory or barriers. Returns a tuple of
    R = max(K / BLOCK_D, 1) vectors: entry i of element l holds the total of column (l >> log2(BLOCK_D / K)) R + i
    (with K < BLOCK_D, BLOCK_D / K elements hold each total)."""
    for level in tl.static_range(8):
        if (BLOCK_D >> level) > 1:
            partner = idx ^ (BLOCK_D >> (level + 1))
            if (K >> level) > 1:
                up = (idx & (BLOCK_D >> (level + 1))) != 0  # this element keeps the upper half
                new = ()
                for i in tl.static_range(K >> (level + 1)):
                    lo = v[i]
                    hi = v[i + (K >> (level + 1))]
                    new = new + (tl.where(up, hi, lo) + tl.gather(tl.where(up, lo, hi), partner, 0),)
                v = new
            else:
                v = (v[0] + tl.gather(v[0], partner, 0),)
    return v


def _summary_walk(
    lam,
    dsum,
    A2,
    dt_row,
    z_row,
    g_row,
    bc_row,
    lo,
    hi,
    bias,
    md,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """Tokens [lo, hi) in reverse (hi - lo a multiple of TILE, lo too when TILE > 1). lam: tuple of N (BLOCK_D,)
    carries ``a_{t+1} lam_{t+1}``; on return ``a_lo lam_lo``. Also sums dt into dsum."""
    offs = tl.arange(0, TILE)[None, :]
    mask = md[:, None]
    for k in range(0, (hi - lo) // TILE):
        t0 = tl.multiple_of(hi - (k + 1) * TILE, TILE)
        ds = _columns(tl.load(dt_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        gs = _columns(tl.load(g_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        if HAS_Z:
            zs = _columns(tl.load(z_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        for j in tl.static_range(TILE - 1, -1, -1):
            cs = _row(bc_row + (t0 + j) * (2 * NP) + NP, BLOCK_D, NP)
            dt, _slope = _dt_and_slope(ds[j].to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
            g = gs[j].to(tl.float32)
            if HAS_Z:
                dy, _dzf = _dy_of(g, zs[j].to(tl.float32), True)
            else:
                dy = g
            dsum = dsum + dt
            new = ()
            for n in tl.static_range(N):
                new = new + (tl.exp2(dt * A2[n]) * (cs[n] * dy + lam[n]),)
            lam = new
    return lam, dsum


def _summary_kernel(
    dt_ptr,
    z_ptr,
    g_ptr,
    bc_ptr,
    A_ptr,
    bias_ptr,
    P_ptr,
    dsum_ptr,
    Dm,
    L,
    seg_len,
    n_seg,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_gb,
    s_gd,
    s_ad,
    s_an,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """Program (channel block, j, batch) for segment s = S - 1 - j (j < S - 1): stores P[b, j] (D, N) and
    dsum[b, j] (D,), the layout of the forward's carry kernel (which then runs over j, i.e. segments in reverse)."""
    pid_d = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    s = n_seg - 1 - j
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < Dm
    d64 = offs_d.to(tl.int64)
    A2 = ()
    lam = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A_ptr + offs_d * s_ad + n * s_an, mask=md, other=0.0) * 1.4426950408889634,)
        lam = lam + (tl.full([BLOCK_D], 0.0, tl.float32),)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    lo = s * seg_len
    hi = tl.minimum(lo + seg_len, L)
    full = lo + (hi - lo) // TILE * TILE
    dt_row = dt_ptr + b * s_tb + d64 * s_td
    z_row = z_ptr + b * s_zb + d64 * s_zd
    g_row = g_ptr + b * s_gb + d64 * s_gd
    bc_row = bc_ptr + b * L * (2 * NP)
    dsum = tl.full([BLOCK_D], 0.0, tl.float32)
    if TILE > 1:  # the ragged end comes first in reverse order
        lam, dsum = _summary_walk(
            lam, dsum, A2, dt_row, z_row, g_row, bc_row, full, hi, bias, md,
            N, NP, BLOCK_D, 1, HAS_Z, HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
    lam, dsum = _summary_walk(
        lam, dsum, A2, dt_row, z_row, g_row, bc_row, lo, full, bias, md,
        N, NP, BLOCK_D, TILE, HAS_Z, HAS_BIAS, SOFTPLUS,
    )  # fmt: skip
    base = (b * (n_seg - 1) + j) * Dm + d64
    tl.store(dsum_ptr + base, dsum, mask=md)
    for n in tl.static_range(N):
        tl.store(P_ptr + base * N + n, lam[n], mask=md)


def _checkpoint_walk(
    h,
    A2,
    u_row,
    dt_row,
    bc_row,
    ck_row,
    lo,
    hi,
    row0,
    bias,
    md,
    Dm,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    """Tokens [lo, hi) forwards from h; stores the state entering each tile as checkpoint row
    ``row0 + (t0 - lo) // TILE`` (N rows of Dm values from ck_row, a (BLOCK_D,) pointer at this block's channels
    of row 0). Returns h at hi."""
    offs = tl.arange(0, TILE)[None, :]
    mask = md[:, None]
    for t in range(lo, hi, TILE):
        t0 = tl.multiple_of(t, TILE)
        row = (row0 + (t0 - lo) // TILE).to(tl.int64)
        for n in tl.static_range(N):
            tl.store(ck_row + (row * N + n) * Dm, h[n], mask=md)
        us = _columns(tl.load(u_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        ds = _columns(tl.load(dt_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        for j in tl.static_range(TILE):
            bs = _row(bc_row + (t0 + j) * (2 * NP), BLOCK_D, NP)
            dt, _slope = _dt_and_slope(ds[j].to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
            dtu = dt * us[j].to(tl.float32)
            new = ()
            for n in tl.static_range(N):
                new = new + (tl.exp2(dt * A2[n]) * h[n] + dtu * bs[n],)
            h = new
    return h


def _reverse_walk(
    lam,
    dA,
    dD,
    dbias,
    A2,
    u_row,
    dt_row,
    z_row,
    g_row,
    du_row,
    ddt_row,
    dz_row,
    bc_row,
    dbc_row,
    ck_row,
    lo,
    hi,
    row0,
    bias,
    d_skip,
    md,
    Dm,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    LANE_SUM: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Tiles of [lo, hi) in reverse, each restarted from its checkpoint (see :func:`_checkpoint_walk`). lam
    carries ``a_{t+1} lam_{t+1}`` (tuple of N (BLOCK_D,)); dA (tuple of N), dD, dbias: per-channel accumulators.
    Stores du, ddelta, dz per token and this block's dB|dC partial row per token (dbc_row: scalar pointer at
    token 0 of (L, 2 NP), dB then dC). Returns (lam, dA, dD, dbias)."""
    offs = tl.arange(0, TILE)[None, :]
    mask = md[:, None]
    zero = tl.full([BLOCK_D], 0.0, tl.float32)
    cols = tl.arange(0, 2 * NP)
    idx = tl.arange(0, BLOCK_D)
    for k in tl.range(0, (hi - lo) // TILE, num_stages=STAGES):  # STAGES > 1: the next tile's loads in flight
        t0 = tl.multiple_of(hi - (k + 1) * TILE, TILE)
        row = (row0 + (t0 - lo) // TILE).to(tl.int64)
        h = ()
        for n in tl.static_range(N):
            h = h + (tl.load(ck_row + (row * N + n) * Dm, mask=md, other=0.0),)
        us = _columns(tl.load(u_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        ds = _columns(tl.load(dt_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        gs = _columns(tl.load(g_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        if HAS_Z:
            zs = _columns(tl.load(z_row[:, None] + t0 + offs, mask=mask, other=0.0), BLOCK_D, TILE)
        # recompute the tile's states: hs holds the state entering the tile, then the one after each token
        hs = h
        dts = ()
        slopes = ()
        for jf in tl.static_range(TILE):
            bs = _row(bc_row + (t0 + jf) * (2 * NP), BLOCK_D, NP)
            dt, slope = _dt_and_slope(ds[jf].to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
            dts = dts + (dt,)
            slopes = slopes + (slope,)
            dtu = dt * us[jf].to(tl.float32)
            new = ()
            for n in tl.static_range(N):
                new = new + (tl.exp2(dt * A2[n]) * h[n] + dtu * bs[n],)
            h = new
            hs = hs + h
        # reverse through the tile
        dus = ()
        ddts = ()
        dzs = ()
        for j in tl.static_range(TILE - 1, -1, -1):
            bs = _row(bc_row + (t0 + j) * (2 * NP), BLOCK_D, NP)
            cs = _row(bc_row + (t0 + j) * (2 * NP) + NP, BLOCK_D, NP)
            u = us[j].to(tl.float32)
            dt = dts[j]
            g = gs[j].to(tl.float32)
            if HAS_Z:
                z = zs[j].to(tl.float32)
                y = zero
                for n in tl.static_range(N):
                    y = y + cs[n] * hs[(j + 1) * N + n]
                if HAS_D:
                    y = y + d_skip * u
                dy, dzf = _dy_of(g, z, True)
                dzs = (y * dzf,) + dzs
            else:
                dy = g
            dtu = dt * u
            lam_b = zero  # sum_n lam B
            ddt = zero  # sum_n lam A a h_{t-1}
            new = ()
            dB = ()
            dC = ()
            dA_new = ()
            for n in tl.static_range(N):
                a = tl.exp2(dt * A2[n])
                ln = cs[n] * dy + lam[n]
                q = ln * a * hs[j * N + n]
                dA_new = dA_new + (dA[n] + dt * q,)
                ddt = ddt + A2[n] * q
                lam_b = lam_b + ln * bs[n]
                dB = dB + (ln * dtu,)
                dC = dC + (dy * hs[(j + 1) * N + n],)
                new = new + (a * ln,)
            for _n in tl.static_range(N, NP):
                dB = dB + (zero,)
                dC = dC + (zero,)
            lam = new
            dA = dA_new
            ddt = ddt * 0.6931471805599453 + u * lam_b  # A2 = A log2 e: undo the factor once per token
            ddelta = ddt * slopes[j]
            du = dt * lam_b
            if HAS_D:
                du = du + d_skip * dy
                dD = dD + dy * u
            dbias = dbias + ddelta
            dus = (du,) + dus
            ddts = (ddelta,) + ddts
            dbc_tok = dbc_row + (t0 + j) * (2 * NP)
            if LANE_SUM:
                sums = _lane_sum(dB + dC, idx, BLOCK_D, 2 * NP)
                if 2 * NP >= BLOCK_D:
                    for i in tl.static_range(2 * NP // BLOCK_D):
                        tl.store(dbc_tok + idx * (2 * NP // BLOCK_D) + i, sums[i])
                else:
                    tl.store(dbc_tok + idx // (BLOCK_D // (2 * NP)), sums[0], mask=idx % (BLOCK_D // (2 * NP)) == 0)
            else:
                part = tl.reduce(_tile(dB + dC, BLOCK_D, 2 * NP), 0, SUM_OP)  # noqa: F821 (put in by LazyKernels)
                tl.store(dbc_tok + cols, part)
        tl.store(du_row[:, None] + t0 + offs, _tile(dus, BLOCK_D, TILE).to(du_row.dtype.element_ty), mask=mask)
        tl.store(ddt_row[:, None] + t0 + offs, _tile(ddts, BLOCK_D, TILE).to(ddt_row.dtype.element_ty), mask=mask)
        if HAS_Z:
            tl.store(dz_row[:, None] + t0 + offs, _tile(dzs, BLOCK_D, TILE).to(dz_row.dtype.element_ty), mask=mask)
    return lam, dA, dD, dbias


def _main_kernel(
    u_ptr,
    dt_ptr,
    z_ptr,
    g_ptr,
    bc_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    hs_ptr,
    R_ptr,
    ck_ptr,
    du_ptr,
    ddt_ptr,
    dz_ptr,
    dbc_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    Dm,
    L,
    seg_len,
    n_seg,
    n_fwd,
    n_rows,
    s_ub,
    s_ud,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_gb,
    s_gd,
    s_ad,
    s_an,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    LANE_SUM: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program (channel block, segment s, batch). hs: the forward's states (B, n_fwd, D, N), hs[b, s-1] entering
    s; R: the carried lam (B, S-1, D, N), R[b, S-2-s] entering s from the right (s < S-1); ck: checkpoints
    (B, n_rows, N, D). du, ddelta, dz: contiguous (B, D, L) in the input dtypes; dbc: (D blocks, B, L, 2 NP);
    dA: (B, S, N, D), dD, dbias: (B, S, D) per-segment partials (all fp32, contiguous)."""
    pid_d = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_b = tl.num_programs(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < Dm
    d64 = offs_d.to(tl.int64)
    A2 = ()
    h = ()
    lam = ()
    dA = ()
    for n in tl.static_range(N):
        A2 = A2 + (tl.load(A_ptr + offs_d * s_ad + n * s_an, mask=md, other=0.0) * 1.4426950408889634,)
        h = h + (tl.load(hs_ptr + ((b * n_fwd + s - 1) * Dm + d64) * N + n, mask=md & (s > 0), other=0.0),)
        right = R_ptr + ((b * (n_seg - 1) + n_seg - 2 - s) * Dm + d64) * N + n
        lam = lam + (tl.load(right, mask=md & (s < n_seg - 1), other=0.0),)
        dA = dA + (tl.full([BLOCK_D], 0.0, tl.float32),)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(D_ptr + offs_d, mask=md, other=0.0)
    lo = s * seg_len
    hi = tl.minimum(lo + seg_len, L)
    full = lo + (hi - lo) // TILE * TILE
    u_row = u_ptr + b * s_ub + d64 * s_ud
    dt_row = dt_ptr + b * s_tb + d64 * s_td
    z_row = z_ptr + b * s_zb + d64 * s_zd
    g_row = g_ptr + b * s_gb + d64 * s_gd
    out_off = (b * Dm + d64) * L  # du, ddelta, dz are contiguous
    bc_row = bc_ptr + b * L * (2 * NP)
    dbc_row = dbc_ptr + (pid_d * n_b + b) * L * (2 * NP)
    ck_row = ck_ptr + b * n_rows * N * Dm + d64
    # (a) checkpoints; the ragged end (last segment only) is walked token by token, its rows after L // TILE
    h = _checkpoint_walk(
        h, A2, u_row, dt_row, bc_row, ck_row, lo, full, lo // TILE, bias, md, Dm,
        N, NP, BLOCK_D, TILE, HAS_BIAS, SOFTPLUS,
    )  # fmt: skip
    if TILE > 1:
        h = _checkpoint_walk(
            h, A2, u_row, dt_row, bc_row, ck_row, full, hi, L // TILE, bias, md, Dm,
            N, NP, BLOCK_D, 1, HAS_BIAS, SOFTPLUS,
        )  # fmt: skip
    # (b) reverse, the ragged end first
    dD = tl.full([BLOCK_D], 0.0, tl.float32)
    dbias = tl.full([BLOCK_D], 0.0, tl.float32)
    if TILE > 1:
        lam, dA, dD, dbias = _reverse_walk(
            lam, dA, dD, dbias, A2, u_row, dt_row, z_row, g_row, du_ptr + out_off, ddt_ptr + out_off,
            dz_ptr + out_off, bc_row, dbc_row, ck_row, full, hi, L // TILE, bias, d_skip, md, Dm,
            N, NP, BLOCK_D, 1, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, LANE_SUM, 1,
        )  # fmt: skip
    lam, dA, dD, dbias = _reverse_walk(
        lam, dA, dD, dbias, A2, u_row, dt_row, z_row, g_row, du_ptr + out_off, ddt_ptr + out_off,
        dz_ptr + out_off, bc_row, dbc_row, ck_row, lo, full, lo // TILE, bias, d_skip, md, Dm,
        N, NP, BLOCK_D, TILE, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, LANE_SUM, STAGES,
    )  # fmt: skip
    seg = b * n_seg + s
    for n in tl.static_range(N):
        tl.store(dA_ptr + (seg * N + n) * Dm + d64, dA[n], mask=md)
    if HAS_D:
        tl.store(dD_ptr + seg * Dm + d64, dD, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + seg * Dm + d64, dbias, mask=md)


MAX_STATES = 16  # the dB|dC channel sums: 2N columns over one warp's 32 lanes

_KERNELS = LazyKernels(
    __name__,
    [
        _log1p_poly,
        _columns,
        _tile,
        _row,
        _carry_kernel,
        _dt_and_slope,
        _dy_of,
        _lane_sum,
        _summary_walk,
        _summary_kernel,
        _checkpoint_walk,
        _reverse_walk,
        _main_kernel,
    ],
)

# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def selective_scan_bwd_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    dout: Tensor,
    states: Tensor,
    seg_len: int,
    delta_softplus: bool = False,
    block_d: int = 32,
    num_warps: int = 1,
    token_tile: int = 2,
    lane_sum: bool = True,
    maxnreg: Optional[int] = 168,
    stages: int = 1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`gsmsr.ops.seq_scan_triton.selective_scan_fwd_triton` (semantics of
    :func:`gsmsr.ops.selective_scan_ref.selective_scan_ref`) given ``dout`` = dL/dout (batch, D, L).

    states, seg_len: from the forward with ``return_states=True`` on the same inputs (states (batch,
    max(S - 1, 1), D, N) fp32, S = ceil(L / seg_len)). token_tile: tokens per checkpoint (a power of two; reduced
    to the largest power of two dividing seg_len when S > 1). block_d, num_warps: as in the forward. lane_sum:
    sum dB and dC over channels by recursive halving with ``tl.gather`` (:func:`_lane_sum`) instead of one
    ``tl.reduce`` per column. maxnreg: register cap of the main launch on CUDA (None: the compiler's choice, 255
    at token_tile 4): 168 with token_tile 2 lets an SM hold 12 one-warp programs (72 bytes spilled, sm_90a).
    stages: software pipelining of the reverse walk's tile loop (``tl.range(num_stages=...)``; 2 puts the next
    tile's loads in flight through shared memory, cp.async; untimed, ~100 bytes spilled at the 168 cap).

    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), mamba-ssm's order: du, ddelta, dz (batch, D, L) in the
    dtypes of u, delta, z; dA (D, N) fp32; dB, dC (batch, N, L) in the dtypes of B, C; dD, ddelta_bias (D,) fp32;
    None for absent D, z, delta_bias.
    """
    check_operands(
        'selective_scan_bwd_triton', u, delta, A, B, C, D, z, delta_bias, dout, states,
        block_d=block_d, token_tile=token_tile, num_warps=num_warps,
    )  # fmt: skip
    batch, dim, length = u.shape
    n_state = A.shape[1]
    if n_state > MAX_STATES:
        raise ValueError(f'selective_scan_bwd_triton: at most {MAX_STATES} states, got {n_state}')
    seg_len = max(int(seg_len), 1)
    n_seg = -(-length // seg_len) if length else 1
    if n_seg > 1:
        token_tile = min(token_tile, seg_len & -seg_len)  # checkpoint tiles must not straddle segments
    if states.shape != (batch, max(n_seg - 1, 1), dim, n_state):
        raise ValueError(f'selective_scan_bwd_triton: states {tuple(states.shape)} do not match seg_len {seg_len}')

    u, delta, dout, z = (unit_stride(t) for t in (u, delta, dout, z))
    Af = A.float()
    Df = D.float().contiguous() if D is not None else None
    bias = delta_bias.float().contiguous() if delta_bias is not None else None
    states = states.float().contiguous()
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    du = torch.empty(batch, dim, length, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, length, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, dim, length, device=dev, dtype=z.dtype) if z is not None else None
    n_dblocks = -(-dim // block_d)
    if length == 0 or batch == 0 or dim == 0:
        zero_bc = torch.zeros(batch, n_state, length, **f32)
        return (
            du.zero_(),
            ddelta.zero_(),
            torch.zeros(dim, n_state, **f32),
            zero_bc.to(B.dtype),
            zero_bc.to(C.dtype),
            torch.zeros(dim, **f32) if D is not None else None,
            dz.zero_() if dz is not None else None,
            torch.zeros(dim, **f32) if delta_bias is not None else None,
        )

    # B and C packed token-major as in the forward (NP a power of two: the dB|dC tile has 2 NP columns)
    n_pad = max(4, 1 << (n_state - 1).bit_length())
    bc = pack_bc(B, C, n_pad)
    n_carry = max(n_seg - 1, 1)
    P = torch.empty(batch, n_carry, dim, n_state, **f32)
    dsum = torch.empty(batch, n_carry, dim, **f32)
    n_rows = length // token_tile + length % token_tile
    ck = torch.empty(batch, n_rows, n_state, dim, **f32)
    dbc = torch.empty(n_dblocks, batch, length, 2 * n_pad, **f32)
    dA_part = torch.empty(batch, n_seg, n_state, dim, **f32)
    dD_part = torch.empty(batch, n_seg, dim, **f32) if D is not None else None
    dbias_part = torch.empty(batch, n_seg, dim, **f32) if delta_bias is not None else None

    interpret = interpret_for(u)
    k = _KERNELS(interpret)
    zz = z if z is not None else u  # placeholders for absent operands: never read or written (constexpr flags)
    flags = dict(
        N=n_state,
        NP=n_pad,
        BLOCK_D=block_d,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus),
        num_warps=num_warps,
    )
    with torch.cuda.device(dev) if u.is_cuda else nullcontext():
        if n_seg > 1:
            k.summary_kernel[(n_dblocks, n_seg - 1, batch)](
                delta, zz, dout, bc, Af, bias if bias is not None else Af, P, dsum,
                dim, length, seg_len, n_seg,
                *delta.stride()[:2], *zz.stride()[:2], *dout.stride()[:2], *Af.stride(),
                TILE=8 if seg_len % 8 == 0 else token_tile, **flags,
            )  # fmt: skip
            lanes = 128
            k.carry_kernel[(-(-dim * n_state // lanes), batch)](
                P, dsum, Af, dim, n_seg - 1, *Af.stride(), N=n_state, BLOCK=lanes, SEG_BLOCK=8, num_warps=4
            )
        k.main_kernel[(n_dblocks, n_seg, batch)](
            u, delta, zz, dout, bc, Af, Df if Df is not None else Af, bias if bias is not None else Af,
            states, P, ck, du, ddelta, dz if dz is not None else du, dbc, dA_part,
            dD_part if dD_part is not None else dA_part, dbias_part if dbias_part is not None else dA_part,
            dim, length, seg_len, n_seg, states.shape[1], n_rows,
            *u.stride()[:2], *delta.stride()[:2], *zz.stride()[:2], *dout.stride()[:2], *Af.stride(),
            TILE=token_tile, HAS_D=D is not None, LANE_SUM=bool(lane_sum), STAGES=stages, **flags,
            **({'maxnreg': maxnreg} if maxnreg and not interpret else {}),
        )  # fmt: skip
    # deterministic reductions of the partials (fixed order)
    dbc_sum = dbc.sum(0)  # (batch, L, 2 NP)
    # .contiguous() copies: dB and dC must not share storage (custom ops refuse aliased outputs)
    dB = dbc_sum[:, :, :n_state].transpose(1, 2).contiguous().to(B.dtype)
    dC = dbc_sum[:, :, n_pad : n_pad + n_state].transpose(1, 2).contiguous().to(C.dtype)
    dA = dA_part.sum((0, 1)).t().contiguous()
    dD = dD_part.sum((0, 1)) if dD_part is not None else None
    dbias = dbias_part.sum((0, 1)) if dbias_part is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias
