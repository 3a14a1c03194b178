"""benchmarks/bench_dwconv.py on CPU: the baseline it times is the reference, and its crop checks are exact."""

from __future__ import annotations

import importlib.util
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
    assert bench.parse_variants('fast,gelu-only')['fast'].tap_rows
    with pytest.raises(SystemExit):
        bench.parse_variants('fast,nope')
