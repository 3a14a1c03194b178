"""Where the GPU waits for the host: sample the main thread's Python stack and the GPU's queue together.

A sampler thread wakes every ``interval`` seconds. Each time it records the main thread's stack and, once CUDA is
initialised, a timing event on the device's default stream (gsmsr runs the network there), with the host time just
before the record (a record that took longer than MAX_RECORD_S keeps no event: its time is unknown). An event
completes when the GPU has finished everything queued before it, so ``lag`` = (its completion) - (its recording) is
how far the GPU trails the host at that moment; a lag of about zero means the GPU had run out of queued work: it
was idle, waiting for whatever the host was doing. The completions are on the GPU's clock, the recordings on the
host's; the offset between them is taken from the sample with the least lag, which is assumed idle (the first
samples, before the network runs, are).

    sampler = Sampler(path); sampler.start()   # in the measured process, before its work
    ...; sampler.stop()                        # writes ``path`` (JSON): [unix time, gpu ms or null, stack] rows
    rows = idle_by_stack(load(path), t0, t1)   # anywhere: idle seconds in [t0, t1] by the host's stack

Used by ``bench_infer.py --gpu-waits``. Sampling costs the main thread a little GIL time (~10 us a sample).
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

IDLE_LAG_MS = 2.0  # a sample whose event completed within this of its recording finds the GPU idle
MAX_RECORD_S = 0.0005  # a record that took longer (blocked behind the main thread's launch) has no usable time
PACKAGE = 'gsmsr/'  # the innermost frame in this package names what the host was doing in gsmsr's terms


REPO = str(Path(__file__).resolve().parents[1]) + '/'


def _where(frame) -> str:
    path = frame.f_code.co_filename
    if path.startswith(REPO):
        path = path[len(REPO) :]
    elif 'site-packages/' in path or 'dist-packages/' in path:
        path = path.split('-packages/', 1)[1]
    elif '/inductor/' in path:  # a module Inductor generated (its cache may live in a folder named gsmsr)
        path = 'inductor-generated/' + path.rsplit('/', 1)[1]
    return f'{path}:{frame.f_lineno} {frame.f_code.co_name}'


def stack_of(thread_id: int, depth: int = 40) -> List[str]:
    """The thread's Python frames, innermost first (at most ``depth``)."""
    frame = sys._current_frames().get(thread_id)
    out = []
    while frame is not None and len(out) < depth:
        out.append(_where(frame))
        frame = frame.f_back
    return out


class Sampler:
    """Samples the calling thread's stack and the GPU's queue every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, path: str, interval: float = 0.005) -> None:
        self.path = Path(path)
        self.interval = interval
        self.main = threading.get_ident()
        self.samples: List[Tuple[float, object, List[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='gpu-waits', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import torch

        while not self._stop.wait(self.interval):
            event, before = None, time.time()
            if torch.cuda.is_initialized():
                event = torch.cuda.Event(enable_timing=True)
                event.record(torch.cuda.default_stream())
                if time.time() - before > MAX_RECORD_S:  # blocked (a driver lock): the lag would be unknown
                    event = None
            self.samples.append((before, event, stack_of(self.main)))

    def stop(self) -> None:
        """Stop sampling, wait for the GPU, and write the samples (events as ms since the first one)."""
        import torch

        self._stop.set()
        self._thread.join()
        timed = [e for _, e, _ in self.samples if e is not None]
        if timed:
            torch.cuda.synchronize()
        rows = []
        for t, event, stack in self.samples:
            gpu = timed[0].elapsed_time(event) if event is not None else None
            rows.append([t, gpu, stack])
        self.path.write_text(json.dumps(rows))


def load(path: str) -> List[list]:
    return json.loads(Path(path).read_text())


def lags(samples: List[list]) -> List[Optional[float]]:
    """Per sample, ms by which the GPU trailed the host (None before CUDA was up): completion minus recording, on
    one clock, with the offset that makes the least lag zero."""
    timed = [(t * 1e3, g) for t, g, _ in samples if g is not None]
    if not timed:
        return [None] * len(samples)
    offset = max(t - g for t, g in timed)  # host ms = gpu ms + offset at an idle sample; elsewhere gpu + offset > t
    return [None if g is None else g + offset - t * 1e3 for t, g, _ in samples]


def _frame_in(stack: List[str], package: str) -> str:
    return next((f for f in stack if f.startswith(package)), stack[-1] if stack else '?')


def idle_by_stack(samples: List[list], t0: float, t1: float, top: int = 15) -> Tuple[float, List[Dict[str, str]]]:
    """GPU-idle seconds in [t0, t1] (Unix times) and the host stacks they went to: rows by the innermost gsmsr frame
    and the innermost frame of all, most idle first. A sample's interval (to the next sample) counts as idle when its
    event found the GPU idle."""
    lag = lags(samples)
    spent: Dict[Tuple[str, str], float] = collections.defaultdict(float)
    total = 0.0
    for i in range(len(samples) - 1):
        t, _, stack = samples[i]
        if not (t0 <= t < t1) or lag[i] is None or lag[i] > IDLE_LAG_MS:
            continue
        dt = min(samples[i + 1][0], t1) - t
        total += dt
        spent[(_frame_in(stack, PACKAGE), stack[0] if stack else '?')] += dt
    rows = [
        {'idle_s': f'{s:.2f}', 'gsmsr_frame': g, 'innermost_frame': inner}
        for (g, inner), s in sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    ]
    return total, rows


def timeline(samples: List[list], t0: float, t1: float, step: float = 0.5) -> List[Dict[str, str]]:
    """Per ``step`` seconds from t0: the GPU's idle share, its largest lag (how far ahead the host ran) and the host's
    most sampled gsmsr frame."""
    lag = lags(samples)
    rows = []
    start = t0
    while start < t1:
        end = min(start + step, t1)
        inside = [i for i, (t, _, _) in enumerate(samples) if start <= t < end and lag[i] is not None]
        if inside:
            idle = sum(1 for i in inside if lag[i] <= IDLE_LAG_MS) / len(inside)
            frames = collections.Counter(_frame_in(samples[i][2], PACKAGE) for i in inside)
            rows.append(
                {
                    'from_s': f'{start - t0:.1f}',
                    'gpu_idle': f'{100 * idle:.0f}%',
                    'max_lag_ms': f'{max(lag[i] for i in inside):.0f}',
                    'host_mostly_in': frames.most_common(1)[0][0],
                }
            )
        start = end
    return rows
