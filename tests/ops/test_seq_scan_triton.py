"""The sequential Triton scan forward (gsmsr.ops.seq_scan_triton) against the PyTorch reference in float64.

On CPU tensors the kernels run through Triton's interpreter in this process (gsmsr.ops.triton_jit), which is slow
per token, so shapes are small; they still cover several channel blocks with a partial one (D = 40 with
block_d = 16), segment counts that do not divide L (ragged last segment, tile tail), N = 4 and 16, batch 2, and
every optional operand. The output is NaN-filled first, so every element must be written.

Tolerances, on the max abs error relative to max(1, max |reference|):
* float32 inputs: 1e-5 (the kernel differs from the float64 reference only by float32 rounding; with segments the
  carried state also goes through exp(A * sum dt) instead of the product of the per-token decays).
* bfloat16 inputs (the reference gets the same bf16-rounded inputs in float64): 1e-2, one bf16 ulp of the output
  (2^-8 relative, rounded to nearest on GPU, truncated by the interpreter) dominates.
"""

from __future__ import annotations

import math
from typing import Dict

import pytest
import torch

from gsmsr.ops import selective_scan_ref
from gsmsr.ops.seq_scan_triton import _split, choose_segments, kernel_softplus, selective_scan_fwd_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _inputs(
    batch: int, dim: int, state: int, length: int, decay: str, dtype: torch.dtype, device: str, seed: int = 0
) -> Dict[str, torch.Tensor]:
    """u, delta, z, B, C in ``dtype``; A, D, delta_bias float32. decay: 'mamba' (Mamba's init: A = -(1..N),
    dt in 1e-3..1e-1), 'fast' (A down to -20, dt ~ 1: states forget within a few tokens), 'slow' (dt ~ 1e-3:
    states carry across segments), 'wide' (delta spread over -25..25, softplus's branches and its threshold)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dt_min, dt_max = {'mamba': (1e-3, 1e-1), 'fast': (0.5, 2.0), 'slow': (1e-3, 2e-3), 'wide': (1e-3, 1e-1)}[decay]
    dt = torch.exp(torch.rand(dim, generator=g, dtype=torch.float64) * math.log(dt_max / dt_min) + math.log(dt_min))
    A = -torch.arange(1, state + 1, dtype=torch.float64).repeat(dim, 1)
    if decay == 'fast':
        A = A * 20 / state
    delta = (0.1 if decay == 'slow' else 0.5) * r(batch, dim, length)
    if decay == 'wide':
        delta = 50 * torch.rand(batch, dim, length, generator=g, dtype=torch.float64) - 25
    t = dict(
        u=r(batch, dim, length),
        delta=delta,
        A=A,
        B=r(batch, state, length),
        C=r(batch, state, length),
        D=r(dim),
        z=r(batch, dim, length),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # softplus^-1(dt), as Mamba initialises it
    )
    return {k: v.to(device=device, dtype=dtype if v.dim() == 3 else torch.float32) for k, v in t.items()}


def _check(inp: Dict[str, torch.Tensor], softplus: bool, **kwargs) -> float:
    """Run the kernel into a NaN-filled output (u's layout) and return its error against the float64 reference."""
    out = torch.full_like(inp['u'], float('nan'))
    y = selective_scan_fwd_triton(**inp, delta_softplus=softplus, out=out, **kwargs)
    assert y is out
    assert not torch.isnan(y).any(), 'unwritten output elements'
    ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in inp.items()},
                             delta_softplus=softplus, reverse=kwargs.get('reverse', False))  # fmt: skip
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


