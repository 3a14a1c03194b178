"""GPU check of GSMNet.compile_kernels_ahead, in fresh processes with empty kernel caches.

    python -m pytest -m gpu tests/gpu/test_compile_ahead_gpu.py -s

After the compilations it starts, a bf16 forward (eager, and with compiled blocks) launches no kernel specialisation
that was not started ahead, and gives the same output as a second forward (the garbage of the window step run
ahead stays out of the results). Prints how long the start took and how long the first forward then took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gsmsr.ops.triton_jit import triton_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(), reason='needs CUDA and Triton')]

CHILD = """
import json, sys, time, torch, triton
from gsmsr import GSMNet

compiles = {'ahead': [], 'forward': []}
phase = 'ahead'

def hook(*, fn, repr, **_):  # Triton calls it before compiling a specialisation (not for one it already has)
    if fn.module.startswith('gsmsr.'):
        compiles[phase].append(f'{fn.module}.{repr}')
    return False  # compile it

triton.knobs.runtime.jit_cache_hook = hook
torch.manual_seed(0)
net = GSMNet(compile_blocks=sys.argv[1] == 'compiled').cuda().eval()
shape = (1, 6, 3, 64, 96)
lq = torch.rand(shape, device='cuda')
with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
    start = time.perf_counter()
    started = net.compile_kernels_ahead(shape)
    ahead_s = time.perf_counter() - start
    phase = 'forward'
    start = time.perf_counter()
    y1 = net(lq).float()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    y2 = net(lq).float()
print(json.dumps(dict(started=started, ahead_s=ahead_s, first_s=first_s, before=len(compiles['ahead']),
                      ahead=compiles['ahead'],
                      new=compiles['forward'], diff=(y1 - y2).abs().max().item(), finite=bool(y1.isfinite().all()))))
"""


def _nearest(spec: str, ahead: list) -> str:
    """A specialisation compiled by the forward, against the one of the same kernel started ahead that differs in
    the fewest fields: the fields that differ (why it was not found)."""
    name = spec.split('[', 1)[0]
    fields = set(spec.split(', '))
    same = [a for a in ahead if a.split('[', 1)[0] == name]
    if not same:
        return f'{name}: no specialisation of it was started ahead'
    best = set(min(same, key=lambda a: len(fields ^ set(a.split(', ')))).split(', '))
    return f'{name}: forward has {sorted(fields - best)}, ahead had {sorted(best - fields)}'


@pytest.mark.parametrize('mode', ['eager', 'compiled'])
def test_forward_after_compile_ahead_compiles_nothing_new(tmp_path, mode):
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / 'triton'), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / 'ind'))
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [root, env.get('PYTHONPATH')]))
    proc = subprocess.run([sys.executable, '-c', CHILD, mode], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(mode, res)
    assert res['started'] and res['before'] > 0
    assert not res['new'], 'the forward compiled kernels of its own:\n' + '\n'.join(
        _nearest(spec, res['ahead']) for spec in res['new']
    )
    assert res['finite'] and res['diff'] <= 1e-6
