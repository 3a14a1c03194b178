"""benchmarks/gpu_waits.py: the GPU's lag behind the host and its idle time by stack, from synthetic samples whose
GPU clock runs at an unknown offset from the host's."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import gpu_waits  # noqa: E402

GPU_OFFSET_MS = 123456.0  # host ms - GPU ms at an idle moment: unknown to the functions


def _samples(spec):
    """spec: (host second, GPU busy until host second or None when idle, gsmsr frame) per sample."""
    out = []
    for t, busy_until, frame in spec:
        done = max(t, busy_until or t)  # the event completes once the queued work is done
        out.append([1000.0 + t, done * 1e3 - GPU_OFFSET_MS, [f'torch/x.py:1 inner_{frame}', f'gsmsr/{frame}.py:7 f']])
    return out


def test_idle_time_goes_to_the_stack_the_host_was_in():
    spec = [(0.0, None, 'load'), (0.1, None, 'load'), (0.2, 0.45, 'net'), (0.3, 0.45, 'net'), (0.4, 0.45, 'net')]
    spec += [(0.5, None, 'decode'), (0.6, None, 'decode'), (0.7, 1.5, 'net'), (0.8, 1.5, 'net')]
    samples = _samples(spec)
    lags = gpu_waits.lags(samples)
    assert lags[0] == pytest.approx(0.0, abs=1e-6) and lags[2] == pytest.approx(250.0, abs=1e-3)
    # an idle sample's interval (to the next sample) counts to the host's stack at that sample
    idle, rows = gpu_waits.idle_by_stack(samples, 1000.0, 1000.8)
    assert idle == pytest.approx(0.4, abs=1e-9)
    by_frame = {r['gsmsr_frame']: float(r['idle_s']) for r in rows}
    assert by_frame == {'gsmsr/load.py:7 f': 0.2, 'gsmsr/decode.py:7 f': 0.2}
    assert rows[0]['innermost_frame'].startswith('torch/x.py:1 inner_')
    # only inside the window, the last interval cut at its end
    idle, _ = gpu_waits.idle_by_stack(samples, 1000.05, 1000.55)
    assert idle == pytest.approx(0.15, abs=1e-9)
    steps = gpu_waits.timeline(samples, 1000.0, 1000.9, step=0.5)
    assert [s['gpu_idle'] for s in steps] == ['40%', '50%'] and steps[0]['max_lag_ms'] == '250'


def test_samples_before_cuda_have_no_lag_and_count_as_nothing():
    samples = _samples([(0.0, None, 'a'), (0.1, None, 'a')])
    samples[0][1] = None
    assert gpu_waits.lags(samples)[0] is None
    assert gpu_waits.idle_by_stack(samples, 999.0, 1001.0)[0] == 0.0


def test_sampler_records_the_main_thread_stack(tmp_path):
    path = tmp_path / 'w.json'
    sampler = gpu_waits.Sampler(str(path), interval=0.002)
    sampler.start()

    def busy_here():
        end = time.perf_counter() + 0.1
        while time.perf_counter() < end:
            pass

    busy_here()
    sampler.stop()
    samples = gpu_waits.load(str(path))
    assert samples and all(g is None for _, g, _ in samples)  # no CUDA here
    assert any('busy_here' in s[2][0] for s in samples)
