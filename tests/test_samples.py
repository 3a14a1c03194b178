"""Sample-clip preparation: layout, sizes, LR = BasicSR imresize of GT, caching, interrupted builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import gsmsr  # noqa: F401  (compat before BasicSR)

# isort: split
from basicsr.utils.matlab_functions import imresize

from gsmsr.data import samples
from gsmsr.data.samples import DEFAULT_CLIPS, ClipSpec, prepare_samples, read_frames

# Real frames of the bundled videos, kept tiny: 7 training frames (one septuplet) and 3 test frames.
TINY_CLIPS = (
    ClipSpec('bikes', 'bikes.mp4', 'train', 137, 7, 2, (136, 144)),
    ClipSpec('carphone', 'carphone_pristine.mp4', 'test', 5, 3, 1, (144, 140)),
)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return prepare_samples(tmp_path_factory.mktemp('cache'), TINY_CLIPS, progress=False)


def test_reds_layout_sizes_and_meta(tiny):
    assert tiny.root.is_absolute()
    for spec in TINY_CLIPS:
        gt, lq = read_frames(tiny.gt_root / spec.name), read_frames(tiny.lq_root / spec.name)
        names = sorted(p.name for p in (tiny.gt_root / spec.name).iterdir())
        assert names == [f'{i:08d}.png' for i in range(spec.num_frames)]
        assert names == sorted(p.name for p in (tiny.lq_root / spec.name).iterdir())
        assert gt.shape == (spec.num_frames, *spec.crop, 3)
        assert lq.shape == (spec.num_frames, spec.crop[0] // 4, spec.crop[1] // 4, 3)
    assert tiny.meta('train').read_text() == 'bikes 7 (136,144,3)\n'
    assert tiny.meta('test').read_text() == 'carphone 3 (144,140,3)\n'
    assert tiny.names('train') == ['bikes'] and tiny.names('test') == ['carphone']
    assert tiny.clip('carphone')['fps'] == pytest.approx(30000 / 1001)


def test_vimeo_layout_links_the_same_frames(tiny):
    assert tiny.vimeo_meta.read_text() == 'bikes/0001 7 (136,144,3)\n'
    for k in range(7):
        for reds, vimeo in ((tiny.gt_root, tiny.vimeo_gt_root), (tiny.lq_root, tiny.vimeo_lq_root)):
            a = (reds / 'bikes' / f'{k:08d}.png').read_bytes()
            assert (vimeo / 'bikes' / '0001' / f'im{k + 1}.png').read_bytes() == a
    assert not (tiny.vimeo_gt_root / 'carphone').exists()  # the test clip never enters training data


def test_lr_is_basicsr_imresize_of_gt(tiny):
    for spec in TINY_CLIPS:
        gt, lq = read_frames(tiny.gt_root / spec.name), read_frames(tiny.lq_root / spec.name)
        for g, lr in zip(gt, lq):
            ref = np.clip(np.round(imresize(g.astype(np.float32) / 255.0, 0.25) * 255.0), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(lr, ref)


def test_gt_is_the_centre_crop_of_the_shrunk_source_frame(tiny):
    # Independent decoder (OpenCV's FFmpeg build) for the same frame; colour conversion may differ by rounding.
    spec = TINY_CLIPS[0]
    cap = cv2.VideoCapture(str(samples.source_dir() / spec.source))
    for _ in range(spec.start):
        assert cap.grab()
    ok, frame = cap.read()
    cap.release()
    assert ok
    h, w = frame.shape[0] // spec.downscale, frame.shape[1] // spec.downscale
    small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
    top, left = (h - spec.crop[0]) // 2, (w - spec.crop[1]) // 2
    ref = small[top : top + spec.crop[0], left : left + spec.crop[1]]
    gt0 = read_frames(tiny.gt_root / spec.name)[0].astype(np.float64)
    assert np.abs(gt0 - ref).mean() < 2.0
    # The next frame differs more than that, so the test would see an off-by-one frame.
    gt1 = read_frames(tiny.gt_root / spec.name)[1].astype(np.float64)
    assert np.abs(gt1 - ref).mean() > np.abs(gt0 - ref).mean()


def test_second_call_uses_the_cache(tiny, monkeypatch):
    marker = tiny.root / samples.MARKER
    before = marker.stat().st_mtime_ns

    def no_decode(*args, **kwargs):
        raise AssertionError('the cached dataset was rebuilt')

    monkeypatch.setattr(samples, '_decode', no_decode)
    again = prepare_samples(tiny.root.parent.parent, TINY_CLIPS, progress=False)
    assert again.root == tiny.root
    assert marker.stat().st_mtime_ns == before


def test_other_recipe_gets_its_own_folder(tiny, tmp_path):
    other = (dataclasses.replace(TINY_CLIPS[0], start=140), TINY_CLIPS[1])
    built = prepare_samples(tiny.root.parent.parent, other, progress=False)
    assert built.root != tiny.root and (tiny.root / samples.MARKER).is_file()


def test_interrupted_build_is_never_used(tmp_path, monkeypatch):
    real_write, calls = samples._write_png, []

    def failing_write(path, img):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-way
        real_write(path, img)

    monkeypatch.setattr(samples, '_write_png', failing_write)
    with pytest.raises(KeyboardInterrupt):
        prepare_samples(tmp_path, TINY_CLIPS, progress=False)
    assert list((tmp_path / 'samples').iterdir()) == []  # no final folder, no partial folder left behind

    monkeypatch.setattr(samples, '_write_png', real_write)
    data = prepare_samples(tmp_path, TINY_CLIPS, progress=False)
    assert len(list((data.gt_root / 'bikes').iterdir())) == 7


def test_folder_without_valid_marker_is_rebuilt(tmp_path):
    data = prepare_samples(tmp_path, TINY_CLIPS, progress=False)
    # A folder left by a killed process (no marker) or a marker that names another recipe: rebuilt, not used.
    for tamper in ('delete', 'other-version'):
        marker = data.root / samples.MARKER
        if tamper == 'delete':
            marker.unlink()
        else:
            info = json.loads(marker.read_text())
            info['recipe']['version'] = -1
            marker.write_text(json.dumps(info))
        stale = data.root / 'GT' / 'bikes' / '00000000.png'
        stale.write_bytes(b'truncated')
        data = prepare_samples(tmp_path, TINY_CLIPS, progress=False)
        assert read_frames(data.gt_root / 'bikes').shape == (7, 136, 144, 3)
        assert json.loads((data.root / samples.MARKER).read_text())['recipe']['version'] == samples.SAMPLES_VERSION


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv('GSMSR_CACHE', str(tmp_path / 'c'))
    assert samples.default_cache_dir() == tmp_path / 'c'
    monkeypatch.delenv('GSMSR_CACHE')
    assert samples.default_cache_dir() == Path.home() / '.cache' / 'gsmsr'


@pytest.mark.parametrize(
    'change, message',
    [
        (dict(crop=(138, 144)), 'multiples of 4'),
        (dict(crop=(272, 144)), 'larger than'),
        (dict(num_frames=6), 'at least 7'),
        (dict(start=248), 'fewer than'),
    ],
)
def test_bad_recipe_names_the_clip(tmp_path, change, message):
    clips = (dataclasses.replace(TINY_CLIPS[0], **change), TINY_CLIPS[1])
    with pytest.raises(ValueError, match=message) as err:
        prepare_samples(tmp_path, clips, progress=False)
    assert 'bikes' in str(err.value)
    assert not any((tmp_path / 'samples').glob('*'))  # nothing left behind


def test_default_recipe():
    samples._check_clips(DEFAULT_CLIPS)
    train = [c for c in DEFAULT_CLIPS if c.split == 'train']
    test = [c for c in DEFAULT_CLIPS if c.split == 'test']
    assert {c.source for c in train}.isdisjoint(c.source for c in test)  # split by source video
    assert all(c.num_frames == 100 for c in train)  # REDSRecurrentDataset samples frames 0-99
    assert all(min(c.crop) // 4 >= 33 for c in DEFAULT_CLIPS)  # GSMNet's smallest input
    for c in DEFAULT_CLIPS:
        assert (samples.source_dir() / c.source).is_file()


def test_basicsr_datasets_read_both_layouts(tiny):
    from basicsr.data.reds_dataset import REDSRecurrentDataset  # noqa: F401  (registers the classes)
    from basicsr.data.vimeo90k_dataset import Vimeo90KRecurrentDataset

    common = dict(
        io_backend={'type': 'disk'},
        gt_size=136,
        scale=4,
        use_hflip=True,
        use_rot=True,
        random_reverse=False,
        phase='train',
    )
    vimeo = Vimeo90KRecurrentDataset(
        dict(
            common,
            dataroot_gt=str(tiny.vimeo_gt_root),
            dataroot_lq=str(tiny.vimeo_lq_root),
            meta_info_file=str(tiny.vimeo_meta),
            num_frame=7,
            flip_sequence=False,
        )
    )
    item = vimeo[0]
    assert item['key'] == 'bikes/0001'
    assert tuple(item['lq'].shape) == (7, 3, 34, 34) and tuple(item['gt'].shape) == (7, 3, 136, 136)
