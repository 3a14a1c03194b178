"""Tests for gsmsr.compile_cache: cache folders under the user cache (user settings kept, torch's own default
replaced), the Mega-Cache key, and atomic, change-only saves and failure-tolerant loads (with stub artifact
functions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import gsmsr
from gsmsr.compile_cache import MegaCache, cache_key, cache_root, enable_persistent_caches

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


def test_torch_default_inductor_folder_is_replaced(clean_env, monkeypatch):
    """Importing torch._dynamo writes Inductor's default folder (in the system temporary folder) into the
    environment: that is not the user's choice, so the persistent folder replaces it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', default_cache_dir())
    root = enable_persistent_caches()
    assert os.environ['TORCHINDUCTOR_CACHE_DIR'] == str(root / 'inductor')
    assert os.environ['TRITON_CACHE_DIR'] == str(root / 'triton')
