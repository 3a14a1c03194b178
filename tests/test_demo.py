"""``gsmsr demo``, shortened: real sample frames, a tiny GSMNet, two training steps, three test frames."""
from __future__ import annotations

import argparse
import json

import av
import cv2
import numpy as np
import pytest
import torch
import yaml

import gsmsr  # noqa: F401  (compat before BasicSR)
from basicsr.metrics import calculate_psnr
from gsmsr import cli, demo
from gsmsr.archs import GSMNet, load_checkpoint
from gsmsr.data import samples
from gsmsr.data.samples import ClipSpec, read_frames

# One 100-frame training clip (REDSRecurrentDataset samples frames 0-99) and a 4-frame test clip, small crops.
QUICK_CLIPS = (
    ClipSpec('bikes', 'bikes.mp4', 'train', 137, 100, 2, (136, 136)),
    ClipSpec('carphone', 'carphone_pristine.mp4', 'test', 0, 4, 1, (144, 144)),
)
TINY = ['--embed-dims', '8', '--prop-depth', '1', '--attn-depth', '0', '--num-heads', '4', '--pa-frame', '1']


@pytest.fixture(scope='module')
def quick_samples(tmp_path_factory):
    """The demo on QUICK_CLIPS instead of the full recipe (the recipe itself is tested in test_samples.py)."""
    cache = tmp_path_factory.mktemp('cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, 'prepare_samples', lambda cache_dir=None: samples.prepare_samples(
            cache_dir, QUICK_CLIPS, progress=False))
        yield cache