# name: (batch, D, N, L, decay, segments, token_tile, block_d, operands)
CASES = {
    'L1': (1, 3, 4, 1, 'mamba', 1, 4, 32, 'all'),
    'L7_seg3_tile1': (2, 3, 4, 7, 'mamba', 3, 1, 32, 'all'),
    'L7_seg2_tile4': (1, 40, 4, 7, 'slow', 2, 4, 16, 'all'),  # 3 channel blocks, the last partial
    'L100_seg3_N16': (1, 3, 16, 100, 'mamba', 3, 4, 32, 'all'),
    'L100_seg4_fast': (2, 3, 4, 100, 'fast', 4, 2, 32, 'all'),
    'L100_bare': (1, 3, 4, 100, 'mamba', 3, 4, 32, 'none'),  # no D, z, delta_bias
    'L100_wide_delta': (1, 3, 4, 100, 'wide', 2, 8, 32, 'no_z'),
    'L257_seg5_slow': (1, 3, 4, 257, 'slow', 5, 8, 32, 'all'),  # 5 x 56 tokens, last 33: ragged tile tail
}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(CASES))
def test_fp32_matches_reference(name, device):
    batch, dim, state, length, decay, segments, tile, block_d, operands = CASES[name]
    inp = _inputs(batch, dim, state, length, decay, torch.float32, device)
    if operands == 'none':
        inp.update(D=None, z=None, delta_bias=None)
    elif operands == 'no_z':
        inp['z'] = None
    err = _check(inp, True, segments=segments, token_tile=tile, block_d=block_d)
    assert err <= TOL[torch.float32], f'{name}: {err:.2e}'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('segments', [1, 3])
def test_without_softplus(segments, device):
    # delta used as is (plus the bias): kept positive and small here, so the states stay bounded
    inp = _inputs(2, 3, 4, 40, 'mamba', torch.float32, device)
    inp['delta'] = inp['delta'].abs() * 0.1
    inp['delta_bias'] = torch.full_like(inp['delta_bias'], 0.01)
    err = _check(inp, False, segments=segments, token_tile=4)
    assert err <= TOL[torch.float32], f'{err:.2e}'


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['L100_seg3_N16', 'L257_seg5_slow'])
def test_bf16_matches_reference_on_the_same_inputs(name, device):
    batch, dim, state, length, decay, segments, tile, block_d, _ = CASES[name]
    inp = _inputs(batch, dim, state, length, decay, torch.bfloat16, device)
    err = _check(inp, True, segments=segments, token_tile=tile, block_d=block_d)
    assert err <= TOL[torch.bfloat16], f'{name}: {err:.2e}'


