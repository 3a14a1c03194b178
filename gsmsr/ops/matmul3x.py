"""fp32 GEMMs as three TF32 tensor-core products ("3xTF32"), for the compiled fp32 network.

In fp32 the network's GEMMs run on the FP32 FMA pipe (an H200: ~67 TFLOP/s; TF32 tensor cores: ~495). TF32 alone
keeps 10 mantissa bits (relative error ~2^-11 per operand, ~1e-3 on a GEMM), too coarse for the fp32 path's
1e-4 bound. The split trick recovers fp32 accuracy from TF32 products:

    a = a_hi + a_lo,  a_hi = a with the 13 low mantissa bits cleared (exact in TF32),  a_lo = a - a_hi (exact)
    a @ b ~= a_hi @ b_hi + a_hi @ b_lo + a_lo @ b_hi

|a_lo| < 2^-10 |a|, so the dropped a_lo @ b_lo is below 2^-20 |a||b| and the TF32 rounding of a_lo / b_lo costs
at most 2^-21 |a||b| per term; products of TF32 values are exact in fp32 and the sum is accumulated in fp32 as
in an IEEE GEMM: about 1e-6 relative at worst, ~1e-7 typically, against ~5e-4 for plain TF32.

The three products are one GEMM: they are concatenated along the reduction dimension,
``[a_hi, a_hi, a_lo] @ [b_hi; b_lo; b_hi]`` (K -> 3K), run by cuBLAS with TF32. In a compiled graph Inductor
fuses the split and the concatenation into the kernel that produces the operand (LayerNorm, GELU * gate, ...)
and splits the weights (small) at every call.

How TF32 is turned on for these products only. cuBLAS picks its math mode from the process-wide flag
(``torch.backends.cuda.matmul.allow_tf32``) when an op calls it, at run time; Inductor reads the flag at compile
time only for its own Triton GEMM templates (max-autotune; the flag is part of its cache key), and Dynamo guards
on it: setting it inside a compiled region is not a per-op switch. So the TF32 GEMMs are two ``torch.library``
custom ops, :func:`tf32_linear` and :func:`tf32_matmul`, opaque to Inductor, whose CUDA kernels set the flag
around their one cuBLAS call and restore it (the legacy setter, which keeps the legacy and the new
``fp32_precision`` state in step; the flag is per process, so a matmul of another thread during that call would
also run in TF32). Inside CUDA graphs the flag is read at capture, which is when the kernel is chosen. Triton's
``tl.dot(input_precision='tf32x3')`` splits in registers without the 3x operand traffic, but needs an own GEMM
kernel (Inductor's templates only know 'ieee' and 'tf32'): :func:`linear_triton`, which runs the linears the
concatenated split does not pay for (``SPLIT_IN_REGISTERS``, on by default).

How the network switches it on: :class:`TF32x3Mode`, a ``TorchFunctionMode`` that, while active, sends fp32
``F.linear``, ``torch.matmul`` / ``@``, ``torch.bmm`` and ``torch.mm`` calls to :func:`linear3x` / :func:`mm3x`.
Dynamo traces through the ``__torch_function__`` of a mode that is active when a compiled function is called
(and guards on the mode stack: graphs with and without it are separate cache entries), so the compiled blocks of
``GSMNet(compile_blocks=True, fp32_matmul='3xtf32')`` contain the split GEMMs and the module code is unchanged.
One catch: under a mode Dynamo sends every tensor operation of the traced frame through it, and a comparison of a
tensor with a non-tensor (``tensor == None``, hence ``list.index(None)`` on a list of tensors) then breaks the
graph; the compiled blocks avoid such comparisons (tests/ops/test_matmul3x.py checks there is no graph break).
By default the mode acts only inside compiled graphs (eagerly the split would be several separate passes over
the operand) and only where :func:`worth_splitting` expects a gain: the concatenation triples the traffic of
the reduction operand, which pays where the GEMM is compute-bound in fp32 and the output is at least as wide as
the reduction.

On other devices the ops emulate TF32 (operands rounded to 10 mantissa bits, fp32 products and sums), which is
how the CPU tests check the algorithm.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from gsmsr.ops.triton_jit import LazyKernels, interpret_for, tl

_LOW_BITS = 13  # fp32 keeps 23 explicit mantissa bits, TF32 10
_HI_MASK = -(1 << _LOW_BITS)  # int32 0xFFFFE000: sign, exponent and the top 10 mantissa bits

# worth_splitting: below this reduction length a GEMM is memory-bound already in fp32 (the attention products,
# K = head dim 24; dt_proj, K = 12)
MIN_K = 64


def split_tf32(x: Tensor) -> Tuple[Tensor, Tensor]:
    """fp32 x (any shape) -> (hi, lo), hi + lo == x: hi is x with the 13 low mantissa bits cleared (truncation, so
    exactly representable in TF32), lo = x - hi is exact in fp32 and |lo| < 2^-10 |x|.

    +-inf gives (+-inf, 0); NaN gives NaN in lo (and in hi unless its payload is in the low bits only)."""
    hi = (x.view(torch.int32) & _HI_MASK).view(torch.float32)
    return hi, torch.where(x.isinf(), 0.0, x - hi)  # inf - inf would be NaN


def tf32_round(x: Tensor) -> Tensor:
    """fp32 x rounded to the nearest TF32 value (ties to even; 10 mantissa bits), the emulation of the tensor cores'
    operand conversion. Non-finite values pass through."""
    bits = x.view(torch.int32)
    up = bits + ((1 << (_LOW_BITS - 1)) - 1) + ((bits >> _LOW_BITS) & 1)  # a carry may bump the exponent: correct
    return torch.where(x.isfinite(), (up & _HI_MASK).view(torch.float32), x)


@contextmanager
def _cublas_tf32() -> Iterator[None]:
    """TF32 cuBLAS GEMMs inside the block, the caller's setting restored after it."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


