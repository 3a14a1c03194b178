"""The Triton selective-scan backward (gsmsr.ops.seq_scan_triton_bwd) against float64 autograd through the PyTorch
reference, on CPU tensors through Triton's interpreter (slow per token: small shapes).

The cases cover several channel blocks with a partial one (D = 40, block_d = 16), segment counts that do not
divide L (a short last segment) and a ragged last checkpoint tile (walked token by token), N = 4 and 16, batch 2,
with and without D / z / delta_bias / softplus, decays that carry across segments ('slow') and ones that forget
within a few tokens ('fast', A down to -20: decays ~1e-9 per token, where reconstructing h_{t-1} = (h_t - b_t) /
a_t would blow up). Every element of every gradient is compared.

Tolerances, on the max abs error relative to max(1, max |reference gradient|):
* float32 inputs: 1e-5. The kernel differs from the float64 reference by float32 rounding only; the largest
  gradients (dA, dD, dbias) are sums over L tokens and segments of products of a few rounded factors, so their
  error grows like sqrt(L) ulp-sized terms: ~1e-7 at these lengths, and 1e-5 leaves room without hiding a wrong
  term (a missing or misplaced term is O(1) relative).
* bfloat16 inputs (the reference gets the same bf16-rounded inputs in float64, the incoming gradient too): 2e-2.
  du, ddelta, dz are rounded to bf16 on output (2^-8 relative), and dB, dC as well (to B's and C's dtype).
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import pytest
import torch
from test_seq_scan_triton import _inputs

from gsmsr.ops import selective_scan_ref
from gsmsr.ops.seq_scan_triton import selective_scan_fwd_triton
from gsmsr.ops.seq_scan_triton_bwd import selective_scan_bwd_triton

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _grads(
    inp: Dict[str, Optional[torch.Tensor]],
    dout: torch.Tensor,
    softplus: bool,
    segments: int,
    block_d: int = 32,
    token_tile: int = 4,
    lane_sum: bool = True,
) -> Dict[str, torch.Tensor]:
    out, states, seg_len = selective_scan_fwd_triton(
        **inp, delta_softplus=softplus, segments=segments, block_d=block_d, return_states=True
    )
    grads = selective_scan_bwd_triton(
        *(inp[k] for k in NAMES), dout, states, seg_len, softplus, block_d=block_d, token_tile=token_tile,
        lane_sum=lane_sum,
    )  # fmt: skip
    return {k: g for k, g in zip(NAMES, grads) if inp[k] is not None}


def _ref_grads(inp: Dict[str, Optional[torch.Tensor]], dout: torch.Tensor, softplus: bool) -> Dict[str, torch.Tensor]:
    x = {k: v.double().requires_grad_() if v is not None else None for k, v in inp.items()}
    y = selective_scan_ref(**x, delta_softplus=softplus)
    keys = [k for k in NAMES if x[k] is not None]
    return dict(zip(keys, torch.autograd.grad(y, [x[k] for k in keys], dout.double())))


def _errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    errs = {}
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape, (k, g.shape, r.shape)
        assert torch.isfinite(g).all(), f'non-finite d{k}'
        errs[k] = ((g.double() - r).abs().max() / r.abs().max().clamp_min(1.0)).item()
    return errs


def _case_inputs(batch, dim, state, length, decay, operands, dtype, seed=0):
    inp = _inputs(batch, dim, state, length, decay, dtype, 'cpu', seed=seed)
    if operands == 'none':
        inp.update(D=None, z=None, delta_bias=None)
    elif operands == 'no_z':
        inp['z'] = None
    dout = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return inp, dout


# name: (batch, D, N, L, decay, segments asked, block_d, token_tile (checkpoints), operands)
# the forward's segment lengths are multiples of its token tile (8): 'L23' runs 3 segments of 8, 8, 7 tokens
CASES = {
    'L1': (1, 3, 4, 1, 'mamba', 1, 32, 4, 'all'),
    'L23_seg3_batch2': (2, 3, 4, 23, 'mamba', 3, 32, 4, 'all'),  # last segment 7 = one tile of 4 + 3 ragged
    'L19_blocks_batch2': (2, 40, 4, 19, 'slow', 2, 16, 4, 'all'),  # 3 channel blocks, the last partial
    'L30_N16_fast': (1, 3, 16, 30, 'fast', 3, 32, 4, 'all'),
    'L21_bare': (1, 3, 4, 21, 'mamba', 2, 32, 2, 'none'),  # no D, z, delta_bias
    'L24_wide_no_z': (1, 3, 4, 24, 'wide', 3, 32, 4, 'no_z'),
    'L64_seg4_slow_N16': (1, 3, 16, 64, 'slow', 4, 32, 8, 'all'),  # carries across 4 segments, 8-token tiles
}


@pytest.mark.parametrize('name', list(CASES))
def test_fp32_gradients_match_reference(name):
    """Every gradient within float32 rounding of the float64 reference; with the softplus (its exp shared with
    ddelta's sigmoid) delta on both sides of 0 and beyond the threshold in the 'wide' case."""
    batch, dim, state, length, decay, segments, block_d, tile, operands = CASES[name]
    inp, dout = _case_inputs(batch, dim, state, length, decay, operands, torch.float32)
    start = time.perf_counter()
    got = _grads(inp, dout, True, segments, block_d, tile)
    seconds = time.perf_counter() - start
    errs = _errors(got, _ref_grads(inp, dout, True))
    print(f'{name} ({seconds:.1f} s):', ' '.join(f'd{k}={v:.1e}' for k, v in errs.items()))
    assert max(errs.values()) <= TOL[torch.float32], errs


@pytest.mark.parametrize('block_d,state,lane_sum', [(8, 16, True), (16, 4, False), (32, 16, False)])
def test_channel_sums_of_dB_dC(block_d, state, lane_sum):
    """dB, dC summed over channels by recursive halving with more columns (2 N) than channels per block (8), with
    fewer (N = 4: 8 columns over 16 channels), and by one tl.reduce per column (lane_sum off)."""
    inp, dout = _case_inputs(1, 20, state, 12, 'mamba', 'all', torch.float32)
    got = _grads(inp, dout, True, 2, block_d=block_d, lane_sum=lane_sum)
    errs = _errors(got, _ref_grads(inp, dout, True))
    assert max(errs.values()) <= TOL[torch.float32], errs


@pytest.mark.parametrize('segments', [1, 3])
def test_without_softplus(segments):
    # delta used as is (plus the bias): kept positive and small, so the states stay bounded
    inp, dout = _case_inputs(2, 3, 4, 24, 'mamba', 'all', torch.float32)
    inp['delta'] = inp['delta'].abs() * 0.1
    inp['delta_bias'] = torch.full_like(inp['delta_bias'], 0.01)
    errs = _errors(_grads(inp, dout, False, segments), _ref_grads(inp, dout, False))
    assert max(errs.values()) <= TOL[torch.float32], errs


def test_bf16_gradients_match_reference_on_the_same_inputs():
    inp, dout = _case_inputs(1, 3, 16, 30, 'mamba', 'all', torch.bfloat16)
    got = _grads(inp, dout, True, 3)
    assert got['u'].dtype == got['B'].dtype == got['z'].dtype == torch.bfloat16
    assert got['A'].dtype == got['D'].dtype == got['delta_bias'].dtype == torch.float32
    errs = _errors(got, _ref_grads(inp, dout, True))
    assert max(errs.values()) <= TOL[torch.bfloat16], errs


def test_segment_split_matches_one_segment():
    """Four segments (summary + carry launches, restarts from the forward's states) against one segment."""
    inp, dout = _case_inputs(1, 3, 4, 64, 'slow', 'all', torch.float32, seed=3)
    one = _grads(inp, dout, True, 1)
    four = _grads(inp, dout, True, 4)
    for k in one:
        scale = one[k].abs().max().clamp_min(1.0)
        assert ((four[k] - one[k]).abs().max() / scale).item() <= 1e-6, k


def test_rejects_mismatched_states():
    inp, dout = _case_inputs(1, 3, 4, 24, 'mamba', 'all', torch.float32)
    _, states, seg_len = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=3, return_states=True)
    assert seg_len == 8 and states.shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match='states'):
        selective_scan_bwd_triton(*(inp[k] for k in NAMES), dout, states, seg_len * 2, True)
    with pytest.raises(ValueError, match=r'one shape.*\(1, 3, 24\)'):
        selective_scan_bwd_triton(*(inp[k] for k in NAMES), dout[..., 1:], states, seg_len, True)


