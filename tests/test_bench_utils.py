"""benchmarks/bench_utils.py: the --compile-cache file of the benchmark scripts (load, then save to $OUT or back), the
reading of a CUDA allocation trace at its peak (--memory-peak), and module settings (--set)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from bench_utils import BenchCompileCache, apply_settings, live_at_peak, parse_settings  # noqa: E402


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


def test_live_at_peak_groups_what_the_peak_holds_by_line():
    """A hand-made trace: blocks freed before the peak, after it, and one freed twice (requested, then completed);
    a free of a block allocated before the trace began is ignored. Frames are innermost first; torch's own frames
    are skipped for the first frame of user or generated code."""
    torch_frame = {'filename': f'/x/site-packages/torch/nn/{"functional"}.py', 'line': 1, 'name': 'linear'}

    def at(file: str, line: int) -> list:
        return [torch_frame, {'filename': f'/code/{file}', 'line': line, 'name': 'f'}]

    mib = 2**20
    events = [
        {'action': 'free_completed', 'addr': 99, 'size': 500 * mib},  # allocated before the trace
        {'action': 'alloc', 'addr': 1, 'size': 100 * mib, 'frames': at('a.py', 10)},
        {'action': 'alloc', 'addr': 2, 'size': 300 * mib, 'frames': at('b.py', 20)},
        {'action': 'free_requested', 'addr': 2, 'size': 300 * mib},
        {'action': 'free_completed', 'addr': 2, 'size': 300 * mib},
        {'action': 'alloc', 'addr': 3, 'size': 200 * mib, 'frames': at('a.py', 10)},
        {'action': 'alloc', 'addr': 4, 'size': 250 * mib, 'frames': [torch_frame]},
        {'action': 'free_requested', 'addr': 4, 'size': 250 * mib},  # the peak was 550 MiB, just before this
        {'action': 'alloc', 'addr': 5, 'size': 10 * mib, 'frames': at('c.py', 3)},
    ]
    peak, table = live_at_peak(events)
    assert peak == 550 * mib
    assert table == [
        {'GiB': f'{300 / 1024:.3f}', 'count': '2', 'made at': 'a.py:10 f'},
        {'GiB': f'{250 / 1024:.3f}', 'count': '1', 'made at': 'torch internals'},
    ]


def test_settings_reach_modules_and_attributes_below_them(monkeypatch):
    import torch._inductor.config as inductor_config

    from gsmsr.archs import swsa

    monkeypatch.setattr(swsa, 'COMPILE_ATTENTION', swsa.COMPILE_ATTENTION)
    monkeypatch.setattr(inductor_config.triton, 'autotune_pointwise', inductor_config.triton.autotune_pointwise)
    settings = parse_settings(
        ['gsmsr.archs.swsa.COMPILE_ATTENTION=False', 'torch._inductor.config.triton.autotune_pointwise=0']
    )
    assert settings == {
        'gsmsr.archs.swsa.COMPILE_ATTENTION': False,
        'torch._inductor.config.triton.autotune_pointwise': 0,
    }
    apply_settings(settings)
    assert swsa.COMPILE_ATTENTION is False and inductor_config.triton.autotune_pointwise == 0
    with pytest.raises(AttributeError, match='NO_SUCH'):
        apply_settings({'gsmsr.archs.swsa.NO_SUCH': 1})
    assert not hasattr(swsa, 'NO_SUCH')
    for bad, why in (('oops', 'expected MODULE.NAME=VALUE'), ('a.b=not python', 'must be a Python literal')):
        with pytest.raises(SystemExit, match=why):
            parse_settings([bad])
