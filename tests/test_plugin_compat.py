"""Plugin registration and the BasicSR compatibility fixes (CPU-safe resume, torchrun init, argv glue)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import gsmsr
from gsmsr import compat
from gsmsr import train as gsm_train


def test_registration_is_unique_and_import_is_idempotent():
    from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY

    assert ARCH_REGISTRY.get('GSMNet').__module__.startswith('gsmsr.')
    assert MODEL_REGISTRY.get('GSMModel').__module__.startswith('gsmsr.')
    # importing again (package, submodules, entry points) and re-applying the fixes changes nothing
    for name in ('gsmsr', 'gsmsr.models', 'gsmsr.archs', 'gsmsr.train', 'gsmsr.test', 'gsmsr.data.make_lmdb'):
        importlib.import_module(name)
    compat.apply()
    assert MODEL_REGISTRY.get('GSMModel') is gsmsr.models.GSMModel
    # BasicSR itself registers no GSM* names, so no other plugin that reuses BasicSR's names can clash
    import basicsr.archs  # noqa: F401
    import basicsr.models  # noqa: F401

    ours = [n for n in list(ARCH_REGISTRY.keys()) + list(MODEL_REGISTRY.keys()) if n.startswith('GSM')]
    assert sorted(ours) == ['GSMModel', 'GSMNet']


def test_basicsr_functions_are_replaced():
    import basicsr.train
    from basicsr.utils import dist_util

    assert dist_util._init_dist_pytorch is compat.init_dist_pytorch
    assert basicsr.train.load_resume_state is compat.load_resume_state


@pytest.mark.parametrize('padding_mode', ['zeros', 'border'])
def test_flow_warp_on_device_matches_basicsr(padding_mode):
    from basicsr.archs import arch_util, spynet_arch

    from gsmsr.archs import flow

    assert arch_util.flow_warp is spynet_arch.flow_warp is flow.flow_warp is compat.flow_warp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 300, generator=g)
    f = 3 * torch.randn(2, 37, 300, 2, generator=g)
    want = compat.basicsr_flow_warp(x, f, padding_mode=padding_mode)
    assert torch.equal(compat.flow_warp(x, f, padding_mode=padding_mode), want)
    with pytest.raises(ValueError, match=r'\(2, 3, 37, 300\).*\(2, 36, 300, 2\)'):
        compat.flow_warp(x, f[:, 1:])


def test_launcher_pytorch_without_torchrun_is_a_clear_error(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match='torchrun'):
        compat.init_dist_pytorch('nccl')


def test_auto_resume_picks_the_newest_state_on_cpu(tmp_path):
    states = tmp_path / 'experiments' / 'x' / 'training_states'
    states.mkdir(parents=True)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param], lr=0.1)
    param.sum().backward()
    optimizer.step()
    for it in (2, 10, 9):
        torch.save(
            {'epoch': 0, 'iter': it, 'optimizers': [optimizer.state_dict()], 'schedulers': []}, states / f'{it}.state'
        )
    (states / 'notes.txt').write_text('ignored')
    models = tmp_path / 'experiments' / 'x' / 'models'
    models.mkdir()
    for it in (2, 10, 9):  # auto_resume only picks an iteration whose model loads too
        torch.save({'params': {'w': param.detach()}}, models / f'net_g_{it}.pth')
    opt = {
        'auto_resume': True,
        'network_g': {},
        'path': {
            'training_states': str(states),
            'models': str(tmp_path / 'experiments' / 'x' / 'models'),
            'resume_state': None,
            'pretrain_network_g': None,
            'param_key_g': 'params_ema',
        },
    }
    state = compat.load_resume_state(opt)
    assert state['iter'] == 10 and opt['path']['resume_state'].endswith('10.state')
    assert opt['path']['pretrain_network_g'].endswith(os.path.join('models', 'net_g_10.pth'))
    assert opt['path']['param_key_g'] == 'params'
    assert state['optimizers'][0]['state'][0]['exp_avg'].device.type == 'cpu'

    opt['auto_resume'] = False
    opt['path']['resume_state'] = None
    assert compat.load_resume_state(opt) is None


def test_argv_and_package_path_glue(tmp_path, monkeypatch):
    assert gsm_train._normalise_argv(['-opt', 'x.yml', '--local-rank=1']) == ['-opt', 'x.yml', '--local_rank=1']
    monkeypatch.chdir(tmp_path)
    opt = {
        'datasets': {
            'train': {'meta_info_file': 'gsmsr/data/meta_info/meta_info_REDS_train_GT.txt'},
            'val': {'meta_info_file': 'local.txt'},
        }
    }
    (tmp_path / 'local.txt').write_text('000 1 (1,1,3)\n')
    gsm_train.resolve_package_paths(opt)
    assert os.path.isabs(opt['datasets']['train']['meta_info_file'])
    assert os.path.isfile(opt['datasets']['train']['meta_info_file'])
    assert opt['datasets']['val']['meta_info_file'] == 'local.txt'  # present in the working directory: kept
