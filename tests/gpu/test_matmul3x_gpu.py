"""GPU checks of 3xTF32 GEMMs (gsmsr.ops.matmul3x): the split products on TF32 tensor cores against float64, and the
compiled fp32 network with them (``fp32_matmul='3xtf32'``) against the faithful one.

python -m pytest -m gpu tests/gpu/test_matmul3x_gpu.py -s

conftest turns TF32 off for GPU tests, so these also check that the ops turn it on for their own products only.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from gsmsr import GSMNet
from gsmsr.ops import cuda_kernel, kernel_status, matmul3x
from gsmsr.ops.matmul3x import linear3x, linear_triton, mm3x, tf32_linear, tf32_matmul

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]
needs_kernel = pytest.mark.skipif(not cuda_kernel(), reason=f'needs mamba-ssm: {kernel_status()}')
CUDA = torch.device('cuda')


def _randn(*shape: int, std: float = 1.0, seed: int = 0) -> Tensor:
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=CUDA) * std


# the network's GEMMs at full width (C = 192) and its value ranges, fewer tokens
GEMMS = [
    ('swsa qkv', 'linear', lambda: (_randn(57_600, 192), _randn(576, 192, std=0.02, seed=1))),
    ('gsm fc1', 'linear', lambda: (_randn(57_600, 192), _randn(768, 192, std=0.02, seed=1))),
    ('in_proj', 'matmul', lambda: (_randn(768, 192, std=0.02), _randn(1, 57_600, 192, seed=1).mT)),
    ('attn @ v', 'matmul', lambda: (_randn(512, 8, 128, 128).softmax(-1), _randn(512, 8, 128, 24, seed=1))),
]


@pytest.mark.parametrize('name, kind, operands', GEMMS, ids=[g[0] for g in GEMMS])
def test_3xtf32_on_tensor_cores_matches_float64(name, kind, operands):
    """Max abs error relative to max |reference|: the split within 1e-5, fp32 within 2e-6; one TF32 product ~3e-4
    (so TF32 really ran, with the global flag off); the flag is off again afterwards. On an H200 (cuBLAS, torch 2.11)
    the split measured 3.4e-6 on swsa qkv against 7.2e-7 for fp32 (CPU emulation of the same split: 5-8e-7): the
    tensor cores' accumulation is coarser than the emulation's; the whole network stays at fp32's error (bench_gsm:
    4.9e-5 against 4.5e-5 max abs vs the faithful row), which is the bound that matters."""
    assert not torch.backends.cuda.matmul.allow_tf32
    a, b = operands()
    exact = F.linear if kind == 'linear' else torch.matmul
    ref = exact(a.double(), b.double())

    def err(out: Tensor) -> float:
        return float((out.double() - ref).abs().max() / ref.abs().max())

    e3 = err(linear3x(a, b) if kind == 'linear' else mm3x(a, b))
    e1 = err(tf32_linear(a, b) if kind == 'linear' else tf32_matmul(a, b))
    e32 = err(exact(a, b))
    print(f'{name}: 3xtf32 {e3:.1e}, fp32 {e32:.1e}, tf32 {e1:.1e}')
    assert e3 <= 1e-5 and e32 <= 2e-6 and e1 >= 1e-4
    assert not torch.backends.cuda.matmul.allow_tf32


# the narrowing GEMMs that run in fp32 today (K > N), then the widening ones
TRITON_GEMMS = [('gsm fc2', 192, 768), ('out_proj', 192, 384), ('gsm fc1', 768, 192), ('swsa qkv', 576, 192)]


@pytest.mark.parametrize('name, n, k', TRITON_GEMMS, ids=[g[0] for g in TRITON_GEMMS])
def test_triton_tf32x3_linear_matches_float64(name, n, k):
    """linear_triton's in-register split (``tl.dot(input_precision='tf32x3')``) within 1e-5 of float64 relative to
    max |reference|, like the concatenated split; its one-product 'tf32' mode ~3e-4 (so the split really ran on
    tensor cores)."""
    x, w, bias = _randn(57_600, k), _randn(n, k, std=0.02, seed=1), _randn(n, std=0.02, seed=2)
    ref = F.linear(x.double(), w.double(), bias.double())

    def err(out: Tensor) -> float:
        return float((out.double() - ref).abs().max() / ref.abs().max())

    e3, e1 = err(linear_triton(x, w, bias)), err(linear_triton(x, w, bias, precision='tf32'))
    print(f'{name}: triton tf32x3 {e3:.1e}, tf32 {e1:.1e}')
    assert e3 <= 1e-5 and e1 >= 1e-4


def test_tf32_flag_is_restored_when_it_was_on():
    a, b = _randn(256, 192), _randn(192, 256, seed=1)
    torch.backends.cuda.matmul.allow_tf32 = True  # conftest restores its own setting after the test
    mm3x(a, b)
    assert torch.backends.cuda.matmul.allow_tf32


NET = dict(prop_depth=2, attn_depth=2, embed_dims=64, num_heads=4)  # C = 64: worth_splitting picks GEMMs


def _spy(monkeypatch, names: tuple) -> List[str]:
    """Replace matmul3x's functions ``names`` by wrappers that log their name on each call; returns the log."""
    calls: List[str] = []
    for name in names:
        inner = getattr(matmul3x, name)

        def spy(*args, _inner=inner, _name=name, **kwargs):
            calls.append(_name)
            return _inner(*args, **kwargs)

        monkeypatch.setattr(matmul3x, name, spy)
    return calls


