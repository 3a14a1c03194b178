"""Selective scan (Mamba-1: real A, input-dependent B and C with one group) in Triton, forward and backward.

Why another kernel: mamba-ssm's CUDA kernel gives each (batch, channel) pair one thread block that walks the whole
sequence. GSM scans batch 1, 384 channels and up to ~300k tokens, i.e. about three blocks per SM, each walking a very
long sequence: the GPU is mostly waiting on latency (4.1 ms a call at L = 288000 on an H200 against a ~0.4 ms
memory floor, benchmarks/NOTES.md). Here the sequence is also cut into chunks of ``block_l`` tokens that are
processed in parallel, with a short scan over the chunk boundaries in between. (Speed not measured yet:
benchmarks/bench_scan.py.)

Recurrence, per batch b, channel d and state n (``a_t = exp(delta_t A[d, n])``, ``x_t = delta_t u_t B[b, n, t]``)::

    h_t = a_t h_{t-1} + x_t,   y_t = sum_n C[b, n, t] h_t + D[d] u_t,   out_t = y_t * silu(z_t)

Forward, three launches:

1. *summary* (one program per channel block x chunk x batch): the chunk's delta sum (its decay is
   ``exp(A * sum delta)``) and its final state from a zero start. The latter is a weighted reduction,
   ``S_c = sum_t exp(A * sum_{r>t} delta_r) x_t``, so this pass needs no scan, only a cumulative sum of delta.
2. *carry scan* (one program per block of (channel, state) lanes x batch): ``H_{c+1} = exp(A Delta_c) H_c + S_c``,
   the state entering every chunk. Walks the chunks in blocks of ``carry_chunks``, each block an associative scan.
3. *output*: every chunk rescans its tokens from ``H_c`` and writes y.

Backward, the same three launches in reverse time. With ``beta_t = C_t dy_t`` the state gradient obeys
``dh_t = beta_t + a_{t+1} dh_{t+1}``. The carry passed between chunks is ``G_c = a_{s_c} dh_{s_c}`` (``s_c`` the
chunk's first token), so that it has the same chunk decay as the forward carry:
``G_c = exp(A Delta_c) G_{c+1} + sum_t exp(A * sum_{s_c<=r<=t} delta_r) beta_t``. The last launch recomputes h of
each chunk from the saved chunk-start states (no (b, D, N, L) tensor is ever stored), runs the reverse scan for dh
and forms every gradient. dB and dC are sums over channels, so each backward program owns a chunk and loops over
(a group of) the channels, accumulating them in registers: no atomics, deterministic. dA, dD and d(delta_bias)
are written per (batch, chunk) and summed on the host.

Why ``tl.associative_scan`` over a (block_d, N, block_l) tile rather than a per-token loop: the tile's loads of u,
delta, z are contiguous along L (coalesced), the B/C tile is shared by ``block_d`` channels, and Triton cannot index
registers, so a token loop would need one strided scalar load per channel and token. The combine function is the
composition of affine maps ``h -> a h + b``; the backward uses the same one with ``reverse=True``.

Memory: inputs and outputs O(B D L); carries and per-chunk partials O(B D N L / block_l) in float32; backward dB/dC
partials (groups, B, N, L) in float32. Everything is accumulated in float32 whatever the input dtype.

On CPU tensors the kernels run through Triton's interpreter. The interpreter is chosen when ``@triton.jit`` wraps a
function (``triton.knobs.runtime.interpret``, i.e. ``TRITON_INTERPRET``, is read at decoration time, not at launch),
so the kernel bodies below are plain functions that :func:`_kernels` wraps lazily, once per mode, inside a knob
scope that restores the knob and the environment: CUDA tensors get compiled kernels and CPU tensors interpreted
ones in the same process. Triton's own library functions (``tl.sum``, ``tl.cumsum``, ...) are wrapped once, when
triton.language is imported, so the kernels avoid them (see :func:`_sum`). With TRITON_INTERPRET=1 set before that
import everything is interpreted, CUDA tensors included. Importing this module does not need Triton.
"""

from __future__ import annotations

import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

