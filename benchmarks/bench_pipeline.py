"""BasicSR's training pipeline against the bare training step, and multi-GPU throughput, on synthetic REDS data.

    python benchmarks/bench_pipeline.py [--gpus 2] [--iters 30] [--warmup 5] [--workers 4] [--bf16 | --fast]
                                        [--torchrun] [--data DIR] [--out DIR] [--frame-size 180x320] [--lr-size 64]
                                        [--frames-per-sample 16] [--embed-dims 192 --num-heads 8 ...]

Writes a synthetic REDS-layout dataset (``train_sharp/<clip>/<frame>.png`` GT, ``train_sharp_bicubic/X4/...`` LR, a
moving smooth texture with grain, REDS-sized 180x320 LR frames by default so that decoding costs what it costs on
REDS; about 260 MB, reused from --data when it matches) and a BasicSR meta-info file listing --clip-frames samples
per clip (BasicSR's REDS dataset reads --frames-per-sample frames from each and assumes 100-frame clips, so each
folder holds the frames that can be read). Then it runs the whole training pipeline: ``python -m gsmsr.train -opt
X.yml --launcher none`` on one device and, with --gpus N > 1, ``torchrun --standalone --nproc_per_node=N -m
gsmsr.train -opt X.yml --launcher pytorch``; --torchrun adds a torchrun run of one process, which times the
distributed path (``--launcher pytorch``: process group, distributed sampler, CUDA-graph capture in a distributed
run) without a second GPU. The options are options/train_gsm_reds.yml (or --opt) with the data on
the disk backend, --iters iterations, a log line every iteration, no validation and no checkpoint before the end,
and SpyNet from random weights; data loading, EMA, fix_flow, loss reduction and logging stay as configured.

The pipeline's time per iteration is the gap between consecutive iteration lines of BasicSR's log (1 ms
timestamps; the ``time (data)`` values BasicSR logs are running averages). It is compared with the bare step:
the same network on a random batch of the same size (batch 1), Adam, Charbonnier loss, bf16 autocast with
--bf16, CUDA graphs when the options say ``train.cuda_graph``, timed like bench_gsm.py's --train rows (CUDA events
on CUDA, perf_counter on CPU). Both skip --warmup iterations and report the median. Prints one table: ms/iter
(median), the mean, the mean wait for data (BasicSR's data timer), samples/s (all processes, from the median),
overhead of the per-process iteration against the bare step (on N GPUs it includes the gradient all-reduce) and
throughput scaling against one device.
--out DIR keeps the logs, option files and a results.json. Runs on CPU too (--device cpu, or without CUDA).

Targets: the pipeline adds <= 10 % over the bare step on one GPU; 2 GPUs give >= 1.9x one GPU's throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench_utils import cpu_time, cuda_time, print_table, train_step  # noqa: E402  (this folder is on sys.path)

import gsmsr  # noqa: E402  (applies the BasicSR compatibility fixes)
import gsmsr.ops  # noqa: E402
from gsmsr import GSMNet  # noqa: E402

REDS4 = ('000', '011', '015', '020')  # left out by val_partition: REDS4
REDS_CLIP_FRAMES = 100  # BasicSR's REDSRecurrentDataset assumes 100-frame clips
NET_FLAGS = ('embed_dims', 'num_heads', 'prop_depth', 'attn_depth', 'pa_frame')
COLS = [
    'row',
    'ms/iter',
    'mean ms/iter',
    'data ms/iter',
    'samples/s',
    'overhead vs bare (%)',
    'scaling vs 1 device (x)',
]
LOG_LINE = re.compile(
    r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO: \[.*?iter:\s*([\d,]+), lr:.*?'
    r'time \(data\): ([\d.]+) \(([\d.]+)\)\]'
)
AVG_WINDOW = 200  # basicsr.utils.misc.AvgTimer's default window: it restarts after window + 1 records


# ----------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------
def clip_names(n: int) -> List[str]:
    names, i = [], 1
    while len(names) < n:
        if f'{i:03d}' not in REDS4:
            names.append(f'{i:03d}')
        i += 1
    return names


def frames_on_disk(clip_frames: int, num_frame: int) -> int:
    """Frames a clip folder needs: REDSRecurrentDataset reads ``num_frame`` frames from each listed start and
    redraws a start > 100 - num_frame from [0, 100 - num_frame]."""
    return min(REDS_CLIP_FRAMES, clip_frames + num_frame - 1)


def write_reds(root: Path, clips: int, clip_frames: int, num_frame: int, lr_hw: Tuple[int, int], scale: int) -> Path:
    """REDS layout under ``root``; returns the meta-info file. Skips writing when ``root`` already holds the same."""
    params = dict(clips=clips, clip_frames=clip_frames, num_frame=num_frame, lr_hw=list(lr_hw), scale=scale, v=1)
    meta = root / 'meta_info_bench_GT.txt'
    stamp = root / 'bench_data.json'
    if meta.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return meta
    h, w = lr_hw[0] * scale, lr_hw[1] * scale
    n = frames_on_disk(clip_frames, num_frame)
    rng = np.random.default_rng(0)
    for clip in clip_names(clips):
        gt_dir, lq_dir = root / 'train_sharp' / clip, root / 'train_sharp_bicubic' / 'X4' / clip
        gt_dir.mkdir(parents=True, exist_ok=True)
        lq_dir.mkdir(parents=True, exist_ok=True)
        bh, bw = h + 2 * n, w + 3 * n
        base = rng.random((bh // 16 + 2, bw // 16 + 2, 3), dtype=np.float32)
        base = cv2.resize(base, (bw, bh), interpolation=cv2.INTER_CUBIC) * 255
        for t in range(n):
            grain = rng.normal(0, 3, (h, w, 3)).astype(np.float32)
            gt = np.clip(base[2 * t : 2 * t + h, 3 * t : 3 * t + w] + grain, 0, 255).round().astype(np.uint8)
            lq = cv2.resize(gt, (lr_hw[1], lr_hw[0]), interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(gt_dir / f'{t:08d}.png'), gt)
            cv2.imwrite(str(lq_dir / f'{t:08d}.png'), lq)
    meta.write_text(''.join(f'{clip} {clip_frames} ({h},{w},3)\n' for clip in clip_names(clips)))
    stamp.write_text(json.dumps(params))
    return meta


# ----------------------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------------------
def build_options(
    base: Dict[str, Any], args: argparse.Namespace, data: Path, meta: Path, name: str, world: int, cuda: bool
) -> Dict[str, Any]:
    opt = copy.deepcopy(base)
    scale = int(opt.get('scale', 4))
    opt['name'] = name
    opt['num_gpu'] = world if cuda else 0
    opt['manual_seed'] = 0
    train_set = opt['datasets']['train']
    samples = args.clips * args.clip_frames
    train_set.update(
        dataroot_gt=str(data / 'train_sharp'),
        dataroot_lq=str(data / 'train_sharp_bicubic' / 'X4'),
        meta_info_file=str(meta),
        val_partition='REDS4',
        test_mode=False,
        io_backend=dict(type='disk'),
        num_frame=args.frames_per_sample,
        gt_size=scale * args.lr_size,
        num_worker_per_gpu=args.workers,
        batch_size_per_gpu=1,
        # no epoch boundary within the run (REDS has 26,600 samples; this dataset only clips x clip_frames)
        dataset_enlarge_ratio=max(1, math.ceil((args.iters + 1) * world / samples)),
    )
    opt['datasets'] = {'train': train_set}  # no validation set
    opt.pop('val', None)
    opt['network_g']['spynet_path'] = None
    for key in NET_FLAGS:
        if getattr(args, key) is not None:
            opt['network_g'][key] = getattr(args, key)
    opt['path'] = dict(pretrain_network_g=None, strict_load_g=True, resume_state=None)
    opt['train']['total_iter'] = args.iters
    opt['train']['use_bf16'] = bool(args.bf16 or args.fast)
    if args.fast:
        opt['network_g']['compile_blocks'] = True
        opt['train']['cuda_graph'] = True
    opt['logger']['print_freq'] = 1
    opt['logger']['save_checkpoint_freq'] = 10 * (args.iters + 1)  # only the final save, after the last iteration
    return opt


# ----------------------------------------------------------------------------------------------------------
# the bare step
# ----------------------------------------------------------------------------------------------------------
def bare_step_ms(
    network_g: Dict[str, Any], args: argparse.Namespace, dev: torch.device, scale: int, cuda_graph: bool
) -> float:
    """Median ms of forward + Charbonnier loss + backward + Adam step on one random batch of the pipeline's size."""
    torch.manual_seed(0)
    kwargs = {k: v for k, v in network_g.items() if k != 'type'}
    net = GSMNet(**kwargs).to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.99))
    t, s = args.frames_per_sample, args.lr_size
    lq = torch.rand(1, t, 3, s, s, device=dev)
    gt = torch.rand(1, t, 3, scale * s, scale * s, device=dev)
    dtype = torch.bfloat16 if args.bf16 or args.fast else None
    step = train_step(net, opt, lq, gt, dtype, cuda_graph=cuda_graph and dev.type == 'cuda')

    repeats = args.iters - args.warmup
    if dev.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as BasicSR's train_pipeline
        ms, _ = cuda_time(step, repeats, warmup=args.warmup)
    else:
        # as GSMModel: CPU bf16 steps run without oneDNN (its bf16 Conv3d backward is unreliable there)
        with torch.backends.mkldnn.flags(enabled=False) if dtype is not None else contextlib.nullcontext():
            ms = cpu_time(step, repeats, warmup=args.warmup)
    return ms


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------
def parse_log(text: str, warmup: int) -> Dict[str, float]:
    """Iteration times from BasicSR's log: median and mean ms per iteration after ``warmup``, and the mean data
    wait. An iteration's time is the gap between its log line and the previous one."""
    stamps: Dict[int, datetime.datetime] = {}
    data_avg: Dict[int, float] = {}
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m:
            it = int(m.group(2).replace(',', ''))
            stamps[it] = datetime.datetime.strptime(m.group(1), '%Y-%m-%d %H:%M:%S,%f')
            data_avg[it] = float(m.group(4))
    last = max(stamps, default=0)
    first = max(warmup, 1)
    if last - first < 1 or any(k not in stamps for k in range(first, last + 1)):
        raise ValueError(f'expected iteration lines 1..{last} with at least {first + 1} of them in the log')
    gaps = [(stamps[k] - stamps[k - 1]).total_seconds() * 1e3 for k in range(first + 1, last + 1)]
    # AvgTimer logs the mean of the records since its last restart (every AVG_WINDOW + 1 records)
    totals = {0: 0.0}
    for k in range(1, last + 1):
        seg_start = (k - 1) // (AVG_WINDOW + 1) * (AVG_WINDOW + 1)
        totals[k] = totals[seg_start] + data_avg[k] * (k - seg_start)
    return dict(
        median_ms=statistics.median(gaps),
        mean_ms=(stamps[last] - stamps[first]).total_seconds() * 1e3 / (last - first),
        data_ms=(totals[last] - totals[first]) * 1e3 / (last - first),
        iters=last,
    )


