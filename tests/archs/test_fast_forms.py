"""The compile-friendly forms that ``GSMNet(compile_blocks=True)`` uses, against the eager ops (float64, grads), and
BiMamba's flip-free backward branch (no autograd) against the flipped one.

On a GPU these forms run inside ``torch.compile`` (tests/gpu/test_fast_paths.py compares the compiled network
with the eager one); here each is checked directly, since compiling the network on a 2-core CPU takes minutes.
"""

from __future__ import annotations

import pytest
import torch

from gsmsr.archs import bimamba
from gsmsr.archs.bimamba import BiMamba, causal_conv_silu, causal_conv_silu_shifted


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    return y.detach(), [x.grad for x in xs]


def test_causal_conv_shifted_sum_matches_conv1d():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 37, generator=g, dtype=torch.float64)
    w = torch.randn(8, 1, 4, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    want, gw = _grads(causal_conv_silu, x, w, b)
    got, gg = _grads(causal_conv_silu_shifted, x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(gg, gw):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _conv_operands(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 37, generator=g, dtype=dtype)
    return x, torch.randn(8, 1, 4, generator=g, dtype=dtype), torch.randn(8, generator=g, dtype=dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_anticausal_shifted_sum_is_the_flipped_causal_one(dtype, monkeypatch):
    """The backward branch's conv without flips: the same products added in the same order, so the sums agree bit for
    bit (checked with SiLU left out: on CPU its vectorised and scalar loops, which the flip swaps at the ends of the
    tensor, may differ by an ulp)."""
    x, w, b = _conv_operands(dtype)
    flipped = causal_conv_silu_shifted(x.flip(-1), w, b).flip(-1)
    torch.testing.assert_close(causal_conv_silu_shifted(x, w, b, reverse=True), flipped)
    monkeypatch.setattr(bimamba.F, 'silu', lambda t: t)
    flipped = causal_conv_silu_shifted(x.flip(-1), w, b).flip(-1)
    torch.testing.assert_close(causal_conv_silu_shifted(x, w, b, reverse=True), flipped, rtol=0, atol=0)


def test_anticausal_conv_matches_shifted_sum_and_flipped_conv1d():
    x, w, b = _conv_operands(torch.float64)
    want, gw = _grads(lambda *a: causal_conv_silu(*a, reverse=True), x, w, b)
    got, gg = _grads(lambda *a: causal_conv_silu_shifted(*a, reverse=True), x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(gg, gw):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    flipped = causal_conv_silu(x.flip(-1), w, b).flip(-1)
    torch.testing.assert_close(want, flipped, rtol=1e-12, atol=1e-12)


def _bimamba(backend: str) -> BiMamba:
    torch.manual_seed(0)
    m = BiMamba(8, scan_backend=backend).eval()
    with torch.no_grad():  # distinct, non-trivial branches (A, D, dt bias and convs differ between them)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def _scan_calls(monkeypatch):
    """Record the ``reverse`` argument of every scan BiMamba runs."""
    calls = []
    scan = bimamba.selective_scan

    def spy(*args, reverse=False, **kwargs):
        calls.append(reverse)
        return scan(*args, reverse=reverse, **kwargs)

    monkeypatch.setattr(bimamba, 'selective_scan', spy)
    return calls


@pytest.mark.parametrize('gate_once', [False, True])
def test_bimamba_without_autograd_runs_the_backward_branch_flip_free(monkeypatch, gate_once):
    """Without autograd and with a scan that reverses natively (the Triton forward; interpreted here), the backward
    branch is an anti-causal conv and a reverse scan on the unflipped sequence: the flipped form's output to float32
    rounding (the projections see the tokens in the other order; with GATE_OUTSIDE the gate multiplies the branches'
    sum instead of each branch). With autograd, or where the scan would flip around its kernel (the PyTorch scan
    here), the flipped form runs as before."""
    z = torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(2))
    calls = _scan_calls(monkeypatch)
    monkeypatch.setattr(bimamba, 'FLIP_FREE', True)
    monkeypatch.setattr(bimamba, 'GATE_OUTSIDE', gate_once)
    m = _bimamba('triton')
    with torch.no_grad():
        y = m(z)
    assert calls == [False, True]
    monkeypatch.setattr(bimamba, 'reverses_natively', lambda *args: False)
    with torch.no_grad():
        flipped = m(z)
    assert calls[2:] == [False, False]
    torch.testing.assert_close(y, flipped, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()

    calls = _scan_calls(monkeypatch)
    m = _bimamba('auto')
    with torch.no_grad():
        m(z)
    m(z).sum().backward()
    assert calls == [False, False] * 2


@pytest.mark.parametrize('gate_once', [False, True])
def test_compiled_bimamba_traces_the_flip_free_branch(monkeypatch, gate_once):
    """Traced as the compiled window step traces it (aot_eager backend: the graph without Inductor's code
    generation): no flips, both scans as gsmsr::scan_infer (the second reverse) on the in-projection's bmm output,
    the shifted-sum convs; with GATE_OUTSIDE both scans ungated and the gate on their float32 sum, without it both
    taking the one gate. The output is the eager flipped form's either way."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    monkeypatch.setattr(bimamba, 'FLIP_FREE', True)
    monkeypatch.setattr(bimamba, 'GATE_OUTSIDE', gate_once)
    m = _bimamba('triton')
    z = torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(2))
    counter = CompileCounterWithBackend('aot_eager')
    with torch.no_grad():
        y = torch.compile(m, backend=counter, fullgraph=True)(z)
        monkeypatch.setattr(bimamba, 'reverses_natively', lambda *args: False)
        flipped = m(z)
    nodes = [n for gm in counter.graphs for n in gm.graph.nodes]
    assert not any('flip' in str(n.target) for n in nodes)
    assert any(n.target is torch.bmm for n in nodes)
    scans = [n for n in nodes if n.target is torch.ops.gsmsr.scan_infer.default]
    assert [n.args[-1] for n in scans] == [False, True]  # reverse
    assert all(n.args[8] is True for n in scans)  # softplus inside
    assert [n.args[6] is None for n in scans] == [gate_once] * 2  # z
    if gate_once:
        assert sum('silu' in str(n.target) for n in nodes) == 3  # the two convs' and the gate's
    else:
        assert scans[0].args[6] is scans[1].args[6]  # one gate
    torch.testing.assert_close(y, flipped, rtol=1e-5, atol=1e-6)
