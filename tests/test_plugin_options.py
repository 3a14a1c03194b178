"""The shipped option files: the §8 recipe values, names that BasicSR's registries resolve, meta-info paths."""

from __future__ import annotations

import os

import pytest
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

from conftest import REPO_ROOT
from gsmsr.train import resolve_package_paths

OPTIONS = sorted((REPO_ROOT / 'options').glob('*.yml'))


def load(name: str):
    import yaml

    with open(REPO_ROOT / 'options' / name) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def test_reds_recipe():
    opt = load('train_gsm_reds.yml')
    data, train = opt['datasets']['train'], opt['train']
    assert (data['type'], data['num_frame'], data['gt_size'], data['batch_size_per_gpu']) == (
        'REDSRecurrentDataset',
        16,
        256,
        1,
    )
    assert data['interval_list'] == [1] and not data['random_reverse'] and data['use_hflip'] and data['use_rot']
    assert train['optim_g'] == {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]}
    assert train['scheduler'] == {
        'type': 'CosineAnnealingRestartLR',
        'periods': [600000],
        'restart_weights': [1],
        'eta_min': 1e-7,
    }
    assert (train['total_iter'], train['fix_flow'], train['flow_lr_mul'], train['ema_decay']) == (
        600000,
        5000,
        0.125,
        0.999,
    )
    assert train['pixel_opt']['type'] == 'CharbonnierLoss' and train['pixel_opt']['eps'] == 1e-12
    net = opt['network_g']
    assert (net['prop_depth'], net['attn_depth'], net['pa_frame'], net['embed_dims'], net['num_heads']) == (
        4,
        4,
        2,
        192,
        8,
    )


def test_vimeo_stage_starts_from_reds_weights():
    reds, vimeo = load('train_gsm_reds.yml'), load('train_gsm_vimeo.yml')
    assert vimeo['train']['total_iter'] == 300000 and vimeo['train']['scheduler']['periods'] == [300000]
    assert vimeo['path']['pretrain_network_g'] == f'experiments/{reds["name"]}/models/net_g_latest.pth'
    assert vimeo['network_g'] == {**reds['network_g'], 'spynet_path': None}
    assert vimeo['val']['center_frame_only'] and load('test_vimeo.yml')['val']['center_frame_only']


@pytest.mark.parametrize('path', OPTIONS, ids=lambda p: p.name)
def test_names_resolve(path, tmp_path, monkeypatch):
    opt = load(path.name)
    assert MODEL_REGISTRY.get(opt['model_type']) and ARCH_REGISTRY.get(opt['network_g']['type'])
    for dataset in opt['datasets'].values():
        assert DATASET_REGISTRY.get(dataset['type'])
        if dataset['type'] == 'VideoRecurrentTestDataset':
            assert dataset['name'].lower() in ('vid4', 'reds4', 'redsofficial')  # BasicSR accepts only these
    for metric in opt['val']['metrics'].values():
        assert METRIC_REGISTRY.get(metric['type']) and metric['crop_border'] == 0
    monkeypatch.chdir(tmp_path)  # the shipped meta-info files are found from any working directory
    resolve_package_paths(opt)
    for dataset in opt['datasets'].values():
        meta = dataset.get('meta_info_file', '')
        if meta.startswith('gsmsr') or os.path.isabs(meta):
            assert os.path.isfile(meta), meta
