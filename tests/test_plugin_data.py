"""Meta-info files and ``gsmsr make-lmdb``: BasicSR layout, atomic output, clear errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch
from basicsr.data.reds_dataset import REDSRecurrentDataset

from conftest import GT_SIZE, write_clip
from gsmsr.data import make_lmdb

META_DIR = Path(make_lmdb.META_INFO_DIR)


def test_shipped_reds_meta_info_is_the_generator_output():
    train = (META_DIR / make_lmdb.REDS_TRAIN_META).read_text().splitlines()
    reds4 = (META_DIR / make_lmdb.REDS4_TEST_META).read_text().splitlines()
    assert train == make_lmdb.reds_meta_lines('train')
    assert reds4 == make_lmdb.reds_meta_lines('reds4')
    assert len(train) == 266 and train[0] == '001 100 (720,1280,3)' and train[-1] == '269 100 (720,1280,3)'
    assert reds4 == [f'{c} 100 (720,1280,3)' for c in ('000', '011', '015', '020')]
    assert not {line.split()[0] for line in train} & {'000', '011', '015', '020'}


def test_vimeo_meta_from_official_list(tmp_path):
    listing = tmp_path / 'sep_trainlist.txt'
    listing.write_text('00001/0001\n00001/0002\n\n00096/0999\n')
    out = tmp_path / 'meta.txt'
    assert make_lmdb.main(['vimeo-meta', '--list', str(listing), '--out', str(out)]) == 0
    assert out.read_text().splitlines() == [
        '00001/0001 7 (256,448,3)',
        '00001/0002 7 (256,448,3)',
        '00096/0999 7 (256,448,3)',
    ]
    with pytest.raises(FileExistsError):
        make_lmdb.main(['vimeo-meta', '--list', str(listing), '--out', str(out)])
    listing.write_text('00001/0001\n00001_0002\n')
    with pytest.raises(ValueError, match=r'sep_trainlist.txt:2'):
        make_lmdb.vimeo_meta_lines(str(listing))


def _lmdb_image(path: Path, key: str) -> np.ndarray:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        buf = txn.get(key.encode('ascii'))
    env.close()
    assert buf is not None, f'{key} missing in {path}'
    return cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_UNCHANGED)


def test_lmdbs_in_basicsr_layout(tiny_data):
    reds, vimeo = tiny_data['reds'], tiny_data['vimeo']
    for lmdb_name, folder in (
        ('train_sharp_with_val.lmdb', 'train_sharp'),
        ('train_sharp_bicubic_with_val.lmdb', 'train_sharp_bicubic/X4'),
    ):
        meta = (reds / lmdb_name / 'meta_info.txt').read_text().splitlines()
        assert len(meta) == 203 and meta[3].startswith('001/00000000.png (')
        np.testing.assert_array_equal(
            _lmdb_image(reds / lmdb_name, '002/00000099'), cv2.imread(str(reds / folder / '002' / '00000099.png'))
        )
    np.testing.assert_array_equal(
        _lmdb_image(vimeo / 'vimeo90k_train_GT_all.lmdb', '00001/0002/im7'),
        cv2.imread(str(vimeo / 'vimeo_septuplet/sequences/00001/0002/im7.png')),
    )
    np.testing.assert_array_equal(
        _lmdb_image(vimeo / 'vimeo90k_train_LR7frames.lmdb', '00001/0001/im1'),
        cv2.imread(str(vimeo / 'vimeo_septuplet_matlabLRx4/sequences/00001/0001/im1.png')),
    )
    assert (
        vimeo / 'meta_info_Vimeo90K_train_GT.txt'
    ).read_text() == '00001/0001 7 (256,448,3)\n00001/0002 7 (256,448,3)\n'
    assert (vimeo / 'meta_info_Vimeo90K_test_GT.txt').read_text() == '00002/0001 7 (256,448,3)\n'
    assert not list(tiny_data['root'].rglob('*.partial*'))

    # BasicSR's own dataset reads the LMDB and the disk layout identically
    samples = []
    for backend, gt, lq in (
        ('lmdb', 'train_sharp_with_val.lmdb', 'train_sharp_bicubic_with_val.lmdb'),
        ('disk', 'train_sharp', 'train_sharp_bicubic/X4'),
    ):
        ds = REDSRecurrentDataset(
            dict(
                dataroot_gt=str(reds / gt),
                dataroot_lq=str(reds / lq),
                meta_info_file=str(reds / 'meta_train.txt'),
                val_partition='REDS4',
                test_mode=False,
                io_backend=dict(type=backend),
                num_frame=3,
                gt_size=GT_SIZE,
                scale=4,
                use_hflip=False,
                use_rot=False,
            )
        )
        samples.append(ds[5])
    assert samples[0]['key'] == samples[1]['key'] == '001/00000005'
    assert torch.equal(samples[0]['lq'], samples[1]['lq']) and torch.equal(samples[0]['gt'], samples[1]['gt'])
    assert samples[0]['lq'].shape == (3, 3, GT_SIZE // 4, GT_SIZE // 4)


def test_reds_val_sharp_becomes_clips_240_and_up(tmp_path):
    rng = np.random.default_rng(0)
    write_clip(tmp_path / 'train_sharp' / '000', tmp_path / 'train_sharp_bicubic' / 'X4' / '000', ['00000000'], rng)
    write_clip(tmp_path / 'val_sharp' / '001', tmp_path / 'val_sharp_bicubic' / 'X4' / '001', ['00000000'], rng)
    gt_items, lq_items = make_lmdb.reds_items(str(tmp_path))
    assert [k for _, k in gt_items] == ['000/00000000', '241/00000000']
    assert [p for p, _ in lq_items][1].endswith('val_sharp_bicubic/X4/001/00000000.png')


def test_failed_lmdb_build_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    write_clip(
        tmp_path / 'train_sharp' / '000', tmp_path / 'train_sharp_bicubic' / 'X4' / '000', ['00000000', '00000001'], rng
    )
    bad = tmp_path / 'train_sharp' / '000' / '00000001.png'
    bad.write_bytes(b'not a png')
    with pytest.raises(ValueError, match='00000001.png'):
        make_lmdb.main(['reds', '--root', str(tmp_path), '--workers', '1'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['train_sharp', 'train_sharp_bicubic']

    (tmp_path / 'train_sharp_bicubic' / 'X4' / '000' / '00000001.png').unlink()
    with pytest.raises(ValueError, match='frame names differ'):
        make_lmdb.reds_items(str(tmp_path))
