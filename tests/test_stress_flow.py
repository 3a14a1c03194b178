"""``gsmsr stress-flow`` (gsmsr.stress_flow) and the ablation option files (options/ablations/).

A tiny random GSMNet saved as a BasicSR checkpoint and a 2-clip REDS-layout test set (3 frames, LR 36x36,
GT 144x144); the report is checked against an independent evaluation with BasicSR's metrics.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import torch
import yaml

import gsmsr  # noqa: F401  (compat before BasicSR)

# isort: split
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import tensor2img
from basicsr.utils.options import ordered_yaml

from conftest import REPO_ROOT, write_clip
from gsmsr.archs import GSMNet
from gsmsr.stress_flow import REPORT_NAMES, FlowPerturbation, add_arguments, find_clips, perturbed_flows, run

TINY = dict(upscale=4, prop_depth=2, attn_depth=1, pa_frame=1, embed_dims=8, num_heads=2)
CLIPS = ('000', '001')
FRAMES = [f'{i:08d}' for i in range(3)]
# the module-scoped fixtures (the report: a forward per clip and level) are computed once, in one xdist worker
pytestmark = pytest.mark.xdist_group('stress_flow')


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='gsmsr stress-flow')
    add_arguments(parser)
    return parser.parse_args(argv)


def _tiny_net() -> GSMNet:
    torch.manual_seed(0)
    return GSMNet(**TINY, spynet_path=None).eval()


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp('stress_flow')
    rng = np.random.default_rng(0)
    for clip in CLIPS:
        write_clip(root / 'gt' / clip, root / 'lq' / clip, FRAMES, rng)
    ckpt = root / 'net.pth'
    torch.save({'params': _tiny_net().state_dict()}, ckpt)
    opt = root / 'net.yml'
    opt.write_text(yaml.safe_dump({'network_g': dict(type='GSMNet', **TINY, spynet_path=None)}))
    return {'root': root, 'gt': root / 'gt', 'lq': root / 'lq', 'ckpt': ckpt, 'opt': opt}


def _lq(data: Dict[str, Path], clip: str) -> torch.Tensor:
    """(1, T, 3, H, W) RGB float in [0, 1], read independently of the tool's loader."""
    frames = [cv2.imread(str(data['lq'] / clip / f'{f}.png'))[..., ::-1] / 255.0 for f in FRAMES]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().unsqueeze(0).contiguous()


@pytest.fixture(scope='module')
def clean_outputs(data) -> Dict[str, torch.Tensor]:
    """Unperturbed forward of every clip, (T, 3, 4H, 4W), with the hook left at None."""
    net = _tiny_net()
    assert net.flow_transform is None
    with torch.no_grad():
        return {clip: net(_lq(data, clip))[0] for clip in CLIPS}


@pytest.fixture(scope='module')
def report(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('report') / 'out'
    rc = run(
        _parse(
            [
                '--weights',
                str(data['ckpt']),
                '-opt',
                str(data['opt']),
                '--gt',
                str(data['gt']),
                '--lq',
                str(data['lq']),
                '--out',
                str(out),
                '--noise',
                '0,2',
                '--dropout',
                '0,0.5',
                '--seed',
                '3',
                '--device',
                'cpu',
            ]
        )
    )
    assert rc == 0
    return out


# ----------------------------------------------------------------------------------------------- the report
def test_report_files(report):
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_NAMES.values())  # no temporary left
    table = (report / REPORT_NAMES['table']).read_text()
    assert table.count('noise std (LR px)') == 2 and table.count('dropout probability') == 2
    img = cv2.imread(str(report / REPORT_NAMES['plot']))
    assert img is not None and img.shape == (600, 880, 3)  # 2 metrics x 2 sweeps of 440x300 panels
    assert (img < 128).any(axis=2).mean() > 0.01  # axes, labels and curves are drawn
    with open(report / REPORT_NAMES['csv']) as f:
        rows = list(csv.DictReader(f))
    assert [(r['sweep'], float(r['level'])) for r in rows] == [
        ('noise', 0),
        ('noise', 2),
        ('dropout', 0),
        ('dropout', 0.5),
    ]
    assert float(rows[1]['noise_std_px']) == 2 and float(rows[3]['dropout_prob']) == 0.5
    for r in rows:
        assert float(r['delta_psnr']) == pytest.approx(float(r['psnr']) - float(rows[0]['psnr']), abs=1e-12)