def _flipped(inp: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The operands with time reversed: every (batch, *, L) tensor flipped along L."""
    return {k: v.flip(-1) if v is not None and v.dim() == 3 else v for k, v in inp.items()}


# name: (case of CASES, dtype); the first three cut L into whole segments, so reverse equals flip-scan-flip exactly
REVERSE_CASES = {
    'L96_seg4_tile8': ('L96_seg4_tile8', torch.float32),
    'L96_seg4_tile8_bf16': ('L96_seg4_tile8', torch.bfloat16),
    'L1': ('L1', torch.float32),
    'L7_seg3_tile1': ('L7_seg3_tile1', torch.float32),  # 3 + 3 + 1: the short segment is walked first
    'L7_seg2_tile4': ('L7_seg2_tile4', torch.float32),
    'L100_seg4_fast': ('L100_seg4_fast', torch.float32),
    'L100_bare': ('L100_bare', torch.float32),
    'L257_seg5_slow_bf16': ('L257_seg5_slow', torch.bfloat16),  # 5 x 56 tokens, last 33: ragged tile tail
}
CASES['L96_seg4_tile8'] = (1, 40, 4, 96, 'slow', 4, 8, 16, 'all')


@pytest.mark.parametrize('name', list(REVERSE_CASES))
def test_reverse_equals_flipped_scan(name):
    """reverse=True against the reference's reverse (flip, scan, flip; float64) and against the kernel itself on the
    flipped operands, flipped back: the same float operations token by token, so equal bit for bit when the segments
    cut L alike both ways (L a multiple of the segment length), else within the dtype's tolerance (the carries
    summarise other tokens)."""
    case, dtype = REVERSE_CASES[name]
    batch, dim, state, length, decay, segments, tile, block_d, operands = CASES[case]
    inp = _inputs(batch, dim, state, length, decay, dtype, 'cpu', seed=3)
    if operands == 'none':
        inp.update(D=None, z=None, delta_bias=None)
    opts = dict(delta_softplus=True, segments=segments, token_tile=tile, block_d=block_d)
    out = torch.full_like(inp['u'], float('nan'))
    y = selective_scan_fwd_triton(**inp, **opts, out=out, reverse=True)
    assert not torch.isnan(y).any(), 'unwritten output elements'
    ref = selective_scan_ref(**{k: v.double() if v is not None else None for k, v in inp.items()},
                             delta_softplus=True, reverse=True)  # fmt: skip
    scale = ref.abs().max().clamp_min(1.0)
    assert ((y.double() - ref).abs().max() / scale).item() <= TOL[dtype], name
    flipped = selective_scan_fwd_triton(**_flipped(inp), **opts).flip(-1)
    seg_len, _ = _split(length, segments, tile)
    if length % seg_len == 0:
        torch.testing.assert_close(y, flipped, rtol=0, atol=0)
    else:
        assert ((y.double() - flipped.double()).abs().max() / scale).item() <= TOL[dtype], name


def test_reverse_states_are_in_walking_order():
    """With return_states the carries are those of the flipped scan: states[:, s - 1] enters the s-th segment walked."""
    inp = _inputs(1, 3, 4, 48, 'slow', torch.float32, 'cpu')
    _, states, seg_len = selective_scan_fwd_triton(
        **inp, delta_softplus=True, segments=3, token_tile=4, return_states=True, reverse=True
    )
    _, flipped, _ = selective_scan_fwd_triton(
        **_flipped(inp), delta_softplus=True, segments=3, token_tile=4, return_states=True
    )
    assert seg_len == 16
    torch.testing.assert_close(states, flipped, rtol=0, atol=0)


@pytest.mark.parametrize('tile,out_tile,seg_len', [(2, 8, 40), (8, 2, 40), (4, 1, 36)])
def test_output_pass_with_its_own_tile(tile, out_tile, seg_len):
    """The output pass walks the segments with a tile other than the summary's: segment lengths are multiples of
    both (101 tokens in 3 x 40, the last 21, or 3 x 36, the last 29: a ragged end for either tile), states carried
    across segments."""
    inp = _inputs(1, 3, 4, 101, 'slow', torch.float32, 'cpu')
    out = torch.full_like(inp['u'], float('nan'))
    _, _, got = selective_scan_fwd_triton(
        **inp, delta_softplus=True, segments=3, token_tile=tile, out_tile=out_tile, out=out, return_states=True
    )
    assert got == seg_len
    err = _check(inp, True, segments=3, token_tile=tile, out_tile=out_tile)
    assert err <= TOL[torch.float32], f'{err:.2e}'


@pytest.mark.parametrize('caps', [dict(out_maxnreg=None, sum_maxnreg=None), dict(out_maxnreg=96, sum_maxnreg=None)])
def test_output_pass_with_two_warps_and_register_caps(caps):
    """out_warps=2: 64 channels per output program over D = 80 (the second block partial) while the summary keeps
    32-channel blocks. The register caps are CUDA launch options (compiled in tests/gpu), accepted and ignored by
    the interpreter: other caps give the default's output."""
    inp = _inputs(1, 80, 4, 50, 'slow', torch.float32, 'cpu')
    err = _check(inp, True, segments=3, token_tile=4, out_warps=2)
    assert err <= TOL[torch.float32], f'{err:.2e}'
    other = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=3, token_tile=4, out_warps=2, **caps)
    default = selective_scan_fwd_triton(**inp, delta_softplus=True, segments=3, token_tile=4, out_warps=2)
    torch.testing.assert_close(other, default, rtol=0, atol=0)


def test_strided_views_and_segment_count_invariance():
    """u, delta, z as views with a channel stride other than L (one half of a wider tensor, as BiMamba's
    projections give them); B, C non-contiguous along L (copied). More segments must not change the result
    beyond rounding."""
    inp = _inputs(1, 6, 4, 64, 'slow', torch.float32, 'cpu')
    wide = torch.cat([inp['u'], inp['z']], dim=1)
    inp['u'], inp['z'] = wide[:, :6], wide[:, 6:]
    inp['B'] = inp['B'].transpose(1, 2).contiguous().transpose(1, 2)
    assert inp['u'].stride(1) == 64 and inp['B'].stride(-1) != 1
    outs = [selective_scan_fwd_triton(**inp, delta_softplus=True, segments=s, token_tile=4) for s in (1, 4)]
    ref = selective_scan_ref(**{k: v.double() for k, v in inp.items()}, delta_softplus=True)
    for y in outs:
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() <= TOL[torch.float32]


