"""benchmarks/bench_scan.py on CPU: every --seq-sweep configuration is a valid call of the Triton scan forward
(interpreted here, tiny shape) with a distinct label, and gives the default's output to the fp32 tolerance of the
reference tests (1e-5); the first is the function's default."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from gsmsr.ops.seq_scan_triton import selective_scan_fwd_triton

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_scan.py'


def _load():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location('bench_scan', SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def _operands(seed: int):
    """Scan operands with fewer channels (40) than one 64-channel program, 8 states, 24 tokens."""
    g = torch.Generator().manual_seed(seed)
    dim, state, length = 40, 8, 24
    return dict(
        u=torch.randn(1, dim, length, generator=g),
        delta=0.5 * torch.randn(1, dim, length, generator=g),
        A=-torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1),
        B=torch.randn(1, state, length, generator=g),
        C=torch.randn(1, state, length, generator=g),
        D=torch.ones(dim),
        z=torch.randn(1, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g),
    )


def test_seq_sweep_configs_run_and_are_labelled_apart():
    bench = _load()
    labels = [c.label() for c in bench.SEQ_SWEEP]
    assert len(set(labels)) == len(labels), labels
    inp = _operands(0)
    default = selective_scan_fwd_triton(**inp, delta_softplus=True)
    for config in bench.SEQ_SWEEP:
        kwargs = config.kwargs()
        kwargs['segments'] = 3  # the CPU path would run one segment; the sweep's segment counts are GPU-sized
        y = selective_scan_fwd_triton(**inp, delta_softplus=True, **kwargs)
        torch.testing.assert_close(y, default, rtol=1e-5, atol=1e-5, msg=config.label())


def test_first_seq_sweep_row_is_the_default():
    bench = _load()
    defaults = inspect.signature(selective_scan_fwd_triton).parameters
    for key, value in bench.SEQ_SWEEP[0].kwargs().items():
        assert defaults[key].default == value, key