def test_zero_rows_equal_independent_evaluation(report, clean_outputs, data):
    per_clip = []
    for clip in CLIPS:
        scores = []
        for t, frame in enumerate(FRAMES):
            out = tensor2img(clean_outputs[clip][t].clone())  # clamp to [0, 1], uint8 BGR
            gt = cv2.imread(str(data['gt'] / clip / f'{frame}.png'))
            scores.append((calculate_psnr(out, gt, crop_border=0), calculate_ssim(out, gt, crop_border=0)))
        per_clip.append(np.mean(scores, axis=0))
    psnr, ssim = np.mean(per_clip, axis=0)
    with open(report / REPORT_NAMES['csv']) as f:
        zero_rows = [r for r in csv.DictReader(f) if float(r['level']) == 0]
    assert len(zero_rows) == 2
    for r in zero_rows:
        assert float(r['psnr']) == pytest.approx(psnr, rel=1e-12)
        assert float(r['ssim']) == pytest.approx(ssim, rel=1e-12)
        assert float(r['delta_psnr']) == 0 and float(r['delta_ssim']) == 0


def test_zero_perturbation_gives_the_exact_output(data, clean_outputs):
    net = _tiny_net()
    with perturbed_flows(net, FlowPerturbation(0.0, 0.0, seed=5)), torch.no_grad():
        out = net(_lq(data, CLIPS[0]))[0]
    assert net.flow_transform is None
    assert torch.equal(out, clean_outputs[CLIPS[0]])


# ----------------------------------------------------------------------------------------------- the hook
def _flows(seed: int = 0, shape=(1, 4, 2, 64, 64)) -> torch.Tensor:
    return 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_noise_is_gaussian_seeded_and_shared_between_levels():
    fb, ff = _flows(0), _flows(1)
    out1 = FlowPerturbation(noise_std=1.0, seed=7)(fb, ff)
    again = FlowPerturbation(noise_std=1.0, seed=7)(fb, ff)
    other = FlowPerturbation(noise_std=1.0, seed=8)(fb, ff)
    out2 = FlowPerturbation(noise_std=2.0, seed=7)(fb, ff)
    for k, flow in enumerate((fb, ff)):
        z = out1[k] - flow
        assert torch.equal(out1[k], again[k])  # deterministic with the seed
        assert not torch.equal(out1[k], other[k])  # and the seed matters
        assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03  # 32768 draws of N(0, 1)
        torch.testing.assert_close(out2[k] - flow, 2 * z)  # same draws, scaled: the curve sees only the level
    assert not torch.equal(out1[0] - fb, out1[1] - ff)  # the two directions are perturbed independently


def test_dropout_zeroes_whole_vectors_pixelwise_and_nested():
    fb, ff = _flows(0), _flows(1)
    low = FlowPerturbation(dropout=0.3, seed=1)(fb, ff)[0]
    high = FlowPerturbation(dropout=0.6, seed=1)(fb, ff)[0]
    for p, out in ((0.3, low), (0.6, high)):
        dropped = (out == 0).all(dim=2)  # (B, N, H, W): both components zeroed
        assert ((out == 0) == dropped.unsqueeze(2)).all()  # never just one component
        assert abs(dropped.float().mean().item() - p) < 0.02
        kept = ~dropped.unsqueeze(2).expand_as(out)
        assert torch.equal(out[kept], fb[kept])  # the rest is untouched
    assert ((low == 0).all(dim=2) <= (high == 0).all(dim=2)).all()  # a larger p drops a superset


def test_zero_levels_are_the_identity_and_bad_levels_raise():
    fb, ff = _flows(0), _flows(1)
    out = FlowPerturbation(0.0, 0.0, seed=3)(fb, ff)
    assert torch.equal(out[0], fb) and torch.equal(out[1], ff)
    for kw in (dict(noise_std=-1.0), dict(noise_std=float('nan')), dict(dropout=1.5), dict(dropout=-0.1)):
        with pytest.raises(ValueError):
            FlowPerturbation(**kw)