@torch.library.custom_op('gsmsr::tf32_linear', mutates_args=())
def tf32_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with TF32 products: x (..., K), weight (N, K), bias (N,) -> (..., N).

    CUDA: cuBLAS with TF32 on for this call (bias in its epilogue). Elsewhere the emulation: operands rounded to
    TF32 (:func:`tf32_round`), fp32 products and sums."""
    return F.linear(tf32_round(x), tf32_round(weight), bias)


@tf32_linear.register_kernel('cuda')
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    with _cublas_tf32():
        return F.linear(x, weight, bias)


@tf32_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return F.linear(x, weight, bias)  # on fake tensors: the real call's shape and strides


@torch.library.custom_op('gsmsr::tf32_matmul', mutates_args=())
def tf32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` with TF32 products: a (..., M, K), b (..., K, N) (batch dims broadcast) ->
    (..., M, N). CUDA: cuBLAS with TF32 on for this call; elsewhere the emulation (see :func:`tf32_linear`)."""
    return torch.matmul(tf32_round(a), tf32_round(b))


@tf32_matmul.register_kernel('cuda')
def _(a: Tensor, b: Tensor) -> Tensor:
    with _cublas_tf32():
        return torch.matmul(a, b)


@tf32_matmul.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def _cat_k(parts: Sequence[Tensor], dim: int) -> Tensor:
    """Concatenate same-shaped matrices (..., R, C) along dim -1 or -2, keeping the unit-stride dimension of the
    parts: a transposed operand (e.g. the (B, C, L) view of (B, L, C) tokens) stays transposed, so the fused
    producer writes rows as it reads them; cuBLAS takes either layout."""
    x = parts[0]
    if x.stride(-1) != 1 and x.stride(-2) == 1:
        return torch.cat([p.mT for p in parts], dim=-3 - dim).mT
    return torch.cat(list(parts), dim=dim)


def mm3x(a: Tensor, b: Tensor) -> Tensor:
    """``torch.matmul(a, b)`` for fp32 a (..., M, K), b (..., K, N) as one TF32 GEMM over K' = 3K:
    ``[a_hi, a_hi, a_lo] @ [b_hi; b_lo; b_hi]``. Returns (..., M, N) fp32."""
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    return tf32_matmul(_cat_k((a_hi, a_hi, a_lo), -1), _cat_k((b_hi, b_lo, b_hi), -2))


