"""Selective-scan dispatch: on CUDA tensors mamba-ssm's kernel for training and gsmsr's sequential Triton kernel
(:mod:`gsmsr.ops.seq_scan_triton`) without autograd; the PyTorch scan elsewhere. The Triton kernels also train
(with :mod:`gsmsr.ops.seq_scan_triton_bwd`): asked for by ``backend='triton'``, and by default where mamba-ssm is
missing (the PyTorch scan's autograd does not fit the recipe's training step in an H200's 140 GB).

The kernels are wrapped as ``torch.library`` custom ops (``gsmsr::scan_fwd`` / ``scan_bwd`` around mamba-ssm and
``gsmsr::tscan_fwd`` / ``tscan_bwd`` around Triton, both with autograd, and ``gsmsr::scan_infer`` without), so
``torch.compile`` keeps the code around them in one graph instead of breaking at an opaque extension call.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from gsmsr.ops.selective_scan_ref import flipped_scan, selective_scan_ref
from gsmsr.ops.seq_scan_triton import _split, choose_segments, selective_scan_fwd_triton, unit_stride
from gsmsr.ops.seq_scan_triton_bwd import MAX_STATES, selective_scan_bwd_triton
from gsmsr.ops.triton_jit import triton

_module = None
_kernel_checked = False
kernel_import_error: Optional[str] = None  # why mamba-ssm could not be used, for diagnostics
KERNEL_CHUNK = 2048  # tokens per chunk of mamba-ssm's kernel: one saved state each
# What the no-grad CUDA scan (``gsmsr::scan_infer``) runs: 'triton' (gsmsr.ops.seq_scan_triton: sequential scan
# with a sequence split; 1.9 against mamba-ssm's 3.6 ms at L = 288k, bf16, H200, benchmarks/NOTES.md) or 'mamba'
# (mamba-ssm's kernel). The one place this default is decided (GSMSR_SCAN_INFER overrides it). Training (autograd)
# runs mamba-ssm's kernel where it imports, else the Triton kernels (backend='triton' asks for them anyway).
INFER_IMPL = os.environ.get('GSMSR_SCAN_INFER', 'triton')
# Keyword arguments of the Triton forward under ``gsmsr::scan_infer`` (block_d, token_tile, warps_per_sm, out_tile,
# out_warps, out_maxnreg, stages, ...; the rest at its defaults). Read at every call (the op is opaque to
# torch.compile), so benchmarks can try configurations in a compiled network without recompiling it. stages=3:
# the tile loop's loads as async copies two tiles ahead, the same values bit for bit; 39.3 against 42.0 ms/frame
# (39.7 against 40.8 in another run) for the bf16 compiled default at 20x180x320 on an H200 (benchmarks/NOTES.md).
# Training keeps the function's defaults.
INFER_TRITON_CONFIG: Dict[str, int] = {'stages': 3}


def _cuda_module():
    """mamba-ssm's compiled ``selective_scan_cuda`` module if importable (``pip install gsmsr[cuda]``), else None."""
    global _module, _kernel_checked, kernel_import_error
    if not _kernel_checked:
        _kernel_checked = True
        if os.environ.get('GSMSR_DISABLE_MAMBA_KERNEL', '0') == '1':
            kernel_import_error = 'disabled by GSMSR_DISABLE_MAMBA_KERNEL=1'
        else:
            try:
                # The extension is a top-level module of the mamba-ssm wheel. Its package is not imported: the
                # package's __init__ loads mamba-ssm's model code and transformers, seconds of start-up for nothing
                # used here.
                if importlib.util.find_spec('mamba_ssm') is None:
                    raise ModuleNotFoundError("No module named 'mamba_ssm'")
                import selective_scan_cuda  # noqa: F401  (needs torch loaded first, as here)

                _module = selective_scan_cuda
            except Exception as err:  # ImportError, or a broken CUDA extension
                kernel_import_error = f'{type(err).__name__}: {err}'
    return _module


def cuda_kernel() -> bool:
    """True when mamba-ssm's kernel can be used (CUDA tensors only)."""
    return _cuda_module() is not None


def _infer_runs_triton() -> bool:
    """Whether ``backend='auto'`` without autograd sends Triton-ready CUDA tensors to the Triton forward: without
    mamba-ssm, or with it when ``INFER_IMPL`` is 'triton' (the two ways :func:`selective_scan` reaches it)."""
    return not cuda_kernel() or INFER_IMPL == 'triton'


