"""Two CPU processes under torchrun with ``--launcher pytorch`` (gloo), as in multi-GPU training."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import REPO_ROOT, read_log, train_options, write_options


def test_torchrun_two_processes_gloo(tiny_data, in_tmp_cwd):
    opt = train_options(tiny_data, 'ddp', 'reds', 'disk', val=dict(val_freq=100))
    write_options(in_tmp_cwd / 'train.yml', opt)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH='')
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        str(REPO_ROOT / 'gsmsr' / 'train.py'),
        '-opt',
        'train.yml',
        '--launcher',
        'pytorch',
    ]
    proc = subprocess.run(cmd, cwd=in_tmp_cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    exp = in_tmp_cwd / 'experiments' / 'ddp'
    log = read_log(exp, 'train_ddp')
    assert 'World size (gpu number): 2' in log
    assert 'iter:       2' in log and 'Validation REDS4 (1 clips, 3 scored frames)' in log
    ckpt = torch.load(exp / 'models' / 'net_g_2.pth', map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    assert not any(k.startswith('module.') for k in ckpt['params'])
    assert torch.load(exp / 'training_states' / '2.state', map_location='cpu', weights_only=True)['iter'] == 2
