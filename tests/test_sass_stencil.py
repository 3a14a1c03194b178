"""benchmarks/sass_stencil.py on CPU: the stencil compiles offline for sm_90a (Triton's bundled ptxas and cuobjdump)
at GSM's shape, and the findings documented on DWConvConfig hold: the default kernel issues ~5x the instructions
its 27 FMAs a tap sum need, so issue, not L1 or DRAM, is its largest floor; FAST_CONFIG issues under 0.6x of
them with 16-byte tile loads, no shared memory and at most 128 registers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'sass_stencil.py'
SHAPE = (1, 5, 180, 320, 768)


def _load():
    triton = pytest.importorskip('triton')
    tools = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'
    if not all((tools / name).exists() for name in ('ptxas', 'cuobjdump')):
        pytest.skip(f"Triton's offline CUDA tools are not in {tools}")
    spec = importlib.util.spec_from_file_location('sass_stencil', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules['sass_stencil'] = module
    spec.loader.exec_module(module)
    return module


def test_default_is_issue_bound_and_fast_issues_fewer_instructions():
    sass = _load()
    from gsmsr.ops import dwconv3d

    default, fast = (
        sass.analyse(*sass.parse_variant(name, dwconv3d), dwconv3d, SHAPE, dwconv3d.MODE_GELU, torch.bfloat16)
        for name in ('default', 'fast')
    )
    # the tap loop (9 per frame) inside the frame loop; every x load one 16-byte vector per thread
    assert default['trips'] == [5, 9] and default['x_layout'].startswith('[1, 8]')
    per_elem = lambda r, row: 32 * r['rows'][row] / r['out_per_warp_frame']  # noqa: E731
    assert per_elem(default, 'FFMA') >= 27 and per_elem(default, 'total') > 100
    floors = default['floors']
    assert floors['issue'] == max(floors.values()) and floors['issue'] > 4 * floors['DRAM']
    assert floors['issue'] > 2 * floors['L1 wavefronts']

    assert fast['interior'] == pytest.approx(43 * 38 / (45 * 40))  # tiles whose halo lies inside the frame
    assert fast['x_layout'].startswith('[1, 4]')  # int32 channel pairs: 16 bytes a thread
    assert fast['info']['regs'] <= 128 and fast['shared'] == 0 and fast['resident'] >= default['resident']
    assert per_elem(fast, 'total') < 0.6 * per_elem(default, 'total')
    assert fast['floors']['issue'] < 0.6 * floors['issue']