def kernel_status() -> str:
    """One line saying which scan runs with autograd (training) and without (inference) on this machine's GPU (the
    PyTorch scan everywhere without one), and why not mamba-ssm's kernel where it is unavailable."""
    gpu_triton = triton is not None and torch.cuda.is_available()
    if cuda_kernel():
        train = 'mamba-ssm kernel'
    else:
        train = f'{"gsmsr Triton scan" if gpu_triton else "PyTorch scan"} (mamba-ssm: {kernel_import_error})'
    if gpu_triton and _infer_runs_triton():
        infer = 'gsmsr Triton scan'
    else:
        infer = 'mamba-ssm kernel' if cuda_kernel() else 'PyTorch scan'
    return f'training: {train}; inference: {infer}'


# -- custom ops around the kernel --------------------------------------------------------------------------------


def _states_shape(u: Tensor, A: Tensor) -> List[int]:
    return [u.shape[0], u.shape[1], -(-u.shape[2] // KERNEL_CHUNK), 2 * A.shape[1]]


@torch.library.custom_op('gsmsr::scan_fwd', mutates_args=())
def scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """mamba-ssm forward. Returns (output, output before the z gate, chunk states (batch, D, chunks, 2N) fp32)."""
    out, x, *rest = _cuda_module().fwd(u, delta, A, B.unsqueeze(1), C.unsqueeze(1), D, z, delta_bias, delta_softplus)
    return (rest[0] if z is not None else out.clone()), out, x


@scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return torch.empty_like(u), torch.empty_like(u), u.new_empty(_states_shape(u, A), dtype=torch.float32)


@torch.library.custom_op('gsmsr::scan_bwd', mutates_args=())
def scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    dout: Tensor,
    x: Tensor,
    out: Tensor,
    delta_softplus: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """mamba-ssm backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); absent inputs get empty gradients."""
    du, ddelta, dA, dB, dC, dD, ddb, *rest = _cuda_module().bwd(
        u,
        delta,
        A,
        B.unsqueeze(1),
        C.unsqueeze(1),
        D,
        z,
        delta_bias,
        dout.contiguous(),
        x,
        out if z is not None else None,
        None,
        delta_softplus,
        False,
    )
    empty = u.new_empty(0)
    return (
        du,
        ddelta,
        dA,
        dB.squeeze(1).to(B.dtype),
        dC.squeeze(1).to(C.dtype),
        dD if D is not None else empty,
        rest[0] if z is not None else empty,
        ddb if delta_bias is not None else empty,
    )


@scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, x, out, delta_softplus):
    empty = u.new_empty(0)
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else empty,
        torch.empty_like(z) if z is not None else empty,
        torch.empty_like(delta_bias) if delta_bias is not None else empty,
    )


def _save_operands(ctx, u, delta, A, B, C, D, z, delta_bias, *extra: Tensor) -> None:
    """Save the scan's operands for the backward (absent optional ones as empty tensors) and ``extra`` tensors."""
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    empty = u.new_empty(0)
    ctx.save_for_backward(u, delta, A, B, C, *(t if t is not None else empty for t in (D, z, delta_bias)), *extra)


def _saved_operands(ctx) -> Tuple[List[Optional[Tensor]], List[Tensor]]:
    """What :func:`_save_operands` saved: the eight operands (None where absent) and the extra tensors."""
    u, delta, A, B, C, D, z, delta_bias, *extra = ctx.saved_tensors
    optional = [t if has else None for t, has in zip((D, z, delta_bias), ctx.has)]
    return [u, delta, A, B, C, *optional], extra


def _grads_for(operands: List[Optional[Tensor]], grads: Tuple[Tensor, ...]) -> Tuple[Optional[Tensor], ...]:
    """Kernel gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) -> one per operand, in its dtype, None for
    absent operands."""
    return tuple(None if t is None else g.to(t.dtype) for t, g in zip(operands, grads))


def _setup_context(ctx, inputs, output) -> None:
    *operands, delta_softplus = inputs
    ctx.delta_softplus = delta_softplus
    _save_operands(ctx, *operands, output[2], output[1])


