"""Two CPU processes (gloo) as in multi-GPU training: under torchrun with ``--launcher pytorch``, and GSMModel's
weights across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from conftest import REPO_ROOT, make_opt, read_log, train_options, write_options


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


def _two_rank_step(rank: int, tmp: str) -> None:
    from basicsr.models import build_model

    dist.init_process_group('gloo', init_method=f'file://{tmp}/store', rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # BasicSR seeds each rank differently: the networks differ until the broadcast
        opt = make_opt(Path(tmp) / f'rank{rank}', train=dict(fix_flow=None))
        opt.update(dist=True, rank=rank, world_size=2)
        model = build_model(opt)
        start = {k: v.detach().clone() for k, v in model.net_g.named_parameters()}
        g = torch.Generator().manual_seed(rank)  # each rank its own batch
        lq = torch.rand(1, 2, 3, 36, 36, generator=g)
        model.feed_data({'lq': lq, 'gt': torch.rand(1, 2, 3, 144, 144, generator=g)})
        model.optimize_parameters(1)
        step = {k: v.detach().clone() for k, v in model.net_g.named_parameters()}
        torch.save({'start': start, 'step': step}, f'{tmp}/rank{rank}.pt')  # files: a Manager of tensors can hang
    finally:
        dist.destroy_process_group()


def test_two_ranks_start_and_step_alike(tmp_path):
    """Under --launcher pytorch, GSMModel's ranks start from rank 0's weights and stay equal after a step on different
    batches: the broadcast and the gradient averaging both have to work."""
    mp.spawn(_two_rank_step, args=(str(tmp_path),), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2))
    start, step = rank0['start'], rank0['step']
    assert all(torch.equal(rank1['start'][k], v) for k, v in start.items())
    assert all(torch.equal(rank1['step'][k], v) for k, v in step.items())
    assert any(not torch.equal(step[k], v) for k, v in start.items())  # the step moved the weights