@pytest.fixture(scope='module')
def demo_run(quick_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo_out')
    code = cli.main(['demo', '--out', str(out), '--iters', '2', '--test-frames', '3', '--device', 'cpu',
                     '--cache', str(quick_samples)] + TINY)
    return code, out


def test_demo_completes_and_prints_the_table(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['clip'] == 'carphone' and results['frames'] == 3 and results['gt_size'] == [144, 144]
    assert set(results['scores']) == {'GSMNet', 'bicubic', 'bilinear'}
    printed = demo.format_table(results)
    for method in ('GSMNet', 'bicubic', 'bilinear'):
        assert f'{results["scores"][method]["PSNR"]:.2f}' in printed


def test_demo_trains_through_basicsr(demo_run):
    _, out = demo_run
    opt = yaml.safe_load((out / 'options' / 'train_gsmnet_demo.yml').read_text())
    assert opt['model_type'] == 'GSMModel' and opt['train']['total_iter'] == 2
    assert opt['network_g']['embed_dims'] == 8
    ckpt = torch.load(out / 'experiments' / 'gsmnet_demo' / 'models' / 'net_g_latest.pth', weights_only=True)
    assert 'params' in ckpt
    logs = list((out / 'experiments' / 'gsmnet_demo').glob('train_*.log'))
    assert logs and 'iter:       2' in logs[0].read_text()


def _net(out):
    opt = yaml.safe_load((out / 'options' / 'train_gsmnet_demo.yml').read_text())['network_g']
    net = GSMNet(**{k: v for k, v in opt.items() if k != 'type'})
    return load_checkpoint(net, out / 'experiments' / 'gsmnet_demo' / 'models' / 'net_g_latest.pth').eval()


def test_sr_frames_are_the_network_output_and_scores_match(demo_run, quick_samples):
    _, out = demo_run
    data = samples.prepare_samples(quick_samples, QUICK_CLIPS, progress=False)
    lq = read_frames(data.lq_root / 'carphone')[:3]
    gt = read_frames(data.gt_root / 'carphone')[:3]
    with torch.no_grad():  # reference: one direct forward of the whole 3-frame clip
        x = torch.from_numpy(np.ascontiguousarray(lq[..., ::-1])).permute(0, 3, 1, 2).float().div(255)[None]
        y = _net(out)(x)[0].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()[..., ::-1]
    sr = read_frames(out / 'sr' / 'carphone')
    np.testing.assert_array_equal(sr, y)

    results = json.loads((out / 'results.json').read_text())
    psnr = np.mean([calculate_psnr(a, b, 0, test_y_channel=True) for a, b in zip(sr, gt)])
    assert results['scores']['GSMNet']['PSNR'] == pytest.approx(psnr, abs=1e-9)
    bicubic = demo.bicubic_upscale(lq)
    psnr = np.mean([calculate_psnr(a, b, 0, test_y_channel=True) for a, b in zip(bicubic, gt)])
    assert results['scores']['bicubic']['PSNR'] == pytest.approx(psnr, abs=1e-9)
    bilinear = cv2.resize(lq[0], None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)  # same half-pixel convention
    assert np.abs(demo.bilinear_upscale(lq)[0].astype(int) - bilinear).max() <= 1


def test_video_and_crop_comparison(demo_run):
    _, out = demo_run
    with av.open(str(out / 'carphone_bicubic_vs_gsmnet.mp4')) as container:
        frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
    assert len(frames) == 3
    assert frames[0].shape == (2 * (144 + 22), 2 * 2 * 144, 3)  # label strip, two panels, pixels doubled
    crops = cv2.imread(str(out / 'carphone_crops.png'))
    assert crops.shape == (64 * 3 + 22, 4 * 64 * 3 + 3 * 6, 3)


def test_weights_evaluates_a_given_checkpoint(demo_run, quick_samples, tmp_path, capsys):
    _, out = demo_run
    ckpt = out / 'experiments' / 'gsmnet_demo' / 'models' / 'net_g_latest.pth'
    code = cli.main(['demo', '--out', str(tmp_path), '--weights', str(ckpt), '--test-frames', '3',
                     '--device', 'cpu', '--cache', str(quick_samples)] + TINY)
    assert code == 0
    assert not (tmp_path / 'experiments').exists()  # no training
    first = json.loads((out / 'results.json').read_text())['scores']
    again = json.loads((tmp_path / 'results.json').read_text())['scores']
    assert again == first
    assert 'GSMNet' in capsys.readouterr().out


def test_bad_arguments_are_one_line_errors(demo_run, quick_samples, tmp_path, capsys):
    _, out = demo_run
    ckpt = out / 'experiments' / 'gsmnet_demo' / 'models' / 'net_g_latest.pth'
    cases = [
        (['--weights', str(ckpt), '--embed-dims', '16', '--attn-depth', '0', '--prop-depth', '1'],
         'must describe the checkpoint'),
        (['--weights', str(tmp_path / 'missing.pth')], 'no such checkpoint file'),
        (['--embed-dims', '10'], 'embed_dims'),
        (['--test-frames', '1'], 'at least 2'),
    ]
    for extra, message in cases:
        code = cli.main(['demo', '--out', str(tmp_path), '--device', 'cpu', '--cache', str(quick_samples)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.startswith('gsmsr demo: error:')
        assert len(err.strip().splitlines()) == 1


def test_training_log_lines_drive_the_progress_bar(capsys):
    from tqdm import tqdm

    with tqdm(total=10, disable=False) as bar:
        progress = demo._TrainProgress(bar, __import__('sys').stderr)
        progress.write('2026-01-01 INFO: Network: GSMNet, with parameters: 1,000\n')
        progress.write('2026-01-01 INFO: [gsmne..][epoch:  0, iter:       7, lr:(1.000e-03,)] '
                       '[eta: 0:00:12, time (data): 0.5 (0.01)] l_pix: 4.2e-02 \n2026-01-01 WARNING: odd')
        assert bar.n == 7
        progress.write('\n')
    err = capsys.readouterr().err
    assert 'WARNING: odd' in err and 'Network: GSMNet' not in err


def test_defaults_are_a_small_gsmnet():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.iters == demo.DEFAULT_ITERS and args.out == 'demo_out'
    GSMNet(upscale=4, embed_dims=args.embed_dims, prop_depth=args.prop_depth, attn_depth=args.attn_depth,
           num_heads=args.num_heads, pa_frame=args.pa_frame)  # a valid configuration


def test_research_switch_flags_reach_the_network_options():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert 'anchor' not in demo.network_options(parser.parse_args([]))   # defaults: the official network
    opt = demo.network_options(parser.parse_args(['--anchor', 'last', '--no-scatter', '--mamba-directions', '1']))
    assert (opt['anchor'], opt['scatter'], opt['mamba_directions']) == ('last', False, 1)
    net = demo.build_network(opt)
    assert (net.anchor, net.scatter) == ('last', False)
