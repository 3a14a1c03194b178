"""The Triton depthwise 3x3x3 conv (+ bias + GELU) against the float64 PyTorch reference: outputs and gradients.

On CPU the kernels run through Triton's interpreter (gsmsr.ops.triton_jit), so shapes and tiles are tiny; the
tiles still leave partial pixel tiles in both H and W, a partial channel block, and several programs per
weight-gradient partial. On a CUDA machine the same cases also run compiled.

Tolerances, on the max abs error relative to max(1, max |reference|):
* float32: 1e-5 (fp32 accumulation of 27 taps; observed ~3e-7 relative).
* bfloat16 x and output (fp32 weights, the reference gets the bf16-rounded x in float64): 1e-2; one bf16 ulp is
  2^-8 relative (the interpreter truncates on bf16 stores), and the backward also holds g * GELU' in bf16.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import triton  # noqa: F401  (comes with torch's Linux wheels; these tests must not skip on CPU)

from gsmsr.ops.dwconv3d import (
    MODE_CONV,
    MODE_GELU,
    MODE_GELU_GRAD,
    DWConvConfig,
    _stencil,
    _taps,
    dwconv3d_gelu,
    dwconv3d_gelu_backward_triton,
    dwconv3d_gelu_ref,
    dwconv3d_gelu_triton,
    stencil_launch,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# 4x4 pixels x 32 channels: H = 5 and W = 7 leave partial tiles, C = 40 a partial channel block; the weight
# gradient splits its 4 pixel tiles over 3 groups of 2 (the last group has only tiles past the end)
TINY = DWConvConfig(
    block_h=4, block_w=4, block_c=32, wgrad_block_h=4, wgrad_block_w=4, wgrad_block_c=32, wgrad_groups=3
)
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

# name: ((B, K, H, W, C), gelu, with bias)
CASES = {
    'k1_gelu': ((1, 1, 5, 7, 40), True, True),
    'k2_b2_gelu': ((2, 2, 3, 5, 40), True, True),
    'k5_gelu': ((1, 5, 5, 7, 40), True, True),
    'k5_conv_only': ((1, 5, 5, 7, 40), False, True),
    'k2_no_bias': ((1, 2, 5, 7, 40), False, False),
}


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / max(1.0, float(want.abs().max())))


def _inputs(shape, with_bias: bool, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(dtype)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32  # parameters stay fp32 under bf16
    w = (0.3 * torch.randn(shape[-1], 1, 3, 3, 3, generator=g)).to(wdtype)
    b = torch.randn(shape[-1], generator=g).to(wdtype) if with_bias else None
    dout = torch.randn(*shape, generator=g).to(dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(w), move(b), move(dout)


def _ref_grads(x, w, b: Optional[torch.Tensor], dout, gelu: bool):
    xs, ws = x.double().requires_grad_(), w.double().requires_grad_()
    bs = None if b is None else b.double().requires_grad_()
    y = dwconv3d_gelu_ref(xs, ws, bs, gelu)
    grads = torch.autograd.grad(y, [t for t in (xs, ws, bs) if t is not None], dout.double())
    return y.detach(), grads


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor from torch.empty / empty_like starts as NaN, so an element the kernels skip shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: fill(empty_like(*a, **k)))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('case', list(CASES))
def test_triton_matches_reference_fp32(case, device, poisoned):
    shape, gelu, with_bias = CASES[case]
    x, w, b, dout = _inputs(shape, with_bias, torch.float32, device)
    want, want_grads = _ref_grads(x, w, b, dout, gelu)
    y = dwconv3d_gelu_triton(x, w, b, gelu, TINY)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert _err(y, want) <= TOL[torch.float32]
    dx, dw, db = dwconv3d_gelu_backward_triton(dout, x, w, b, gelu, TINY)
    assert (db is None) == (b is None)
    for name, got, ref in zip(('dx', 'dweight', 'dbias'), (dx, dw, db), want_grads):
        assert got.dtype == torch.float32 and got.shape == ref.shape, name
        assert _err(got, ref) <= TOL[torch.float32], name


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('gelu', [True, False])
def test_triton_matches_reference_bf16(gelu, device, poisoned):
    shape = (1, 3, 5, 7, 40)
    x, w, b, dout = _inputs(shape, True, torch.bfloat16, device)
    want, (rx, rw, rb) = _ref_grads(x, w, b, dout, gelu)
    y = dwconv3d_gelu_triton(x, w, b, gelu, TINY)
    assert y.dtype == torch.bfloat16
    assert _err(y, want) <= TOL[torch.bfloat16]
    dx, dw, db = dwconv3d_gelu_backward_triton(dout, x, w, b, gelu, TINY)
    assert dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    for name, got, ref in (('dx', dx, rx), ('dweight', dw, rw), ('dbias', db, rb)):
        assert _err(got, ref) <= TOL[torch.bfloat16], name


def test_default_config_runs_on_tiny_shape():
    """The GPU tiles (larger than the volume here: everything is one partial tile) through the interpreter."""
    x, w, b, dout = _inputs((1, 2, 3, 4, 24), True, torch.float32, 'cpu')
    want, want_grads = _ref_grads(x, w, b, dout, True)
    assert _err(dwconv3d_gelu_triton(x, w, b), want) <= TOL[torch.float32]
    for got, ref in zip(dwconv3d_gelu_backward_triton(dout, x, w, b), want_grads):
        assert _err(got, ref) <= TOL[torch.float32]


def test_op_autograd_and_fake_on_cpu():
    """The custom op on CPU (reference forward, reference backward): values, gradients, and torch.library's
    consistency checks (schema, fake tensor, autograd registration, AOT dispatch)."""
    x, w, b, dout = _inputs((1, 2, 3, 4, 8), True, torch.float64, 'cpu')
    want, want_grads = _ref_grads(x, w, b, dout, True)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = torch.ops.gsmsr.dwconv3d_gelu(xs, ws, bs, True)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    for got, ref in zip(torch.autograd.grad(y, (xs, ws, bs), dout), want_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    torch.library.opcheck(torch.ops.gsmsr.dwconv3d_gelu, (xs, ws, bs, False))


def test_op_compiles_in_one_graph():
    """torch.compile(fullgraph=True) traces the op and its backward (fake tensors; cheap backend)."""
    x, w, b, dout = _inputs((1, 2, 3, 4, 8), True, torch.float64, 'cpu')
    fn = torch.compile(
        lambda x, w, b: torch.ops.gsmsr.dwconv3d_gelu(x * 2, w, b, True) + 1, fullgraph=True, backend='aot_eager'
    )
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = fn(xs, ws, bs)
    want, want_grads = _ref_grads(2 * x, w, b, dout, True)
    torch.testing.assert_close(y, want + 1, rtol=0, atol=1e-12)
    gx, gw, gb = torch.autograd.grad(y, (xs, ws, bs), dout)
    for got, ref in zip((gx, gw, gb), (2 * want_grads[0], *want_grads[1:])):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


def test_dispatch_uses_reference_on_cpu():
    x, w, b, _ = _inputs((1, 2, 3, 4, 8), True, torch.float64, 'cpu')
    assert torch.equal(dwconv3d_gelu(x, w, b), dwconv3d_gelu_ref(x, w, b))


def test_module_imports_without_triton():
    """gsm_block imports this module, so the package must import (and use the reference) where Triton is absent."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        'import torch\n'
        'from gsmsr.ops import dwconv3d as m\n'
        'assert not m.triton_available()\n'
        'x, w, b = torch.randn(1, 2, 3, 4, 8), torch.randn(8, 1, 3, 3, 3), torch.randn(8)\n'
        'assert torch.equal(m.dwconv3d_gelu(x, w, b), m.dwconv3d_gelu_ref(x, w, b))\n'
    )
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, '-c', code], check=True, env=env)


