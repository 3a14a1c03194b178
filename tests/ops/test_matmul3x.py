"""3xTF32 GEMMs (gsmsr.ops.matmul3x) on CPU: the split, the algorithm against float64 with TF32 emulated, the ops'
fake implementations, and the dispatch mode in eager and in traced (Dynamo) network code.

TF32 does not exist on CPU: there the ops round their operands to TF32 (:func:`tf32_round`) and multiply in fp32,
which is what the tensor cores compute (products of TF32 values are exact in fp32, sums in fp32). The CUDA side
is in tests/gpu/test_matmul3x_gpu.py.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gsmsr import GSMNet
from gsmsr.archs import gsmnet_arch
from gsmsr.archs.swsa import compile_swsa_blocks
from gsmsr.ops import matmul3x
from gsmsr.ops.matmul3x import (
    TF32x3Mode,
    linear3x,
    linear_tf32x3,
    linear_triton,
    mm3x,
    split_tf32,
    tf32_linear,
    tf32_matmul,
    tf32_round,
    worth_splitting,
)

LOW = 0x1FFF  # the 13 mantissa bits TF32 drops


def _bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32)


def _spread(n: int, seed: int = 0) -> Tensor:
    """n fp32 values of both signs over most of the fp32 range, with zeros, subnormals and extremes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-120, 120, (n,), generator=g).float())
    tiny = torch.finfo(torch.float32).tiny
    extra = torch.tensor([0.0, -0.0, tiny, -tiny, tiny / 3, 1.0, -1.0, torch.finfo(torch.float32).max])
    return torch.cat([x, extra, -extra])


# -------------------------------------------------------------------------------------------------- the split
def test_split_is_exact_and_hi_is_tf32():
    x = _spread(8192)
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)  # exact: lo carries every dropped bit
    assert ((_bits(hi) & LOW) == 0).all()  # 13 zero low bits: representable in TF32
    assert torch.equal(tf32_round(hi), hi)
    assert (lo.abs() <= x.abs() * 2**-10).all()
    assert ((hi == 0) | (torch.sign(hi) == torch.sign(x))).all()  # truncation: hi toward zero, lo same sign
    assert ((lo == 0) | (torch.sign(lo) == torch.sign(x))).all()


def test_split_of_a_strided_operand():
    # a transposed view, as the channel-first projections see their tokens
    x = _spread(64 * 48, seed=1)[: 64 * 48].view(64, 48).mT
    hi, lo = split_tf32(x)
    assert hi.shape == lo.shape == x.shape
    assert torch.equal(hi + lo, x)