def run_pipeline(
    opt: Dict[str, Any],
    work: Path,
    world: int,
    cuda: bool,
    warmup: int,
    out: Optional[Path],
    torchrun: bool = False,
) -> Tuple[Dict[str, float], str]:
    """Runs BasicSR's train pipeline with ``opt`` (cwd ``work``) in ``world`` processes, through torchrun when
    ``world`` > 1 or ``torchrun``; returns the parsed times and the log's text."""
    name = opt['name']
    yml = work / f'{name}.yml'
    yml.write_text(yaml.safe_dump(opt, sort_keys=False))
    if world > 1 or torchrun:
        launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}']
        cmd = [*launch, '-m', 'gsmsr.train', '-opt', str(yml), '--launcher', 'pytorch']
    else:
        cmd = [sys.executable, '-m', 'gsmsr.train', '-opt', str(yml), '--launcher', 'none']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    if not cuda:
        env['CUDA_VISIBLE_DEVICES'] = ''
    print(f'# {name}: {" ".join(cmd)}', flush=True)
    exp = work / 'experiments' / name
    if exp.exists():
        shutil.rmtree(exp)
    start = time.perf_counter()
    with open(work / f'{name}.stdout.txt', 'w') as stdout:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=stdout, stderr=subprocess.STDOUT)
    print(f'# {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s', flush=True)
    logs = sorted(exp.glob(f'train_{name}_*.log'))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for path in [yml, work / f'{name}.stdout.txt', *logs]:
            shutil.copy(path, out / path.name)
    if proc.returncode != 0 or not logs:
        tail = (work / f'{name}.stdout.txt').read_text()[-3000:]
        raise RuntimeError(f'{name} failed (exit {proc.returncode}):\n{tail}')
    text = logs[-1].read_text()
    return parse_log(text, warmup), text


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gpus', type=int, default=1, help='also run the pipeline on N GPUs (torchrun) when N > 1')
    parser.add_argument('--iters', type=int, default=30, help='training iterations per run')
    parser.add_argument('--warmup', type=int, default=5, help='iterations left out of the statistics (>= 1)')
    parser.add_argument('--workers', type=int, default=4, help='num_worker_per_gpu')
    parser.add_argument('--bf16', action='store_true', help='train.use_bf16 (and bf16 autocast in the bare step)')
    parser.add_argument(
        '--fast', action='store_true', help='the fast step: bf16, network_g.compile_blocks, train.cuda_graph'
    )
    parser.add_argument(
        '--torchrun', action='store_true', help='also run one process through torchrun: the distributed path alone'
    )
    parser.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto')
    parser.add_argument('--opt', default=str(ROOT / 'options' / 'train_gsm_reds.yml'), help='base option file')
    parser.add_argument('--data', default=None, help='dataset folder (written there; reused if it matches)')
    parser.add_argument('--out', default=None, help='copy the logs, option files and results.json here')
    parser.add_argument('--clips', type=int, default=4)
    parser.add_argument('--clip-frames', type=int, default=20, help='samples (start frames) listed per clip')
    parser.add_argument('--frame-size', default='180x320', help='LR frame HxW on disk (GT is scale x that)')
    parser.add_argument('--lr-size', type=int, default=64, help='LR patch side (gt_size = scale x this)')
    parser.add_argument('--frames-per-sample', type=int, default=16, help='num_frame')
    for key in NET_FLAGS:
        parser.add_argument('--' + key.replace('_', '-'), type=int, default=None, help='network_g override')
    args = parser.parse_args()

    if args.warmup < 1 or args.iters < args.warmup + 2:
        parser.error('need --warmup >= 1 and --iters >= --warmup + 2')
    lr_hw = tuple(int(v) for v in args.frame_size.lower().split('x'))
    if len(lr_hw) != 2 or min(lr_hw) < args.lr_size:
        parser.error(f'--frame-size {args.frame_size} must be HxW, both >= --lr-size {args.lr_size}')
    if not 2 <= args.frames_per_sample <= REDS_CLIP_FRAMES or not 1 <= args.clip_frames <= REDS_CLIP_FRAMES:
        parser.error(f'--frames-per-sample and --clip-frames must be in [2, {REDS_CLIP_FRAMES}]')
    cuda = args.device == 'cuda' or (args.device == 'auto' and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device')
    if cuda and args.gpus > torch.cuda.device_count():
        parser.error(f'--gpus {args.gpus}: only {torch.cuda.device_count()} visible')
    dev = torch.device('cuda' if cuda else 'cpu')

    base = yaml.safe_load(Path(args.opt).read_text())
    scale = int(base.get('scale', 4))
    out = Path(args.out).resolve() if args.out else None
    tmp = tempfile.TemporaryDirectory(prefix='bench_pipeline_')
    work = Path(tmp.name)
    data = Path(args.data).resolve() if args.data else work / 'REDS'
    start = time.perf_counter()
    meta = write_reds(data, args.clips, args.clip_frames, args.frames_per_sample, lr_hw, scale)
    print(
        f'# data: {args.clips} clips x {frames_on_disk(args.clip_frames, args.frames_per_sample)} frames, LR '
        f'{lr_hw[0]}x{lr_hw[1]}, GT x{scale}, in {data} ({time.perf_counter() - start:.1f} s)',
        flush=True,
    )

    unit, units = ('GPU', 'GPUs') if cuda else ('CPU process', 'CPU processes')
    runs: List[Tuple[str, int, bool]] = [('pipeline 1 device', 1, False)]  # (row, processes, through torchrun)
    if args.torchrun:
        runs.append((f'pipeline 1 {unit}, torchrun', 1, True))
    if args.gpus > 1:
        runs.append((f'pipeline {args.gpus} {units}', args.gpus, True))
    opts = {}
    for label, world, via_torchrun in runs:
        name = f'bench_pipeline_{world}{"gpu" if cuda else "proc"}{"_torchrun" if via_torchrun and world == 1 else ""}'
        opts[label] = build_options(base, args, data, meta, name, world, cuda)
    net_opt = opts['pipeline 1 device']['network_g']
    device_name = torch.cuda.get_device_name() if cuda else 'CPU'
    print(
        f'# {device_name}, torch {torch.__version__}, scan: {gsmsr.ops.kernel_status()}; network_g '
        f'{ {k: net_opt.get(k) for k in NET_FLAGS} }, bf16 {args.bf16 or args.fast}, '
        f'cuda_graph {opts["pipeline 1 device"]["train"].get("cuda_graph")}, batch 1 x '
        f'{args.frames_per_sample}x{args.lr_size}x{args.lr_size} LR, {args.workers} workers per process, '
        f'{args.iters} iterations ({args.warmup} warm-up)',
        flush=True,
    )

    rows: List[Dict[str, str]] = []
    results: Dict[str, Any] = dict(args=vars(args), device=device_name)
    bare = bare_step_ms(net_opt, args, dev, scale, bool(opts['pipeline 1 device']['train'].get('cuda_graph')))
    if cuda:
        torch.cuda.empty_cache()  # the step's tensors are gone with its frame; the pipelines get the memory
    results['bare step'] = dict(median_ms=bare)
    rows.append({'row': 'bare step', 'ms/iter': f'{bare:.1f}', 'samples/s': f'{1e3 / bare:.3f}'})
    print(rows[-1], flush=True)

    one_device = None
    for label, world, via_torchrun in runs:
        row = {'row': label}
        try:
            stats, _ = run_pipeline(opts[label], work, world, cuda, args.warmup, out, torchrun=via_torchrun)
            throughput = world * 1e3 / stats['median_ms']
            one_device = throughput if label == 'pipeline 1 device' else one_device
            results[label] = stats
            row.update(
                {
                    'ms/iter': f'{stats["median_ms"]:.1f}',
                    'mean ms/iter': f'{stats["mean_ms"]:.1f}',
                    'data ms/iter': f'{stats["data_ms"]:.1f}',
                    'samples/s': f'{throughput:.3f}',
                    'overhead vs bare (%)': f'{(stats["median_ms"] / bare - 1) * 100:+.1f}',
                }
            )
            if one_device:
                row['scaling vs 1 device (x)'] = f'{throughput / one_device:.2f}'
        except Exception as err:  # report, keep going
            row['ms/iter'] = f'failed: {str(err).splitlines()[0][:80]}'
            print(err, flush=True)
        rows.append(row)
        print(row, flush=True)

    print_table(rows, COLS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'results.json').write_text(json.dumps(dict(results, rows=rows), indent=2, default=str))
    tmp.cleanup()
    return 0 if all(not r['ms/iter'].startswith('failed') for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
