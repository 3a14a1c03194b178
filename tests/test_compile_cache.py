"""Tests for gsmsr.compile_cache: cache folders under the user cache (user settings kept, torch's own default
replaced), the Mega-Cache key, atomic, change-only saves and failure-tolerant loads (with stub artifact functions),
and precompiled functions: the same values as eager, one compiled function for all layers, a load in a fresh
process, and the fallbacks (corrupt or foreign file, failed save, arguments or torch without ahead-of-time
compilation). Precompiled functions use the 'aot_eager' backend here (Inductor's C++ compilation takes minutes on
CPU), except one small Inductor round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gsmsr
from gsmsr import compile_cache
from gsmsr.compile_cache import (
    AOT_MAGIC,
    DoneMarker,
    MegaCache,
    PrecompiledFunction,
    cache_key,
    cache_root,
    enable_persistent_caches,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

VARS = ('TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR', 'TORCHINDUCTOR_FX_GRAPH_CACHE', 'TORCHINDUCTOR_AUTOGRAD_CACHE')


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, 'fx_graph_cache', False)
    monkeypatch.setattr(functorch_config, 'enable_autograd_cache', False)
    return tmp_path


def test_cache_folders_default_under_user_cache(clean_env):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    assert cache_root() == clean_env / 'xdg' / 'gsmsr'
    root = enable_persistent_caches()
    assert (root / 'inductor').is_dir()
    assert root == clean_env / 'xdg' / 'gsmsr'
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(root / 'inductor')
    assert os.environ['TRITON_CACHE_DIR'] == str(root / 'triton')
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache


def test_user_settings_are_kept(clean_env, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', '/mine/inductor')
    monkeypatch.setenv('TORCHINDUCTOR_FX_GRAPH_CACHE', '0')
    enable_persistent_caches()
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == '/mine/inductor'
    assert 'TRITON_CACHE_DIR' not in os.environ  # Inductor keeps Triton's cache inside the user's folder
    assert inductor_config.fx_graph_cache is False
    monkeypatch.delenv('TORCHINDUCTOR_CACHE_DIR')
    monkeypatch.setenv('TRITON_CACHE_DIR', '/mine/triton')
    enable_persistent_caches(clean_env / 'elsewhere')
    assert os.environ['TRITON_CACHE_DIR'] == '/mine/triton'
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(clean_env / 'elsewhere' / 'inductor')


def test_key_names_everything_compiled_code_depends_on(monkeypatch):
    key = cache_key(torch.device('cpu'))
    assert set(key) == {'torch', 'triton', 'cuda', 'gpu', 'capability', 'gsmsr'}
    assert key['torch'] == torch.__version__ and key['gsmsr'] == gsmsr.__version__ and key['gpu'] is None
    a = MegaCache.for_device(torch.device('cpu'), Path('/r')).path
    assert a == MegaCache.for_device(torch.device('cpu'), Path('/r')).path  # stable
    assert a.parent == Path('/r/megacache') and a.suffix == '.megacache'
    monkeypatch.setattr(gsmsr, '__version__', gsmsr.__version__ + '.post1')
    assert MegaCache.for_device(torch.device('cpu'), Path('/r')).path != a  # any field changes the file


class Artifacts:
    """Stand-in for torch.compiler.save_cache_artifacts / load_cache_artifacts."""

    def __init__(self, data: bytes = b''):
        self.data, self.loaded = data, []

    def save(self):
        return (self.data, object()) if self.data else None

    def load(self, data: bytes):
        if data.startswith(b'bad'):
            raise RuntimeError('cannot deserialize')
        self.loaded.append(data)


def test_save_then_load_round_trip_and_change_only_writes(tmp_path):
    path = tmp_path / 'm' / 'x.megacache'
    art = Artifacts()
    cache = MegaCache(path, art.save, art.load)
    assert not cache.load() and not cache.save() and not path.exists()  # nothing compiled: no file
    art.data = b'artifacts v1'
    assert cache.save() and path.read_bytes() == b'artifacts v1'
    mtime = path.stat().st_mtime_ns
    assert not cache.save() and path.stat().st_mtime_ns == mtime  # unchanged: not rewritten
    fresh = Artifacts(b'artifacts v1')
    again = MegaCache(path, fresh.save, fresh.load)
    assert again.load() and fresh.loaded == [b'artifacts v1']
    assert not again.save()  # what was loaded is what the process has
    fresh.data = b'artifacts v2'
    assert again.save() and path.read_bytes() == b'artifacts v2'
    assert sorted(p.name for p in path.parent.iterdir()) == ['x.megacache']  # no temporaries left


def test_save_is_atomic_and_bad_files_are_ignored(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'x.megacache'
    path.write_bytes(b'bad old file')
    art = Artifacts(b'new')
    cache = MegaCache(path, art.save, art.load)
    assert not cache.load()  # unusable file: ignored (inference recompiles)

    def crash(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', crash)  # the rename of the finished temporary fails
    assert not cache.save()  # warns, inference goes on
    assert 'compile cache not saved' in capsys.readouterr().err
    assert path.read_bytes() == b'bad old file' and sorted(p.name for p in tmp_path.iterdir()) == ['x.megacache']


def test_done_marker_is_keyed_set_atomically_and_never_fails(clean_env, monkeypatch):
    cpu = torch.device('cpu')
    done = DoneMarker('kernels', {'shape': [1, 52, 3, 360, 640]}, cpu)
    assert done.path.parent == cache_root() / 'done' and not done.exists()
    done.set()
    assert done.exists() and done.path.read_bytes() == b''
    assert DoneMarker('kernels', {'shape': [1, 52, 3, 360, 640]}, cpu).exists()  # a later process sees it
    # another shape, other cache folders or other sources: not done
    assert not DoneMarker('kernels', {'shape': [1, 52, 3, 360, 641]}, cpu).exists()
    monkeypatch.setenv('TRITON_CACHE_DIR', str(clean_env / 'elsewhere'))
    assert not DoneMarker('kernels', {'shape': [1, 52, 3, 360, 640]}, cpu).exists()
    monkeypatch.delenv('TRITON_CACHE_DIR')
    monkeypatch.setattr(compile_cache, '_SOURCE_DIGEST', 'edited')
    assert not DoneMarker('kernels', {'shape': [1, 52, 3, 360, 640]}, cpu).exists()
    # an unwritable cache root only leaves the step to be done again
    blocked = DoneMarker('kernels', {}, cpu, root=done.path)  # a file where its folder would be
    blocked.set()
    assert not blocked.exists()
    assert sorted(p.name for p in done.path.parent.iterdir()) == [done.path.name]  # no temporaries left


def test_torch_default_inductor_folder_is_replaced(clean_env, monkeypatch):
    """Importing torch._dynamo writes Inductor's default folder (in the system temporary folder) into the
    environment: that is not the user's choice, so the persistent folder replaces it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', default_cache_dir())
    root = enable_persistent_caches()
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(root / 'inductor')
    assert os.environ['TRITON_CACHE_DIR'] == str(root / 'triton')