def _backward(ctx, dout, _dout_pre, _dx):
    operands, (x, out) = _saved_operands(ctx)
    return (*_grads_for(operands, scan_bwd(*operands, dout, x, out, ctx.delta_softplus)), None)


scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op('gsmsr::scan_infer', mutates_args=())
def scan_infer(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    impl: str,
    reverse: bool = False,
) -> Tensor:
    """Forward without autograd state: impl 'triton' (:func:`gsmsr.ops.seq_scan_triton.selective_scan_fwd_triton`)
    or 'mamba' (mamba-ssm's kernel). reverse: time from the end, natively in Triton, by flipping around mamba-ssm
    (the copies stay inside the op, where the compiler cannot fuse them anyway)."""
    if impl == 'triton':
        return selective_scan_fwd_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=reverse, **INFER_TRITON_CONFIG
        )
    if impl != 'mamba':
        raise ValueError(f'scan_infer: impl must be "mamba" or "triton", got {impl!r}')
    if reverse:
        return flipped_scan(scan_fwd, u, delta, A, B, C, D, z, delta_bias, delta_softplus, index=0)
    return scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]


@scan_infer.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl, reverse=False):
    return torch.empty_like(u)


# -- custom ops around the Triton forward and backward ------------------------------------------------------------

TRITON_FWD_TILE = 8  # token tile of the forward when it trains: segment lengths are multiples of it
# Training segments: the backward's main launch holds 168 registers a thread (gsmsr.ops.seq_scan_triton_bwd), so an
# SM keeps 12 of its one-warp programs: ~12 warps per SM over the (channel block x segment) programs make one whole
# wave, with segments of at least TRITON_TRAIN_MIN_SEGMENT tokens (at L = 20,480 and D = 384 on 132 SMs: 128
# segments of 160 tokens, 1,536 programs).
TRITON_TRAIN_WARPS_PER_SM = 12
TRITON_TRAIN_MIN_SEGMENT = 128


def triton_train_segments(u: Tensor) -> int:
    """Segments per sequence for the Triton scan with autograd (1 on CPU tensors: the interpreter)."""
    if not u.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(u.device).multi_processor_count
    batch, dim, length = u.shape
    return choose_segments(
        batch, dim, length, 32, 1, sms, TRITON_TRAIN_WARPS_PER_SM, min_segment=TRITON_TRAIN_MIN_SEGMENT
    )


def _tscan_seg_len(length: int, segments: int) -> Tuple[int, int]:
    return _split(length, segments, TRITON_FWD_TILE)


@torch.library.custom_op('gsmsr::tscan_fwd', mutates_args=())
def tscan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    segments: int,
) -> Tuple[Tensor, Tensor]:
    """Triton forward that keeps what the backward needs: (output, states entering each segment (batch,
    max(S - 1, 1), D, N) fp32), S from ``segments`` as :func:`gsmsr.ops.seq_scan_triton._split` rounds it."""
    out, states, _ = selective_scan_fwd_triton(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, segments=segments, token_tile=TRITON_FWD_TILE,
        return_states=True,
    )  # fmt: skip
    return out, states


@tscan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segments):
    n_seg = _tscan_seg_len(u.shape[2], segments)[1]
    return torch.empty_like(u), u.new_empty(u.shape[0], max(n_seg - 1, 1), u.shape[1], A.shape[1], dtype=torch.float32)


