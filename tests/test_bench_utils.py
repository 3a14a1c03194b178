"""benchmarks/bench_utils.py: the --compile-cache file of the benchmark scripts (load, then save to $OUT or back), the
reading of a CUDA allocation trace at its peak (--memory-peak), peaks by phase (--phase-peaks), module settings
(--set) and the rows --only selects."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from bench_utils import (  # noqa: E402
    BenchCompileCache,
    PhasePeaks,
    apply_settings,
    live_at_peak,
    parse_settings,
    parse_variant,
    selected,
)


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


class FakeMemory:
    """torch.cuda's memory statistics over a counter that the fake network below moves."""

    def __init__(self) -> None:
        self.allocated = self.peak = 0

    def synchronize(self) -> None:
        pass

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)


MEM = FakeMemory()


class Base:
    def __call__(self) -> str:
        MEM.alloc(30)  # a leaf: peaks 30 over its start
        MEM.alloc(-30)
        return 'called'


class Net(Base):
    def forward(self) -> None:
        MEM.alloc(100)  # held through the call
        self.inner()
        MEM.alloc(200)  # the call's peak, outside every other phase
        MEM.alloc(-200)
        self.inner()
        MEM.alloc(-100)

    def inner(self) -> None:
        MEM.alloc(50)
        self.leaf()
        self()
        MEM.alloc(-50)

    @staticmethod
    def leaf() -> None:
        MEM.alloc(10)
        MEM.alloc(-10)


def test_phase_peaks_by_label_carried_to_callers_and_restored():
    net = Net()
    originals = (Net.__dict__['forward'], Net.__dict__['leaf'])
    targets = [(Net, 'forward', 'forward'), (Net, 'leaf', 'leaf'), (Net, '__call__', 'call'), (net, 'inner', 'inner')]
    with PhasePeaks(targets, memory=MEM) as peaks:
        assert isinstance(Net.__dict__['leaf'], staticmethod) and net() == 'called'  # wrapped, same results
        MEM.allocated = MEM.peak = 7  # held before the call
        net.forward()
    rows = {r['phase']: r for r in peaks.rows()}
    assert [r['phase'] for r in peaks.rows()] == ['forward', 'call', 'inner', 'leaf']  # highest peak first
    assert peaks.stats['forward'] == [1, 307, 7, 300]  # its own peak, above every phase it called
    assert peaks.stats['inner'] == [2, 187, 107, 80]  # the peak of the calls it made (its leaf and call) included
    assert peaks.stats['leaf'] == [2, 167, 157, 10]
    assert peaks.stats['call'] == [3, 187, 157, 30]  # also called once outside forward, from 0 (a lower peak)
    assert rows['forward']['peak_GiB'] == f'{307 / 2**30:.2f}' and rows['inner']['calls'] == '2'
    # everything as it was: the class's own methods (a staticmethod stays one), the inherited __call__, the instance
    assert (Net.__dict__['forward'], Net.__dict__['leaf']) == originals
    assert '__call__' not in Net.__dict__ and 'inner' not in vars(net) and net.inner.__func__ is Net.inner


def test_bench_gsm_phase_targets_are_reached_by_a_streaming_forward():
    """bench_gsm's --phase-peaks watches methods that exist and that a streaming forward calls (a small network on the
    CPU, a clip longer than one SWSA slab), with the same output as without the watch."""
    import bench_gsm

    from gsmsr import GSMNet

    torch.manual_seed(0)
    net = GSMNet(upscale=2, prop_depth=2, attn_depth=2, pa_frame=1, embed_dims=16, num_heads=4).eval()
    net.stream_whole, net.stream_slab = 4, 2  # slabs at this length: the slab copies run too
    lq = torch.rand(1, 7, 3, 36, 40)
    with torch.no_grad():
        want = net(lq)
        MEM.allocated = MEM.peak = 0
        with PhasePeaks(bench_gsm.phase_targets(), memory=MEM) as peaks:
            got = net(lq)
    assert torch.equal(got, want)
    missed = {label for _, _, label in bench_gsm.phase_targets()} - set(peaks.stats)
    # the large-volume attention paths run only where SDPA (CUDA, bf16) or the explicit steps would cut the volume
    assert missed == {'SWSA attention in parts', 'SWSA attention in steps', 'SWSA merge'}, missed
    assert peaks.stats['forward'][0] == 1 and peaks.stats['window step'][0] == 2 * 7


def test_only_selects_rows_by_substring_or_name_end():
    names = ['bf16 compiled', 'bf16 compiled [pwout=1]', 'seq-triton pointwise outside dt tokens']
    assert [n for n in names if selected('', n)] == names
    assert [n for n in names if selected('bf16 compiled$', n)] == ['bf16 compiled']
    assert [n for n in names if selected('[,dt tokens', n)] == names[1:]
    assert selected(',', 'bf16 compiled')  # empty keys are dropped: no key, every row


def test_parse_variant_reads_key_int_pairs():
    assert parse_variant('warps_per_sm=48, stages=2') == {'warps_per_sm': 48, 'stages': 2}
    assert parse_variant('') == {}


def test_bench_gsm_clips_are_read_as_basicsr_reads_them(tmp_path):
    """bench_gsm --clips: each folder of PNG frames is one input (1, T, 3, H, W), RGB in [0, 1] as BasicSR's
    ``imfrombytes`` + ``img2tensor(bgr2rgb=True)`` load them, labelled by folder and size; random sizes otherwise."""
    import argparse

    import bench_gsm
    import cv2
    import numpy as np
    from basicsr.utils import img2tensor

    rng = np.random.default_rng(0)
    clips = {
        'b_clip': rng.integers(0, 256, (3, 6, 10, 3), dtype=np.uint8),
        'a_clip': rng.integers(0, 256, (2, 4, 8, 3)),
    }
    for name, frames in clips.items():
        (tmp_path / name).mkdir()
        for i, f in enumerate(frames.astype(np.uint8)):
            cv2.imwrite(str(tmp_path / name / f'{i:08d}.png'), f)
    (tmp_path / 'meta_info.txt').write_text('not a clip')
    args = argparse.Namespace(clips=str(tmp_path), sizes='')
    got = list(bench_gsm.bench_inputs(args, torch.device('cpu')))
    assert [label for label, _ in got] == ['a_clip 2x4x8', 'b_clip 3x6x10']
    for (_, lq), name in zip(got, ['a_clip', 'b_clip']):
        want = torch.stack(img2tensor([f.astype(np.float32) / 255 for f in clips[name]], bgr2rgb=True, float32=True))
        assert lq.shape == (1, *want.shape)
        torch.testing.assert_close(lq[0], want, rtol=0, atol=1e-7)
    random = list(bench_gsm.bench_inputs(argparse.Namespace(clips=None, sizes='2x4x6,3x5x7'), torch.device('cpu')))
    assert [(label, tuple(lq.shape)) for label, lq in random] == [
        ('2x4x6', (1, 2, 3, 4, 6)),
        ('3x5x7', (1, 3, 3, 5, 7)),
    ]
    with pytest.raises(SystemExit, match='no clip folders'):
        list(bench_gsm.bench_inputs(argparse.Namespace(clips=str(tmp_path / 'a_clip'), sizes=''), torch.device('cpu')))
