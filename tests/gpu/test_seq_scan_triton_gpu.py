"""GPU check of the sequential Triton scan forward (gsmsr.ops.seq_scan_triton), compiled, at L = 200,000.

    python -m pytest -m gpu tests/gpu/test_seq_scan_triton.py -s
Against the PyTorch reference scan (float64 inputs for fp32, the same bf16-rounded inputs for bf16) and, when
mamba-ssm is installed, its kernel. Skips without CUDA + Triton.
"""

from __future__ import annotations

import math

import pytest
import torch

from gsmsr.ops import cuda_kernel, selective_scan, selective_scan_ref
from gsmsr.ops.seq_scan_triton import exp2_fma, selective_scan_fwd_triton
from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]
# max abs error relative to max |reference|: fp32 differs by rounding (ex2.approx, summation order); bf16 outputs
# are rounded to bf16 (2^-8 relative)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def _inputs(batch: int, dim: int, state: int, length: int, dtype: torch.dtype) -> dict:
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


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize('segments', [None, 1, 37])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_matches_reference_and_mamba_at_gsm_shape(dtype, segments):
    inp = _inputs(1, 384, 16, 200_000, dtype)
    out = torch.full_like(inp['u'], float('nan'))
    with torch.no_grad():
        y = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=segments, out=out)
        # the reference in float64 (float32 inputs upcast; bf16 inputs are the same rounded values)
        ref = selective_scan_ref(**{k: v.double() for k, v in inp.items()}, delta_softplus=True)
    assert not torch.isnan(y).any()
    errs = {'ref': _err(y, ref)}
    if cuda_kernel():
        with torch.no_grad():
            errs['mamba'] = _err(y, selective_scan(**inp, delta_softplus=True, backend='kernel'))
        errs['mamba_vs_ref'] = _err(selective_scan(**inp, delta_softplus=True, backend='kernel'), ref)
    print(f'{dtype} segments={segments}:', ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    assert errs['ref'] <= TOL[dtype], errs
    if 'mamba' in errs:
        assert errs['mamba'] <= 2 * TOL[dtype], errs


@pytest.mark.parametrize(
    'tile,block_d,num_warps,out_pass',
    [
        (1, 32, 1, {}),
        (8, 64, 2, {}),
        (4, 128, 4, {}),
        # the output pass's own options: tile, register cap (compiled only here), warps
        (8, 32, 1, dict(out_tile=2)),
        (2, 32, 1, dict(out_tile=8, out_maxnreg=128)),
        (8, 32, 1, dict(out_warps=2, out_maxnreg=128)),
        (8, 32, 1, dict(index_loop=True, out_maxnreg=128, sum_maxnreg=128)),
    ],
)
def test_configs_and_batch_two(tile, block_d, num_warps, out_pass):
    inp = _inputs(2, 200, 16, 30_001, torch.float32)  # partial channel block, ragged tail
    with torch.no_grad():
        y = selective_scan_fwd_triton(
            **inp, delta_softplus=True, token_tile=tile, block_d=block_d, num_warps=num_warps, segments=13, **out_pass
        )
        ref = selective_scan_ref(**{k: v.double() for k, v in inp.items()}, delta_softplus=True)
    assert _err(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize('out_exp_fma', [None, 16])
def test_fma_exp2_decays_at_gsm_shape(out_exp_fma):
    """exp_fma=8: the first 8 states' decays through the FMA-pipe polynomial (compiled: FMA contraction, integer
    bit tricks), the output pass as the summary or all 16 states on the FMA pipe."""
    inp = _inputs(1, 384, 16, 200_000, torch.float32)
    with torch.no_grad():
        y = selective_scan_fwd_triton(**inp, delta_softplus=True, exp_fma=8, out_exp_fma=out_exp_fma)
        ref = selective_scan_ref(**{k: v.double() for k, v in inp.items()}, delta_softplus=True)
    err = _err(y, ref)
    print(f'exp_fma=8 out_exp_fma={out_exp_fma}: ref={err:.1e}')
    assert err <= TOL[torch.float32]


def test_exp2_fma_compiled_accuracy():
    """The compiled polynomial exp2 against float64 2^x over [-130, 0], as the CPU test checks the interpreted one."""
    x = torch.cat([torch.linspace(-130, 0, 4_000_001, device='cuda'), -torch.logspace(-30, 0, 10_001, device='cuda')])
    y = exp2_fma(x).double()
    ref = torch.exp2(x.double())
    normal = x >= -126
    assert ((y - ref) / ref).abs()[normal].max().item() <= 2.5e-7
    assert ((y[~normal] >= 0) & (y[~normal] <= 2.0**-126)).all()
    k = torch.arange(0, 127, dtype=torch.float32, device='cuda')
    assert torch.equal(exp2_fma(-k).double(), torch.exp2(-k.double()))
