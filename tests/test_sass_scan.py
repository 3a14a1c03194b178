"""benchmarks/sass_scan.py on CPU: the scan forward compiles offline for sm_90a (Triton's bundled ptxas), and the
findings its defaults rest on hold: the output pass loads and stores each tile as one vector per thread with no
shared-memory transpose (the loop over the tile index), and its 128-register cap lets the tile loads be issued well
ahead of their use, which the compiler's own choice (~90 registers) does not (benchmarks/NOTES.md). The reverse scan
(BiMamba's backward branch without autograd) compiles to the same loop."""

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


def _analyser():
    """sass_scan's ``analyse`` for a variant name, at the default call's shape: L = 288k, D = 384, bf16."""
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=16, seg_len=0, keep='')
    return lambda name: sass.analyse(name, mod, args)


def test_output_pass_loads_vector_tiles_ahead_of_use():
    analyse = _analyser()
    capped, free, reverse = (analyse(name) for name in ('out8r128', 'out8', 'revout8r128'))
    for r in (capped, free, reverse):
        assert r['load'].startswith('[1, 8]') and r['store'].startswith('[1, 8]')  # a tile: one vector a thread
        assert r['widths']['LDG.U16'] == 0 and r['shared'] == 0  # no 2-byte loads, no transpose
    assert capped['info']['regs'] <= 128 and capped['info']['spill_st'] == 0
    # unpipelined, the reverse spills one 4-byte register a tile at the cap with the polynomial softplus (Triton 3.6;
    # none with libdevice's log); pipelined, as inference runs it, none: test_pipelined_loop_copies_each_b_c_row_once
    assert reverse['info']['regs'] <= 128 and reverse['info']['spill_st'] <= 4
    # the reverse scan (tiles last first) is the same loop: tile starts still multiples of the tile, no more work (1.1
    # instructions a token fewer with the polynomial softplus, its spill included; the same 148 with libdevice's log)
    assert reverse['rows']['total'] <= capped['rows']['total'] + 1
    assert free['info']['regs'] < 128  # the cap is room the compiler fills with loads in flight, not a squeeze
    ahead = lambda r: int(r['dist_wide'].split()[0])  # noqa: E731  (median load-to-use distance, instructions)
    assert ahead(capped) > 2 * ahead(free)


def test_gate_outside_takes_special_function_ops_off():
    """With the gate once outside the scans (bimamba.GATE_OUTSIDE) the output pass's special-function ops are the 16
    decays and the softplus's exp (no sigmoid's exp and reciprocal), with 16 instructions fewer a token; the summary
    pass has the same 17 (benchmarks/NOTES.md). The softplus is one of them: its log1p is FMA-pipe arithmetic."""
    analyse = _analyser()
    gated, ungated, summary = analyse('out8r128s3'), analyse('out8r128s3g1'), analyse('sum8r128s3')
    mufu = lambda r: {k: v for k, v in r['rows'].items() if k.startswith('MUFU') and v}  # noqa: E731
    assert mufu(gated) == {'MUFU.EX2': 18, 'MUFU.RCP': 1} and mufu(ungated) == {'MUFU.EX2': 17}
    assert ungated['rows']['total'] <= gated['rows']['total'] - 12
    assert mufu(summary) == {'MUFU.EX2': 17}
    assert summary['info']['spill_st'] == 0 and summary['info']['regs'] <= 128


def test_pipelined_loop_copies_each_b_c_row_once():
    """stages > 1: the tile loop's loads become async copies into shared memory, and the B|C row of a token is one
    copy for the warp (``_row_staged``), so a program needs ~4 KB of shared memory; copying the broadcast pieces a
    thread each took 34 KB and cut an SM's programs from 16 to 6 (benchmarks/NOTES.md). No global loads are left in
    the loop, and no spills at the register cap, forwards and in reverse."""
    analyse = _analyser()
    for name in ('out8r128s3g1', 'revout8r128s3g1', 'revsum8r128s3'):
        r = analyse(name)
        assert r['shared'] <= 4096, (name, r['shared'])
        assert r['rows']['LDG'] == 0, name
        assert r['info']['spill_st'] == 0 and r['info']['regs'] <= 128, name
