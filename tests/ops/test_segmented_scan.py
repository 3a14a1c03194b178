"""Segment-parallel scan (gsmsr.ops.segmented_scan) against the whole-sequence reference, float64.

A sequence cut into S segments that each start from a zero state, then corrected with the carried states, must
equal the scan of the whole sequence. The CPU checks use the reference scan per segment; the Triton fix-up runs
through Triton's interpreter in a subprocess (TRITON_INTERPRET must be set before triton is imported). The
GPU test (tests/gpu/test_cuda_kernels.py) checks the same against mamba-ssm's kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from gsmsr.ops import selective_scan_ref
from gsmsr.ops.segmented_scan import carry_states, choose_segments, segment_fixup_ref


def _inputs(b=2, d=6, n=4, length=96, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(b, d, length),
        delta=r(b, d, length) - 1.0,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2,
        B=r(b, n, length),
        C=r(b, n, length),
        D=r(d),
        z=r(b, d, length),
        delta_bias=0.3 * r(d),
    )


def _segment_states(inp, segments):
    """Per segment, from a zero start: the decay product and the end state, (b, S, D, N) each (naive loop)."""
    delta = F.softplus(inp['delta'] + inp['delta_bias'][:, None])
    b, d, length = inp['u'].shape
    seg = length // segments
    a_prod, h_end = [], []
    for s in range(segments):
        h = inp['u'].new_zeros(b, d, inp['A'].shape[1])
        p = torch.ones_like(h)
        for t in range(s * seg, (s + 1) * seg):
            a = torch.exp(delta[..., t, None] * inp['A'])
            h = a * h + (delta[..., t] * inp['u'][..., t])[..., None] * inp['B'][:, None, :, t]
            p = p * a
        a_prod.append(p)
        h_end.append(h)
    return torch.stack(a_prod, 1), torch.stack(h_end, 1)


@pytest.mark.parametrize('segments', [2, 3, 8])
def test_segments_plus_fixup_equal_whole_scan(segments):
    inp = _inputs()
    whole = selective_scan_ref(**inp, delta_softplus=True)
    seg = inp['u'].shape[-1] // segments
    parts = [
        selective_scan_ref(
            **{k: (v[..., s * seg : (s + 1) * seg] if v.dim() == 3 else v) for k, v in inp.items()}, delta_softplus=True
        )
        for s in range(segments)
    ]
    y = torch.cat(parts, dim=-1)
    assert (y - whole).abs().max() > 1e-3  # the zero-start segments alone are wrong
    h_in = carry_states(*_segment_states(inp, segments))
    fixed = segment_fixup_ref(y, h_in, inp['delta'], inp['A'], inp['C'], inp['z'], inp['delta_bias'], True)
    torch.testing.assert_close(fixed, whole, rtol=1e-12, atol=1e-12)


def test_choose_segments():
    assert choose_segments(1, 384, 288000, 2112) == 6  # smallest divisor giving 2112 blocks
    assert choose_segments(8, 384, 288000, 2112) == 1  # enough blocks already
    assert choose_segments(1, 384, 4099, 2112) == 1  # prime length: no split
    assert choose_segments(1, 384, 5 * 4096, 10**6) == 5  # cannot reach the target: largest that fits


_TRITON_CHECK = r"""
import torch
from gsmsr.ops.segmented_scan import segment_fixup, segment_fixup_ref
g = torch.Generator().manual_seed(1)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for (b, d, n, length, segments) in ((1, 5, 4, 60, 3), (2, 20, 16, 96, 4)):
        r = lambda *s: torch.randn(*s, generator=g)
        y, delta, z = r(b, d, length).to(dtype), r(b, d, length).to(dtype), r(b, d, length).to(dtype)
        C = r(b, n, length).to(dtype)
        A, bias, h_in = -torch.rand(d, n, generator=g) * 2, 0.3 * r(d), r(b, segments, d, n)
        h_in[:, 0] = 0
        ref = segment_fixup_ref(y.double(), h_in.double(), delta.double(), A.double(), C.double(), z.double(),
                                bias.double(), True)
        out = segment_fixup(y.clone(), h_in, delta, A, C, z, bias, True, block_d=4, block_t=16)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert err < tol, (dtype, b, d, n, length, segments, err)
        worst = max(worst, err)
print('ok', worst)
"""


def test_triton_fixup_matches_reference_interpreted():
    env = dict(os.environ, TRITON_INTERPRET='1', CUDA_VISIBLE_DEVICES='')
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, '-c', _TRITON_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and res.stdout.startswith('ok'), res.stdout + res.stderr