try:  # the kernel bodies only reference ``tl`` when they are compiled or interpreted
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the compiled, fast path)."""
    return triton is not None and torch.cuda.is_available()


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes. All must be powers of two. Only ``block_l`` changes the result (rounding); the rest is speed.

    The defaults are not tuned on a GPU yet (``benchmarks/bench_scan.py --sweep``). They were picked from sm_90
    register counts (ptxas, no GPU needed): the output kernel needs 98 registers at (2, 16, 128) tiles with 8 warps,
    the backward kernel ~25 registers per tile element held by a thread, so (1, 16, 128) tiles over 16 warps
    (4 elements per thread, 124 registers, no spills); 8 elements per thread would take 240.
    """

    block_l: int = 128  # tokens per chunk (one tile); carries take B*D*N*L/block_l floats
    block_d: int = 2  # channels per program in the forward kernels and the backward summary
    block_d_bwd: int = 1  # channels per loop step of the backward kernel
    num_warps: int = 8  # forward kernels, the backward summary and the carry scan
    num_warps_bwd: int = 16  # backward kernel
    carry_chunks: int = 64  # chunks per step of the carry scan
    carry_lanes: int = 32  # (channel, state) lanes per carry-scan program
    bwd_groups: int = 0  # channel groups of the backward kernel (0: enough programs for ~4 per SM)

    def __post_init__(self) -> None:
        for name in ('block_l', 'block_d', 'block_d_bwd', 'num_warps', 'num_warps_bwd', 'carry_chunks', 'carry_lanes'):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f'ScanConfig.{name} must be a power of two, got {value}')


DEFAULT_CONFIG = ScanConfig()


# ---------------------------------------------------------------------------------------------------------------
# Kernel bodies. Plain functions here; _kernels() turns them into Triton JIT (or interpreted) functions.
# Tiles are (BLOCK_D channels, BLOCK_N states, BLOCK_L tokens); exp(x) is computed as exp2(x * 1.4426950408889634)
# with log2(e) folded into A (a literal: a kernel may only read constexpr globals).
# ---------------------------------------------------------------------------------------------------------------


def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier map h -> a1 h + b1, (a2, b2) the later one; returns their composition. For a
    # reverse scan Triton passes the later elements' accumulator first, which is the composition the backward
    # recurrence dh_t = beta_t + alpha_t dh_{t+1} needs with the same formula.
    return a1 * a2, a2 * b1 + b2


def _softplus(x):
    # torch's softplus (threshold 20). log1p(e) via Kahan's trick (tl has no log1p): exact where log(1 + e)
    # would round 1 + e, i.e. for very negative x.
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# tl.sum / tl.cumsum are themselves @triton.jit functions, wrapped (compiled or interpreted) when triton.language
# is imported, so an interpreted kernel cannot call them unless TRITON_INTERPRET was set before that import. These
# two use the core builtins with Triton's own add combine (``_SUM_OP``, see _kernels): the same IR as tl.sum and
# tl.cumsum when compiled, and the interpreter recognises that combine and uses numpy's sum / cumsum.
def _sum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _SUM_OP)  # noqa: F821  (set per mode in _kernels' namespace)


def _cumsum(x, AXIS: tl.constexpr, REVERSE: tl.constexpr):
    return tl.associative_scan(x, AXIS, _SUM_OP, reverse=REVERSE)  # noqa: F821


def _add_combine(a, b):  # fallback for _SUM_OP if a Triton version lacks tl.standard._sum_combine
    return a + b


