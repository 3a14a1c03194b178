"""The implicit warp's fused inference kernels (gsmsr.ops.implicit_attn) against the module's PyTorch math, and the
module's switch (ImplicitWarp.FUSED_ATTENTION) with and without autograd and under torch.compile.

On CPU the kernels run through Triton's interpreter (gsmsr.ops.triton_jit): shapes are tiny, with odd H and W,
B = 2, flows that point outside the frame (clamped neighbours), C = 48 with 4 heads of 12 (padded to 16 lanes) and
C = 40 with 5 heads (both head counts and widths padded). On a CUDA machine the kernel cases also run compiled.

Tolerances, on the max abs error relative to max(1, max |reference|):
* float32: 1e-5 against the float64 reference (fp32 scores, softmax and mix; observed ~1e-7).
* bfloat16 inputs (the reference gets the same bf16-rounded inputs in float64): 1e-2, one bf16 ulp of the output
  (2^-8 relative; the interpreter truncates on bf16 conversions, the GPU rounds to nearest).
The query input in float32 is the reference's to an ulp of the sum (same quotients, sine within 2e-7 of sinf).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton  # noqa: F401  (comes with torch's Linux wheels; these tests must not skip on CPU)

from gsmsr.archs import implicit_warp
from gsmsr.archs.implicit_warp import ImplicitWarp, sampling_geometry
from gsmsr.ops.implicit_attn import (
    ImplicitAttnConfig,
    implicit_attention_ref,
    implicit_attention_triton,
    query_input_ref,
    query_input_triton,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
SMALL = ImplicitAttnConfig(block_p=8, pe_block_p=16, pe_block_c=16)  # several programs, partial blocks
# (B, C, heads, H, W)
SHAPES = {'c48_h4': (2, 48, 4, 5, 7), 'c40_h5': (2, 40, 5, 3, 9)}


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / max(1.0, float(want.double().abs().max())))


def _flow(b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """Flows of a few pixels, some pointing well outside the frame (clamped neighbours on every side)."""
    flow = 2.5 * torch.randn(b, 2, h, w, generator=g)
    flow[:, :, 0, 0] = torch.tensor([-40.0, -30.0])
    flow[:, :, -1, -1] = torch.tensor([50.0, 60.0])
    return flow


def _attn_inputs(shape, dtype: torch.dtype, device: str):
    b, c, heads, h, w = shape
    g = torch.Generator().manual_seed(c + h)
    q = torch.randn(b, h * w, c, generator=g).to(dtype)
    kv = torch.randn(b, h * w, 2 * c, generator=g).to(dtype)
    pe = 0.5 * torch.randn(4, 2 * c, generator=g)
    index, _ = sampling_geometry(_flow(b, h, w, g), h, w, torch.float32)
    assert index.min() == 0 and index.max() == h * w - 1
    return [t.to(device) for t in (q, kv, index, pe)]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('shape', list(SHAPES))
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_attention_kernel_matches_reference(shape, dtype, device):
    b, c, heads, h, w = SHAPES[shape]
    q, kv, index, pe = _attn_inputs(SHAPES[shape], dtype, device)
    scale = (c // heads) ** -0.5
    want = implicit_attention_ref(q.double(), kv.double(), index, pe.double(), heads, scale)
    got = implicit_attention_triton(q, kv, index, pe, heads, scale, SMALL)
    assert got.dtype == dtype and got.shape == (b, h * w, c)
    assert _err(got, want) <= TOL[dtype]
    # the default tiles (one partial program per batch element here)
    assert _err(implicit_attention_triton(q, kv, index, pe, heads, scale), want) <= TOL[dtype]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_query_input_kernel_matches_reference(dtype, device):
    b, c, h, w = 2, 48, 5, 7
    g = torch.Generator().manual_seed(3)
    _, offset = sampling_geometry(_flow(b, h, w, g), h, w, torch.float32)
    scaled = (offset / (2 + 1e-6) * (2 * math.pi)).to(device)
    # a strided target: channels-first frames of a (B, C, 2, H, W) buffer, slot 1
    target = torch.randn(b, c, 2, h, w, generator=g).to(dtype).to(device)[:, :, 1]
    want = query_input_ref(target, scaled)
    got = query_input_triton(target, scaled, SMALL)
    assert got.dtype == dtype and got.shape == (b, h * w, c) and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=5e-7)
        # against the float64 encoding: the kernel's sines are as good as the reference's
        want64 = query_input_ref(target.double(), scaled.double())
        assert _err(got, want64) <= 2 * _err(want, want64) + 1e-6
    else:
        assert _err(got, want) <= TOL[dtype]
    # a stride-0 batch (one frame expanded over the slots, as GSMBlock.gather passes the anchor)
    frame = target[:1].expand(b, c, h, w)
    want = query_input_ref(frame, scaled)
    assert _err(query_input_triton(frame, scaled, SMALL), want) <= (5e-7 if dtype == torch.float32 else TOL[dtype])


def _module(c: int, heads: int, g: torch.Generator) -> ImplicitWarp:
    m = ImplicitWarp(c, heads)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m


def _module_inputs(b: int, c: int, h: int, w: int, g: torch.Generator):
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g), _flow(b, h, w, g)


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The switch on, and the fused path taken on CPU tensors too (its kernels interpreted)."""
    monkeypatch.setattr(implicit_warp, 'FUSED_ATTENTION', True)
    monkeypatch.setattr(implicit_warp.implicit_attn, 'runs_fused', lambda x: True)


