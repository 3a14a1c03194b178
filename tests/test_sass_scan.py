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


def test_output_pass_loads_vector_tiles_ahead_of_use():
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=16, seg_len=0, keep='')
    capped, free, reverse = (sass.analyse(name, mod, args) for name in ('out8r128', 'out8', 'revout8r128'))
    for r in (capped, free, reverse):
        assert r['load'].startswith('[1, 8]') and r['store'].startswith('[1, 8]')  # a tile: one vector a thread
        assert r['widths']['LDG.U16'] == 0 and r['shared'] == 0  # no 2-byte loads, no transpose
    for r in (capped, reverse):
        assert r['info']['regs'] <= 128 and r['info']['spill_st'] == 0
    # the reverse scan (tiles last first) is the same loop: tile starts still multiples of the tile, same work
    assert abs(reverse['rows']['total'] - capped['rows']['total']) <= 1
    assert free['info']['regs'] < 128  # the cap is room the compiler fills with loads in flight, not a squeeze
    ahead = lambda r: int(r['dist_wide'].split()[0])  # noqa: E731  (median load-to-use distance, instructions)
    assert ahead(capped) > 2 * ahead(free)


def test_pointwise_outside_leaves_the_decays_alone():
    """With dt's softplus and the gate outside the kernel (bimamba.POINTWISE_OUTSIDE) the output pass's special-
    function ops are the 16 decays alone, and a third of its instructions go (benchmarks/NOTES.md)."""
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=16, seg_len=0, keep='')
    r = sass.analyse('out8r128p1', mod, args)
    mufu = {k: v for k, v in r['rows'].items() if k.startswith('MUFU') and v}
    assert mufu == {'MUFU.EX2': 16}, mufu
    assert r['rows']['total'] < 110  # 148 with them inside


def test_token_major_dt_is_one_line_a_token():
    """With dt token-major (bimamba.DT_TOKENS) each token's dt is one 4-byte load a thread, a warp's 32 channels in
    one line, instead of a share of two 16-byte tile loads touching a line a thread: in both passes one LDG.32 a token
    and 7 fewer L1 wavefronts, for about one instruction more and no spills; with two channels a thread, two loads
    (benchmarks/NOTES.md)."""
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=16, seg_len=0, keep='')
    for name in ('out8r128p1', 'sum8r128p1', 'revout8r128p1'):
        channels, tokens = sass.analyse(name, mod, args), sass.analyse(name + 't1', mod, args)
        assert tokens['widths']['LDG.32'] == 1 and channels['widths']['LDG.32'] == 0, name
        assert tokens['l1'] == channels['l1'] - 7, name
        assert tokens['rows']['total'] <= channels['rows']['total'] + 2, name
        assert tokens['info']['spill_st'] == 0 and tokens['info']['regs'] <= 128, name
    # two channels a thread: the token's two halves, no layout conversion (shuffles) and no spills
    channels, tokens = sass.analyse('out8r168p1c2', mod, args), sass.analyse('out8r168p1t1c2', mod, args)
    assert tokens['widths']['LDG.32'] == 2 and tokens['rows']['SHFL'] == 0
    assert tokens['rows']['total'] <= channels['rows']['total'] + 2 and tokens['info']['spill_st'] == 0
    assert tokens['l1'] == channels['l1'] - 14


def test_pipelined_loop_copies_each_b_c_row_once():
    """stages > 1: the tile loop's loads become async copies into shared memory, and the B|C row of a token is one
    copy for the warp (``_row_staged``), so a program needs ~4 KB of shared memory; copying the broadcast pieces a
    thread each took 34 KB and cut an SM's programs from 16 to 6 (benchmarks/NOTES.md). No global loads are left in
    the loop (token-major dt comes as a tile, 2 bytes a token being too narrow for an async copy), and no spills at
    the register cap."""
    sass = _load()
    mod = sass.load_module('gsmsr.ops.seq_scan_triton')
    args = argparse.Namespace(length=288000, dim=384, dtype='bf16', warps_per_sm=16, seg_len=0, keep='')
    for name in ('out8r128p2t1s3', 'revsum8r128p2t1s3'):
        r = sass.analyse(name, mod, args)
        assert r['shared'] <= 4096, (name, r['shared'])
        assert r['rows']['LDG'] == 0, name
        assert r['info']['spill_st'] == 0 and r['info']['regs'] <= 128, name