def _unit_d_stride(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (batch, D, L) view of a contiguous (batch, L, D) tensor: unit stride along D."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def test_output_layouts():
    """Without out the result has exactly ``torch.empty_like(u)``'s strides (those of the custom op's fake result,
    which torch.compile takes as the real ones), also for a u without unit L stride (copied for the kernel); an out
    of another layout than u's is written as given (through a copy when its L stride is not 1)."""
    from gsmsr.ops.selective_scan import scan_infer

    inp = _inputs(1, 6, 4, 24, 'slow', torch.float32, 'cpu')
    opts = dict(delta_softplus=True, segments=2, token_tile=4)
    transposed = {**inp, 'u': _unit_d_stride(inp['u'])}  # dense: empty_like keeps its strides
    wide = torch.cat([inp['u'], inp['z']], dim=1)
    sliced = {**inp, 'u': wide[:, :6]}  # unit L stride, not dense: empty_like is contiguous
    expected = selective_scan_fwd_triton(**inp, **opts)
    for operands in (inp, transposed, sliced):
        y = selective_scan_fwd_triton(**operands, **opts)
        assert y.stride() == torch.empty_like(operands['u']).stride()
        assert torch.equal(y, expected)
    nan = torch.full_like(inp['u'], float('nan'))
    for operands, out in ((transposed, nan.clone()), (inp, _unit_d_stride(nan))):
        stride = out.stride()
        y = selective_scan_fwd_triton(**operands, **opts, out=out)
        assert y is out and y.stride() == stride
        assert torch.equal(y, expected)
    args = [transposed[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')] + [True, 'triton', False]
    torch.library.opcheck(scan_infer, args, test_utils=('test_faketensor',))


@pytest.mark.parametrize(
    'case,dtype,softplus,reverse,channels',
    [
        ('L257_seg5_slow', torch.float32, True, False, 1),  # ragged tile tail, z and softplus in the kernel
        ('L257_seg5_slow', torch.bfloat16, False, True, 1),  # dt given, reverse
        ('L7_seg2_tile4', torch.float32, True, True, 1),  # 3 channel blocks, the last partial
        ('L100_bare', torch.float32, True, False, 1),  # no D, z, delta_bias
        ('L7_seg2_tile4', torch.float32, False, False, 2),  # two channels a thread
    ],
)
def test_pipelined_loads_give_the_same_output(case, dtype, softplus, reverse, channels):
    """stages > 1 (the tile loop software-pipelined: the loads become async copies through shared memory, B and C
    one 2N-wide row a token) moves only where the operands wait: the output equals that of stages = 1 bit for bit,
    with the carried states, and stays within the reference's tolerance."""
    batch, dim, state, length, decay, segments, tile, block_d, operands = CASES[case]
    inp = _inputs(batch, dim, state, length, decay, dtype, 'cpu', seed=7)
    if operands == 'none':
        inp.update(D=None, z=None, delta_bias=None)
    if not softplus:  # dt itself
        inp['delta'] = torch.nn.functional.softplus(inp['delta'].float() + inp.pop('delta_bias')[:, None])
    opts = dict(segments=segments, token_tile=tile, block_d=block_d, reverse=reverse, return_states=True)
    if channels == 2:
        opts.update(block_d=64, num_warps=1)
    expected, states, _ = selective_scan_fwd_triton(**inp, delta_softplus=softplus, **opts)
    assert torch.isfinite(expected).all()
    for stages in (2, 3):
        y, s, _ = selective_scan_fwd_triton(**inp, delta_softplus=softplus, stages=stages, **opts)
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
        torch.testing.assert_close(s, states, rtol=0, atol=0)
    opts.pop('return_states')
    assert _check(inp, softplus, stages=3, **opts) < TOL[dtype]


def test_softplus_accuracy():
    """The kernels' softplus (max(x, 0) + t (1 + t Q(t)), t = exp(-|x|)) against float64 over a dense grid where the
    result is a normal float32: relative error <= 3e-7 (~2.5 ulp; libdevice's log, which it replaced, reached 3.3e-7
    here), x itself above torch's threshold of 20, and torch's values at the infinities and NaN."""
    x = torch.cat([torch.linspace(-87, 100, 2_000_001), torch.linspace(-1, 1, 200_001), torch.tensor([0.0, -0.0])])
    ref = torch.nn.functional.softplus(x.double())
    y = kernel_softplus(x).double()
    rel = ((y - ref).abs() / ref).max().item()
    assert rel <= 3e-7, f'max relative error {rel:.2e}'
    above = torch.tensor([20.0, 20.000002, 25.0, 88.0, 1e30])
    assert torch.equal(kernel_softplus(above), above)
    special = kernel_softplus(torch.tensor([float('inf'), -float('inf'), float('nan')]))
    assert special[0] == float('inf') and special[1] == 0 and special[2].isnan()


def test_strided_b_and_c():
    """B and C as strided views, (batch, N, L) views of slices of one (batch, L, R + 2N) projection output, need no
    unit stride (packed anyway): the same output as contiguous ones."""
    inp = _inputs(1, 6, 4, 24, 'slow', torch.float32, 'cpu')
    dt_rank = 3
    proj = torch.cat([torch.zeros(1, 24, dt_rank), inp['B'].transpose(1, 2), inp['C'].transpose(1, 2)], dim=2)
    views = {
        **inp,
        'B': proj[:, :, dt_rank : dt_rank + 4].transpose(1, 2),
        'C': proj[:, :, dt_rank + 4 :].transpose(1, 2),
    }
    assert views['B'].stride() == (24 * (dt_rank + 8), 1, dt_rank + 8)
    opts = dict(delta_softplus=True, segments=2, token_tile=4)
    assert torch.equal(selective_scan_fwd_triton(**views, **opts), selective_scan_fwd_triton(**inp, **opts))


def test_segment_split_rules():
    assert _split(7, 3, 1) == (3, 3)
    assert _split(7, 3, 4) == (4, 2)  # lengths rounded up to the tile: fewer segments than asked
    assert _split(257, 5, 8) == (56, 5)
    assert _split(288000, 176, 4) == (1640, 176)
    # GSM's shape on an H200: 12 channel blocks, ~16 warps per SM over 132 SMs
    assert choose_segments(1, 384, 288000, 32, 1, 132, 16) == 176
    assert choose_segments(1, 384, 1000, 32, 1, 132, 16) == 1  # short sequences stay whole (>= MIN_SEGMENT)


def test_rejects_bad_arguments():
    inp = _inputs(1, 3, 4, 8, 'mamba', torch.float32, 'cpu')
    with pytest.raises(ValueError, match='power of two'):
        selective_scan_fwd_triton(**inp, token_tile=3)
    with pytest.raises(ValueError, match='out_tile must be a power of two'):
        selective_scan_fwd_triton(**inp, out_tile=6)
    with pytest.raises(ValueError, match='out_warps must be a power of two'):
        selective_scan_fwd_triton(**inp, out_warps=3)
    with pytest.raises(ValueError, match='stages must be at least 1'):
        selective_scan_fwd_triton(**inp, stages=0)
    with pytest.raises(ValueError, match='B and C'):
        selective_scan_fwd_triton(**{**inp, 'B': inp['B'][:, :2]})


def test_dispatch_backend_triton():
    """selective_scan(backend='triton') without autograd runs this kernel through the gsmsr::scan_infer op (with
    autograd: tests/ops/test_seq_scan_triton_bwd.py), reverse=True included."""
    from gsmsr.ops import selective_scan
    from gsmsr.ops.selective_scan import INFER_TRITON_CONFIG, scan_infer

    inp = _inputs(1, 3, 4, 16, 'mamba', torch.float32, 'cpu')
    with torch.no_grad():
        y = selective_scan(**inp, delta_softplus=True, backend='triton')
    direct = selective_scan_fwd_triton(**inp, delta_softplus=True, **INFER_TRITON_CONFIG)
    torch.testing.assert_close(y, direct, rtol=0, atol=0)
    with torch.no_grad():
        y = selective_scan(**inp, delta_softplus=True, backend='triton', reverse=True)
    direct = selective_scan_fwd_triton(**inp, delta_softplus=True, reverse=True, **INFER_TRITON_CONFIG)
    torch.testing.assert_close(y, direct, rtol=0, atol=0)
    args = [inp[k] for k in ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')] + [True, 'triton', True]
    torch.library.opcheck(scan_infer, args, test_utils=('test_schema', 'test_faketensor'))
