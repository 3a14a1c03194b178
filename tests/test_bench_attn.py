"""benchmarks/bench_attn.py: its two attention cores agree with the fp64 reference on CPU (eager, tiny size)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_attn.py'


def _load_bench():
    spec = importlib.util.spec_from_file_location('bench_attn', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('shifted', [False, True])
def test_bench_cores_agree_on_cpu(shifted):
    bench = _load_bench()
    inp = bench.make_inputs(12, torch.float64, torch.device('cpu'))
    assert inp['labels'].shape == (12, bench.N)
    if shifted:  # these windows hold more than one region, so the mask is exercised
        assert any(len(row.unique()) > 1 for row in inp['labels'])
    want = bench.reference(inp, shifted, chunk=5)
    for name, core in bench.CORES.items():
        out, _ = bench.run_once(core, inp, shifted, backward=False)
        assert bench.rel_err(out, want) < 1e-12, name
    # CPU SDPA's bias gradient is off by ~1e-7 (fp64) once the -100 mask is in.
    _, grads = bench.run_once(bench.CORES['sdpa'], inp, shifted, backward=True)
    _, ref_grads = bench.run_once(bench.CORES['explicit'], inp, shifted, backward=True)
    for name, a, b in zip('qkvb', grads, ref_grads):
        assert bench.rel_err(a, b) < (1e-6 if name == 'b' else 1e-12), name
