"""benchmarks/bench_utils.py: the --compile-cache file of the benchmark scripts (load, then save to $OUT or back)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from bench_utils import BenchCompileCache  # noqa: E402


def fake_artifacts(monkeypatch, produced: bytes) -> list:
    loaded: list = []
    monkeypatch.setattr(torch.compiler, 'load_cache_artifacts', loaded.append)
    monkeypatch.setattr(torch.compiler, 'save_cache_artifacts', lambda: (produced, None))
    return loaded


def test_loads_the_file_and_saves_to_out(tmp_path, monkeypatch, capsys):
    loaded = fake_artifacts(monkeypatch, b'compiled here')
    src = tmp_path / 'carried' / 'gsm.megacache'
    src.parent.mkdir()
    src.write_bytes(b'compiled before')
    monkeypatch.setenv('OUT', str(tmp_path / 'out'))
    cache = BenchCompileCache(str(src))
    assert loaded == [b'compiled before'] and 'loaded' in capsys.readouterr().out
    cache.save()
    assert (tmp_path / 'out' / 'gsm.megacache').read_bytes() == b'compiled here'
    assert src.read_bytes() == b'compiled before'  # the carried input is left alone


def test_without_out_the_file_is_updated_and_no_option_does_nothing(tmp_path, monkeypatch, capsys):
    loaded = fake_artifacts(monkeypatch, b'new')
    monkeypatch.delenv('OUT', raising=False)
    path = tmp_path / 'c.megacache'
    cache = BenchCompileCache(str(path))  # no file yet: nothing loaded
    assert loaded == [] and 'none loaded' in capsys.readouterr().out
    cache.save()
    assert path.read_bytes() == b'new'
    BenchCompileCache(None).save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['c.megacache'] and loaded == []
