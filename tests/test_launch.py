"""gsmsr.launch: the process's start time from the OS, its fallbacks, and the start of the launch timeline."""

from __future__ import annotations

import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from conftest import REPO_ROOT
from gsmsr import launch


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc is Linux')
def test_process_start_is_the_launch_time_of_a_fresh_process():
    code = 'from gsmsr import launch; print(repr(launch.process_start()[0]), launch.process_start()[1])'
    launched = time.time()
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    start, source = out.stdout.split()
    # the kernel counts in clock ticks (10 ms) and rounds down: at most one tick before the launch seen here
    assert source == 'proc' and launched - 0.02 <= float(start) <= launched + 5, (launched, start)


def test_timeline_starts_with_the_process_then_the_gsmsr_import():
    timeline, source = launch.launch_timeline()
    assert list(timeline) == ['process_start', 'gsmsr_import_start']
    assert timeline['process_start'] <= timeline['gsmsr_import_start'] <= time.time()
    assert source in ('proc', 'psutil', 'gsmsr_import')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='/proc is Linux')
def test_process_start_is_read_with_the_gsmsr_import(monkeypatch):
    """Read at import, next to GSMSR_IMPORT_START: a long-lived process (this test runner) whose wall and boot
    clocks drift apart later still reports the start it saw then."""
    start = launch._PROC_START
    assert start is not None and start <= launch.GSMSR_IMPORT_START
    monkeypatch.setattr(launch, '_proc_start', lambda: launch.GSMSR_IMPORT_START + 60.0)  # a later, drifted reading
    assert launch.process_start() == (start, 'proc')


def test_falls_back_to_psutil_then_to_the_gsmsr_import(monkeypatch):
    monkeypatch.setattr(launch, '_PROC_START', None)
    monkeypatch.setattr(launch, '_psutil_start', lambda: launch.GSMSR_IMPORT_START - 1.5)
    assert launch.process_start() == (launch.GSMSR_IMPORT_START - 1.5, 'psutil')
    monkeypatch.setattr(launch, '_psutil_start', lambda: None)
    assert launch.process_start() == (launch.GSMSR_IMPORT_START, 'gsmsr_import')
    # a start after the import (a wrong clock) is not believed
    monkeypatch.setattr(launch, '_psutil_start', lambda: launch.GSMSR_IMPORT_START + 1.0)
    assert launch.process_start() == (launch.GSMSR_IMPORT_START, 'gsmsr_import')


def test_pyav_is_imported_with_the_first_video_file_only(tmp_path):
    """PyAV costs every launch ~0.2 s: ``gsmsr infer`` on folders of frames never imports it."""
    code = (
        'import sys, gsmsr.inference\n'
        'from gsmsr import video_io\n'
        'print("av" in sys.modules)\n'
        f'video_io.open_source({str(tmp_path)!r}).close()\n'
        'print("av" in sys.modules)\n'
        f'try: video_io.open_source({str(tmp_path / "x.mp4")!r})\n'
        'except video_io.InputError: pass\n'
        'print("av" in sys.modules)\n'
    )
    cv2.imwrite(str(tmp_path / '00000.png'), np.zeros((4, 4, 3), np.uint8))
    (tmp_path / 'x.mp4').write_bytes(b'not a video')
    out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False', 'True'], out.stderr