# ---------------------------------------------------------------------------------------------------------------
# Interior tiles, bf16 channel pairs and the fast GELU, at the CPU tiles
# ---------------------------------------------------------------------------------------------------------------

# 4x4-pixel tiles: H = 9, W = 13 (or 9) leave interior tiles (tile and halo inside the frame) when C = 32 is a
# multiple of the channel block; C = 40 (a partial block) and C = 39 (odd: no bf16 pairs) run every tile masked
ROW_CASES = {
    'k1_interior': (1, 1, 9, 13, 32),
    'k2_b2_partial_c': (2, 2, 5, 7, 40),
    'k5_interior': (1, 5, 9, 9, 32),
    'k3_odd_c': (1, 3, 5, 6, 39),
}
# every tile masked (C = 32 is half a channel block) and bf16 widened channel by channel
MASKED = dataclasses.replace(TINY, block_c=64, bf16_pairs=False)


def _stencil_cases(x, w, b, dout, cfg):
    """(name, got, float64 reference) for the three epilogues: GELU and conv only (without bias) in the forward,
    and the backward's g * GELU'(conv + bias)."""
    xd, wd, bd = x.double(), w.double(), b.double()
    pre = dwconv3d_gelu_ref(xd, wd, bd, gelu=False)
    g = _stencil(x, _taps(w), b.float(), dout, MODE_GELU_GRAD, cfg)
    return [
        ('gelu', dwconv3d_gelu_triton(x, w, b, True, cfg), dwconv3d_gelu_ref(xd, wd, bd)),
        ('conv', dwconv3d_gelu_triton(x, w, None, False, cfg), dwconv3d_gelu_ref(xd, wd, None, gelu=False)),
        ('gelu_grad', g, torch.ops.aten.gelu_backward(dout.double(), pre)),
    ]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('case', list(ROW_CASES))