def test_hook_perturbs_the_network_flows_and_is_restored(data):
    net = _tiny_net()
    lq = _lq(data, CLIPS[0])
    with torch.no_grad():
        clean = net.get_flows(lq)
        perturbation = FlowPerturbation(noise_std=1.0, dropout=0.2, seed=4)
        with perturbed_flows(net, perturbation):
            assert net.flow_transform is perturbation
            got = net.get_flows(lq)
        expected = FlowPerturbation(noise_std=1.0, dropout=0.2, seed=4)(*clean)
    assert net.flow_transform is None
    for g, e, c in zip(got, expected, clean):
        assert g.shape == c.shape == (1, len(FRAMES) - 1, 2, 36, 36)
        assert torch.equal(g, e) and not torch.equal(g, c)

    def failing(fb, ff):
        raise RuntimeError('boom')

    previous = FlowPerturbation()
    net.flow_transform = previous
    with pytest.raises(RuntimeError, match='boom'), torch.no_grad():
        with perturbed_flows(net, failing):
            net.get_flows(lq)
    assert net.flow_transform is previous


# ----------------------------------------------------------------------------------------------- bad input
def _bad_clip_set(root: Path, gt_size: int = 144, frames: int = 3) -> Dict[str, Path]:
    rng = np.random.default_rng(1)
    write_clip(root / 'gt' / '000', root / 'lq' / '000', FRAMES[:frames], rng)
    if gt_size != 144:
        path = root / 'gt' / '000' / f'{FRAMES[1]}.png'
        cv2.imwrite(str(path), cv2.resize(cv2.imread(str(path)), (gt_size, gt_size)))
    return {'gt': root / 'gt', 'lq': root / 'lq'}


