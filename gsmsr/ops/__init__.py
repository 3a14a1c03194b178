"""Functional ops: the selective scan and its backends."""

from gsmsr.ops.selective_scan import cuda_kernel, kernel_status, selective_scan
from gsmsr.ops.selective_scan_ref import selective_scan_naive, selective_scan_ref

__all__ = ['selective_scan', 'selective_scan_ref', 'selective_scan_naive', 'cuda_kernel', 'kernel_status']
