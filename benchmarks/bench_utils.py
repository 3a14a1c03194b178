"""Shared by the benchmark scripts: timing (CUDA events, or the host clock on CPU), the training step, the table and
module settings (``--set``)."""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

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


def cpu_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` by the host clock (for CPU runs, where no CUDA events exist)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def train_step(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    lq: torch.Tensor,
    gt: torch.Tensor,
    dtype: Optional[torch.dtype] = None,
    cuda_graph: bool = False,
) -> Callable[[], torch.Tensor]:
    """One training step as GSMModel takes it: forward (autocast to ``dtype`` if given), Charbonnier loss in fp32,
    backward, optimizer step; with ``cuda_graph`` the forward and backward replay CUDA graphs
    (``train.cuda_graph``). Returns a function that runs it and returns the loss."""
    if cuda_graph:
        from gsmsr.models.train_graphs import install_train_graphs

        install_train_graphs(net)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            lq.device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=not cuda_graph
        ):
            out = net(lq)
        loss = torch.sqrt((out.float() - gt) ** 2 + 1e-12).mean()
        loss.backward()
        opt.step()
        return loss

    return step


def _made_at(frames: List[dict]) -> str:
    """Where an allocation was made: the innermost Python frame outside torch's own modules (a line of gsmsr, of a
    benchmark, or of a compiled graph's generated code, whose files live in Inductor's cache folder)."""
    for f in frames:
        name = f.get('filename', '')
        if f'{os.sep}torch{os.sep}' not in name and not name.startswith('<'):
            return f'{Path(name).name}:{f.get("line")} {f.get("name", "")}'.strip()
    return 'torch internals' if frames else 'no stack'


def live_at_peak(events: List[dict], rows: int = 15) -> Tuple[int, List[Dict[str, str]]]:
    """The allocations alive when a CUDA memory trace held the most bytes, grouped by where they were made.

    events: ``torch.cuda.memory._snapshot()['device_traces'][device]`` of a run recorded with
    ``torch.cuda.memory._record_memory_history()`` (actions ``alloc``, ``free_requested``, ``free_completed``; a
    block counts as freed at its first free event). Allocations made before the trace began are not seen.
    Returns (peak bytes of the traced allocations, rows of GiB, count and place, largest first)."""
    total = peak = peak_at = 0
    live: Dict[int, int] = {}
    for i, e in enumerate(events):  # first pass: when the peak was
        if e.get('action') == 'alloc':
            live[e['addr']] = e['size']
            total += e['size']
            if total > peak:
                peak, peak_at = total, i
        elif e.get('action') in ('free_requested', 'free_completed') and e['addr'] in live:
            total -= live.pop(e['addr'])
    alive: Dict[int, dict] = {}
    for e in events[: peak_at + 1]:  # second pass: what was alive then
        if e.get('action') == 'alloc':
            alive[e['addr']] = e
        elif e.get('action') in ('free_requested', 'free_completed'):
            alive.pop(e['addr'], None)
    groups: Dict[str, List[int]] = {}
    for e in alive.values():
        g = groups.setdefault(_made_at(e.get('frames', [])), [0, 0])
        g[0] += e['size']
        g[1] += 1
    table = [
        {'GiB': f'{size / 2**30:.3f}', 'count': str(count), 'made at': place}
        for place, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:rows]
    ]
    return peak, table


class PhasePeaks:
    """Peak CUDA memory by phase of a call: within the ``with`` block, each method named in ``targets`` (owner, name,
    label) records, per label, its calls, the highest peak reached during one of them (what was allocated when it
    began, at that call) and its largest rise over its start. A call's peak includes those of the calls it makes
    (they are carried to the caller), and the label of the whole call (e.g. ``forward``) shows a peak that no
    other phase contains as a peak above every phase. Each wrapped call synchronises and resets the device's peak
    statistic, so times measured inside the block mean nothing. ``memory``: the device memory statistics (default
    ``torch.cuda``; a stand-in for tests): ``synchronize``, ``memory_allocated``, ``max_memory_allocated`` and
    ``reset_peak_memory_stats``."""

    def __init__(self, targets: Sequence[Tuple[object, str, str]], memory: Any = None) -> None:
        self.targets = list(targets)
        self.memory = memory if memory is not None else torch.cuda
        self.stats: Dict[str, List[float]] = {}  # label -> [calls, peak, allocated at that call's start, largest rise]
        self._stack: List[int] = []  # the peak so far of each call in progress, innermost last
        self._saved: List[Tuple[object, str, Any]] = []

    def _wrap(self, fn: Callable[..., T], label: str) -> Callable[..., T]:
        mem = self.memory

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> T:
            mem.synchronize()
            if self._stack:  # what the caller reached before this call
                self._stack[-1] = max(self._stack[-1], mem.max_memory_allocated())
            start = mem.memory_allocated()
            mem.reset_peak_memory_stats()
            self._stack.append(start)
            try:
                return fn(*args, **kwargs)
            finally:
                mem.synchronize()
                peak = max(self._stack.pop(), mem.max_memory_allocated())
                row = self.stats.setdefault(label, [0, 0, 0, 0])
                row[0] += 1
                if peak > row[1]:
                    row[1], row[2] = peak, start
                row[3] = max(row[3], peak - start)
                if self._stack:
                    self._stack[-1] = max(self._stack[-1], peak)
                mem.reset_peak_memory_stats()

        return call

    _ABSENT = object()

    def __enter__(self) -> PhasePeaks:
        for owner, name, label in self.targets:
            own = vars(owner).get(name, self._ABSENT)  # the owner's own attribute (a staticmethod stays one)
            self._saved.append((owner, name, own))
            wrapped = self._wrap(getattr(owner, name), label)
            setattr(owner, name, staticmethod(wrapped) if isinstance(own, staticmethod) else wrapped)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, own in reversed(self._saved):
            if own is self._ABSENT:
                delattr(owner, name)  # inherited (or a class method seen from an instance): found there again
            else:
                setattr(owner, name, own)
        self._saved.clear()

    def rows(self) -> List[Dict[str, str]]:
        """One row per label, highest peak first: calls, peak GiB, GiB allocated at that call's start, largest rise."""
        g = 2**30
        return [
            {'phase': label, 'calls': str(n), 'peak_GiB': f'{peak / g:.2f}', 'at_start_GiB': f'{start / g:.2f}',
             'largest_rise_GiB': f'{rise / g:.2f}'}
            for label, (n, peak, start, rise) in sorted(self.stats.items(), key=lambda kv: -kv[1][1])
        ]  # fmt: skip


def selected(only: str, name: str) -> bool:
    """Whether a row ``name`` is run under ``--only``: a comma list of substrings ("$" ends a name); empty: all."""
    keys = [k for k in only.split(',') if k]
    return not keys or any(name.endswith(k[:-1]) if k.endswith('$') else k in name for k in keys)


def parse_variant(spec: str) -> Dict[str, int]:
    """``'key=int,key=int'`` (one --variants / --scan-configs entry) -> {key: int}; empty: {}."""
    return {k.strip(): int(v) for k, v in (kv.split('=') for kv in spec.split(',') if kv.strip())}


def print_table(rows: List[Dict[str, str]], cols: Sequence[str]) -> None:
    """One column per key in ``cols``, padded; a missing value prints empty."""
    widths = {c: max(len(c), *(len(r.get(c, '')) for r in rows)) for c in cols}
    print('\n' + ' | '.join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print(' | '.join(r.get(c, '').ljust(widths[c]) for c in cols))


def add_compile_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--compile-cache',
        metavar='FILE',
        help='Mega-Cache file of torch.compile artifacts: loaded before the first compilation when it exists, and '
        "this process's artifacts saved after each compiled row (to $OUT/<its name> when OUT is set, else to FILE), "
        'so a later process on a fresh machine with the same torch, Triton and GPU skips most of the compilation',
    )


class BenchCompileCache:
    """The ``--compile-cache`` file of a benchmark process (nothing when ``path`` is None)."""

    def __init__(self, path: Optional[str]) -> None:
        from gsmsr.compile_cache import MegaCache

        self._out: Optional[MegaCache] = None
        if not path:
            return
        loaded = MegaCache(Path(path)).load()
        out = os.environ.get('OUT')
        self._out = MegaCache(Path(out) / Path(path).name if out else Path(path))
        print(f'# compile cache {Path(path).name}: ' + ('loaded' if loaded else 'none loaded'), flush=True)

    def save(self) -> None:
        """Write what this process compiled so far (a run cut short by a time limit keeps what it had)."""
        if self._out is not None and self._out.save():
            print(f'# compile cache saved: {self._out.path.stat().st_size / 2**20:.1f} MiB', flush=True)


def add_set_option(parser: argparse.ArgumentParser, where: str) -> None:
    """``--set MODULE.NAME=VALUE`` (repeatable): see :func:`apply_settings`; ``where`` says which runs get them."""
    parser.add_argument(
        '--set',
        action='append',
        default=[],
        metavar='MODULE.NAME=VALUE',
        help=f'a module attribute set {where}, e.g. torch._inductor.config.triton.autotune_pointwise=False or '
        'gsmsr.archs.swsa.COMPILE_ATTENTION=False (repeatable; VALUE a Python literal)',
    )


def parse_settings(items: List[str]) -> Dict[str, Any]:
    """``MODULE.NAME=VALUE`` strings -> {dotted name: value}, each value a Python literal (``False``, ``4``)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'--set {item!r}: expected MODULE.NAME=VALUE')
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f'--set {item!r}: VALUE must be a Python literal') from None
    return settings


def apply_settings(settings: Dict[str, Any]) -> None:
    """Set each dotted name: its longest importable prefix is the module, the rest attributes below it. A name the
    module does not already have is an error (AttributeError), not a new attribute."""
    for key, value in settings.items():
        parts = key.split('.')
        for i in range(len(parts) - 1, 0, -1):
            try:
                module = importlib.import_module('.'.join(parts[:i]))
                break
            except ImportError:
                pass
        else:
            raise SystemExit(f'--set {key}: no importable module in it')
        *path, name = parts[i:]
        owner = functools.reduce(getattr, path, module)
        getattr(owner, name)
        setattr(owner, name, value)
