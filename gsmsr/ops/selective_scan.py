"""Selective-scan dispatch: mamba-ssm's CUDA kernel on CUDA tensors when installed, the PyTorch scan elsewhere."""
from __future__ import annotations

import os
from typing import Callable, Optional

from torch import Tensor

from gsmsr.ops.selective_scan_ref import selective_scan_ref

_kernel: Optional[Callable] = None
_kernel_checked = False
kernel_import_error: Optional[str] = None  # why mamba-ssm could not be used, for diagnostics


def cuda_kernel() -> Optional[Callable]:
    """mamba-ssm's ``selective_scan_fn`` if importable (``pip install gsmsr[cuda]``), else None."""
    global _kernel, _kernel_checked, kernel_import_error
    if not _kernel_checked:
        _kernel_checked = True
        if os.environ.get('GSMSR_DISABLE_MAMBA_KERNEL', '0') == '1':
            kernel_import_error = 'disabled by GSMSR_DISABLE_MAMBA_KERNEL=1'
        else:
            try:
                import torch  # noqa: F401  (selective_scan_cuda needs torch loaded first)
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
                _kernel = selective_scan_fn
            except Exception as err:  # ImportError, or a broken CUDA extension
                kernel_import_error = f'{type(err).__name__}: {err}'
    return _kernel


def kernel_status() -> str:
    """One line saying which scan runs on CUDA tensors, and why not the kernel when it is unavailable."""
    return 'mamba-ssm kernel' if cuda_kernel() is not None else f'PyTorch scan ({kernel_import_error})'


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: str = 'auto') -> Tensor:
    """Selective scan; shapes as in :func:`gsmsr.ops.selective_scan_ref.selective_scan_ref`.

    backend: 'auto' (mamba-ssm's kernel on CUDA float16/bfloat16/float32 when available, else the PyTorch
    scan), 'kernel' (mamba-ssm, required), 'triton' (:mod:`gsmsr.ops.selective_scan_triton`: chunk-parallel
    over L; interpreted, slowly, on CPU tensors) or 'ref'. 'auto' will prefer Triton once it is timed faster
    on a GPU (benchmarks/bench_scan.py).
    """
    if backend == 'triton':
        from gsmsr.ops.selective_scan_triton import selective_scan_triton
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    kernel = cuda_kernel() if backend != 'ref' else None
    use_kernel = kernel is not None and u.is_cuda and u.dtype.is_floating_point and u.dtype.itemsize <= 4
    if backend == 'kernel' and not use_kernel:
        raise RuntimeError('selective_scan backend "kernel" needs CUDA tensors and mamba-ssm '
                           '(pip install "gsmsr[cuda]")')
    if use_kernel:
        # the kernel's wrapper copies only operands without unit stride along L
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