def _summary_kernel(
    u_ptr,
    dt_ptr,
    z_ptr,
    g_ptr,
    bc_ptr,
    A_ptr,
    bias_ptr,
    dsum_ptr,
    s_ptr,
    n_dblocks,
    n_chunks,
    Dm,
    L,
    N,
    s_ub,
    s_ud,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_gb,
    s_gd,
    s_bcb,
    s_bcn,
    s_ad,
    s_an,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Per (channel block, chunk, batch): forward, the chunk's delta sum -> dsum (B, n_chunks, D) and its final
    state from zero, ``sum_t exp(A sum_{r>t} delta_r) delta_t u_t B_t`` -> s (B, n_chunks, D, N). Backward, the
    chunk's contribution to ``G_c = a_{s_c} dh_{s_c}``, ``sum_t exp(A sum_{r<=t} delta_r) C_t dy_t`` -> s.
    bc_ptr is B (forward) or C (backward); g is the output gradient (backward only)."""
    pid = tl.program_id(0)
    pid_d = pid % n_dblocks
    rest = pid // n_dblocks
    c = rest % n_chunks
    b = (rest // n_chunks).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = c * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < Dm
    mn = offs_n < N
    m_dl = md[:, None] & (offs_l < L)[None, :]
    m_dn = md[:, None] & mn[None, :]

    dt = tl.load(dt_ptr + b * s_tb + offs_d[:, None] * s_td + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=md, other=0.0)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(m_dl, dt, 0.0)  # padding tokens are identity steps: a = 1, x = 0
    A2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m_dn, other=0.0) * 1.4426950408889634
    bc = tl.load(
        bc_ptr + b * s_bcb + offs_n[:, None] * s_bcn + offs_l[None, :],
        mask=mn[:, None] & (offs_l < L)[None, :],
        other=0.0,
    ).to(tl.float32)
    if BACKWARD:
        w = tl.load(g_ptr + b * s_gb + offs_d[:, None] * s_gd + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + offs_l[None, :], mask=m_dl, other=0.0).to(
                tl.float32
            )
            w = w * z * _sigmoid(z)  # dy = dout * silu(z)
        expo = _cumsum(dt, 1, False)  # decay from the chunk start through token t (inclusive)
    else:
        u = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
        w = dt * u
        # decay after token t to the chunk end. A reverse cumsum, not (total - prefix): its rounding error is
        # relative to the suffix itself, so the weights of late tokens stay accurate in long chunks.
        expo = _cumsum(dt, 1, True) - dt
        tl.store(dsum_ptr + (b * n_chunks + c) * Dm + offs_d, _sum(dt, 1), mask=md)
    decay = tl.exp2(A2[:, :, None] * expo[:, None, :])  # (BLOCK_D, BLOCK_N, BLOCK_L)
    s = _sum(decay * bc[None, :, :] * w[:, None, :], 2)  # (BLOCK_D, BLOCK_N)
    tl.store(s_ptr + ((b * n_chunks + c) * Dm + offs_d[:, None]) * N + offs_n[None, :], s, mask=m_dn)


def _carry_kernel(
    dsum_ptr,
    s_ptr,
    A_ptr,
    x_ptr,
    n_chunks,
    Dm,
    N,
    s_ad,
    s_an,
    REVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per (lane block, batch), lanes = flattened (channel, state): the state entering every chunk.

    Forward: x[c] = H_c with H_0 = 0, H_{c+1} = P_c H_c + s[c]. Reverse: x[c] = G_{c+1} with G_{n_chunks} = 0,
    G_c = P_c G_{c+1} + s[c]. P_c = exp(A dsum[c]). dsum (B, n_chunks, D); s, x (B, n_chunks, D, N).
    The inclusive scan's result for chunk c is stored at c + 1 (c - 1 in reverse): the shift that makes it
    exclusive costs nothing in memory."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DN = Dm * N
    lanes = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = lanes < DN
    d = lanes // N
    n = lanes % N
    A2 = tl.load(A_ptr + d * s_ad + n * s_an, mask=mk, other=0.0) * 1.4426950408889634
    carry = tl.full([BLOCK_K], 0.0, tl.float32)
    if REVERSE:
        edge = n_chunks - 1
    else:
        edge = 0
    tl.store(x_ptr + (b * n_chunks + edge) * DN + lanes, carry, mask=mk)  # nothing flows into the edge chunk
    n_blocks = (n_chunks + BLOCK_C - 1) // BLOCK_C
    for i in range(n_blocks):
        if REVERSE:
            blk = n_blocks - 1 - i
        else:
            blk = i
        cs = blk * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = cs < n_chunks
        m = mc[:, None] & mk[None, :]
        rows = b * n_chunks + cs  # (BLOCK_C,) int64
        dsum = tl.load(dsum_ptr + rows[:, None] * Dm + d[None, :], mask=m, other=0.0)
        p = tl.exp2(dsum * A2[None, :])  # padding chunks: p = 1, s = 0
        s = tl.load(s_ptr + rows[:, None] * DN + lanes[None, :], mask=m, other=0.0)
        pc, sc = tl.associative_scan((p, s), axis=0, combine_fn=_affine_combine, reverse=REVERSE)
        h = pc * carry[None, :] + sc  # (BLOCK_C, BLOCK_K)
        if REVERSE:
            tl.store(x_ptr + (rows[:, None] - 1) * DN + lanes[None, :], h, mask=m & (cs > 0)[:, None])
            carry = _sum(tl.where((cs == blk * BLOCK_C)[:, None], h, 0.0), 0)
        else:
            tl.store(x_ptr + (rows[:, None] + 1) * DN + lanes[None, :], h, mask=m & (cs < n_chunks - 1)[:, None])
            carry = _sum(tl.where((cs == blk * BLOCK_C + BLOCK_C - 1)[:, None], h, 0.0), 0)


def _output_kernel(
    u_ptr,
    dt_ptr,
    z_ptr,
    B_ptr,
    C_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    h0_ptr,
    out_ptr,
    n_dblocks,
    n_chunks,
    Dm,
    L,
    N,
    s_ub,
    s_ud,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_Bb,
    s_Bn,
    s_Cb,
    s_Cn,
    s_ad,
    s_an,
    s_ob,
    s_od,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Per (channel block, chunk, batch): rescan the chunk from its entering state h0 (B, n_chunks, D, N) and
    write out (B, D, L)."""
    pid = tl.program_id(0)
    pid_d = pid % n_dblocks
    rest = pid // n_dblocks
    c = rest % n_chunks
    b = (rest // n_chunks).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = c * BLOCK_L + tl.arange(0, BLOCK_L)
    md = offs_d < Dm
    mn = offs_n < N
    ml = offs_l < L
    m_dl = md[:, None] & ml[None, :]
    m_dn = md[:, None] & mn[None, :]
    m_nl = mn[:, None] & ml[None, :]

    u = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * s_tb + offs_d[:, None] * s_td + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=md, other=0.0)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(m_dl, dt, 0.0)
    A2 = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m_dn, other=0.0) * 1.4426950408889634
    Bt = tl.load(B_ptr + b * s_Bb + offs_n[:, None] * s_Bn + offs_l[None, :], mask=m_nl, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_Cb + offs_n[:, None] * s_Cn + offs_l[None, :], mask=m_nl, other=0.0).to(tl.float32)

    a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
    x = (dt * u)[:, None, :] * Bt[None, :, :]
    acum, xcum = tl.associative_scan((a, x), axis=2, combine_fn=_affine_combine)
    h0 = tl.load(h0_ptr + ((b * n_chunks + c) * Dm + offs_d[:, None]) * N + offs_n[None, :], mask=m_dn, other=0.0)
    h = acum * h0[:, :, None] + xcum
    y = _sum(h * Ct[None, :, :], 1)  # (BLOCK_D, BLOCK_L)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=md, other=0.0)[:, None] * u
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + offs_l[None, :], mask=m_dl, other=0.0).to(tl.float32)
        y = y * z * _sigmoid(z)
    tl.store(out_ptr + b * s_ob + offs_d[:, None] * s_od + offs_l[None, :], y, mask=m_dl)


