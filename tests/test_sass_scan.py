"""benchmarks/sass_scan.py on CPU: the scan forward compiles offline for sm_90a (Triton's bundled ptxas), and the
finding it documents holds: with ``index_loop`` the output pass loads and stores each tile as one vector per thread
and needs no shared-memory transpose; without it the tile loads are 2-byte scalars (benchmarks/NOTES.md)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'sass_scan.py'


def _load():
    pytest.importorskip('triton')
    spec = importlib.util.spec_from_file_location('sass_scan', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules['sass_scan'] = module
    spec.loader.exec_module(module)
    return module


def test_index_loop_vectorises_the_tile_loads():
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=12, seg_len=0, keep='')
    plain, looped = (sass.analyse(name, mod, args) for name in ('out8', 'out8r128i'))
    assert plain['seg_len'] % 16  # the host's segment length: the loop start tells the compiler nothing
    assert plain['load'].startswith('[1, 1]') and plain['widths']['LDG.U16'] == 3  # u, dt, z: 2-byte scalars
    assert looped['load'].startswith('[1, 8]') and looped['widths']['LDG.U16'] == 0  # one 16-byte vector a tile
    assert looped['shared'] == 0 < plain['shared']  # no transpose through shared memory
    assert looped['info']['regs'] <= 128 and looped['rows']['total'] < plain['rows']['total']