def test_stencil_epilogues_match_reference(case, dtype, poisoned):
    x, w, b, dout = _inputs(ROW_CASES[case], True, dtype, 'cpu')
    for name, got, want in _stencil_cases(x, w, b, dout, TINY):
        assert got.dtype == dtype and _err(got, want) <= TOL[dtype], name


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_interior_copy_and_pairs_sum_in_the_same_order(dtype):
    """The unmasked interior copy and the bf16 pairs give the conv bit for bit as the masked, channel-by-channel
    path does (interpreted: same taps, same order; a pair widens exactly), with edge tiles and a partial block."""
    for shape in ((1, 2, 9, 13, 32), (2, 2, 5, 7, 40)):
        x, w, b, _ = _inputs(shape, True, dtype, 'cpu')
        launch = stencil_launch(shape, dtype, MODE_CONV, True, TINY)[3]
        assert launch['PAIRS'] == (dtype == torch.bfloat16) and launch['EVEN_C'] == (shape[-1] == 32)
        want = dwconv3d_gelu_triton(x, w, b, False, MASKED)
        assert torch.equal(dwconv3d_gelu_triton(x, w, b, False, TINY), want), shape


def test_pairs_only_where_valid():
    """int32 channel pairs only for bf16 x with an even C that starts on a 4-byte boundary; a bf16 view that starts
    mid-word (storage offset 1) takes the channel-by-channel loads and still matches the reference."""

    def pairs(c: int, dtype: torch.dtype, aligned: bool = True) -> bool:
        return stencil_launch((1, 2, 5, 7, c), dtype, MODE_GELU, True, TINY, aligned)[3]['PAIRS']

    assert pairs(40, torch.bfloat16)
    assert not (pairs(40, torch.float32) or pairs(39, torch.bfloat16) or pairs(40, torch.bfloat16, aligned=False))
    x, w, b, _ = _inputs((1, 2, 5, 7, 40), True, torch.bfloat16, 'cpu')
    view = torch.empty(x.numel() + 1, dtype=torch.bfloat16)[1:].view(x.shape).copy_(x)
    assert view.data_ptr() % 4 == 2
    want = dwconv3d_gelu_ref(x.double(), w.double(), b.double())
    assert _err(dwconv3d_gelu_triton(view, w, b, True, TINY), want) <= TOL[torch.bfloat16]


def _identity_taps(c: int) -> torch.Tensor:
    """Weights of a conv that returns its input: only the centre tap, 1."""
    w = torch.zeros(c, 1, 3, 3, 3)
    w[:, 0, 1, 1, 1] = 1.0
    return w


def test_fast_gelu_against_float64():
    """The GELU epilogue through the stencil (identity taps, so the epilogue sees x itself), fp32, on x in [-13, 13]:
    relative error of GELU within 2e-6 for x >= -3 and 1.2e-5 below (exp's argument loses digits as x^2 grows),
    i.e. far inside bf16 rounding (2^-9); GELU' within 2e-6 absolute."""
    xs = torch.cat(
        [torch.linspace(-13, 13, 64 * 64 - 64), 2.0 ** -torch.arange(1, 33.0), -(2.0 ** -torch.arange(1, 33.0))]
    )
    x = xs.view(1, 1, 8, 8, 64)
    y = dwconv3d_gelu_triton(x, _identity_taps(64), torch.zeros(64), True, TINY).flatten().double()
    xd = xs.double()
    cdf = 0.5 * torch.erfc(-xd / math.sqrt(2))
    rel = (y - xd * cdf).abs() / (xd * cdf).abs()
    assert rel[xd >= -3].max() <= 2e-6 and rel.max() <= 1.2e-5, float(rel.max())
    grad = _stencil(x, _taps(_identity_taps(64)), torch.zeros(64), torch.ones_like(x), MODE_GELU_GRAD, TINY)
    want = cdf + xd * torch.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
    assert (grad.flatten().double() - want).abs().max() <= 2e-6
