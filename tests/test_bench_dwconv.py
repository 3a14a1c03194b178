"""benchmarks/bench_dwconv.py on CPU: the baseline it times is the reference, and its crop checks are exact."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsmsr.ops.dwconv3d import dwconv3d_gelu_backward_ref, dwconv3d_gelu_ref

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_dwconv.py'


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location('bench_dwconv', SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_shifted_sum_baseline_and_crop_checker():
    bench = _load()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 20, 6, 8, generator=g, dtype=torch.float64)  # more frames and rows than the crop
    w = torch.randn(8, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    dout = torch.randn_like(x)
    y = dwconv3d_gelu_ref(x, w, b)
    torch.testing.assert_close(bench.shifted_sum_gelu(x, w, b), y, rtol=1e-12, atol=1e-12)
    check = bench.Checker(x, w, b, dout)
    assert check.forward(y, True) < 1e-14
    assert check.forward(dwconv3d_gelu_ref(x, w, b, gelu=False), False) < 1e-14
    assert check.grads(*dwconv3d_gelu_backward_ref(bench.masked_dout(dout), x, w, b)) < 1e-12
    # and it does see an error
    assert check.forward(y + 1e-3 * torch.rand_like(y), True) > 1e-6


def test_variants_by_name():
    bench = _load()
    assert bench.parse_variants('') == {}
    assert list(bench.parse_variants('all')) == list(bench.VARIANTS)
    assert bench.parse_variants('c64-w4,noreg')['c64-w4'].block_c == 64
    assert bench.DEFAULT_CONFIG not in bench.VARIANTS.values()  # the default has its own row
    with pytest.raises(SystemExit):
        bench.parse_variants('c64-w4,nope')


def test_baseline_module_runs_beside_the_default(tmp_path):
    """--baseline loads a copy of the op module (here today's) as a module of its own whose launchers run, and its
    default is timed first. In a subprocess: loading the copy registers the gsmsr ops again."""
    copy = tmp_path / 'prev_dwconv3d.py'
    copy.write_text((SCRIPT.parents[1] / 'gsmsr' / 'ops' / 'dwconv3d.py').read_text())
    code = f"""
import sys
sys.path.insert(0, {str(SCRIPT.parent)!r})
import torch
import bench_dwconv as bench
base = bench.load_baseline({str(copy)!r})
runs = bench.stencils(bench.parse_variants('noreg'), base)
assert list(runs) == ['baseline', 'default', 'noreg'], list(runs)
assert runs['baseline'] == (base, base.DEFAULT_CONFIG) and base is not bench.dwconv3d
assert runs['default'][0] is bench.dwconv3d
x, w, b = torch.randn(1, 2, 5, 6, 8), torch.randn(8, 1, 3, 3, 3), torch.randn(8)
y = base.dwconv3d_gelu_triton(x, w, b, True, base.DWConvConfig(block_h=4, block_w=4, block_c=8))
torch.testing.assert_close(y, bench.dwconv3d_gelu_ref(x, w, b), rtol=1e-5, atol=1e-5)
"""
    subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': str(SCRIPT.parents[1])})