def linear3x(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for fp32 x (..., K), weight (N, K), bias (N,) as one TF32 GEMM over K' = 3K
    (see :func:`mm3x`). Returns (..., N) fp32."""
    x_hi, x_lo = split_tf32(x)
    w_hi, w_lo = split_tf32(weight)
    return tf32_linear(torch.cat((x_hi, x_hi, x_lo), -1), torch.cat((w_hi, w_lo, w_hi), -1), bias)


def worth_splitting(m: int, n: int, k: int) -> bool:
    """Whether an (M, K) @ (K, N) fp32 GEMM (M, N: rows and columns of one output matrix) is expected to run faster
    as 3xTF32 than on the FMA pipe.

    The split costs 3x the TF32 rate's work, ~7x less time than the fp32 FMAs, but the concatenated operand
    triples the reduction side's traffic. For a GEMM over many tokens (one of M, N large) that pays where K is
    long enough for fp32 to be compute-bound (:data:`MIN_K`) and the other output dimension is at least K. In
    GSMNet (C = 192): SWSA qkv, proj, fc11, fc12; implicit-warp q, k|v; Mamba in_proj; GSM MLP fc1 qualify; the
    4x narrowing fc2, out_proj (K = 384 -> 192), x_proj (44 outputs), dt_proj (K = 12) and the window
    attention products (K = 24, or 24 outputs) do not."""
    return k >= MIN_K and min(m, n) >= k


# ---------------------------------------------------------------------------------------------------------------
# The split inside the GEMM: Triton's tl.dot(input_precision='tf32x3') splits each operand tile into hi and lo in
# registers and issues the three TF32 products there, so the operands are read once, as fp32, and nothing is
# concatenated: no 3x operand traffic, so the narrowing GEMMs (fc2, out_proj: K > N), which the concatenated split
# does not pay for (worth_splitting), qualify too. Per GEMM alone at 288k rows (H200) it beat cuBLAS's fp32 where the
# concatenated split is not used (fc2 1.21 against 1.75 ms, out_proj 0.72 against 1.02) and lost to that split where
# it is (fc1 1.45 against 0.99 with the producer's extra writes, in_proj 0.78 against 0.61), so it takes only the rest:
# the compiled fp32 network 95.9 -> 87.5 ms/frame at 20x180x320 (benchmarks/NOTES.md).
# ---------------------------------------------------------------------------------------------------------------

# TF32x3Mode sends fp32 F.linear calls with K >= MIN_K that its route leaves alone to linear_tf32x3 (False: to cuBLAS)
SPLIT_IN_REGISTERS = True


def _linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    o_ptr,
    M,
    N,
    K,
    s_xm,
    s_xk,
    s_wn,
    s_wk,
    s_om,
    s_on,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (column block, row block): o[rows, cols] = x[rows] @ w[cols].T (+ bias[cols]), fp32 accumulation.
    The column blocks of one row block are consecutive programs, so x's rows are read from L2 after the first."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    mn = rn < N
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mk = k0 + rk < K
        a = tl.load(x_ptr + rm[:, None] * s_xm + (k0 + rk)[None, :] * s_xk, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(w_ptr + (k0 + rk)[:, None] * s_wk + rn[None, :] * s_wn, mask=mk[:, None] & mn[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0)[None, :]
    tl.store(o_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc, mask=mm[:, None] & mn[None, :])


_KERNELS = LazyKernels(__name__, [_linear_kernel])
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of linear_triton; benchmarks/bench_matmul3x.py sweeps others
LINEAR_CONFIG = (128, 64, 32, 4, 3)


def linear_triton(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    precision: str = 'tf32x3',
    config: Tuple[int, int, int, int, int] = LINEAR_CONFIG,
) -> Tensor:
    """``F.linear(x, weight, bias)`` for fp32 x (..., K), weight (N, K), bias (N,) -> (..., N) fp32, as one Triton
    GEMM whose dot products use ``precision`` ('tf32x3': hi/lo split in registers, about fp32's accuracy; 'tf32';
    'ieee'). CUDA tensors run compiled, CPU tensors interpreted (where the interpreter multiplies in fp32)."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(
            f'linear_triton: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias '
            f'{None if bias is None else tuple(bias.shape)}: need weight (N, K) and bias (N,) with K = x.shape[-1]'
        )
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f'linear_triton: fp32 operands only, got {x.dtype} and {weight.dtype}')
    rows = x.reshape(-1, k)
    n = weight.shape[0]
    out = torch.empty(rows.shape[0], n, device=x.device, dtype=torch.float32)
    block_m, block_n, block_k, warps, stages = config
    if out.numel():
        grid = (-(-n // block_n), -(-rows.shape[0] // block_m))
        _KERNELS(interpret_for(x)).linear_kernel[grid](
            rows, weight, bias if bias is not None else out, out, rows.shape[0], n, k, *rows.stride(),
            *weight.stride(), *out.stride(), HAS_BIAS=bias is not None, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out.view(*x.shape[:-1], n)


@torch.library.custom_op('gsmsr::linear_tf32x3', mutates_args=())
def linear_tf32x3(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`linear_triton` with the in-register 3xTF32 split, as one opaque node for ``torch.compile``."""
    return linear_triton(x, weight, bias)


@linear_tf32x3.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_MATMULS = (
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.mm,
    torch.Tensor.mm,
)


class TF32x3Mode(TorchFunctionMode):
    """While active, fp32 ``F.linear`` / ``torch.matmul`` / ``@`` / ``torch.bmm`` / ``torch.mm`` calls run as
    :func:`linear3x` / :func:`mm3x` where

    * the operands are fp32 tensors on one of ``devices`` and autocast is off for that device,
    * no gradient is needed (the split ops have no backward: training is left alone),
    * ``compiled_only`` is False or the call is being traced by ``torch.compile`` (where the split is fused),
    * ``route(m, n, k)`` (default :func:`worth_splitting`) says so.

    With ``SPLIT_IN_REGISTERS``, such ``F.linear`` calls that the route leaves alone run as :func:`linear_tf32x3`
    when K >= ``MIN_K`` (the narrowing ones). Every other call runs unchanged. Enter it around calls of compiled
    modules (Dynamo traces it, see the module docstring) or, with ``compiled_only=False``, around eager code.
    """

    def __init__(
        self,
        devices: Sequence[str] = ('cuda',),
        compiled_only: bool = True,
        route: Callable[[int, int, int], bool] = worth_splitting,
    ) -> None:
        super().__init__()
        self.devices = tuple(devices)
        self.compiled_only = compiled_only
        self.route = route

    def _takes(self, a: Any, b: Any, bias: Any = None) -> bool:
        """fp32 tensors on a chosen device, outside autocast, without autograd, in the chosen context."""
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device != b.device:
            return False
        if bias is not None and (not isinstance(bias, Tensor) or bias.dtype != torch.float32):
            return False
        if a.device.type not in self.devices or torch.is_autocast_enabled(a.device.type):
            return False
        needs_grad = a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            return False
        return torch.compiler.is_compiling() or not self.compiled_only

    def __torch_function__(
        self, func: Callable, types: Tuple[type, ...], args: Tuple = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get('bias')
            if len(args) + len(kwargs) <= 3 and self._takes(x, weight, bias) and weight.dim() == 2 and x.dim() >= 1:
                if self.route(x.numel() // max(x.shape[-1], 1), weight.shape[0], weight.shape[1]):
                    return linear3x(x, weight, bias)
                if SPLIT_IN_REGISTERS and weight.shape[1] >= MIN_K:
                    return linear_tf32x3(x, weight, bias)
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            a, b = args
            if (
                self._takes(a, b)
                and a.dim() >= 2
                and b.dim() >= 2
                and self.route(a.shape[-2], b.shape[-1], a.shape[-1])
            ):
                return mm3x(a, b)
        return func(*args, **kwargs)
