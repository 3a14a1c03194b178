"""benchmarks/bench_infer.py: a CPU smoke run of the real ``gsmsr infer`` command (tiny network, fresh cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # the child's stdout and stderr streamed into the log: the command, then what gsmsr infer said
    log = (tmp_path / 'bench_infer' / '36x40x2-fresh.log').read_text()
    assert '-m gsmsr infer' in log.splitlines()[0] and 'gsmsr infer: 2 frames 36x40 -> 144x160' in log
    # the launch timeline: a table per run, and the stats' phases in order from the launch seen here
    timeline = stats['timeline']
    assert '# launch timeline of 36x40x2-fresh' in proc.stdout and 'first_frame_written' in proc.stdout
    assert 'process_exit' in proc.stdout and stats['process_start_source'] == 'proc'
    times = [v for k, v in timeline.items() if k != 'first_frame_written']  # the one phase that may come earlier
    assert times == sorted(times) and timeline['first_frame_written'] == stats['first_frame_at']
    assert timeline['stream_start'] < timeline['first_frame_written']
    # the kernel's start time is in 10 ms ticks, rounded down
    assert stats['launched_at'] - 0.02 <= timeline['process_start'] <= timeline['gsmsr_import_start']


def test_bench_infer_run_timeout_keeps_a_row_and_the_log(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(SCRIPT), '--cases', '36x40x2', '--config', 'tiny', '--cache', 'fresh,warm']
    cmd += ['--no-reference', '--run-timeout', '0.01']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / 'bench_infer' / 'rows.json').read_text())
    assert [r['cache'] for r in rows] == ['fresh', 'warm']  # each run is stopped and reported, the next one runs
    assert all('over --run-timeout 0.01 s' in r['frames/s'] and float(r['wall_s']) < 60 for r in rows), rows
    log = (tmp_path / 'bench_infer' / '36x40x2-fresh.log').read_text()
    assert '-m gsmsr infer' in log and 'bench_infer: stopped after' in log


def test_a_failing_run_says_why_from_its_streamed_log(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_infer

    log = tmp_path / 'run.log'
    args = ['--weights', str(tmp_path / 'none.pth')]
    with pytest.raises(bench_infer.RunFailed, match='missing: no such file or folder') as info:
        bench_infer.run_infer(tmp_path / 'missing', tmp_path / 'out', args, [], tmp_path / 'xdg', log)
    assert info.value.wall is None  # it exited by itself
    text = log.read_text()
    assert text.startswith(sys.executable) and 'gsmsr infer: error:' in text


def test_settings_and_the_profile_reach_the_child(tmp_path):
    """--set MODULE.NAME=VALUE: set in each gsmsr infer child before its command runs, Inductor's settings and gsmsr's
    switches alike (a name the module lacks fails that child). --profile: the child's main thread under cProfile,
    its stats beside the log and its costliest functions printed. --gpu-waits: the child's samples beside the log
    (stacks; no GPU events on the CPU) and the report."""
    import pstats

    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, str(SCRIPT), '--cases', '36x40x2', '--config', 'tiny', '--cache', 'fresh', '--no-reference']
    settings = ['torch._inductor.config.triton.autotune_pointwise=False', 'gsmsr.archs.swsa.COMPILE_ATTENTION=False']
    proc = subprocess.run(
        cmd + [f'--set={s}' for s in settings] + ['--profile', '--gpu-waits'], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert ', '.join(settings) in proc.stdout
    folder = tmp_path / 'bench_infer'
    log = (folder / '36x40x2-fresh.log').read_text()
    first = '{"torch._inductor.config.triton.autotune_pointwise": false, "gsmsr.archs.swsa.COMPILE_ATTENTION": false}'
    # the prelude's arguments: settings, profile file, GPU-wait samples file ('' for none), then gsmsr's
    files = f'{folder / "36x40x2-fresh.prof"} {folder / "36x40x2-fresh.waits.json"}'
    assert f'{first} {files} infer' in log.splitlines()[0] and '2 frames 36x40' in log
    samples = json.loads((folder / '36x40x2-fresh.waits.json').read_text())
    assert samples and all(gpu is None and stack for _, gpu, stack in samples)
    assert '36x40x2-fresh: GPU idle 0.00 s' in proc.stdout
    # the profile holds the run: upscale_video below the CLI's main, which took (nearly) all of the main thread's time
    stats = pstats.Stats(str(folder / '36x40x2-fresh.prof')).stats
    entries = {(Path(file).name, name): v for (file, _, name), v in stats.items()}
    run, cli = entries[('inference.py', 'upscale_video')], entries[('cli.py', 'main')]
    assert run[1] == 1 and 0 < run[3] <= cli[3]
    for key in ('cumulative', 'self'):
        assert f'# 36x40x2-fresh, main thread (cProfile, 36x40x2-fresh.prof): by {key} time' in proc.stdout
    assert 'gsmsr/inference.py:' in proc.stdout and 'upscale_video' in proc.stdout
    proc = subprocess.run(cmd + [f'--set={s}' for s in settings], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and 'cProfile' not in proc.stdout  # no profile unless asked
    assert f'{first}   infer' in (folder / '36x40x2-fresh.log').read_text().splitlines()[0]
    for wrong in ('torch._inductor.config.triton.no_such_setting=1', 'gsmsr.archs.swsa.NO_SUCH_SWITCH=1'):
        proc = subprocess.run(cmd + ['--set', wrong], env=env, capture_output=True, text=True)
        rows = json.loads((tmp_path / 'bench_infer' / 'rows.json').read_text())
        assert proc.returncode == 0 and 'gsmsr infer failed' in rows[0]['frames/s']
        assert wrong.split('.')[-1].split('=')[0] in (tmp_path / 'bench_infer' / '36x40x2-fresh.log').read_text()
    proc = subprocess.run(cmd + ['--set', 'oops'], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "--set 'oops': expected MODULE.NAME=VALUE" in proc.stderr


@pytest.mark.parametrize(
    'cached, forbidden, expected', [(False, True, False), (True, True, True), (False, False, True)]
)
def test_bytecode_check(tmp_path, monkeypatch, cached, forbidden, expected):
    """The header's warning: torch's bytecode is missing and the environment forbids writing it (the children then
    compile torch's sources at every start), and only then."""
    import importlib.util
    import types

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_infer
    finally:
        sys.path.remove(str(SCRIPT.parent))
    pyc = tmp_path / 'scheduler.cpython.pyc'
    if cached:
        pyc.write_bytes(b'')
    spec = types.SimpleNamespace(origin=str(tmp_path / 'scheduler.py'), cached=str(pyc))
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: spec)
    monkeypatch.setattr(sys, 'flags', types.SimpleNamespace(dont_write_bytecode=False))
    if forbidden:
        monkeypatch.setenv('PYTHONDONTWRITEBYTECODE', '1')
    else:
        monkeypatch.delenv('PYTHONDONTWRITEBYTECODE', raising=False)
    assert bench_infer.torch_bytecode_cached() is expected
