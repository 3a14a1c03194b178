"""End-to-end: ``basicsr train`` / ``--auto_resume`` / ``gsmsr/test.py`` on tiny REDS and Vimeo-90K clips.

Each run uses a tiny GSMNet on 2-frame (REDS) or 7-frame (Vimeo) 36x36 LR clips for 1-3 iterations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch
from basicsr.metrics import calculate_psnr, calculate_ssim

from conftest import REPO_ROOT, read_log, train_options, write_options
from gsmsr.cli import basicsr_main


def _checkpoint_keys(path: Path):
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return set(ckpt.keys()), ckpt


def _assert_trained(exp: Path, last_iter: int) -> None:
    keys, ckpt = _checkpoint_keys(exp / 'models' / f'net_g_{last_iter}.pth')
    assert keys == {'params', 'params_ema'}
    assert set(ckpt['params']) == set(ckpt['params_ema'])
    assert any(not torch.equal(ckpt['params'][k], ckpt['params_ema'][k]) for k in ckpt['params'])
    assert (exp / 'models' / 'net_g_latest.pth').is_file()
    assert (exp / 'training_states' / f'{last_iter}.state').is_file()
    assert not list(exp.rglob('*.partial')), 'temporary files left behind'


def _validation_values(log: str, dataset: str):
    """The (psnr, ssim) averages of the last 'Validation <dataset>' block of a log."""
    block = log.rsplit(f'Validation {dataset}', 1)[1]
    values = {}
    for line in block.splitlines()[1:]:
        line = line.strip()
        if line.startswith('# '):
            name, value = line[2:].split('\t')[0].split(': ')
            values[name] = float(value)
        elif values:
            break
    return values


def test_reds_disk_train_resume_and_test(tiny_data, in_tmp_cwd):
    opt = train_options(tiny_data, 'reds_disk', 'reds', 'disk', val=dict(val_freq=100))
    write_options(in_tmp_cwd / 'train.yml', opt)
    assert basicsr_main(['train', '-opt', 'train.yml']) == 0
    exp = in_tmp_cwd / 'experiments' / 'reds_disk'
    _assert_trained(exp, 2)
    log = read_log(exp, 'train_reds_disk')
    values = _validation_values(log, 'REDS4')
    assert set(values) == {'psnr', 'ssim'} and 10 < values['psnr'] < 60 and 0 < values['ssim'] <= 1
    assert '000: psnr' in log

    # resume: same experiment, total_iter raised to 3, continues from the iteration-2 state
    opt['train']['total_iter'] = 3
    opt['logger']['save_checkpoint_freq'] = 1
    write_options(in_tmp_cwd / 'train.yml', opt)
    assert basicsr_main(['train', '-opt', 'train.yml', '--auto_resume']) == 0
    _assert_trained(exp, 3)
    state = torch.load(exp / 'training_states' / '3.state', map_location='cpu', weights_only=True)
    assert state['iter'] == 3
    first_log, resumed_log = [p.read_text() for p in sorted(exp.glob('train_reds_disk_*.log'), key=os.path.getmtime)]
    assert 'Resuming' not in first_log  # each run in this process wrote its own log file
    assert 'Resuming training from epoch: 0, iter: 2.' in resumed_log
    assert 'iter:       3' in resumed_log

    # evaluate the trained model with gsmsr/test.py run as a script from the checkout
    test_opt = dict(
        name='reds_eval',
        model_type='GSMModel',
        scale=4,
        num_gpu=0,
        manual_seed=0,
        datasets=dict(test=opt['datasets']['val']),
        network_g=opt['network_g'],
        path=dict(
            pretrain_network_g=str(exp / 'models' / 'net_g_latest.pth'), param_key_g='params_ema', strict_load_g=True
        ),
        val=dict(
            save_img=True,
            suffix=None,
            chunk=100,
            chunk_overlap=2,
            tile=144,
            tile_overlap=50,
            metrics=opt['val']['metrics'],
        ),
    )
    write_options(in_tmp_cwd / 'test.yml', test_opt)
    env = dict(os.environ, PYTHONPATH='')
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / 'gsmsr' / 'test.py'), '-opt', 'test.yml'],
        cwd=in_tmp_cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = in_tmp_cwd / 'results' / 'reds_eval'
    log = read_log(results, 'test_reds_eval')
    assert 'Loading GSMNet from' in log and '[params_ema]' in log
    metrics = json.loads((results / 'metrics_REDS4.json').read_text())
    assert metrics['num_clips'] == 1 and metrics['num_frames'] == 3
    assert _validation_values(log, 'REDS4') == pytest.approx(metrics['average'], abs=1e-4)
    # the saved frames, scored against the GT with BasicSR's functions, give the reported numbers
    gt_dir = tiny_data['reds'] / 'train_sharp' / '000'
    frames = sorted((results / 'visualization' / 'REDS4' / '000').glob('*.png'))
    assert [f.name for f in frames] == ['00000000.png', '00000001.png', '00000002.png']
    psnr = [calculate_psnr(cv2.imread(str(f)), cv2.imread(str(gt_dir / f.name)), 0) for f in frames]
    ssim = [calculate_ssim(cv2.imread(str(f)), cv2.imread(str(gt_dir / f.name)), 0) for f in frames]
    assert metrics['clips']['000']['psnr'] == pytest.approx(sum(psnr) / 3, abs=1e-9)
    assert metrics['clips']['000']['ssim'] == pytest.approx(sum(ssim) / 3, abs=1e-9)


def test_reds_lmdb_train(tiny_data, in_tmp_cwd):
    opt = train_options(tiny_data, 'reds_lmdb', 'reds', 'lmdb', val=dict(val_freq=2))
    write_options(in_tmp_cwd / 'train.yml', opt)
    assert basicsr_main(['train', '-opt', 'train.yml']) == 0
    exp = in_tmp_cwd / 'experiments' / 'reds_lmdb'
    _assert_trained(exp, 2)
    log = read_log(exp, 'train_reds_lmdb')
    assert log.count('Validation REDS4') == 2  # at iteration 2 (val_freq) and after training
    assert 'Validation REDS4 (1 clips, 3 scored frames) @ 2' in log


@pytest.mark.parametrize('backend', ['disk', 'lmdb'])
def test_vimeo_train(tiny_data, in_tmp_cwd, backend):
    """Disk: one iteration and the Vimeo-90K-T validation. LMDB: one iteration, then resume to a second one
    (validation reads the disk layout in both cases, so it runs once)."""
    name = f'vimeo_{backend}'
    opt = train_options(
        tiny_data,
        name,
        'vimeo',
        backend,
        train=dict(total_iter=1),
        val=dict(val_freq=100),
        logger=dict(save_checkpoint_freq=1),
    )
    if backend == 'lmdb':
        del opt['datasets']['val'], opt['val']
    write_options(in_tmp_cwd / 'train.yml', opt)
    assert basicsr_main(['train', '-opt', 'train.yml']) == 0
    exp = in_tmp_cwd / 'experiments' / name
    _assert_trained(exp, 1)
    log = read_log(exp, f'train_{name}')
    assert 'Dataset [Vimeo90KRecurrentDataset] - Vimeo90K is built.' in log
    if backend == 'disk':
        assert 'Validation Vimeo90K-T (1 clips, 1 scored frames, centre frame only)' in log
        assert '00002/0001: psnr' in log
    else:
        opt['train']['total_iter'] = 2
        write_options(in_tmp_cwd / 'train.yml', opt)
        assert basicsr_main(['train', '-opt', 'train.yml', '--auto_resume']) == 0
        _assert_trained(exp, 2)
