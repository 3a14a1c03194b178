"""Shared by the benchmark scripts: CUDA-event timing and the printed table."""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import torch

T = TypeVar('T')


def cuda_time(fn: Callable[[], T], repeats: int, warmup: int = 1) -> Tuple[float, T]:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and the last result."""
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def print_table(rows: List[Dict[str, str]], cols: Sequence[str]) -> None:
    """One column per key in ``cols``, padded; a missing value prints empty."""
    widths = {c: max(len(c), *(len(r.get(c, '')) for r in rows)) for c in cols}
    print('\n' + ' | '.join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print(' | '.join(r.get(c, '').ljust(widths[c]) for c in cols))