def test_dispatch_backend_triton_trains():
    """selective_scan(backend='triton') with autograd runs gsmsr::tscan_fwd / tscan_bwd (one segment on CPU)."""
    from gsmsr.ops import selective_scan

    inp, dout = _case_inputs(1, 3, 4, 12, 'mamba', 'all', torch.float32)
    x = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = selective_scan(**x, delta_softplus=True, backend='triton')
    got = dict(zip(NAMES, torch.autograd.grad(y, [x[k] for k in NAMES], dout)))
    errs = _errors(got, _ref_grads(inp, dout, True))
    assert max(errs.values()) <= TOL[torch.float32], errs
    # only some inputs requiring gradients, no z
    u = inp['u'].clone().requires_grad_()
    y = selective_scan(**{**inp, 'u': u, 'z': None}, delta_softplus=True, backend='triton')
    (du,) = torch.autograd.grad(y, [u], dout)
    ref = _ref_grads({**inp, 'z': None}, dout, True)['u']
    assert ((du.double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.float32]


def test_dispatch_reverse_trains_on_flipped_operands():
    """reverse=True with autograd runs the training kernels on the flipped operands (there is no reverse backward):
    output and every gradient as the reference's reverse scan."""
    from gsmsr.ops import selective_scan

    inp, dout = _case_inputs(1, 3, 4, 12, 'mamba', 'all', torch.float32)
    x = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = selective_scan(**x, delta_softplus=True, backend='triton', reverse=True)
    ref = {k: v.double().requires_grad_() for k, v in inp.items()}
    y_ref = selective_scan_ref(**ref, delta_softplus=True, reverse=True)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()).item() <= TOL[torch.float32]
    got = dict(zip(NAMES, torch.autograd.grad(y, [x[k] for k in NAMES], dout)))
    want = dict(zip(NAMES, torch.autograd.grad(y_ref, [ref[k] for k in NAMES], dout.double())))
    errs = _errors(got, want)
    assert max(errs.values()) <= TOL[torch.float32], errs


