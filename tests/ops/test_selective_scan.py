"""The PyTorch selective scan against a token-by-token float64 recurrence: outputs and every gradient, forward and
reverse in time."""

from __future__ import annotations

import importlib

import pytest
import torch

from gsmsr.ops import selective_scan, selective_scan_naive, selective_scan_ref
from gsmsr.ops.selective_scan import reverses_natively

TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}


def _inputs(batch: int, dim: int, state: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    tensors = dict(
        u=r(batch, dim, length),
        delta=0.5 * r(batch, dim, length),
        A=-torch.rand(dim, state, generator=g, dtype=torch.float64) * 3,
        B=r(batch, state, length),
        C=r(batch, state, length),
        D=r(dim),
        z=r(batch, dim, length),
        delta_bias=0.3 * r(dim),
    )
    return {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}


@pytest.mark.parametrize('length', [1, 2, 7, 64, 333])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('with_dz', [True, False])
@pytest.mark.parametrize('reverse', [False, True])  # reverse: the reference flips, the naive loop walks backwards
def test_ref_matches_naive(length, dtype, with_dz, reverse):
    inp = _inputs(2, 5, 4, length, dtype, seed=length)
    if not with_dz:
        inp.pop('D'), inp.pop('z')
    ref = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    y = selective_scan_ref(**inp, delta_softplus=True, chunk_size=50, reverse=reverse)
    y_naive = selective_scan_naive(**ref, delta_softplus=True, reverse=reverse)
    grad = torch.randn_like(y_naive)
    out_tol, grad_tol = TOL[dtype]
    scale = y_naive.abs().max()
    assert (y.double() - y_naive).abs().max() <= out_tol * max(1.0, scale)
    g = torch.autograd.grad(y, list(inp.values()), grad.to(dtype))
    g_naive = torch.autograd.grad(y_naive, list(ref.values()), grad)
    for name, a, b in zip(inp, g, g_naive):
        assert (a.double() - b).abs().max() <= grad_tol * max(1.0, b.abs().max()), name


def test_chunking_is_invisible():
    inp = _inputs(1, 3, 16, 200, torch.float64)
    whole = selective_scan_ref(**inp, delta_softplus=True, chunk_size=10_000)
    chunked = selective_scan_ref(**inp, delta_softplus=True, chunk_size=17)
    assert (whole - chunked).abs().max() <= 1e-12


@pytest.mark.parametrize(
    'mamba,has_triton,impl,expected',
    [
        (True, True, 'triton', 'training: mamba-ssm kernel; inference: gsmsr Triton scan'),
        (True, True, 'mamba', 'training: mamba-ssm kernel; inference: mamba-ssm kernel'),
        (False, True, 'triton', 'training: gsmsr Triton scan (mamba-ssm: why); inference: gsmsr Triton scan'),
        (False, False, 'triton', 'training: PyTorch scan (mamba-ssm: why); inference: PyTorch scan'),
    ],
)
def test_kernel_status_names_what_each_path_runs(monkeypatch, mamba, has_triton, impl, expected):
    """kernel_status() says what selective_scan dispatches CUDA tensors to with and without autograd: without mamba-ssm
    both run the Triton scan where Triton imports, else the PyTorch scan."""
    module = importlib.import_module('gsmsr.ops.selective_scan')
    monkeypatch.setattr(module, 'cuda_kernel', lambda: mamba)
    monkeypatch.setattr(module, 'kernel_import_error', None if mamba else 'why')
    monkeypatch.setattr(module, 'triton', object() if has_triton else None)
    monkeypatch.setattr(module, 'INFER_IMPL', impl)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert module.kernel_status() == expected
    if not mamba:  # without a GPU (hence without mamba-ssm) nothing but the PyTorch scan runs
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
        assert module.kernel_status() == 'training: PyTorch scan (mamba-ssm: why); inference: PyTorch scan'


def test_dispatch_uses_reference_on_cpu():
    inp = {k: v.detach() for k, v in _inputs(1, 3, 4, 20, torch.float32).items()}
    assert torch.equal(selective_scan(**inp, delta_softplus=True), selective_scan_ref(**inp, delta_softplus=True))
    y = selective_scan(**inp, delta_softplus=True, reverse=True)
    assert torch.equal(y, selective_scan_ref(**inp, delta_softplus=True, reverse=True))
    # only the Triton forward walks time backwards itself; the PyTorch scan flips around
    assert not reverses_natively(inp['u']) and not reverses_natively(inp['u'], 'ref')
    assert reverses_natively(inp['u'], 'triton')
    with pytest.raises(RuntimeError, match='kernel'):
        selective_scan(**inp, backend='kernel')