def test_split_special_values():
    inf, nan = float('inf'), float('nan')
    hi, lo = split_tf32(torch.tensor([inf, -inf]))
    assert torch.equal(hi, torch.tensor([inf, -inf])) and torch.equal(lo, torch.zeros(2))
    payload_nan = torch.tensor([0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)  # low / top bits
    hi, lo = split_tf32(torch.cat([torch.tensor([nan]), payload_nan]))
    assert (hi + lo).isnan().all()  # a NaN stays NaN even when its payload is in the dropped bits


def test_tf32_round_is_round_to_nearest_even():
    x = _spread(8192, seed=2)
    r = tf32_round(x)
    assert ((_bits(r) & LOW) == 0).all()
    finite = r.isfinite()
    half_ulp = torch.clamp(x.abs() * 2**-11, min=2.0**-137)  # subnormals: a fixed ulp, 2^-136
    assert ((r - x).abs() <= half_ulp)[finite].all()
    # ties: a kept last bit of 0 stays (down), of 1 rounds up to even
    ones = torch.tensor([1.0, 1.0 + 2**-10], dtype=torch.float32)
    half = 2**-11
    assert torch.equal(tf32_round(ones + half), torch.tensor([1.0, 1.0 + 2**-9]))
    assert torch.equal(tf32_round(-(ones + half)), -torch.tensor([1.0, 1.0 + 2**-9]))
    big = torch.tensor([torch.finfo(torch.float32).max, float('inf'), float('-inf')])
    assert torch.equal(tf32_round(big), torch.tensor([float('inf'), float('inf'), float('-inf')]))
    assert tf32_round(torch.tensor([float('nan')])).isnan().all()


# ------------------------------------------------------------------------------- the algorithm against float64
def _randn(*shape: int, std: float = 1.0, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# The network's GEMMs at its value ranges (LayerNorm'd activations ~N(0, 1), weights ~N(0, 0.02^2) as GSM's init,
# softmax weights), with fewer tokens: (name, 'linear' | 'matmul', operands)
GEMMS: List[Tuple[str, str, Callable[[], Tuple[Tensor, Tensor]]]] = [
    ('swsa qkv', 'linear', lambda: (_randn(4096, 192), _randn(576, 192, std=0.02, seed=1))),
    ('gsm fc2', 'linear', lambda: (F.gelu(_randn(4096, 768)), _randn(192, 768, std=0.02, seed=1))),
    ('in_proj', 'matmul', lambda: (_randn(768, 192, std=0.02), _randn(2, 1024, 192, seed=1).mT)),
    ('scores', 'matmul', lambda: (_randn(16, 8, 128, 24), _randn(16, 8, 128, 24, seed=1).mT)),
    ('attn @ v', 'matmul', lambda: (_randn(16, 8, 128, 128).softmax(-1), _randn(16, 8, 128, 24, seed=1))),
]


@pytest.mark.parametrize('name, kind, operands', GEMMS, ids=[g[0] for g in GEMMS])
def test_3xtf32_matches_float64_where_tf32_does_not(name, kind, operands):
    """Max abs error relative to max |reference|: 3xTF32 (emulated) within 2e-6, as fp32 (observed 2e-7 to 8e-7
    for both); one TF32 product ~3e-4."""
    a, b = operands()
    exact = F.linear if kind == 'linear' else torch.matmul
    ref = exact(a.double(), b.double())

    def err(out: Tensor) -> float:
        assert out.dtype == torch.float32 and out.shape == ref.shape
        return float((out.double() - ref).abs().max() / ref.abs().max())

    split = linear3x(a, b) if kind == 'linear' else mm3x(a, b)
    single = tf32_linear(a, b) if kind == 'linear' else tf32_matmul(a, b)
    e3, e32, e1 = err(split), err(exact(a, b)), err(single)
    print(f'{name}: 3xtf32 {e3:.1e}, fp32 {e32:.1e}, tf32 {e1:.1e}')
    assert e3 <= 2e-6 and e32 <= 2e-6
    assert e1 >= 1e-4


def test_linear3x_bias_and_a_strided_input():
    x = _randn(2, 192, 300).mT  # (B, HW, C) view of a (B, C, HW) map, as the implicit warp's projections see it
    w, b = _randn(384, 192, std=0.02, seed=1), _randn(384, std=0.02, seed=2)
    ref = F.linear(x.double(), w.double(), b.double())
    out = linear3x(x, w, b)
    assert out.shape == (2, 300, 384)
    assert float((out.double() - ref).abs().max() / ref.abs().max()) <= 2e-6


def test_mm3x_keeps_the_operand_layout():
    """A transposed operand is concatenated in its own layout (the fused producer writes rows as it reads them);
    the product's values and shape do not depend on it."""
    w, z = _randn(96, 64, std=0.02), _randn(2, 500, 64, seed=1)
    parts = split_tf32(z.mT)
    cat = matmul3x._cat_k((parts[0], parts[1], parts[0]), -2)
    assert cat.shape == (2, 192, 500) and cat.stride(-2) == 1
    torch.testing.assert_close(mm3x(w, z.mT), mm3x(w, z.mT.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize(
    'op, args',
    [
        (tf32_linear, (_randn(2, 10, 48), _randn(20, 48, seed=1), _randn(20, seed=2))),
        (tf32_linear, (_randn(10, 48), _randn(20, 48, seed=1))),
        (tf32_matmul, (_randn(30, 48), _randn(2, 50, 48, seed=1).mT)),
        (tf32_matmul, (_randn(3, 4, 5, 6), _randn(3, 4, 6, 7, seed=1))),
        (linear_tf32x3, (_randn(2, 10, 48), _randn(20, 48, seed=1), _randn(20, seed=2))),
        (linear_tf32x3, (_randn(10, 48), _randn(20, 48, seed=1))),
    ],
)
def test_ops_schema_and_fake_implementation(op, args):
    """What torch.compile relies on: schema, fake tensors with the real strides, AOT dispatch."""
    torch.library.opcheck(op, args, test_utils=('test_schema', 'test_faketensor', 'test_aot_dispatch_dynamic'))


# ----------------------------------------------------------------------------------------------- the routing
def test_worth_splitting_picks_the_compute_bound_gemms():
    tokens, c = 288_000, 192  # one GSM window at 180 x 320, C = 192
    split = {
        'swsa qkv': (tokens, 3 * c, c),
        'swsa proj': (tokens, c, c),
        'swsa fc11 / fc12': (tokens, 2 * c, c),
        'implicit warp q': (tokens, c, c),
        'implicit warp k|v': (tokens, 2 * c, c),
        'mamba in_proj': (4 * c, tokens, c),  # channel-first: weight @ (C, L)
        'gsm fc1': (tokens, 4 * c, c),
    }
    kept = {
        'swsa fc2': (tokens, c, 2 * c),
        'gsm fc2': (tokens, c, 4 * c),
        'mamba out_proj': (tokens, c, 2 * c),
        'mamba x_proj': (44, tokens, 2 * c),
        'mamba dt_proj': (2 * c, tokens, 12),
        'window scores': (128, 128, 24),
        'window attn @ v': (128, 24, 128),
        'position encoding k': (4, c, c),
    }
    assert all(worth_splitting(*mnk) for mnk in split.values())
    assert not any(worth_splitting(*mnk) for mnk in kept.values())


class OpCounter(TorchDispatchMode):
    """Counts the ATen and custom ops that reach the dispatcher (not those inside an op's own kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _all(m: int, n: int, k: int) -> bool:
    return True


EAGER_CPU = functools.partial(TF32x3Mode, devices=('cpu',), compiled_only=False, route=_all)


@pytest.mark.parametrize(
    'setup',
    ['float64', 'autocast', 'grad', 'compiled_only', 'other device', 'route says no'],
)
def test_mode_leaves_other_calls_alone(setup):
    x, w = _randn(64, 32), _randn(16, 32, seed=1)
    kwargs: Dict[str, Any] = dict(devices=('cpu',), compiled_only=False, route=_all)
    grad = False
    if setup == 'float64':
        x, w = x.double(), w.double()
    elif setup == 'grad':
        w.requires_grad_(True)
        grad = True
    elif setup == 'compiled_only':
        kwargs['compiled_only'] = True  # eager code: not traced
    elif setup == 'other device':
        kwargs['devices'] = ('cuda',)
    elif setup == 'route says no':
        kwargs['route'] = lambda m, n, k: False
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=setup == 'autocast')
    with torch.set_grad_enabled(grad), autocast:
        want = (F.linear(x, w), torch.matmul(x, w.mT), x @ w.mT)
        counter = OpCounter()
        with TF32x3Mode(**kwargs), counter:
            got = (F.linear(x, w), torch.matmul(x, w.mT), x @ w.mT)
    assert not any('gsmsr' in op for op in counter.counts)
    for g, e in zip(got, want):
        assert torch.equal(g, e)


def test_mode_routes_each_kind_of_call():
    x, w, b = _randn(64, 32), _randn(16, 32, seed=1), _randn(16, seed=2)
    a3, b3 = _randn(4, 64, 32), _randn(4, 32, 16, seed=1)
    counter = OpCounter()
    with EAGER_CPU(), counter:
        outs = [F.linear(x, w, b), F.linear(x, w, bias=b), torch.matmul(x, w.mT), x @ w.mT, x.matmul(w.mT)]
        outs += [torch.mm(x, w.mT), x.mm(w.mT), torch.bmm(a3, b3), a3.bmm(b3)]
    assert counter.counts['gsmsr.tf32_linear'] == 2 and counter.counts['gsmsr.tf32_matmul'] == 7
    assert not any(op in counter.counts for op in ('aten.mm', 'aten.addmm', 'aten.bmm'))
    want = [F.linear(x, w, b)] * 2 + [x @ w.mT] * 5 + [a3 @ b3] * 2
    for g, e in zip(outs, want):
        assert (g - e).abs().max() <= 2e-6 * e.abs().max()


TINY = dict(upscale=4, prop_depth=1, attn_depth=2, pa_frame=1, embed_dims=16, num_heads=4)


def _tiny_net(**kwargs: Any) -> GSMNet:
    torch.manual_seed(0)
    net = GSMNet(**{**TINY, **kwargs}).eval()
    with torch.no_grad():
        for p in net.parameters():  # no branch an exact identity
            p.add_(0.02 * torch.randn_like(p))
    return net


class GemmCounter(torch.overrides.TorchFunctionMode):
    """Counts the fp32 GEMM calls the mode looks at (F.linear, matmul, @, mm, bmm)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear or func in matmul3x._MATMULS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_mode_routes_every_gemm_of_a_tiny_network(monkeypatch):
    """Every GEMM of a whole forward (SWSA, implicit warp, Mamba projections, MLPs, reconstruction; the attention
    products too) through 3xTF32, emulated: within 1e-5 of the fp32 network (observed ~2e-7); one TF32 product per
    GEMM is over 10x further off."""
    net = _tiny_net()
    lq = torch.rand(1, 3, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gemms = GemmCounter()
        with gemms:
            want = net(lq)
        counter = OpCounter()
        with EAGER_CPU(), counter:
            got = net(lq)
        # one TF32 product per GEMM: the same routing with the split left out
        monkeypatch.setattr(matmul3x, 'linear3x', tf32_linear)
        monkeypatch.setattr(matmul3x, 'mm3x', tf32_matmul)
        with EAGER_CPU():
            single = net(lq)
    routed = counter.counts['gsmsr.tf32_linear'] + counter.counts['gsmsr.tf32_matmul']
    assert routed == gemms.count > 20
    assert counter.counts['aten.mm'] + counter.counts['aten.addmm'] == 0  # (the CPU scan's einsum is a bmm)
    e3, e1 = (got - want).abs().max().item(), (single - want).abs().max().item()
    print(f'3xtf32 {e3:.1e}, tf32 {e1:.1e}')
    assert e3 <= 1e-5 and e1 >= 10 * e3


def _traced_tiny_blocks(monkeypatch) -> Tuple[List[torch.fx.GraphModule], Dict[str, int], float]:
    """A C = 64 tiny GSMNet(fp32_matmul='3xtf32') with its blocks compiled by Dynamo only (graphs recorded, run
    eagerly; the mode's device list widened to the CPU), run once: (graphs, graph breaks, max abs difference from
    the eager fp32 network)."""
    import torch._dynamo

    graphs: List[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: List[Tensor]) -> Callable:
        graphs.append(gm)
        return gm.forward

    ref = _tiny_net(embed_dims=64)
    net = _tiny_net(embed_dims=64, fp32_matmul='3xtf32')
    lq = torch.rand(1, 3, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(lq)
    monkeypatch.setattr(gsmnet_arch, 'TF32x3Mode', functools.partial(TF32x3Mode, devices=('cpu',)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in net.prop_layers:
        layer.stage.mamba_block.compile(backend=record, dynamic=False)
    compile_swsa_blocks(net.swsa_blocks(), backend=record)
    net._compiled = True
    try:
        with torch.no_grad():
            got = net(lq)
        breaks = dict(torch._dynamo.utils.counters['graph_break'])
    finally:
        torch._dynamo.reset()
    return graphs, breaks, (got - want).abs().max().item()


def test_compiled_blocks_route_their_gemms_without_graph_breaks(monkeypatch):
    """GSMNet(fp32_matmul='3xtf32') with its blocks compiled (Dynamo only, on CPU with the mode's device list
    widened): Dynamo traces through the mode with no graph break (one graph per compiled block kind), the graphs hold
    the split GEMMs :func:`worth_splitting` picks at C = 64 (the concatenated split alone: ``SPLIT_IN_REGISTERS``
    off), and the output equals the eager fp32 network's up to rounding."""
    monkeypatch.setattr(matmul3x, 'SPLIT_IN_REGISTERS', False)
    graphs, breaks, error = _traced_tiny_blocks(monkeypatch)
    assert not breaks
    ops = sorted(Counter(str(n.target) for g in graphs for n in g.graph.nodes if 'gsmsr.tf32' in str(n.target)).items())
    # two SWSA attention graphs (unshifted, shifted) with qkv, proj each; one per-token branch graph for all SWSA
    # blocks with fc11, fc12; one window step with implicit-warp q and k|v, in_proj (channel-first matmul), MLP fc1
    assert len(graphs) == 4
    assert ops == [('gsmsr.tf32_linear.default', 9), ('gsmsr.tf32_matmul.default', 1)]
    assert error <= 1e-5


def test_split_in_registers_takes_the_long_reductions_the_route_leaves(monkeypatch):
    """SPLIT_IN_REGISTERS: fp32 F.linear with K >= MIN_K that the route leaves alone (the narrowing fc2) goes to the
    in-register split, what the route takes to the concatenated split as before, shorter reductions to cuBLAS's fp32;
    matmuls are unchanged."""
    monkeypatch.setattr(matmul3x, 'SPLIT_IN_REGISTERS', True)
    x, x_short = _randn(300, 256), _randn(300, 32, seed=3)
    narrow, wide, short = _randn(64, 256, seed=1), _randn(512, 256, seed=2), _randn(64, 32, seed=4)
    counter = OpCounter()
    with TF32x3Mode(devices=('cpu',), compiled_only=False), counter:
        outs = [F.linear(x, narrow), F.linear(x, wide, _randn(512, seed=5)), F.linear(x_short, short), x @ wide.mT]
    assert counter.counts['gsmsr.linear_tf32x3'] == 1 and counter.counts['gsmsr.tf32_linear'] == 1
    assert counter.counts['gsmsr.tf32_matmul'] == 1  # the matmul: worth_splitting as before
    assert torch.equal(outs[2], F.linear(x_short, short))  # K = 32: left to cuBLAS's fp32
    want = F.linear(x, narrow)
    assert (outs[0] - want).abs().max() <= 1e-6 * want.abs().max()  # fp32 summation order


def test_compiled_blocks_split_in_registers_without_graph_breaks(monkeypatch):
    """The compiled blocks (Dynamo only, CPU, C = 64) with SPLIT_IN_REGISTERS (the default): no graph break, every
    linear with K >= 64 is a linear_tf32x3 node (the narrowing fc2 / out_proj) or a concatenated split (where
    worth_splitting), and the output (interpreted Triton GEMMs) equals the eager fp32 network's up to rounding."""
    monkeypatch.setattr(matmul3x, 'SPLIT_IN_REGISTERS', True)
    graphs, breaks, error = _traced_tiny_blocks(monkeypatch)
    assert not breaks
    ops = Counter(str(n.target) for g in graphs for n in g.graph.nodes if 'gsmsr.' in str(n.target))
    linears = [n for g in graphs for n in g.graph.nodes if n.target is F.linear or 'linear' in str(n.target)]
    assert ops['gsmsr.linear_tf32x3.default'] >= 4 and ops['gsmsr.tf32_linear.default'] >= 4
    assert all('tf32' in str(n.target) or n.args[1].meta['example_value'].shape[1] < 64 for n in linears)
    assert error <= 1e-5


def test_gsmnet_fp32_matmul_option():
    with pytest.raises(ValueError, match='fp32_matmul'):
        GSMNet(**TINY, fp32_matmul='tf32')
    net = GSMNet(**TINY, fp32_matmul='3xtf32')
    assert not isinstance(net._gemm_mode(), TF32x3Mode)  # blocks not compiled: nothing to route
    net._compiled = True
    assert isinstance(net._gemm_mode(), TF32x3Mode)
    assert not isinstance(GSMNet(**TINY)._gemm_mode(), TF32x3Mode)
    ieee = GSMNet(**TINY, fp32_matmul='ieee')
    ieee._compiled = True
    assert GSMNet(**TINY).fp32_matmul == '3xtf32' and not isinstance(ieee._gemm_mode(), TF32x3Mode)


@pytest.mark.parametrize('rows, n, k, bias', [(70, 40, 96, True), (129, 64, 33, False), (1, 3, 5, True)])
def test_linear_triton_interpreted_matches_float64(rows, n, k, bias):
    """The Triton GEMM (interpreted on CPU, where products are fp32 whatever the precision) against float64: ragged
    blocks in every dimension, with and without bias, leading dimensions and a transposed (strided) input."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    out = linear_triton(x, w, b)
    assert out.shape == (2, rows, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    strided = x.transpose(0, 1)  # (rows, 2, k): not contiguous
    torch.testing.assert_close(linear_triton(strided, w, b).double(), ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_linear_triton_names_bad_operands():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r'weight \(3, 7\)'):
        linear_triton(x, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r'bias \(4,\)'):
        linear_triton(x, w, torch.randn(4))
    with pytest.raises(ValueError, match='fp32 operands only'):
        linear_triton(x.double(), w.double())