def test_custom_ops_opcheck():
    """Schema, fake (meta) implementations and autograd registration of gsmsr::tscan_fwd / tscan_bwd."""
    from gsmsr.ops.selective_scan import tscan_fwd

    inp, _ = _case_inputs(1, 3, 4, 8, 'mamba', 'all', torch.float32)
    args = [inp[k].clone().requires_grad_(k in ('u', 'B')) for k in NAMES] + [True, 2]
    torch.library.opcheck(tscan_fwd, args, test_utils=('test_schema', 'test_faketensor', 'test_autograd_registration'))


ACTIVATIONS = ('u_ptr', 'dt_ptr', 'z_ptr', 'g_ptr', 'du_ptr', 'ddt_ptr', 'dz_ptr')  # in the input dtype


def _compile_sm90(kernel, consts: Dict[str, object], ptr_dtype: str):
    """Compile a kernel body for sm_90a as a launch on an H200 would specialise it (pointers 16-byte aligned,
    integers multiples of 16 where GSM's training shape has them, unit strides as constants), without a GPU.
    Returns the PTX."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ints = dict(Dm=384, L=20480, seg_len=160, n_seg=128, n_fwd=127, n_rows=10240, s_ad=16, s_an=1)
    params = list(inspect.signature(kernel.fn).parameters)
    signature, attrs, constexprs = {}, {}, {}
    for i, p in enumerate(params):
        value = consts.get(p, ints.get(p, 20480 if p.startswith('s_') else None))
        if p in consts or value == 1:
            signature[p], constexprs[(i,)] = 'constexpr', value
        elif p.endswith('_ptr'):
            signature[p] = ptr_dtype if p in ACTIVATIONS else '*fp32'
            attrs[(i,)] = [['tt.divisibility', 16]]
        else:
            signature[p] = 'i32'
            if value % 16 == 0:
                attrs[(i,)] = [['tt.divisibility', 16]]
    src = ASTSource(fn=kernel.jit, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=1)).asm['ptx']


@pytest.mark.parametrize('config', ['bf16_all_tile2_lanesum', 'fp32_bare_tile1_reduce'])
def test_kernels_compile_for_sm90(config):
    """The interpreter does not see compile-time rules (constexpr reassignment, early returns, layouts): compile
    the backward's kernels for sm_90a here (no GPU needed) with GSM's flags. The channel sums by recursive halving
    must stay in registers (warp shuffles, no shared memory barrier)."""
    pytest.importorskip('triton.backends.nvidia')
    from gsmsr.ops.seq_scan_triton_bwd import _KERNELS

    k = _KERNELS(False)
    full = config.startswith('bf16')
    flags = dict(N=16, NP=16, BLOCK_D=32, HAS_Z=full, HAS_BIAS=full, SOFTPLUS=full)
    dtype = '*bf16' if full else '*fp32'
    ptx = _compile_sm90(k.main_kernel, dict(flags, TILE=2 if full else 1, HAS_D=full, LANE_SUM=full, STAGES=1), dtype)
    if full:
        assert 'shfl.sync' in ptx and 'bar.sync' not in ptx
    _compile_sm90(k.summary_kernel, dict(flags, TILE=8), dtype)