# ----------------------------------------------------------------------------------------------- precompiled
class Tiny(nn.Module):
    def __init__(self, scale: float = 2.0) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = scale

    def forward(self, x, extra=None):
        y = self.norm(self.lin(x)) * self.scale
        return y if extra is None else y + extra[0]


@pytest.fixture
def aot(monkeypatch):
    """Fast backend, and warnings that are printed again in every test."""
    monkeypatch.setattr(compile_cache, 'AOT_BACKEND', 'aot_eager')
    monkeypatch.setattr(compile_cache, '_warned', set())


def files(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_precompiled_equals_eager_and_one_function_serves_all_modules(tmp_path, aot):
    a, b = Tiny().eval(), Tiny().eval()  # different weights: parameters are inputs, not constants
    x = torch.randn(4, 8)
    fn = PrecompiledFunction(Tiny.forward, tmp_path)
    with torch.no_grad():
        for m in (a, b, a):
            torch.testing.assert_close(fn(m, x), Tiny.forward(m, x), rtol=0, atol=0)
    assert len(fn.entries) == 1 and len(files(tmp_path)) == 1
    assert [e.split()[0] for e in fn.events] == ['compiled', 'saved']
    assert fn.seconds['compile'] > 0 and fn.seconds['load'] == 0 and fn.seconds['first_call'] > 0
    assert files(tmp_path)[0].startswith('Tiny.forward-cpu-torch')
    again = PrecompiledFunction(Tiny.forward, tmp_path)  # a new instance reads the file
    with torch.no_grad():
        torch.testing.assert_close(again(b, x), Tiny.forward(b, x), rtol=0, atol=0)
    assert [e.split()[0] for e in again.events] == ['loaded']
    assert again.seconds['load'] > 0 and again.seconds['compile'] == 0 and again.seconds['first_call'] > 0


def test_precompiled_seconds_summed_for_the_run_stats(tmp_path, aot):
    from gsmsr.inference import _precompiled_seconds

    a, b = PrecompiledFunction(Tiny.forward, tmp_path), PrecompiledFunction(Tiny.forward, tmp_path)
    a.seconds = {'load': 0.5, 'compile': 2.0, 'first_call': 1.0}
    b.seconds = {'load': 0.25, 'compile': 0.0, 'first_call': 0.5}
    assert _precompiled_seconds(nn.Module()) is None  # not precompiled: nothing to report
    net = nn.Module()
    net.precompiled = (a, b)
    assert _precompiled_seconds(net) == {'load': 0.75, 'compile': 2.0, 'first_call': 1.5}


def test_precompiled_keys_inputs_state_switches_and_config(tmp_path, aot):
    m = Tiny().eval()
    switch = ['x']
    fn = PrecompiledFunction(Tiny.forward, tmp_path, switches=lambda: tuple(switch))
    x = torch.randn(4, 8)
    with torch.no_grad():
        fn(m, x)
        fn(m, torch.randn(6, 8))  # another shape
        fn(m, x, [torch.randn(4, 8)])  # another structure
        switch[0] = 'y'
        fn(m, x)  # another module-level setting
        other = Tiny(3.0).eval()
        torch.testing.assert_close(fn(other, x), Tiny.forward(other, x))  # another module attribute
    fn(m, x)  # grad mode on
    assert len(files(tmp_path)) == 6 and len(fn.entries) == 6
    with torch.no_grad():
        fn(m, x)
    assert len(fn.entries) == 6  # nothing new: the first entry for these inputs answers


def test_corrupt_or_foreign_file_is_compiled_again_with_a_warning(tmp_path, aot, capsys):
    m, x = Tiny().eval(), torch.randn(4, 8)
    with torch.no_grad():
        PrecompiledFunction(Tiny.forward, tmp_path)(m, x)
    (path,) = tmp_path.iterdir()
    good = path.read_bytes()
    magic, header, payload = good.split(b'\n', 2)
    key = json.loads(header)
    key['software']['torch'] = '0.0.1'
    broken = {
        'corrupt': magic + b'\n' + header + b'\n' + payload[: len(payload) // 2],
        'foreign': magic + b'\n' + json.dumps(key).encode() + b'\n' + payload,
        'not ours': b'something else\n{}\n',
    }
    for name, data in broken.items():
        path.write_bytes(data)
        fn = PrecompiledFunction(Tiny.forward, tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(fn(m, x), Tiny.forward(m, x))
        assert [e.split()[0] for e in fn.events] == ['compiled', 'saved'], name
        assert 'not used' in capsys.readouterr().err, name
        assert path.read_bytes().startswith(AOT_MAGIC + header + b'\n'), name  # replaced by a good one
        compile_cache._warned.clear()
    assert files(tmp_path) == [path.name]


def test_failed_save_warns_leaves_no_file_and_still_runs(tmp_path, aot, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(os, 'replace', crash)  # the rename of the finished temporary fails
    m, x = Tiny().eval(), torch.randn(4, 8)
    fn = PrecompiledFunction(Tiny.forward, tmp_path / 'aot')
    with torch.no_grad():
        torch.testing.assert_close(fn(m, x), Tiny.forward(m, x))
    assert 'precompiled function not saved' in capsys.readouterr().err
    assert files(tmp_path / 'aot') == []  # no partial file, no temporary


def test_unsupported_arguments_or_torch_fall_back_to_torch_compile(tmp_path, aot, monkeypatch, capsys):
    m, x = Tiny().eval(), torch.randn(4, 8)
    fn = PrecompiledFunction(lambda mod, x, f: mod(f(x)), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fn(m, x, torch.relu), m(torch.relu(x)))  # a function argument: no key
    assert fn.events[0].startswith('fallback: cannot key') and 'using torch.compile' in capsys.readouterr().err
    monkeypatch.setattr(compile_cache, 'aot_supported', lambda: False)
    fn = PrecompiledFunction(Tiny.forward, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fn(m, x), Tiny.forward(m, x))
    assert fn.events[0].startswith('fallback: torch') and files(tmp_path) == []


def test_precompiled_inductor_round_trip(tmp_path, monkeypatch):
    """The real backend: Inductor's generated code is saved and loaded (C++ kernels on CPU)."""
    monkeypatch.setattr(compile_cache, '_warned', set())
    m, x = Tiny().eval(), torch.randn(4, 8)
    with torch.no_grad():
        first = PrecompiledFunction(Tiny.forward, tmp_path, backend='inductor')
        torch.testing.assert_close(first(m, x), Tiny.forward(m, x))
        second = PrecompiledFunction(Tiny.forward, tmp_path, backend='inductor')
        other = Tiny().eval()
        torch.testing.assert_close(second(other, x), Tiny.forward(other, x))
    assert [e.split()[0] for e in second.events] == ['loaded']


def test_gsmnet_blocks_compile_with_gsmsr_inductor_options(monkeypatch, tmp_path):
    """Every torch.compile of GSMNet's blocks gets INDUCTOR_OPTIONS (pointwise autotuning off), and a precompiled
    function keys its files on them (other options, another file)."""
    from gsmsr.archs import GSMNet

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda *a, **kw: calls.append(kw) or real(*a, **{**kw, 'backend': 'eager'}))
    GSMNet(**NET)._compile()
    # a window step per layer, the per-token residual, a block's attention residual and its four pieces
    assert len(calls) == 2 + 1 + 2 * 2 * 5
    assert all(kw.get('options') == compile_cache.INDUCTOR_OPTIONS for kw in calls)
    assert compile_cache.INDUCTOR_OPTIONS == {'triton.autotune_pointwise': False}
    fn = PrecompiledFunction(Tiny.forward, tmp_path, backend='inductor')
    key = fn.key((Tiny(), torch.randn(2, 8)), {}, None)
    assert key['options'] == compile_cache.INDUCTOR_OPTIONS
    monkeypatch.setattr(fn, 'options', {})
    assert fn.path(fn.key((Tiny(), torch.randn(2, 8)), {}, None)) != fn.path(key)


NET = dict(upscale=4, prop_depth=2, attn_depth=2, pa_frame=1, embed_dims=16, num_heads=4)
CHILD = """
import sys, torch
from gsmsr import compile_cache
from gsmsr.archs import GSMNet
compile_cache.AOT_BACKEND = 'aot_eager'
folder, weights, lq, out = sys.argv[1:]
net = GSMNet(**{net}).eval()
net.load_state_dict(torch.load(weights))
net.precompile_dir = folder
net._compile()
with torch.no_grad():
    torch.save(net(torch.load(lq)), out)
for fn in net.precompiled:
    if fn.events:
        print(fn.name, '|'.join(fn.events))
"""


def _precompiled_net(folder) -> tuple:
    """A seeded tiny GSMNet routed through precompiled functions in ``folder``, checked against its eager output on
    a random clip: (net, lq, eager output)."""
    from gsmsr.archs import GSMNet

    torch.manual_seed(0)
    net = GSMNet(**NET).eval()
    lq = torch.rand(1, 5, 3, 36, 36)
    with torch.no_grad():
        ref = net(lq)
        net.precompile_dir = str(folder)
        net._compile()
        torch.testing.assert_close(net(lq), ref, rtol=1e-5, atol=1e-5)
    return net, lq, ref


def test_gsmnet_precompiled_blocks_equal_eager_and_load_in_a_fresh_process(tmp_path, aot):
    """GSMNet routes its window steps and SWSA blocks (2 layers, shifted and unshifted; attention and per-token
    residual) through one precompiled function per kind; a new process loads them all (no compilation) and gives the
    same output."""
    from gsmsr.archs import GSMNet

    net, lq, ref = _precompiled_net(tmp_path / 'aot')
    step, attn, *pieces, ffn = net.precompiled
    # all layers share them; SWSA attention: unshifted, shifted (no SDPA on CPU: no pieces); the per-token residual:
    # one for every block
    assert [fn.name.rsplit('.', 2)[-2:] for fn in (attn, *pieces)] == [
        ['SWSABlock', 'attend'], ['SWSABlock', 'attention_windows'], ['SWSABlock', 'attention_merge'],
        ['WindowAttention', 'attend_part'], ['WindowAttention', 'attend_chunk'],
    ]  # fmt: skip
    assert len(step.entries) == 1 and len(attn.entries) == 2 and len(ffn.entries) == 1
    assert not any(fn.entries for fn in pieces)
    assert sorted(net.state_dict()) == sorted(GSMNet(**NET).state_dict())  # keys unchanged
    torch.save(net.state_dict(), tmp_path / 'w.pth')
    torch.save(lq, tmp_path / 'lq.pt')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')])}
    script = CHILD.format(net=NET)
    args = [str(tmp_path / n) for n in ('aot', 'w.pth', 'lq.pt', 'out.pt')]
    proc = subprocess.run([sys.executable, '-c', script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('gsmsr.archs')]
    assert len(lines) == 3 and all(e.startswith('loaded') for ln in lines for e in ln.split(' ', 1)[1].split('|'))
    torch.testing.assert_close(torch.load(tmp_path / 'out.pt'), ref, rtol=1e-5, atol=1e-5)


def test_gsmnet_precompiled_without_swsa_attention(tmp_path, aot, monkeypatch):
    """swsa.COMPILE_ATTENTION = False: the window step and the per-token residual are precompiled, each SWSA block's
    attention residual stays its eager method; the output is the eager network's."""
    from gsmsr.archs import swsa

    monkeypatch.setattr(swsa, 'COMPILE_ATTENTION', False)
    net, _, _ = _precompiled_net(tmp_path / 'aot')
    assert [fn.name.rsplit('.', 1)[-1] for fn in net.precompiled] == ['forward', 'ffn_residual']
    assert all(blk.attend.__func__ is swsa.SWSABlock.attend for blk in net.swsa_blocks())
