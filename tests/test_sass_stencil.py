"""benchmarks/sass_stencil.py on CPU: the stencil compiles offline for sm_90a (Triton's bundled ptxas and cuobjdump)
at GSM's shape, and the findings documented on DWConvConfig hold: the default issues under 80 instructions an
output element (the previous kernel 132) with 16-byte tile loads, no shared memory and at most 128 registers, and
the model counts the same work for the 64-channel, 4-warp tile that measured 11 % slower."""

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


def test_default_instructions_and_a_tile_the_model_cannot_tell_apart():
    sass = _load()
    from gsmsr.ops import dwconv3d

    default, c64 = (
        sass.analyse(*sass.parse_variant(name, dwconv3d), dwconv3d, SHAPE, dwconv3d.MODE_GELU, torch.bfloat16)
        for name in ('default', 'default,block_c=64,num_warps=4')
    )
    per_elem = lambda r, row: 32 * r['rows'][row] / r['out_per_warp_frame']  # noqa: E731
    assert default['interior'] == pytest.approx(43 * 38 / (45 * 40))  # tiles whose halo lies inside the frame
    assert default['x_layout'].startswith('[1, 4]')  # int32 channel pairs: 16 bytes a thread
    assert default['info']['regs'] <= 128 and default['shared'] == 0
    assert per_elem(default, 'FFMA') >= 27 and per_elem(default, 'total') < 80  # the previous kernel issued 132
    # measured 0.99 against 1.11 ms, yet the same instructions a warp, warps a scheduler and issue floor
    assert default['rows']['total'] == pytest.approx(c64['rows']['total'], rel=1e-3)
    assert default['warps_per_smsp'] == c64['warps_per_smsp'] and default['resident'] == 2 * c64['resident']
    assert default['floors']['issue'] == pytest.approx(c64['floors']['issue'], rel=1e-3)