@pytest.mark.parametrize(
    'case', ['missing_gt', 'gt_size', 'one_frame', 'bad_checkpoint', 'wrong_checkpoint', 'bad_dropout', 'bad_tile']
)
def test_bad_input_exits_2_with_one_line(case, data, tmp_path, capsys):
    dirs = {'gt': data['gt'], 'lq': data['lq']}
    weights, extra, needle = data['ckpt'], [], None
    if case == 'missing_gt':
        dirs['gt'] = tmp_path / 'nowhere'
        needle = 'nowhere'
    elif case == 'gt_size':
        dirs = _bad_clip_set(tmp_path, gt_size=140)
        needle = f'{FRAMES[1]}.png: GT is 140x140'
    elif case == 'one_frame':
        dirs = _bad_clip_set(tmp_path, frames=1)
        needle = '1 frame(s)'
    elif case == 'bad_checkpoint':
        weights = tmp_path / 'junk.pth'
        weights.write_bytes(b'not a checkpoint')
        needle = 'junk.pth'
    elif case == 'wrong_checkpoint':
        weights = tmp_path / 'other.pth'
        sd = _tiny_net().state_dict()
        sd.pop('conv_first.weight')
        torch.save({'params_ema': sd}, weights)
        needle = 'conv_first.weight'
    elif case == 'bad_dropout':
        extra, needle = ['--dropout', '0,1.5'], '--dropout'
    elif case == 'bad_tile':
        extra, needle = ['--tile', '20'], '--tile 20'
    out = tmp_path / 'out'
    rc = run(
        _parse(
            [
                '--weights',
                str(weights),
                '-opt',
                str(data['opt']),
                '--gt',
                str(dirs['gt']),
                '--lq',
                str(dirs['lq']),
                '--out',
                str(out),
                '--noise',
                '0,1',
                '--device',
                'cpu',
            ]
            + extra
        )
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith('gsmsr stress-flow: error:') and needle in err[0], err
    assert not out.exists() or not any(out.iterdir())  # nothing that looks like a result


def test_find_clips_limits_frames(data):
    clips = find_clips(str(data['gt']), str(data['lq']), max_frames=2)
    assert [c.name for c in clips] == list(CLIPS)
    assert all(c.frames == [f'{f}.png' for f in FRAMES[:2]] for c in clips)


# ----------------------------------------------------------------------------------------------- ablations
ABLATIONS = REPO_ROOT / 'options' / 'ablations'
SWITCHES = {  # file -> (network_g key, value); anchor_center is the baseline
    'anchor_center': None,
    'anchor_last': ('anchor', 'last'),
    'scatter_off': ('scatter', False),
    'window_k3': ('pa_frame', 1),
    'window_k7': ('pa_frame', 3),
    'align_bilinear': ('align', 'bilinear'),
    'flow_compose_geometric': ('flow_compose', 'geometric'),
    'forward_only': ('alternate_direction', False),
    'mamba_one_direction': ('mamba_directions', 1),
}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def _flatten(d, prefix: str = '') -> Dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _differences(a: dict, b: dict) -> Dict[str, tuple]:
    fa, fb = _flatten(a), _flatten(b)
    missing = '<absent>'
    return {
        k: (fa.get(k, missing), fb.get(k, missing))
        for k in fa.keys() | fb.keys()
        if fa.get(k, missing) != fb.get(k, missing)
    }


def test_ablation_baseline_is_the_official_ablation_recipe():
    assert sorted(p.stem for p in ABLATIONS.glob('*.yml')) == sorted(SWITCHES)
    base = _load(ABLATIONS / 'anchor_center.yml')
    main = _load(REPO_ROOT / 'options' / 'train_gsm_reds.yml')
    defaults = {k: p.default for k, p in inspect.signature(GSMNet).parameters.items()}
    switch_keys = ['anchor', 'scatter', 'align', 'flow_compose', 'alternate_direction', 'mamba_directions']
    expected = {
        'name': (main['name'], 'GSM_REDS_x4_ablation_anchor_center'),
        'num_gpu': (main['num_gpu'], 1),
        'datasets.train.num_frame': (main['datasets']['train']['num_frame'], 6),
        'train.optim_g.lr': (main['train']['optim_g']['lr'], 1e-4),
        'train.grad_clip_norm': (main['train']['grad_clip_norm'], 1.0),
        'train.total_iter': (main['train']['total_iter'], 300000),
        # the ablations keep the paper's fp32 step; the fast step is validated for the main recipe only
        'train.use_bf16': (True, False),
        'network_g.compile_blocks': (True, '<absent>'),
        'train.scheduler.periods': (main['train']['scheduler']['periods'], [300000]),
        # the switches are spelled out, at the official values (GSMNet's defaults)
        **{f'network_g.{k}': ('<absent>', defaults[k]) for k in switch_keys},
    }
    assert _differences(main, base) == expected


@pytest.mark.parametrize('stem', sorted(SWITCHES))
def test_ablation_differs_from_baseline_only_in_its_switch(stem, monkeypatch):
    from basicsr.utils.options import parse_options

    path = ABLATIONS / f'{stem}.yml'
    opt, base = _load(path), _load(ABLATIONS / 'anchor_center.yml')
    expected = {} if stem == 'anchor_center' else {'name': (base['name'], f'GSM_REDS_x4_ablation_{stem}')}
    if SWITCHES[stem]:
        key, value = SWITCHES[stem]
        assert base['network_g'][key] != value
        expected[f'network_g.{key}'] = (base['network_g'][key], value)
    assert _differences(base, opt) == expected

    # BasicSR's own option parser accepts the file (as `gsmsr train -opt` reads it)
    monkeypatch.setattr(sys, 'argv', ['train', '-opt', str(path)])
    parsed, _ = parse_options(str(REPO_ROOT), is_train=True)
    assert parsed['name'] == opt['name'] and parsed['network_g'] == opt['network_g']

    # every network_g key is a GSMNet argument: build it with the sizes shrunk
    kwargs = {k: v for k, v in opt['network_g'].items() if k != 'type'}
    kwargs.update(prop_depth=1, attn_depth=1, embed_dims=8, num_heads=2, spynet_path=None)
    assert opt['network_g']['type'] == 'GSMNet'
    net = GSMNet(**kwargs)
    if SWITCHES[stem]:
        key, value = SWITCHES[stem]
        owner = net.prop_layers[0].stage.mamba_block if key == 'mamba_directions' else net
        assert getattr(owner, key) == value