def _faithful_net() -> GSMNet:
    """The eager fp32 reference network (NET), weights perturbed so no branch is an exact identity. Dynamo's caches
    are emptied first: a test's compiled copies then trace again, through that test's spies."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = GSMNet(**NET).to(CUDA).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref


def _compiled_copy(ref: GSMNet, fp32_matmul: str) -> GSMNet:
    net = GSMNet(**NET, compile_blocks=True, fp32_matmul=fp32_matmul).to(CUDA).eval()
    net.load_state_dict(ref.state_dict())
    return net


@needs_kernel
def test_compiled_3xtf32_network_matches_the_faithful_one(monkeypatch):
    """The fp32 compiled network with 3xTF32 GEMMs against the eager faithful network: max abs within 1e-4, as the
    compiled fp32 network (C = 64, so that :func:`worth_splitting` picks GEMMs); the split ran inside the compiled
    blocks; under bf16 autocast nothing is split."""
    routed = _spy(monkeypatch, ('linear3x', 'mm3x'))
    ref = _faithful_net()
    nets = {mode: _compiled_copy(ref, mode) for mode in ('ieee', '3xtf32')}
    lq = torch.rand(1, 7, 3, 64, 72, device=CUDA)
    with torch.no_grad():
        want = ref(lq)
        e32 = (nets['ieee'](lq) - want).abs().max().item()
        got = nets['3xtf32'](lq)
        e3 = (got - want).abs().max().item()
        assert routed
        routed.clear()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            nets['3xtf32'](lq)
        assert not routed
    print(f'compiled fp32 max abs {e32:.1e}, compiled fp32 3xtf32 max abs {e3:.1e}')
    assert e3 <= 1e-4 and e32 <= 1e-4


@needs_kernel
def test_compiled_network_splitting_in_registers_matches_the_faithful_one(monkeypatch):
    """``SPLIT_IN_REGISTERS``: the fp32 compiled network (C = 64) with the narrowing linears on the Triton GEMM
    (``gsmsr::linear_tf32x3``) and the others on the concatenated split against the eager faithful network: max abs
    within 1e-4; the mode routed linears both ways and the Triton GEMM's kernel ran.

    The kernel is observed under the profiler, not by a spy on ``linear_triton``: on CUDA, Inductor compiles the
    custom op's Triton launch into the graph (its kernel then runs without the Python function being called; H200,
    torch 2.11), while on the CPU the op stays an opaque call."""
    calls = _spy(monkeypatch, ('linear_tf32x3', 'linear3x'))
    monkeypatch.setattr(matmul3x, 'SPLIT_IN_REGISTERS', True)
    ref = _faithful_net()
    net = _compiled_copy(ref, '3xtf32')
    lq = torch.rand(1, 7, 3, 64, 72, device=CUDA)
    with torch.no_grad():
        want = ref(lq)
        net(lq)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = net(lq)
            torch.cuda.synchronize()
    err = (got - want).abs().max().item()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    print(f'compiled fp32, split in registers: max abs {err:.1e}')
    assert 'linear_tf32x3' in calls and 'linear3x' in calls
    assert '_linear_kernel' in kernels
    assert err <= 1e-4
