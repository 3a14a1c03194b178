"""benchmarks/bench_infer.py: a CPU smoke run of the real ``gsmsr infer`` command (tiny network, fresh cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'bench_infer.py'


def test_bench_infer_cpu_smoke(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(SCRIPT), '--cases', '36x40x2', '--config', 'tiny', '--cache', 'fresh', '--no-reference']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert 'frames/s' in proc.stdout and 'first_frame_s' in proc.stdout and 'GPU_busy' in proc.stdout
    rows = json.loads((tmp_path / 'bench_infer' / 'rows.json').read_text())
    assert (
        len(rows) == 1 and rows[0]['input'] == '36x40' and rows[0]['tile'] == '36x40' and float(rows[0]['frames/s']) > 0
    )
    stats = json.loads((tmp_path / 'bench_infer' / '36x40x2-fresh.json').read_text())
    assert stats['frames'] == 2 and stats['peak_device_bytes'] is None and stats['first_frame_seconds'] > 0
    assert stats['gpu_busy_steady'] is None and rows[0]['GPU_busy'] == ''  # measured on CUDA only: no number on CPU
    # launch to first frame: the run's own time to it plus the start-up before the run, within the process's wall
    assert stats['first_frame_seconds'] < stats['first_frame_since_launch'] < float(rows[0]['wall_s'])
    assert abs(float(rows[0]['first_frame_s']) - stats['first_frame_since_launch']) <= 0.05
    assert '-m gsmsr infer' in (tmp_path / 'bench_infer' / '36x40x2-fresh.log').read_text()
