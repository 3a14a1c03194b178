"""GPU check of the Triton selective-scan backward (gsmsr.ops.seq_scan_triton_bwd), compiled, at GSM's training
shape (batch 1, L = 20,480, D = 384, N = 16, softplus, every operand), through ``selective_scan(backend='triton')``
(the gsmsr::tscan_fwd / tscan_bwd custom ops, training segments).

    python -m pytest -m gpu tests/gpu/test_seq_scan_triton_bwd_gpu.py -s

Gradients against the PyTorch reference in float64 (float32 inputs upcast; bf16 inputs are the same rounded
values) and, when mamba-ssm is installed, its kernel (backend 'kernel'). Prints every gradient's error. Skips
without CUDA + Triton.
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Dict

import pytest
import torch

from gsmsr.ops import cuda_kernel, selective_scan, selective_scan_ref
from gsmsr.ops.seq_scan_triton import selective_scan_fwd_triton
from gsmsr.ops.seq_scan_triton_bwd import selective_scan_bwd_triton
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
# max abs error relative to max |reference gradient|: fp32 differs by rounding (ex2.approx, summation orders of
# the channel and token sums); bf16 gradients of bf16 tensors are rounded to bf16 (2^-8 relative)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _inputs(batch: int, dim: int, state: int, length: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device='cuda').manual_seed(0)
    r = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, device='cuda', generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=r(batch, dim, length).to(dtype),
        delta=(0.5 * r(batch, dim, length)).to(dtype),
        A=-torch.arange(1, state + 1, device='cuda', dtype=torch.float32).repeat(dim, 1),
        B=r(batch, state, length).to(dtype),
        C=r(batch, state, length).to(dtype),
        D=torch.ones(dim, device='cuda'),
        z=r(batch, dim, length).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


def _grads(fn, inp: Dict[str, torch.Tensor], dout: torch.Tensor) -> Dict[str, torch.Tensor]:
    x = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y = fn(**x, delta_softplus=True)
    return dict(zip(NAMES, torch.autograd.grad(y, [x[k] for k in NAMES], dout.to(y.dtype))))


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_gradients_match_reference_and_mamba_at_gsm_training_shape(dtype):
    inp = _inputs(1, 384, 16, 20_480, dtype)
    dout = torch.randn(1, 384, 20_480, device='cuda', generator=torch.Generator(device='cuda').manual_seed(1))
    dout = dout.to(dtype)
    got = _grads(lambda **k: selective_scan(**k, backend='triton'), inp, dout)
    ref = _grads(selective_scan_ref, {k: v.double() for k, v in inp.items()}, dout.double())
    mamba = _grads(lambda **k: selective_scan(**k, backend='kernel'), inp, dout) if cuda_kernel() else None
    failures = []
    for k in NAMES:
        assert torch.isfinite(got[k]).all(), f'non-finite d{k}'
        errs = {'ref': _err(got[k], ref[k])}
        if mamba is not None:
            errs['mamba'] = _err(got[k], mamba[k])
            errs['mamba_vs_ref'] = _err(mamba[k], ref[k])
        print(f'{dtype} d{k}:', ' '.join(f'{n}={v:.1e}' for n, v in errs.items()))
        if errs['ref'] > TOL[dtype] or errs.get('mamba', 0.0) > 2 * TOL[dtype]:
            failures.append((k, errs))
    assert not failures, failures


@pytest.mark.parametrize('segments', [1, 7, 200])
def test_segment_counts_agree(segments):
    """The backward restarted from the forward's segment states (few, odd and many segments) against the
    training default's split, fp32, batch 2, a partial channel block (D = 200)."""
    inp = _inputs(2, 200, 16, 10_001, torch.float32)
    dout = torch.randn(2, 200, 10_001, device='cuda', generator=torch.Generator(device='cuda').manual_seed(1))
    base = _grads(lambda **k: selective_scan(**k, backend='triton'), inp, dout)
    with torch.no_grad():
        fwd = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=segments, return_states=True)
        _, states, seg_len = fwd
        grads = selective_scan_bwd_triton(*(inp[k] for k in NAMES), dout, states, seg_len, True)
    for k, g in zip(NAMES, grads):
        err = _err(g, base[k])
        print(f'segments={segments} d{k}: {err:.1e}')
        assert err <= TOL[torch.float32], (k, err)


@pytest.mark.parametrize(
    'token_tile,maxnreg,lane_sum,stages',
    [(4, None, True, 1), (2, 168, False, 1), (1, 128, True, 1), (8, None, True, 1), (2, 168, True, 2)],
)
def test_backward_configs_agree(token_tile, maxnreg, lane_sum, stages):
    """Checkpoint tiles, register caps, the per-column reduction and the pipelined tile loop against the default
    configuration (bf16)."""
    inp = _inputs(1, 384, 16, 20_480, torch.bfloat16)
    dout = torch.randn(1, 384, 20_480, device='cuda', generator=torch.Generator(device='cuda').manual_seed(1))
    dout = dout.to(torch.bfloat16)
    with torch.no_grad():
        _, states, seg_len = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=128, return_states=True)
        args = (*(inp[k] for k in NAMES), dout, states, seg_len, True)
        base = selective_scan_bwd_triton(*args)
        grads = selective_scan_bwd_triton(
            *args, token_tile=token_tile, maxnreg=maxnreg, lane_sum=lane_sum, stages=stages
        )
    for k, a, b in zip(NAMES, grads, base):
        err = _err(a, b)
        print(f'tile={token_tile} maxnreg={maxnreg} lane_sum={lane_sum} stages={stages} d{k}: {err:.1e}')
        assert err <= TOL[torch.bfloat16], (k, err)


@pytest.mark.parametrize('state', [16, 17])
def test_auto_trains_on_triton_without_mamba(monkeypatch, state):
    """Without mamba-ssm, backend 'auto' with autograd takes the Triton kernels (bit for bit backend 'triton', both
    directions) up to 16 states, and the PyTorch scan beyond (the backward's limit)."""
    # the module, not the function that gsmsr.ops exports under the same name
    monkeypatch.setattr(importlib.import_module('gsmsr.ops.selective_scan'), 'cuda_kernel', lambda: False)
    inp = _inputs(1, 64, state, 3_000, torch.float32)
    dout = torch.randn_like(inp['u'])
    expected = 'triton' if state <= 16 else 'ref'
    for reverse in (False, True):
        auto = _grads(functools.partial(selective_scan, reverse=reverse), inp, dout)
        want = _grads(functools.partial(selective_scan, backend=expected, reverse=reverse), inp, dout)
        for name in NAMES:
            assert torch.equal(auto[name], want[name]), (state, reverse, name)