def _count_fused_calls(monkeypatch):
    calls = []
    ops = implicit_warp.implicit_attn
    for name in ('implicit_attention', 'query_input'):
        fn = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    return calls


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_module_switch_without_autograd(dtype, fused_on_cpu, monkeypatch):
    b, c, heads, h, w = 2, 48, 4, 5, 7
    g = torch.Generator().manual_seed(5)
    m = _module(c, heads, g).to(dtype)
    inputs = [t.to(dtype) for t in _module_inputs(b, c, h, w, g)]
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        got = m(*inputs)
        assert calls == ['query_input', 'implicit_attention']
        monkeypatch.setattr(implicit_warp, 'FUSED_ATTENTION', False)
        want = m(*inputs)
        want64 = m.double()(*[t.double() for t in inputs])
    assert len(calls) == 2
    assert got.shape == want.shape == (b, c, h, w) and got.dtype == dtype
    assert got.stride() == want.stride()  # the reference's channels-last view
    if dtype == torch.float32:
        assert _err(got, want) <= TOL[dtype]
    else:  # both within bf16 rounding of the float64 module
        assert _err(got, want64) <= 2 * max(_err(want, want64), TOL[dtype])


def test_module_with_autograd_runs_the_reference(fused_on_cpu, monkeypatch):
    b, c, heads, h, w = 1, 48, 4, 3, 5
    g = torch.Generator().manual_seed(6)
    m = _module(c, heads, g)
    source, target, flow = (t.requires_grad_() for t in _module_inputs(b, c, h, w, g))
    calls = _count_fused_calls(monkeypatch)
    y = m(source, target, flow)
    y.square().sum().backward()
    assert calls == []
    assert source.grad.abs().sum() > 0 and target.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (m.q.weight, m.k.weight, m.v.weight))
    with torch.no_grad():
        torch.testing.assert_close(m(source, target, flow), y.detach(), rtol=1e-5, atol=1e-5)


def test_module_compiles_in_one_graph(fused_on_cpu):
    """Traced as the compiled window step traces it (aot_eager backend): both ops are graph nodes, no graph break,
    the eager fused output."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    b, c, heads, h, w = 2, 48, 4, 5, 7
    g = torch.Generator().manual_seed(7)
    m = _module(c, heads, g)
    inputs = _module_inputs(b, c, h, w, g)
    counter = CompileCounterWithBackend('aot_eager')
    with torch.no_grad():
        got = torch.compile(m, backend=counter, fullgraph=True)(*inputs)
        want = m(*inputs)
    assert counter.frame_count == 1
    targets = {n.target for gm in counter.graphs for n in gm.graph.nodes}
    assert torch.ops.gsmsr.implicit_attention.default in targets
    assert torch.ops.gsmsr.implicit_query_input.default in targets
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ops_fake_and_schema():
    """torch.library's consistency checks of the two custom ops (schema, fake tensors, AOT dispatch; no autograd)."""
    q, kv, index, pe = _attn_inputs((1, 16, 2, 3, 4), torch.float32, 'cpu')
    torch.library.opcheck(
        torch.ops.gsmsr.implicit_attention, (q, kv, index, pe, 2, 0.25), test_utils=('test_schema', 'test_faketensor')
    )
    target = torch.randn(1, 16, 3, 4)
    scaled = torch.rand(1, 12, 2)
    torch.library.opcheck(
        torch.ops.gsmsr.implicit_query_input, (target, scaled), test_utils=('test_schema', 'test_faketensor')
    )


def test_network_with_the_switch(fused_on_cpu, monkeypatch):
    """The tiny GSMNet without autograd, switch on (kernels interpreted, ~7 s) against off: the window step's
    gather passes an expanded anchor and reads the result through its views; float32 rounding apart."""
    from gsmsr.archs.gsmnet_arch import GSMNet

    torch.manual_seed(0)
    net = GSMNet(upscale=4, prop_depth=1, attn_depth=1, pa_frame=1, embed_dims=16, num_heads=4, spynet_path=None)
    lq = torch.rand(1, 2, 3, 36, 36, generator=torch.Generator().manual_seed(8))
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        got = net.eval()(lq)
        assert calls and set(calls) == {'query_input', 'implicit_attention'}
        monkeypatch.setattr(implicit_warp, 'FUSED_ATTENTION', False)
        want = net(lq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
