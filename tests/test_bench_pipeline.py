"""benchmarks/bench_pipeline.py: its log parsing, and a CPU smoke run (tiny network and data, 1 and 2 processes)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'bench_pipeline.py'


def _load_bench():
    spec = importlib.util.spec_from_file_location('bench_pipeline', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log_line(stamp: datetime.datetime, it: int, iter_avg: float, data_avg: float) -> str:
    return (
        f'{stamp:%Y-%m-%d %H:%M:%S},{stamp.microsecond // 1000:03d} INFO: [bench..][epoch:  0, iter:{it:8,d}, '
        f'lr:(2.000e-04,2.500e-05,)] [eta: 0:00:01, time (data): {iter_avg:.3f} ({data_avg:.3f})] l_pix: 1.0e-02 '
    )


def test_parse_log_uses_timestamps_and_unrolls_running_averages():
    bench = _load_bench()
    gaps_ms = [900, 100, 100, 120, 100, 80, 100]  # iterations 1..7; the first is left out as warm-up
    data_ms = [500, 10, 20, 10, 30, 10, 10]
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5)
    lines = ['2026-01-02 03:04:05,000 INFO: Start training from epoch: 0, iter: 0']
    for k, (gap, _) in enumerate(zip(gaps_ms, data_ms), start=1):
        stamp += datetime.timedelta(milliseconds=gap)
        data_avg = sum(data_ms[:k]) / k / 1e3  # BasicSR logs running means in seconds
        lines.append(_log_line(stamp, k, sum(gaps_ms[:k]) / k / 1e3, data_avg))
    stats = bench.parse_log('\n'.join(lines), warmup=1)
    assert stats['iters'] == 7
    assert stats['median_ms'] == pytest.approx(100, abs=1e-6)
    assert stats['mean_ms'] == pytest.approx(sum(gaps_ms[1:]) / 6, abs=1e-6)
    assert stats['data_ms'] == pytest.approx(sum(data_ms[1:]) / 6, abs=2)  # logged with 1 ms resolution
    with pytest.raises(ValueError):
        bench.parse_log('\n'.join(lines[:2]), warmup=1)


def test_frames_on_disk_cover_basicsr_reds_reads():
    bench = _load_bench()
    assert bench.frames_on_disk(8, 4) == 11  # starts 0..7 read up to frame 10
    assert bench.frames_on_disk(100, 16) == 100  # late starts are redrawn within the 100 frames
    assert bench.clip_names(4) == ['001', '002', '003', '004']
    assert '011' not in bench.clip_names(12)


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / 'out'
    cmd = [
        sys.executable,
        str(SCRIPT),
        '--device', 'cpu',
        '--gpus', '2',  # two CPU processes through torchrun (gloo): the multi-GPU path
        '--torchrun',  # and one process through torchrun
        '--iters', '3',  # a warm-up and two timed iterations a row: what a median and a mean need
        '--warmup', '1',
        '--workers', '0',
        '--clips', '2',
        '--clip-frames', '8',
        '--frames-per-sample', '2',
        '--lr-size', '36',
        '--frame-size', '36x40',
        '--embed-dims', '16',
        '--num-heads', '4',
        '--prop-depth', '1',
        '--attn-depth', '1',
        '--pa-frame', '1',
        '--data', str(tmp_path / 'data'),
        '--out', str(out),
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = proc.stdout[proc.stdout.index('\nrow ') :].strip().splitlines()
    header = [c.strip() for c in table[0].split('|')]
    assert header[:2] == ['row', 'ms/iter'] and 'scaling vs 1 device (x)' in header
    rows = {cells[0]: dict(zip(header, cells)) for cells in ([c.strip() for c in ln.split('|')] for ln in table[1:])}
    pipelines = ['pipeline 1 device', 'pipeline 1 CPU process, torchrun', 'pipeline 2 CPU processes']
    assert list(rows) == ['bare step', *pipelines]
    for row in rows.values():
        assert float(row['ms/iter']) > 0 and float(row['samples/s']) > 0
    for name in pipelines:
        assert re.fullmatch(r'[+-]\d+\.\d', rows[name]['overhead vs bare (%)'])
        assert float(rows[name]['data ms/iter']) >= 0
    assert rows['pipeline 1 device']['scaling vs 1 device (x)'] == '1.00'
    assert float(rows['pipeline 2 CPU processes']['scaling vs 1 device (x)']) > 0
    assert float(rows['pipeline 1 CPU process, torchrun']['scaling vs 1 device (x)']) > 0

    logs = sorted(re.sub(r'_\d{8}_\d{6}\.log$', '', p.name) for p in out.glob('train_bench_pipeline_*.log'))
    assert logs == ['train_bench_pipeline_1proc', 'train_bench_pipeline_1proc_torchrun', 'train_bench_pipeline_2proc']
    results = json.loads((out / 'results.json').read_text())
    assert results['pipeline 1 device']['iters'] == 3
    # BasicSR's REDS layout; a clip folder holds the frames that 8 starts of 2 frames read
    assert sorted(p.name for p in (tmp_path / 'data' / 'train_sharp').iterdir()) == ['001', '002']
    assert len(list((tmp_path / 'data' / 'train_sharp_bicubic' / 'X4' / '001').glob('*.png'))) == 9