def _backward_kernel(
    u_ptr,
    dt_ptr,
    z_ptr,
    g_ptr,
    B_ptr,
    C_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    h0_ptr,
    gin_ptr,
    du_ptr,
    ddt_ptr,
    dz_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    n_chunks,
    n_batch,
    blocks_per_group,
    Dm,
    L,
    N,
    s_ub,
    s_ud,
    s_tb,
    s_td,
    s_zb,
    s_zd,
    s_gb,
    s_gd,
    s_Bb,
    s_Bn,
    s_Cb,
    s_Cn,
    s_ad,
    s_an,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Per (chunk, batch, channel group): every gradient of the chunk.

    h0 (B, n_chunks, D, N): forward state entering each chunk; gin (B, n_chunks, D, N): G_{c+1}, the backward carry
    entering from the next chunk. du, ddt, dz are (B, D, L) contiguous; dB/dC partials (groups, B, N, L);
    dA partials (B, n_chunks, D, N); dD, dbias partials (B, n_chunks, D)."""
    pid = tl.program_id(0)
    c = pid % n_chunks
    rest = pid // n_chunks
    b = (rest % n_batch).to(tl.int64)
    grp = rest // n_batch
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = c * BLOCK_L + tl.arange(0, BLOCK_L)
    mn = offs_n < N
    ml = offs_l < L
    m_nl = mn[:, None] & ml[None, :]
    # tokens whose successor lies in this chunk; the last token's successor enters through G_{c+1}
    ml_next = (offs_l + 1 < L) & (offs_l + 1 < (c + 1) * BLOCK_L)
    Bt = tl.load(B_ptr + b * s_Bb + offs_n[:, None] * s_Bn + offs_l[None, :], mask=m_nl, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + b * s_Cb + offs_n[:, None] * s_Cn + offs_l[None, :], mask=m_nl, other=0.0).to(tl.float32)
    dB_acc = tl.full([BLOCK_N, BLOCK_L], 0.0, tl.float32)
    dC_acc = tl.full([BLOCK_N, BLOCK_L], 0.0, tl.float32)
    row = b * n_chunks + c  # (batch, chunk) row of the partials

    for i in range(blocks_per_group):
        offs_d = (grp * blocks_per_group + i) * BLOCK_D + tl.arange(0, BLOCK_D)
        md = offs_d < Dm
        m_dl = md[:, None] & ml[None, :]
        m_dn = md[:, None] & mn[None, :]
        o_dl = offs_d[:, None] * L + offs_l[None, :]  # into the contiguous gradients

        u = tl.load(u_ptr + b * s_ub + offs_d[:, None] * s_ud + offs_l[None, :], mask=m_dl, other=0.0)
        u = u.to(tl.float32)
        t_ptrs = dt_ptr + b * s_tb + offs_d[:, None] * s_td + offs_l[None, :]
        raw = tl.load(t_ptrs, mask=m_dl, other=0.0).to(tl.float32)
        # delta of the next token, for a_{t+1} in the dh recurrence (Triton has no register shift)
        m_next = md[:, None] & ml_next[None, :]
        raw_next = tl.load(t_ptrs + 1, mask=m_next, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=md, other=0.0)[:, None]
            raw += bias
            raw_next += bias
        if SOFTPLUS:
            dt = _softplus(raw)
            dt_next = _softplus(raw_next)
        else:
            dt = raw
            dt_next = raw_next
        dt = tl.where(m_dl, dt, 0.0)
        dt_next = tl.where(m_next, dt_next, 0.0)  # a = 1 where the successor is outside the chunk
        A = tl.load(A_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m_dn, other=0.0)
        A2 = A * 1.4426950408889634

        # forward states of the chunk
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BLOCK_D, BLOCK_N, BLOCK_L)
        dtu = dt * u
        x = dtu[:, None, :] * Bt[None, :, :]
        acum, xcum = tl.associative_scan((a, x), axis=2, combine_fn=_affine_combine)
        h0 = tl.load(h0_ptr + (row * Dm + offs_d[:, None]) * N + offs_n[None, :], mask=m_dn, other=0.0)
        h = acum * h0[:, :, None] + xcum
        ah = h - x  # a_t h_{t-1}: all the gradients need of h after dC (fewer live tiles)
        y = _sum(h * Ct[None, :, :], 1)  # (BLOCK_D, BLOCK_L)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=md, other=0.0)
            y += Dv[:, None] * u
        g = tl.load(g_ptr + b * s_gb + offs_d[:, None] * s_gd + offs_l[None, :], mask=m_dl, other=0.0)
        g = g.to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + b * s_zb + offs_d[:, None] * s_zd + offs_l[None, :], mask=m_dl, other=0.0)
            z = z.to(tl.float32)
            sz = _sigmoid(z)
            tl.store(dz_ptr + b * Dm * L + o_dl, g * y * sz * (1.0 + z * (1.0 - sz)), mask=m_dl)
            dy = g * z * sz
        else:
            dy = g
        dC_acc += _sum(dy[:, None, :] * h, 0)

        # dh_t = C_t dy_t + a_{t+1} dh_{t+1}, entered at the chunk end by G_{c+1}
        a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
        beta = Ct[None, :, :] * dy[:, None, :]
        ra, rb = tl.associative_scan((a_next, beta), axis=2, combine_fn=_affine_combine, reverse=True)
        gin = tl.load(gin_ptr + (row * Dm + offs_d[:, None]) * N + offs_n[None, :], mask=m_dn, other=0.0)
        dh = ra * gin[:, :, None] + rb

        dB_acc += _sum(dh * dtu[:, None, :], 0)
        sdhB = _sum(dh * Bt[None, :, :], 1)  # (BLOCK_D, BLOCK_L)
        w = dh * ah  # dh_t * a_t * h_{t-1}
        ddt = u * sdhB + _sum(w * A[:, :, None], 1)
        du = dt * sdhB
        if HAS_D:
            du += dy * Dv[:, None]
            tl.store(dD_ptr + row * Dm + offs_d, _sum(dy * u, 1), mask=md)
        tl.store(dA_ptr + (row * Dm + offs_d[:, None]) * N + offs_n[None, :], _sum(w * dt[:, None, :], 2), mask=m_dn)
        if SOFTPLUS:
            ddt = ddt * _sigmoid(raw)
        ddt = tl.where(m_dl, ddt, 0.0)
        if HAS_BIAS:
            tl.store(dbias_ptr + row * Dm + offs_d, _sum(ddt, 1), mask=md)
        tl.store(du_ptr + b * Dm * L + o_dl, du, mask=m_dl)
        tl.store(ddt_ptr + b * Dm * L + o_dl, ddt, mask=m_dl)

    o_nl = ((grp.to(tl.int64) * n_batch + b) * N + offs_n[:, None]) * L + offs_l[None, :]
    tl.store(dB_ptr + o_nl, dB_acc, mask=m_nl)
    tl.store(dC_ptr + o_nl, dC_acc, mask=m_nl)


_HELPERS = (_affine_combine, _softplus, _sigmoid, _sum, _cumsum, _add_combine)
_KERNELS = (_summary_kernel, _carry_kernel, _output_kernel, _backward_kernel)
_built: Dict[bool, types.SimpleNamespace] = {}


def _kernels(interpret: bool) -> types.SimpleNamespace:
    """The JIT functions, compiled (``interpret=False``) or interpreted, built on first use.

    Each mode gets its own globals dict, so a kernel finds the helpers of its own mode by name and the
    interpreter's additions to a kernel's globals stay out of this module."""
    if triton is None:
        raise RuntimeError('selective_scan_triton needs the triton package')
    if interpret not in _built:
        namespace = {'__name__': __name__, 'tl': tl, 'triton': triton}
        jitted = {}
        with triton.knobs.runtime.scope():  # restores the knob and TRITON_INTERPRET afterwards
            triton.knobs.runtime.interpret = interpret
            for fn in _HELPERS + _KERNELS:
                copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
                copy.__annotations__ = dict(fn.__annotations__)
                copy.__doc__ = fn.__doc__
                copy.__qualname__ = fn.__qualname__
                namespace[fn.__name__] = jitted[fn.__name__.lstrip('_')] = triton.jit(copy)
        # Triton's add combine, jitted when triton.language was imported: identical code when compiled, and the
        # interpreter's numpy fast path for sums keys on this very object (a combine of ours would be run
        # element by element in Python).
        namespace['_SUM_OP'] = getattr(tl.standard, '_sum_combine', None) or namespace['_add_combine']
        _built[interpret] = types.SimpleNamespace(**jitted)
    return _built[interpret]


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


def _interpret(u: Tensor) -> bool:
    """Interpret on CPU tensors, and everywhere when TRITON_INTERPRET was set (then Triton's own library
    functions are interpreted ones and cannot be compiled)."""
    return not u.is_cuda or bool(triton.knobs.runtime.interpret)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _bwd_groups(cfg: ScanConfig, n_dblocks: int, n_chunks: int, batch: int, device: torch.device) -> int:
    """Channel groups of the backward kernel: one group keeps dB/dC in registers across all channels; more groups
    add programs when there are few chunks, at the cost of a (groups, B, N, L) partial sum."""
    if cfg.bwd_groups > 0:
        groups = cfg.bwd_groups
    elif device.type == 'cuda':
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        groups = _ceil_div(target, n_chunks * batch)
    else:
        groups = 1
    groups = max(1, min(groups, n_dblocks))
    return _ceil_div(n_dblocks, _ceil_div(n_dblocks, groups))  # no empty groups


def _forward(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    softplus: bool,
    cfg: ScanConfig,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns out (batch, D, L) in u's dtype, the chunk delta sums (batch, n_chunks, D) and the chunk-start
    states (batch, n_chunks, D, N), both float32."""
    k = _kernels(_interpret(u))
    batch, dim, length = u.shape
    nstate = A.shape[1]
    n_chunks = _ceil_div(length, cfg.block_l)
    n_dblocks = _ceil_div(dim, cfg.block_d)
    block_n = triton.next_power_of_2(nstate)
    f32 = dict(device=u.device, dtype=torch.float32)
    dsum = torch.empty(batch, n_chunks, dim, **f32)
    s = torch.empty(batch, n_chunks, dim, nstate, **f32)
    h0 = torch.empty(batch, n_chunks, dim, nstate, **f32)
    out = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
    zz = z if z is not None else u
    grid = (n_dblocks * n_chunks * batch,)
    k.summary_kernel[grid](
        u,
        delta,
        zz,
        u,
        B,
        A,
        delta_bias if delta_bias is not None else A,
        dsum,
        s,
        n_dblocks,
        n_chunks,
        dim,
        length,
        nstate,
        u.stride(0),
        u.stride(1),
        delta.stride(0),
        delta.stride(1),
        zz.stride(0),
        zz.stride(1),
        u.stride(0),
        u.stride(1),
        B.stride(0),
        B.stride(1),
        A.stride(0),
        A.stride(1),
        HAS_Z=False,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        BACKWARD=False,
        BLOCK_D=cfg.block_d,
        BLOCK_N=block_n,
        BLOCK_L=cfg.block_l,
        num_warps=cfg.num_warps,
    )
    k.carry_kernel[(_ceil_div(dim * nstate, cfg.carry_lanes), batch)](
        dsum,
        s,
        A,
        h0,
        n_chunks,
        dim,
        nstate,
        A.stride(0),
        A.stride(1),
        REVERSE=False,
        BLOCK_C=cfg.carry_chunks,
        BLOCK_K=cfg.carry_lanes,
        num_warps=cfg.num_warps,
    )
    k.output_kernel[grid](
        u,
        delta,
        zz,
        B,
        C,
        A,
        D if D is not None else A,
        delta_bias if delta_bias is not None else A,
        h0,
        out,
        n_dblocks,
        n_chunks,
        dim,
        length,
        nstate,
        u.stride(0),
        u.stride(1),
        delta.stride(0),
        delta.stride(1),
        zz.stride(0),
        zz.stride(1),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        A.stride(0),
        A.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        BLOCK_D=cfg.block_d,
        BLOCK_N=block_n,
        BLOCK_L=cfg.block_l,
        num_warps=cfg.num_warps,
    )
    return out, dsum, h0


def _backward(
    dout: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    softplus: bool,
    dsum: Tensor,
    h0: Tensor,
    cfg: ScanConfig,
) -> Dict[str, Optional[Tensor]]:
    """Gradients of every input, in the inputs' dtypes (None for absent optional inputs)."""
    k = _kernels(_interpret(u))
    batch, dim, length = u.shape
    nstate = A.shape[1]
    n_chunks = dsum.shape[1]
    block_n = triton.next_power_of_2(nstate)
    dev = u.device
    f32 = dict(device=dev, dtype=torch.float32)
    zz = z if z is not None else u
    bias = delta_bias if delta_bias is not None else A

    # reverse carries G_{c+1} entering every chunk from its right
    s = torch.empty(batch, n_chunks, dim, nstate, **f32)
    gin = torch.empty(batch, n_chunks, dim, nstate, **f32)
    n_dblocks = _ceil_div(dim, cfg.block_d)
    k.summary_kernel[(n_dblocks * n_chunks * batch,)](
        u,
        delta,
        zz,
        dout,
        C,
        A,
        bias,
        dsum,
        s,
        n_dblocks,
        n_chunks,
        dim,
        length,
        nstate,
        u.stride(0),
        u.stride(1),
        delta.stride(0),
        delta.stride(1),
        zz.stride(0),
        zz.stride(1),
        dout.stride(0),
        dout.stride(1),
        C.stride(0),
        C.stride(1),
        A.stride(0),
        A.stride(1),
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        BACKWARD=True,
        BLOCK_D=cfg.block_d,
        BLOCK_N=block_n,
        BLOCK_L=cfg.block_l,
        num_warps=cfg.num_warps,
    )
    k.carry_kernel[(_ceil_div(dim * nstate, cfg.carry_lanes), batch)](
        dsum,
        s,
        A,
        gin,
        n_chunks,
        dim,
        nstate,
        A.stride(0),
        A.stride(1),
        REVERSE=True,
        BLOCK_C=cfg.carry_chunks,
        BLOCK_K=cfg.carry_lanes,
        num_warps=cfg.num_warps,
    )
    del s

    n_dblocks = _ceil_div(dim, cfg.block_d_bwd)
    groups = _bwd_groups(cfg, n_dblocks, n_chunks, batch, dev)
    blocks_per_group = _ceil_div(n_dblocks, groups)
    du = torch.empty(batch, dim, length, device=dev, dtype=u.dtype)
    ddelta = torch.empty(batch, dim, length, device=dev, dtype=delta.dtype)
    dz = torch.empty(batch, dim, length, device=dev, dtype=z.dtype) if z is not None else None
    single = groups == 1  # one group writes dB/dC in their final dtype directly
    dB = torch.empty(groups, batch, nstate, length, device=dev, dtype=B.dtype if single else torch.float32)
    dC = torch.empty(groups, batch, nstate, length, device=dev, dtype=C.dtype if single else torch.float32)
    dA = torch.empty(batch, n_chunks, dim, nstate, **f32)
    dD = torch.empty(batch, n_chunks, dim, **f32) if D is not None else None
    dbias = torch.empty(batch, n_chunks, dim, **f32) if delta_bias is not None else None
    k.backward_kernel[(n_chunks * batch * groups,)](
        u,
        delta,
        zz,
        dout,
        B,
        C,
        A,
        D if D is not None else A,
        bias,
        h0,
        gin,
        du,
        ddelta,
        dz if dz is not None else du,
        dB,
        dC,
        dA,
        dD if dD is not None else dA,
        dbias if dbias is not None else dA,
        n_chunks,
        batch,
        blocks_per_group,
        dim,
        length,
        nstate,
        u.stride(0),
        u.stride(1),
        delta.stride(0),
        delta.stride(1),
        zz.stride(0),
        zz.stride(1),
        dout.stride(0),
        dout.stride(1),
        B.stride(0),
        B.stride(1),
        C.stride(0),
        C.stride(1),
        A.stride(0),
        A.stride(1),
        HAS_D=D is not None,
        HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus,
        BLOCK_D=cfg.block_d_bwd,
        BLOCK_N=block_n,
        BLOCK_L=cfg.block_l,
        num_warps=cfg.num_warps_bwd,
    )
    return dict(
        u=du,
        delta=ddelta,
        z=dz,
        B=dB[0] if single else dB.sum(0).to(B.dtype),
        C=dC[0] if single else dC.sum(0).to(C.dtype),
        A=dA.sum((0, 1)).to(A.dtype),
        D=dD.sum((0, 1)).to(D.dtype) if D is not None else None,
        delta_bias=dbias.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None,
    )


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper; arguments as :func:`selective_scan_triton` (plus the config), already validated."""

    @staticmethod
    def forward(
        ctx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        z: Optional[Tensor],
        delta_bias: Optional[Tensor],
        delta_softplus: bool,
        config: ScanConfig,
    ) -> Tensor:
        out, dsum, h0 = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, config)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, dsum, h0)
        ctx.softplus = delta_softplus
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        u, delta, A, B, C, D, z, delta_bias, dsum, h0 = ctx.saved_tensors
        grads = _backward(
            _last_dim_contiguous(dout), u, delta, A, B, C, D, z, delta_bias, ctx.softplus, dsum, h0, ctx.config
        )
        names = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
        return (*(grads[n] if need else None for n, need in zip(names, ctx.needs_input_grad)), None, None)


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    *,
    config: Optional[ScanConfig] = None,
) -> Tensor:
    """Selective scan with the semantics of :func:`gsmsr.ops.selective_scan_ref.selective_scan_ref`.

    u, delta, z: (batch, D, L) float32, float16 or bfloat16; A: (D, N) real; B, C: (batch, N, L);
    D, delta_bias: (D,). A, D and delta_bias are used in float32. Returns (batch, D, L) in u's dtype; everything is
    accumulated in float32. Differentiable in every tensor argument. CUDA tensors run compiled kernels, CPU
    tensors Triton's interpreter (slow: for tests). ``config`` sets tile sizes (:class:`ScanConfig`).
    """
    if triton is None:
        raise RuntimeError('selective_scan_triton needs the triton package')
    cfg = config or DEFAULT_CONFIG
    if u.dim() != 3 or delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError(
            f'u, delta, z must be (batch, D, L) of one shape; got u {tuple(u.shape)}, '
            f'delta {tuple(delta.shape)}' + (f', z {tuple(z.shape)}' if z is not None else '')
        )
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f'A must be real (D, N) with D = {dim}; got {tuple(A.shape)} {A.dtype}')
    nstate = A.shape[1]
    for name, t in (('B', B), ('C', C)):
        if t.shape != (batch, nstate, length):
            raise ValueError(
                f'{name} must be (batch, N, L) = {(batch, nstate, length)} (variable, one group); got {tuple(t.shape)}'
            )
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f'{name} must be (D,) = ({dim},); got {tuple(t.shape)}')
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    for name, t in (('u', u), ('delta', delta), ('B', B), ('C', C), ('z', z)):
        if t is not None and t.dtype not in allowed:
            raise TypeError(f'selective_scan_triton: {name} is {t.dtype}; float32, float16 or bfloat16 expected')
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device != u.device for t in tensors):
        raise ValueError('selective_scan_triton: all tensors must be on one device')
    if length == 0 or batch == 0 or dim == 0:
        raise ValueError(f'selective_scan_triton: empty input {tuple(u.shape)}')
    if dim * length >= 2**31 or nstate * length >= 2**31:  # offsets within one batch element are int32
        raise ValueError(f'selective_scan_triton: D*L and N*L must stay below 2**31; got {tuple(u.shape)}, N={nstate}')

    def as_f32(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.float().contiguous()

    u, delta, B, C = (_last_dim_contiguous(t) for t in (u, delta, B, C))
    z = _last_dim_contiguous(z) if z is not None else None
    with torch.cuda.device(u.device) if u.is_cuda else nullcontext():
        return SelectiveScanTriton.apply(
            u, delta, as_f32(A), B, C, as_f32(D), z, as_f32(delta_bias), bool(delta_softplus), cfg
        )


__all__ = ['selective_scan_triton', 'triton_available', 'ScanConfig', 'DEFAULT_CONFIG', 'SelectiveScanTriton']
