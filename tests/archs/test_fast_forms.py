"""The compile-friendly forms that ``GSMNet(compile_blocks=True)`` uses, against the eager ops (float64, grads), and
BiMamba's flip-free backward branch (no autograd) against the flipped one, and its projections as bmms
(``bimamba.BMM_PROJECTIONS``) against ``torch.matmul``.

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


def test_bimamba_without_autograd_runs_the_backward_branch_flip_free(monkeypatch):
    """Without autograd and with a scan that reverses natively (the Triton forward; interpreted here), the backward
    branch is an anti-causal conv and a reverse scan on the unflipped sequence: the flipped form's output to float32
    rounding (the projections see the tokens in the other order). With autograd, or where the scan would flip
    around its kernel (the PyTorch scan here), the flipped form runs as before."""
    z = torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(2))
    calls = _scan_calls(monkeypatch)
    monkeypatch.setattr(bimamba, 'FLIP_FREE', True)
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


def test_compiled_bimamba_traces_the_flip_free_branch(monkeypatch):
    """Traced as the compiled window step traces it (aot_eager backend: the graph without Inductor's code
    generation): no flips, both scans as gsmsr::scan_infer (the second reverse) on the in-projection's bmm output,
    the shifted-sum convs; the output is the eager flipped form's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    monkeypatch.setattr(bimamba, 'FLIP_FREE', True)
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
    assert scans[0].args[6] is scans[1].args[6]  # one gate
    torch.testing.assert_close(y, flipped, rtol=1e-5, atol=1e-6)


def _aten_nodes(m: BiMamba, z: torch.Tensor, grad: bool):
    """m(z) compiled as the window step is, up to the aten graph Inductor lowers (AOT autograd, no code generation):
    the output and the forward graph's nodes."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        y = torch.compile(m, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(z)
    return y.detach(), [n for gm in graphs for n in gm.graph.nodes]


# views that keep a tensor's unit stride along L (splits along channels, the batch dim)
_VIEWS = {'aten.split.Tensor', 'aten.split_with_sizes.default', 'getitem', 'aten.slice.Tensor', 'aten.squeeze.dim'}


def _source(node):
    """What an operand is a view of, through splits and slices, not through a transpose, permute or clone."""
    while getattr(node.target, '__name__', None) == 'getitem' or str(node.target) in _VIEWS:
        node = node.args[0]
    return node


@pytest.mark.parametrize(
    'flip_free, grad', [(False, False), (True, False), (True, True)], ids=['flipped', 'flip_free', 'grad']
)  # with autograd, the flipped form runs whatever FLIP_FREE says
def test_compiled_scan_operands_come_from_bmms(flip_free, grad, monkeypatch):
    """With ``BMM_PROJECTIONS``, in the graph that Inductor lowers, the scans (``gsmsr::scan_infer`` without autograd,
    ``gsmsr::tscan_fwd`` with it) take delta, B, C and the gate as views of GEMM outputs: bmms, no clone, transpose or
    permute in between (the flipped form's backward branch: the gate through its flip); the graph has no clone at all.
    Without it, Inductor is handed ``torch.matmul``'s (B*L, O) products transposed and cloned into the scan's layout:
    the copies this removes. Outputs equal the eager matmul form's to rounding."""
    monkeypatch.setattr(bimamba, 'FLIP_FREE', flip_free)
    m = _bimamba('triton')
    z = torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = m(z)
    scan_op = 'tscan_fwd' if grad else 'scan_infer'
    for bmm in (False, True):
        monkeypatch.setattr(bimamba, 'BMM_PROJECTIONS', bmm)
        y, nodes = _aten_nodes(m, z, grad)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
        scans = [n for n in nodes if str(n.target) == f'gsmsr.{scan_op}.default']
        assert len(scans) == 2
        clones = [n for n in nodes if str(n.target) == 'aten.clone.default']
        for i, scan in enumerate(scans):
            delta, b, c, gate = (_source(scan.args[k]) for k in (1, 3, 4, 6))
            if not bmm:
                assert str(delta.target) == str(b.target) == 'aten.clone.default', (delta, b)
                continue
            if i == 1 and not (flip_free and not grad):  # the flipped form's backward branch: the gate flipped
                assert str(gate.target) == 'aten.flip.default'
                gate = _source(gate.args[0])
            sources = [str(t.target) for t in (delta, b, c, gate)]
            assert sources == ['aten.bmm.default'] * 4, sources
        assert not clones if bmm else clones


def test_bmm_projections_match_matmul_forms(monkeypatch):
    """BiMamba with every projection as a bmm against ``torch.matmul``, eagerly (PyTorch scan, float64, batch 2):
    the output and every gradient to rounding, with and without autograd."""
    torch.manual_seed(0)
    m = BiMamba(8, scan_backend='ref').double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(2, 37, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    params = dict(m.named_parameters())
    results = []
    for bmm in (False, True):
        monkeypatch.setattr(bimamba, 'BMM_PROJECTIONS', bmm)
        with torch.no_grad():
            plain = m(z)
        y, grads = _grads(
            lambda z, *ps: torch.func.functional_call(m, dict(zip(params, ps)), (z,)), z, *params.values()
        )
        torch.testing.assert_close(plain, y, rtol=1e-12, atol=1e-12)
        results.append((y, grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(['z', *params], got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=name)