@torch.library.custom_op('gsmsr::tscan_bwd', mutates_args=())
def tscan_bwd(
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
    delta_softplus: bool,
    segments: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward (:func:`gsmsr.ops.seq_scan_triton_bwd.selective_scan_bwd_triton`): (du, ddelta, dA, dB, dC,
    dD, dz, ddelta_bias) as :func:`scan_bwd` gives them; absent inputs get empty gradients."""
    seg_len = _tscan_seg_len(u.shape[2], segments)[0]
    du, ddelta, dA, dB, dC, dD, dz, ddb = selective_scan_bwd_triton(
        u, delta, A, B, C, D, z, delta_bias, dout, states, seg_len, delta_softplus
    )
    return (
        du,
        ddelta,
        dA,
        dB,
        dC,
        dD if dD is not None else u.new_empty(0),  # separate empties: outputs must not alias
        dz if dz is not None else u.new_empty(0),
        ddb if ddb is not None else u.new_empty(0),
    )


@tscan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, dout, states, delta_softplus, segments):
    empty = u.new_empty(0)
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A, dtype=torch.float32),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D, dtype=torch.float32) if D is not None else empty,
        torch.empty_like(z) if z is not None else empty,
        torch.empty_like(delta_bias, dtype=torch.float32) if delta_bias is not None else empty,
    )


def _tscan_setup_context(ctx, inputs, output) -> None:
    *operands, delta_softplus, segments = inputs
    ctx.delta_softplus = delta_softplus
    ctx.segments = segments
    _save_operands(ctx, *operands, output[1])


def _tscan_backward(ctx, dout, _dstates):
    operands, (states,) = _saved_operands(ctx)
    grads = tscan_bwd(*operands, dout, states, ctx.delta_softplus, ctx.segments)
    return (*_grads_for(operands, grads), None, None)


tscan_fwd.register_autograd(_tscan_backward, setup_context=_tscan_setup_context)


# -- dispatch ---------------------------------------------------------------------------------------------------


def _triton_ready(u: Tensor) -> bool:
    """The Triton forward kernel applies: Triton importable, a float dtype of at most 32 bits."""
    return triton is not None and u.dtype.is_floating_point and u.dtype.itemsize <= 4


def reverses_natively(u: Tensor, backend: str = 'auto') -> bool:
    """True when :func:`selective_scan` without autograd runs ``reverse=True`` in the Triton forward, which walks
    time backwards itself; elsewhere it flips the operands around the kernel, and a caller that can fold the flips
    into its own work (BiMamba's backward branch under ``torch.compile``) is better off flipping itself."""
    if backend == 'triton':
        return True
    if backend != 'auto' or not (u.is_cuda and _triton_ready(u)):
        return False
    return _infer_runs_triton()


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    backend: str = 'auto',
    reverse: bool = False,
) -> Tensor:
    """Selective scan; shapes as in :func:`gsmsr.ops.selective_scan_ref.selective_scan_ref`.

    reverse: time runs from the end (``scan(flip(inputs)).flip(-1)``). The no-grad Triton kernel walks backwards
    itself; every other path (autograd, mamba-ssm, the PyTorch scan) flips around its kernel.

    backend: 'auto' (on CUDA tensors of at most 32-bit floats: mamba-ssm's kernel with autograd, the ``INFER_IMPL``
    kernel without; without mamba-ssm the Triton kernels, with autograd up to 16 states; else the PyTorch scan),
    'kernel' (mamba-ssm, required, also without autograd), 'triton' (:mod:`gsmsr.ops.seq_scan_triton`; with autograd
    through ``gsmsr::tscan_fwd`` / ``tscan_bwd`` (:mod:`gsmsr.ops.seq_scan_triton_bwd`) when a gradient is needed,
    else ``gsmsr::scan_infer``; interpreted, slowly, on CPU tensors) or 'ref'.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    if needs_grad and reverse:  # the autograd kernels walk forwards only
        return flipped_scan(selective_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)
    if backend == 'triton' or (
        backend == 'auto'
        and u.is_cuda
        and not cuda_kernel()
        and _triton_ready(u)
        and (not needs_grad or A.shape[1] <= MAX_STATES)
    ):
        if needs_grad:
            return tscan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, triton_train_segments(u))[0]
        return scan_infer(u, delta, A, B, C, D, z, delta_bias, delta_softplus, 'triton', reverse)
    use_kernel = (
        backend != 'ref' and cuda_kernel() and u.is_cuda and u.dtype.is_floating_point and u.dtype.itemsize <= 4
    )
    if backend == 'kernel' and not use_kernel:
        raise RuntimeError(
            'selective_scan backend "kernel" needs CUDA tensors and mamba-ssm (pip install "gsmsr[cuda]")'
        )
    if not use_kernel:
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=reverse)
    impl = 'mamba' if backend == 'kernel' else INFER_IMPL
    if needs_grad or impl == 'mamba':  # mamba-ssm's kernel needs unit stride along L; the Triton op copies itself
        u, delta, B, C, z = (unit_stride(t) for t in (u, delta, B, C, z))
    D = D.contiguous() if D is not None else None
    if needs_grad:
        return scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)[0]
    return scan_infer(u, delta, A, B, C, D, z, delta_bias, delta_softplus, impl, reverse)
