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

# isort: split
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
# the module-scoped demo run is computed once, in one xdist worker
pytestmark = pytest.mark.xdist_group('demo')


@pytest.fixture(scope='module')
def quick_samples(tmp_path_factory):
    """The demo on QUICK_CLIPS instead of the full recipe (the recipe itself is tested in test_samples.py)."""
    cache = tmp_path_factory.mktemp('cache')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            demo,
            'prepare_samples',
            lambda cache_dir=None: samples.prepare_samples(cache_dir, QUICK_CLIPS, progress=False),
        )
        yield cache


@pytest.fixture(scope='module')
def demo_run(quick_samples, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo_out')
    code = cli.main(
        [
            'demo',
            '--out',
            str(out),
            '--iters',
            '2',
            '--test-frames',
            '3',
            '--device',
            'cpu',
            '--cache',
            str(quick_samples),
        ]
        + TINY
    )
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


def test_summary_says_how_many_steps_ran_and_why(demo_run):
    _, out = demo_run
    training = json.loads((out / 'results.json').read_text())['training']
    # --iters 2 is within the timing steps: nothing is timed, the cap is reached well within the budget
    assert training['steps'] == training['planned_steps'] == 2 and training['stopped_by'] == 'iters'
    assert training['seconds_per_step'] is None and training['budget_minutes'] == demo.DEFAULT_MINUTES
    assert demo.training_summary(training).startswith('Training: 2 steps in ')
    assert 'because --iters 2 was reached' in demo.training_summary(training)


def test_training_stops_when_the_budget_is_spent(quick_samples, tmp_path, capsys):
    code = cli.main(
        [
            'demo',
            '--out',
            str(tmp_path),
            '--iters',
            '3',
            '--minutes',
            '1e-9',
            '--test-frames',
            '3',
            '--device',
            'cpu',
            '--cache',
            str(quick_samples),
        ]
        + TINY
    )
    assert code == 0
    training = json.loads((tmp_path / 'results.json').read_text())['training']
    assert (training['steps'], training['planned_steps'], training['stopped_by']) == (1, 3, 'budget spent')
    printed = capsys.readouterr()
    assert 'Training: 1 step in ' in printed.out and 'spent after 1 of 3 steps' in printed.out
    assert 'training stops after 1 of 3 steps' in printed.err  # BasicSR's log line, shown on the terminal
    log = next((tmp_path / 'experiments' / 'gsmnet_demo').glob('train_*.log')).read_text()
    assert 'iter:       1,' in log and 'iter:       2,' not in log and 'training stops after 1 of 3' in log
    assert (tmp_path / 'experiments' / 'gsmnet_demo' / 'models' / 'net_g_latest.pth').is_file()


def test_step_count_and_schedule_are_fitted_to_the_budget(quick_samples, tmp_path, monkeypatch, capsys):
    timed = []

    def slow_steps(options, steps=demo.CALIBRATION_STEPS):
        timed.append(options['train']['total_iter'])
        return 20.0  # seconds per step: 0.9 * 60 s fits 2 of them

    monkeypatch.setattr(demo, 'time_training_steps', slow_steps)
    code = cli.main(
        [
            'demo',
            '--out',
            str(tmp_path),
            '--iters',
            '50',
            '--minutes',
            '1',
            '--test-frames',
            '3',
            '--device',
            'cpu',
            '--cache',
            str(quick_samples),
        ]
        + TINY
    )
    assert code == 0 and timed == [50]
    training = json.loads((tmp_path / 'results.json').read_text())['training']
    assert (training['steps'], training['planned_steps'], training['stopped_by']) == (2, 2, 'budget')
    assert training['seconds_per_step'] == 20.0
    opt = yaml.safe_load((tmp_path / 'options' / 'train_gsmnet_demo.yml').read_text())
    assert opt['train']['total_iter'] == 2 and opt['train']['scheduler']['periods'] == [2 * demo.COSINE_SPAN]
    assert opt['train']['fix_flow'] == 3
    out = capsys.readouterr().out
    assert 'Training: 2 steps in ' in out and 'fits 2 steps (20.00 s/step' in out and 'fewer than --iters 50' in out


def test_plan_steps():
    assert demo.plan_steps(300, 300, 5, 0.85) == 300  # the cap
    assert demo.plan_steps(300, 300, 10, 2.25) == int(0.9 * 290 / 2.25)
    assert demo.plan_steps(300, 300, 400, 1.0) == 1  # timing took the whole budget: one step still runs


def test_timing_training_steps(quick_samples):
    data = samples.prepare_samples(quick_samples, QUICK_CLIPS, progress=False)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    options = demo.train_options(data, demo.network_options(parser.parse_args(TINY)), 10, use_gpu=False)
    seconds = demo.time_training_steps(options, steps=2)
    assert 0 < seconds < 60
    assert options['train']['scheduler']['type'] == 'CosineAnnealingRestartLR'  # the options are left as they were
    from basicsr.utils import logger as basicsr_logger

    assert 'basicsr' not in basicsr_logger.initialized_logger  # the next run opens its own log file


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
    code = cli.main(
        [
            'demo',
            '--out',
            str(tmp_path),
            '--weights',
            str(ckpt),
            '--test-frames',
            '3',
            '--device',
            'cpu',
            '--cache',
            str(quick_samples),
        ]
        + TINY
    )
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
        (
            ['--weights', str(ckpt), '--embed-dims', '16', '--attn-depth', '0', '--prop-depth', '1'],
            'must describe the checkpoint',
        ),
        (['--weights', str(tmp_path / 'missing.pth')], 'no such checkpoint file'),
        (['--embed-dims', '10'], 'embed_dims'),
        (['--test-frames', '1'], 'at least 2'),
        (['--minutes', '0'], 'must be a positive number'),
        (['--minutes', 'nan'], 'must be a positive number'),
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
        progress.write(
            '2026-01-01 INFO: [gsmne..][epoch:  0, iter:       7, lr:(1.000e-03,)] '
            '[eta: 0:00:12, time (data): 0.5 (0.01)] l_pix: 4.2e-02 \n2026-01-01 WARNING: odd'
        )
        assert bar.n == 7
        progress.write('\n')
    err = capsys.readouterr().err
    assert 'WARNING: odd' in err and 'Network: GSMNet' not in err


def test_defaults_are_a_small_gsmnet():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    assert args.iters == demo.DEFAULT_ITERS and args.out == 'demo_out'
    assert args.minutes == demo.DEFAULT_MINUTES and 0 < args.minutes <= 6  # the demo must stay under 10 minutes
    GSMNet(
        upscale=4,
        embed_dims=args.embed_dims,
        prop_depth=args.prop_depth,
        attn_depth=args.attn_depth,
        num_heads=args.num_heads,
        pa_frame=args.pa_frame,
    )  # a valid configuration


def test_research_switch_flags_reach_the_network_options():
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert 'anchor' not in demo.network_options(parser.parse_args([]))  # defaults: the official network
    opt = demo.network_options(parser.parse_args(['--anchor', 'last', '--no-scatter', '--mamba-directions', '1']))
    assert (opt['anchor'], opt['scatter'], opt['mamba_directions']) == ('last', False, 1)
    net = demo.build_network(opt)
    assert (net.anchor, net.scatter) == ('last', False)
