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
from gsmsr.ops.seq_scan_triton import kernel_softplus, selective_scan_fwd_triton
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
        # the output pass's own options: tile, warps; register caps (compiled only here) off or other than 128
        (8, 32, 1, dict(out_tile=2)),
        (2, 32, 1, dict(out_tile=8, out_maxnreg=None)),
        (8, 32, 1, dict(out_warps=2, sum_maxnreg=None)),
        (8, 32, 1, dict(out_maxnreg=None, sum_maxnreg=None)),
        (4, 32, 1, dict(out_maxnreg=96, sum_maxnreg=96)),
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


def test_register_caps_change_no_result():
    """The caps change register allocation and scheduling only: output and carried states bit for bit as with the
    compiler's choice (the training forward runs with the default caps)."""
    inp = _inputs(1, 384, 16, 50_000, torch.bfloat16)
    with torch.no_grad():
        capped = selective_scan_fwd_triton(**inp, delta_softplus=True, return_states=True)
        free = selective_scan_fwd_triton(
            **inp, delta_softplus=True, return_states=True, out_maxnreg=None, sum_maxnreg=None
        )
    for a, b in zip(capped, free):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _flipped(inp: dict) -> dict:
    return {k: v.flip(-1) if v.dim() == 3 else v for k, v in inp.items()}


@pytest.mark.parametrize('segments', [None, 180])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_reverse_equals_flipped_scan_at_gsm_shape(dtype, segments):
    """reverse=True (BiMamba's backward branch without autograd) against the forward scan of the flipped operands,
    flipped back, at a window step's length (5 x 180 x 320). 180 segments cut L into whole segments of 1600 tokens,
    so both walk the same tokens from the same states: bit for bit. The default (176 segments of 1640, the last
    shorter) cuts the two directions differently: equal to float rounding."""
    inp = _inputs(1, 384, 16, 288_000, dtype)
    out = torch.full_like(inp['u'], float('nan'))
    with torch.no_grad():
        y = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=segments, out=out, reverse=True)
        flipped = selective_scan_fwd_triton(**_flipped(inp), delta_softplus=True, segments=segments).flip(-1)
        # through the dispatcher (gsmsr::scan_infer, Triton by default) and, with mamba-ssm, flipped around its kernel
        routed = selective_scan(**inp, delta_softplus=True, reverse=True)
        mamba = selective_scan(**inp, delta_softplus=True, backend='kernel', reverse=True) if cuda_kernel() else None
    assert not torch.isnan(y).any()
    if segments is None:
        assert _err(y, flipped) <= TOL[dtype]
        torch.testing.assert_close(routed, y, rtol=0, atol=0)
    else:
        torch.testing.assert_close(y, flipped, rtol=0, atol=0)
    if mamba is not None:
        assert _err(mamba, flipped) <= 2 * TOL[dtype]


@pytest.mark.parametrize('stages', [2, 3])
@pytest.mark.parametrize('reverse,gate', [(False, True), (True, True), (False, False), (True, False)])
def test_pipelined_loads_are_bit_identical_at_gsm_shape(stages, reverse, gate):
    """stages > 1 (the tile loop software-pipelined: async copies through shared memory, B|C one row a token) against
    stages = 1, compiled at a window step's length in bf16, with the gate inside and without it (BiMamba's
    GATE_OUTSIDE): bit for bit, carries included."""
    inp = _inputs(1, 384, 16, 288_000, torch.bfloat16)
    inp['delta_softplus'] = True
    if not gate:
        inp.pop('z')
    with torch.no_grad():
        expected, states, _ = selective_scan_fwd_triton(**inp, reverse=reverse, return_states=True)
        y, s, _ = selective_scan_fwd_triton(**inp, reverse=reverse, return_states=True, stages=stages)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(s, states, rtol=0, atol=0)


def test_softplus_compiled_accuracy():
    """The kernels' softplus compiled (the hardware's ex2 for t, FMA contraction) against float64 where the result is
    a normal float32: relative error <= 5e-7 (~4 ulp) + |x| 2^-23, x above 20 exact. The second term is exp's argument
    x log2(e), with log2(e) and the product each rounded to float32, which exp carries as a relative error of up to
    |x| 2^-23 (3.8e-6 at x = -87, 0.55 of the bound, on an H100, 2026-12-05; libdevice's log, which the polynomial
    replaced, had the same)."""
    x = torch.cat([torch.linspace(-87, 100, 4_000_001, device='cuda'), torch.linspace(-1, 1, 400_001, device='cuda')])
    ref = torch.nn.functional.softplus(x.double())
    bound = 5e-7 + x.double().abs() * 2**-23
    ratio = ((kernel_softplus(x).double() - ref).abs() / ref / bound).max().item()
    print('max relative error over its bound:', ratio)
    assert ratio <= 1
    above = torch.tensor([20.0, 20.000002, 25.0, 88.0, 1e30], device='cuda')
    assert torch.equal(kernel_softplus(above), above)


@pytest.mark.parametrize('reverse', [False, True])
def test_pipelined_matches_reference_at_gsm_shape(reverse):
    """Pipelined as the inference default (stages=3), at a window step's length in fp32, forwards and in reverse:
    within the reference's tolerance."""
    inp = _inputs(1, 384, 16, 288_000, torch.float32)
    with torch.no_grad():
        y = selective_scan_fwd_triton(**inp, delta_softplus=True, stages=3, reverse=reverse)
        ref = selective_scan_ref(**{k: v.double() for k, v in inp.items()}, delta_softplus=True, reverse=reverse)
    assert _err(y, ref) <= TOL[torch.float32]


@pytest.mark.parametrize('gate', [False, True])
def test_bimamba_flip_free_inference_matches_flipped_form(monkeypatch, gate):
    """BiMamba at GSM's width under bf16 autocast, without autograd: the flip-free backward branch (in-projection as a
    bmm, anti-causal conv through causal-conv1d flipped around or conv1d, reverse Triton scan; with GATE_OUTSIDE the
    gate once on the two branches' sum) against the flipped form. (Compiled: tests/gpu/test_fast_paths.py, the network
    against the eager one.)"""
    from gsmsr.archs import bimamba

    torch.manual_seed(0)
    monkeypatch.setattr(bimamba, 'FLIP_FREE', True)
    monkeypatch.setattr(bimamba, 'GATE_OUTSIDE', gate)
    m = bimamba.BiMamba(192).cuda().eval()
    z = torch.randn(1, 5 * 64 * 64, 192, device='cuda')
    assert bimamba.reverses_natively(z)  # the default CUDA scan: the flip-free form runs
    with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
        y = m(z)
        monkeypatch.setattr(bimamba, 'reverses_natively', lambda *args: False)
        flipped = m(z)
    assert _err(y, flipped) <= TOL[torch.bfloat16]
