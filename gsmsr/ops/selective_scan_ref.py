"""Pure-PyTorch selective scan (Mamba-1), the readable reference and the CPU path.

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is linear, so it is solved with a blocked log-depth doubling
scan (Hillis-Steele inside blocks, then across block ends) instead of a per-token loop. Autograd goes through a
custom function whose backward is the same scan run in reverse time, so memory holds only ``a`` and ``h``,
not every doubling step.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F


def _doubling(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Inclusive scan of ``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) along the last dim, in log2(L) steps.

    a, b: (..., L). Returns (h, cumulative products of a), both (..., L).
    """
    # Decay products underflow quickly, and subnormal floats make CPU arithmetic ~100x slower: values below
    # sqrt(tiny) (1e-19 in fp32, 1e-154 in fp64) are flushed to zero, far below any visible effect.
    tiny = torch.finfo(a.dtype).tiny ** 0.5
    a = a.masked_fill(a < tiny, 0.0)
    h = b.clone()
    length = a.shape[-1]
    step = 1
    while step < length:
        # right-hand sides are evaluated into temporaries before the in-place updates
        h[..., step:] += a[..., step:] * h[..., :-step]
        prod = a[..., step:] * a[..., :-step]
        a[..., step:] = prod.masked_fill_(prod < tiny, 0.0)
        step *= 2
    return h, a


def _scan(a: Tensor, b: Tensor, block: int = 16) -> Tensor:
    """Same recurrence as :func:`_doubling`, blocked: a short doubling scan inside blocks of ``block`` tokens,
    a scan over the block ends, and one fix-up pass. About 3x fewer passes over memory than plain doubling."""
    length = a.shape[-1]
    if length <= block:
        return _doubling(a, b)[0]
    pad = -length % block
    if pad:  # identity steps at the end (a = 1, b = 0) leave earlier states unchanged
        a = torch.cat([a, a.new_ones(*a.shape[:-1], pad)], dim=-1)
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)
    shape = (*a.shape[:-1], -1, block)
    h, prod = _doubling(a.reshape(shape), b.reshape(shape))  # (..., nblocks, block), zero start state
    ends = _scan(prod[..., -1], h[..., -1], block)  # true state at each block's end
    carry = torch.nn.functional.pad(ends[..., :-1], (1, 0))  # state entering each block
    h = h + prod * carry.unsqueeze(-1)
    return h.flatten(-2)[..., :length]


class LinearScan(torch.autograd.Function):
    """``h = scan(a, b)`` with ``h_t = a_t h_{t-1} + b_t``; a, b: (..., L)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        a, h = ctx.saved_tensors
        # dL/dh_t accumulates from the future: g_t = grad_h_t + a_{t+1} g_{t+1}
        a_next = F.pad(a[..., 1:], (0, 1))
        g = _scan(a_next.flip(-1), grad_h.flip(-1)).flip(-1)
        h_prev = F.pad(h[..., :-1], (1, 0))
        return g * h_prev, g


def flipped_scan(
    fn: Callable[..., Union[Tensor, Tuple[Tensor, ...]]],
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    *args: object,
    index: Optional[int] = None,
) -> Tensor:
    """The reverse scan of a scan ``fn`` that walks forwards only: ``fn`` on the time-flipped u, delta, B, C, z
    (contiguous copies), its output (``fn(...)[index]`` when given) flipped back."""
    u, delta, B, C, z = (t.flip(-1) if t is not None else None for t in (u, delta, B, C, z))
    out = fn(u, delta, A, B, C, D, z, delta_bias, *args)
    return (out if index is None else out[index]).flip(-1)


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    chunk_size: int = 4096,
    reverse: bool = False,
) -> Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature (real, input-dependent B and C).

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L); D, delta_bias: (D,).
    Returns y: (batch, D, L), ``y_t = C_t . h_t + D u_t``, times ``silu(z)`` when z is given.
    Computed in the input dtype, at least float32. The sequence is processed in chunks of
    ``chunk_size`` tokens (the state is carried across), which bounds the (batch, D, N, L) temporaries.

    reverse: time runs from the end, ``h_t = exp(dt_t A) h_{t+1} + dt_t u_t B_t``; defined (and computed) as the
    scan of the time-flipped sequence, flipped back.
    """
    if reverse:
        return flipped_scan(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
    dtype_in = u.dtype
    dt = torch.promote_types(dtype_in, torch.float32)
    u, delta, B, C = u.to(dt), delta.to(dt), B.to(dt), C.to(dt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(dt)
    length = u.shape[-1]
    ys = []
    state = None  # (batch, D, N)
    for start in range(0, length, chunk_size):
        sl = slice(start, min(start + chunk_size, length))
        d_c = delta[..., sl]
        a = torch.exp(d_c.unsqueeze(2) * A[None, :, :, None])  # (b, D, N, l)
        b = (d_c * u[..., sl]).unsqueeze(2) * B[:, None, :, sl]  # (b, D, N, l)
        if state is not None:
            # fold the carried state into the first token: h_0 = a_0 h_prev + b_0
            b = torch.cat([b[..., :1] + a[..., :1] * state.unsqueeze(-1), b[..., 1:]], dim=-1)
        h = LinearScan.apply(a, b)
        state = h[..., -1]
        ys.append(torch.einsum('bdnl,bnl->bdl', h, C[..., sl]))
    y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + D.to(dt)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dt))
    return y.to(dtype_in)


def selective_scan_naive(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    reverse: bool = False,
) -> Tensor:
    """Token-by-token recurrence, for tests only (same signature as :func:`selective_scan_ref`; with reverse it
    walks the tokens from the last, no flips)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    length = u.shape[-1]
    ys: List[Optional[Tensor]] = [None] * length
    for t in reversed(range(length)) if reverse else range(length):
        h = torch.exp(delta[..., t, None] * A) * h + (delta[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys[t] = (h * C[:, None, :, t]).sum(-1)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y
