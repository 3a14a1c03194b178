"""BiMamba's two depthwise convs + SiLU on token-major x in one Triton kernel (no autograd).

The token-major flip-free branches (:mod:`gsmsr.archs.bimamba`, ``TOKEN_MAJOR``) convolve the same x (B, L, D) along
the tokens twice: causally for the forward branch, anti-causally for the backward one. Inductor's kernel for the
shifted-sum form (:func:`gsmsr.archs.bimamba.causal_conv_silu_tokens`) took 0.97 ms a call on an H200 at the window
step's shape, against ~0.38 for the channels-first form and ~0.25 by bandwidth: there the weights vary along the fast
(channel) axis, so every element loads its own taps. Here a program takes a tile of BLOCK_T tokens x BLOCK_D channels:
the weights and biases once, the tile's rows and their K-1 halo tokens on each side (L1 serves the overlaps), both
outputs. The arithmetic is the compiled shifted sum's: weights and biases rounded to x's dtype, products and sums in
fp32 in tap order, SiLU, one rounding at the store.

:func:`conv_silu_pair` is a ``torch.library`` custom op (one node under ``torch.compile``), compiled on CUDA tensors
and interpreted on CPU tensors (:mod:`gsmsr.ops.triton_jit`).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, runs_fused  # noqa: F401  (re-exported)

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by a subprocess test of triton_jit
    tl = None

BLOCK_T = 32
BLOCK_D = 64
NUM_WARPS = 4


def _conv_pair_kernel(
    x_ptr,
    wf_ptr,
    bf_ptr,
    wb_ptr,
    bb_ptr,
    of_ptr,
    ob_ptr,
    L,
    D,
    s_xb,
    s_xl,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (token block, channel block, batch). x: (B, L, D) with unit channel stride; weights (D, K) and biases
    (D,) contiguous, in x's dtype; outputs (B, L, D) contiguous."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b = tl.program_id(2).to(tl.int64)
    md = d < D
    x_tile = x_ptr + b * s_xb + d[None, :]
    zero = tl.full([BLOCK_T, BLOCK_D], 0.0, tl.float32)
    acc_f = zero + tl.load(bf_ptr + d, mask=md, other=0.0).to(tl.float32)[None, :]
    acc_b = zero + tl.load(bb_ptr + d, mask=md, other=0.0).to(tl.float32)[None, :]
    for i in tl.static_range(K):
        # tap i of the causal conv weighs x[t - (K-1) + i], of the anti-causal one x[t + (K-1) - i]; zeros outside
        tf = t - (K - 1) + i
        mf = ((tf >= 0) & (tf < L))[:, None] & md[None, :]
        xf = tl.load(x_tile + tf.to(tl.int64)[:, None] * s_xl, mask=mf, other=0.0).to(tl.float32)
        acc_f = acc_f + xf * tl.load(wf_ptr + d * K + i, mask=md, other=0.0).to(tl.float32)[None, :]
        tb = t + (K - 1) - i
        mb = (tb < L)[:, None] & md[None, :]
        xb = tl.load(x_tile + tb.to(tl.int64)[:, None] * s_xl, mask=mb, other=0.0).to(tl.float32)
        acc_b = acc_b + xb * tl.load(wb_ptr + d * K + i, mask=md, other=0.0).to(tl.float32)[None, :]
    out = ((b * L + t.to(tl.int64)) * D)[:, None] + d[None, :]
    mask = (t < L)[:, None] & md[None, :]
    tl.store(of_ptr + out, (acc_f / (1.0 + tl.exp(-acc_f))).to(of_ptr.dtype.element_ty), mask=mask)
    tl.store(ob_ptr + out, (acc_b / (1.0 + tl.exp(-acc_b))).to(ob_ptr.dtype.element_ty), mask=mask)


_KERNELS = LazyKernels(__name__, [_conv_pair_kernel])


def conv_silu_pair_triton(
    x: Tensor, weight_f: Tensor, bias_f: Tensor, weight_b: Tensor, bias_b: Tensor
) -> Tuple[Tensor, Tensor]:
    """x: (B, L, D), unit stride along D (e.g. a slice of a wider projection); weights (D, 1, K), biases (D,) ->
    (causal conv + SiLU with weight_f, anti-causal conv + SiLU with weight_b), each (B, L, D) contiguous in x's
    dtype. Equal to :func:`gsmsr.archs.bimamba.causal_conv_silu_tokens` with ``reverse`` False and True, as compiled
    (no rounding between its ops)."""
    batch, length, dim = x.shape
    k = weight_f.shape[-1]
    shapes = [tuple(t.shape) for t in (weight_f, weight_b, bias_f, bias_b)]
    if shapes != [(dim, 1, k), (dim, 1, k), (dim,), (dim,)]:
        raise ValueError(
            f'conv_silu_pair: x {tuple(x.shape)} needs weights ({dim}, 1, K) and biases ({dim},); got '
            f'{", ".join(map(str, shapes))}'
        )
    if x.stride(2) != 1:
        x = x.contiguous()
    w_f, w_b = (w.squeeze(1).to(x.dtype).contiguous() for w in (weight_f, weight_b))
    b_f, b_b = (v.to(x.dtype).contiguous() for v in (bias_f, bias_b))
    out_f = torch.empty(batch, length, dim, device=x.device, dtype=x.dtype)
    out_b = torch.empty_like(out_f)
    if out_f.numel():
        grid = (-(-length // BLOCK_T), -(-dim // BLOCK_D), batch)
        _KERNELS(interpret_for(x)).conv_pair_kernel[grid](
            x, w_f, b_f, w_b, b_b, out_f, out_b, length, dim, x.stride(0), x.stride(1),
            K=k, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out_f, out_b


@torch.library.custom_op('gsmsr::conv_silu_pair', mutates_args=())
def conv_silu_pair(
    x: Tensor, weight_f: Tensor, bias_f: Tensor, weight_b: Tensor, bias_b: Tensor
) -> Tuple[Tensor, Tensor]:
    """:func:`conv_silu_pair_triton` as one opaque node for ``torch.compile``. No autograd: call it with gradients
    off."""
    return conv_silu_pair_triton(x, weight_f, bias_f, weight_b, bias_b)


@conv_silu_pair.register_fake
def _(x: Tensor, weight_f: Tensor, bias_f: Tensor, weight_b: Tensor, bias_b: Tensor) -> Tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)
