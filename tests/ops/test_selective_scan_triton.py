"""The Triton selective scan against the PyTorch reference (float64): outputs and every gradient.

On CPU the kernels run through Triton's interpreter, in this process: the module wraps its kernel bodies with
``triton.jit`` lazily, inside a ``triton.knobs.runtime.scope()`` with ``interpret`` on (Triton reads
TRITON_INTERPRET when ``@triton.jit`` decorates, not at launch), so nothing leaks into other tests
(checked below). On a CUDA machine the same cases also run compiled. Shapes are tiny because the interpreter runs
each program's tile ops in numpy and the pair scan element by element in Python; the small ``TINY`` tiles still
give several chunks, a partial last chunk, several carry-scan steps and padded channels.

Tolerances, on the max abs error relative to max(1, max |reference|):
* float32 inputs: 1e-5 (observed 6e-8 to 5e-7 with softplus; up to 2e-6 in 'groups_N4', whose delta without
  softplus is often negative, so a_t > 1 and the states grow).
* bfloat16 inputs (the reference gets the same bf16-rounded inputs in float64): 1e-2. Outputs and the gradients of
  u, delta, z, B, C are bf16, so one bf16 ulp (2^-7 relative; the interpreter truncates on bf16 stores, the GPU
  rounds to nearest) dominates; observed 2e-4 to 6e-3. dA, dD, d(delta_bias) are float32 (observed <= 1.2e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch
import triton  # comes with torch's Linux wheels; these tests must not skip on CPU, so no importorskip

from gsmsr.ops import selective_scan_naive, selective_scan_ref
from gsmsr.ops.selective_scan_triton import DEFAULT_CONFIG, ScanConfig, selective_scan_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# 16-token chunks, 2 chunks per carry-scan step, 2 channels per program: multi-chunk logic on tiny shapes
# (few warps, so that compiled tiles are not much smaller than the thread blocks when these run on CUDA)
TINY = ScanConfig(block_l=16, block_d=2, block_d_bwd=2, carry_chunks=2, carry_lanes=16, num_warps=2, num_warps_bwd=2)
TINY_GROUPS = ScanConfig(
    block_l=8, block_d=2, block_d_bwd=1, carry_chunks=4, carry_lanes=8, bwd_groups=2, num_warps=1, num_warps_bwd=1
)
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

# name: (batch, channels, states, length, config, with D and z, with delta_bias, softplus)
CASES = {
    'chunks_N16_full': (2, 3, 16, 50, TINY, True, True, True),  # 4 chunks, last one partial
    'short_N4_bare': (1, 5, 4, 7, TINY, False, False, False),  # L shorter than a chunk, padded channels
    'groups_N4': (2, 3, 4, 37, TINY_GROUPS, True, True, False),  # backward split over 2 channel groups
    'odd_N3': (1, 2, 3, 21, TINY, False, True, True),  # N not a power of two (padded states)
    'default_cfg_N4': (1, 4, 4, 20, DEFAULT_CONFIG, True, True, True),  # the GPU tile sizes, L < block_l
}
BF16_CASES = ['chunks_N16_full', 'groups_N4']


def _inputs(
    batch: int,
    dim: int,
    state: int,
    length: int,
    with_dz: bool,
    with_bias: bool,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Kernel inputs: u, delta, z, B, C in ``dtype``; A, D, delta_bias float32; all requiring grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(
        u=r(batch, dim, length),
        delta=0.5 * r(batch, dim, length),
        A=-torch.rand(dim, state, generator=g, dtype=torch.float64) * 3,
        B=r(batch, state, length),
        C=r(batch, state, length),
    )
    if with_dz:
        t.update(D=r(dim), z=r(batch, dim, length))
    if with_bias:
        t['delta_bias'] = 0.3 * r(dim)
    return {
        k: v.to(device=device, dtype=dtype if v.dim() == 3 else torch.float32).requires_grad_() for k, v in t.items()
    }


def _max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a.double() - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _check(name: str, dtype: torch.dtype, device: str) -> Dict[str, float]:
    batch, dim, state, length, cfg, with_dz, with_bias, softplus = CASES[name]
    inp = _inputs(batch, dim, state, length, with_dz, with_bias, dtype, device, seed=length)
    ref = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    y = selective_scan_triton(**inp, delta_softplus=softplus, config=cfg)
    assert y.dtype == dtype and y.shape == (batch, dim, length) and y.device.type == device
    y_ref = selective_scan_ref(**ref, delta_softplus=softplus)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gy = gy.to(device=device, dtype=dtype)
    grads = torch.autograd.grad(y, list(inp.values()), gy)
    grads_ref = torch.autograd.grad(y_ref, list(ref.values()), gy.double())
    errs = {'out': _max_rel_err(y, y_ref)}
    for (key, x), gx, gr in zip(inp.items(), grads, grads_ref):
        assert gx.dtype == x.dtype and gx.shape == x.shape, key
        errs[f'd{key}'] = _max_rel_err(gx, gr)
    print(name, dtype, device, ' '.join(f'{k}={v:.1e}' for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v <= TOL[dtype]}
    assert not bad, f'{name} {dtype}: {bad} > {TOL[dtype]}'
    return errs


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', list(CASES))
def test_float32_matches_reference(name, device):
    _check(name, torch.float32, device)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', BF16_CASES)
def test_bfloat16_inputs_match_reference(name, device):
    _check(name, torch.bfloat16, device)


def test_matches_token_by_token_recurrence():
    """Cross-check against the float64 per-token loop (independent of the reference's blocked scan)."""
    inp = _inputs(1, 3, 16, 40, True, True, torch.float32, 'cpu', seed=3)
    ref = {k: v.detach().double() for k, v in inp.items()}
    y = selective_scan_triton(**{k: v.detach() for k, v in inp.items()}, delta_softplus=True, config=TINY)
    assert _max_rel_err(y, selective_scan_naive(**ref, delta_softplus=True)) <= TOL[torch.float32]


def test_strided_operands_need_no_copy():
    """B and C as row slices of one projection (as BiMamba splits them) give the same result as copies."""
    g = torch.Generator().manual_seed(4)
    batch, dim, state, length = 2, 2, 4, 24
    dbl = torch.randn(batch, 1 + 2 * state, length, generator=g)
    B, C = dbl[:, 1 : 1 + state], dbl[:, 1 + state :]
    assert not B.is_contiguous()
    u, delta = torch.randn(batch, dim, length, generator=g), torch.randn(batch, dim, length, generator=g)
    A = -torch.rand(dim, state, generator=g)
    y = selective_scan_triton(u, delta, A, B, C, delta_softplus=True, config=TINY)
    y_copy = selective_scan_triton(u, delta, A, B.contiguous(), C.contiguous(), delta_softplus=True, config=TINY)
    assert torch.equal(y, y_copy)


def test_cpu_runs_interpreted_without_leaking_the_mode():
    from triton.runtime.interpreter import InterpretedFunction

    from gsmsr.ops import selective_scan_triton as mod

    env_before, knob_before = os.environ.get('TRITON_INTERPRET'), triton.knobs.runtime.interpret
    inp = _inputs(1, 2, 4, 9, False, False, torch.float32, 'cpu')
    selective_scan_triton(**{k: v.detach() for k, v in inp.items()}, config=TINY)
    assert isinstance(mod._kernels(True).output_kernel, InterpretedFunction)
    assert os.environ.get('TRITON_INTERPRET') == env_before
    assert triton.knobs.runtime.interpret == knob_before

    @triton.jit
    def _probe(x):  # decorated now: must be an ordinary (compiled) JIT function again
        pass

    assert not isinstance(_probe, InterpretedFunction) or knob_before


def test_rejects_bad_shapes():
    inp = {k: v.detach() for k, v in _inputs(1, 2, 4, 9, False, False, torch.float32, 'cpu').items()}
    with pytest.raises(ValueError, match='B must be'):
        selective_scan_triton(**{**inp, 'B': inp['B'][..., :5]})
    with pytest.raises(TypeError, match='float64'):
        selective_scan_triton(**{**inp, 'u': inp['u'].double()})


def test_module_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        'import torch\n'
        'from gsmsr.ops import selective_scan_triton as m\n'
        'assert not m.triton_available()\n'
        'x = torch.zeros(1, 1, 4)\n'
        'try:\n'
        '    m.selective_scan_triton(x, x, torch.zeros(1, 2), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))\n'
        'except RuntimeError as err:\n'
        "    assert 'triton' in str(err)\n"
        'else:\n'
        "    raise AssertionError('no error without triton')\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, 'PYTHONPATH': str(root) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    res = subprocess.run([sys.executable, '-c', code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
