"""Does the fast training step learn what the faithful one learns? Same run in two modes, loss curves compared.

    python benchmarks/train_parity.py [--iters 1000] [--modes fp32,bf16-compiled] [--plot parity.json]

Trains a small GSMNet from the same seed on the same batches (synthetic REDS-layout clips: smooth textures moving
a few pixels per frame, LR = bicubic x4 downscale) once per mode, then scores each trained network on held-out clips
in fp32. Modes: ``fp32`` (the faithful step), ``bf16`` (autocast), ``bf16-compiled`` and ``fp32-compiled``
(``compile_blocks``), ``bf16-fast`` and ``fp32-fast`` (compiled, CUDA-graphed, MLP checkpointing: the fast step of
``train.cuda_graph``), ``fp32-graphed`` (the faithful step's eager kernels replayed as CUDA graphs: its numbers
at a fraction of its time, tests/gpu/test_train_graphs_gpu.py). Prints a table (final loss, held-out PSNR, ms per
step) and writes every loss to ``$OUT/parity.json`` (or ``--json``); ``--plot FILE.json`` draws the curves into a
PNG beside it (matplotlib; several files: their runs together).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import print_table  # noqa: E402  (this folder is on sys.path)

from gsmsr import GSMNet  # noqa: E402
from gsmsr.models.train_graphs import install_train_graphs  # noqa: E402

SCALE = 4


def synthetic_clips(n: int, frames: int, size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """n clips of moving smooth textures: LR (n, frames, 3, size, size) and GT (n, frames, 3, 4 size, 4 size)."""
    g = torch.Generator().manual_seed(seed)
    gt_size, margin = SCALE * size, 8 * frames
    gts = []
    for _ in range(n):
        noise = torch.rand(1, 3, (gt_size + margin) // 8 + 2, (gt_size + margin) // 8 + 2, generator=g)
        base = F.interpolate(noise, size=(gt_size + margin, gt_size + margin), mode='bicubic', align_corners=False)
        vy, vx = (int(v) for v in torch.randint(-3, 4, (2,), generator=g))
        oy, ox = margin // 2, margin // 2
        gts.append(
            torch.cat(
                [
                    base[..., oy + vy * t : oy + vy * t + gt_size, ox + vx * t : ox + vx * t + gt_size]
                    for t in range(frames)
                ]
            )
        )
    gt = torch.stack(gts).clamp(0, 1)
    lr = F.interpolate(gt.flatten(0, 1), scale_factor=1 / SCALE, mode='bicubic', antialias=True, align_corners=False)
    return lr.clamp(0, 1).view(n, frames, 3, size, size), gt


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1).double() - b.double()).square().mean().item()
    return 10 * math.log10(1 / mse)


def train(mode: str, args, data, held_out, device: torch.device) -> Dict[str, object]:
    fast = mode.endswith('-fast')
    compiled = mode.endswith('-compiled') or fast
    graphed = fast or mode.endswith('-graphed')
    dtype = torch.bfloat16 if mode.startswith('bf16') else None
    torch.manual_seed(args.seed)
    net = GSMNet(
        prop_depth=args.layers,
        attn_depth=2,
        embed_dims=args.width,
        num_heads=4,
        pa_frame=1,
        use_checkpoint_attn=True,
        use_checkpoint_ffn=True,
        use_checkpoint_mlp=graphed,
        compile_blocks=compiled,
    ).to(device)
    graphs = install_train_graphs(net) if graphed else None
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters, eta_min=args.lr * 1e-3)
    lr_all, gt_all = data
    g = torch.Generator().manual_seed(args.seed + 1)  # the same batches in every mode
    losses: List[float] = []
    times: List[float] = []
    skipped = 0
    for it in range(args.iters):
        clip = torch.randint(0, lr_all.shape[0], (args.batch,), generator=g)
        t0 = int(torch.randint(0, lr_all.shape[1] - args.frames + 1, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(0, lr_all.shape[-1] - args.patch + 1, (2,), generator=g))
        lq = lr_all[clip, t0 : t0 + args.frames, :, y0 : y0 + args.patch, x0 : x0 + args.patch].to(device)
        gt = gt_all[
            clip,
            t0 : t0 + args.frames,
            :,
            SCALE * y0 : SCALE * (y0 + args.patch),
            SCALE * x0 : SCALE * (x0 + args.patch),
        ].to(device)
        start = time.perf_counter()
        net.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(
            device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=not graphed
        ):
            out = net(lq)
        loss = torch.sqrt((out.float() - gt) ** 2 + 1e-12).mean()
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        else:
            skipped += 1
        sched.step()
        losses.append(loss.item())  # syncs: the step time below is the whole step
        times.append(time.perf_counter() - start)
        if it % max(1, args.iters // 10) == 0:
            print(f'{mode} iter {it}: loss {losses[-1]:.5f}', flush=True)
    net.eval()
    lq, gt = held_out
    with torch.no_grad():
        sr = torch.cat([net(lq[i : i + 1].to(device)).float().cpu() for i in range(lq.shape[0])])
    return {
        'losses': losses,
        'psnr': psnr(sr, gt),
        'ms_per_step': 1e3 * statistics.median(times[len(times) // 2 :]),
        'first_step_s': times[0],
        'skipped': skipped,
        'graph_replays': graphs.replays if graphs is not None else 0,
    }


def plot(paths: List[str]) -> str:
    """Draw the runs of one or more JSON files (e.g. modes run in separate calls) into a PNG beside the first."""
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    runs: Dict[str, dict] = {}
    for path in paths:
        runs.update(json.loads(Path(path).read_text())['runs'])
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, run in runs.items():
        losses = torch.tensor(run['losses'])
        k = max(1, len(losses) // 50)  # moving average over 2 % of the run
        smooth = losses.unfold(0, k, 1).mean(1) if len(losses) >= k else losses
        ax.plot(range(k - 1, k - 1 + len(smooth)), smooth, label=f'{mode} (held-out {run["psnr"]:.2f} dB)')
    ax.set_xlabel('iteration')
    ax.set_ylabel('Charbonnier loss (moving average)')
    ax.set_yscale('log')
    ax.legend()
    ax.set_title('GSMNet training: faithful fp32 step vs fast step, same seed and batches', fontsize=10)
    png = str(Path(paths[0]).with_suffix('.png'))
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return png


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--iters', type=int, default=1000)
    p.add_argument('--modes', default='fp32-graphed,bf16-fast')
    p.add_argument('--width', type=int, default=32)
    p.add_argument('--layers', type=int, default=2)
    p.add_argument('--frames', type=int, default=8)
    p.add_argument('--patch', type=int, default=48, help='LR patch size')
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--lr', type=float, default=4e-4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='where to write the losses (default $OUT/parity.json)')
    p.add_argument('--plot', nargs='+', default=None, help='only draw the PNG of earlier JSON files')
    args = p.parse_args()
    if args.plot:
        print(plot(args.plot))
        return 0
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    data = synthetic_clips(8, 2 * args.frames, 2 * args.patch, args.seed)
    held_out = synthetic_clips(2, args.frames, 64, args.seed + 100)
    target = args.json or (os.path.join(os.environ['OUT'], 'parity.json') if os.environ.get('OUT') else 'parity.json')
    args.json = os.path.basename(target)  # the record names its file, not where it ran
    meta = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu', 'torch': torch.__version__}
    runs = {}
    for mode in args.modes.split(','):
        runs[mode] = train(mode, args, data, held_out, device)
        Path(target).write_text(json.dumps({'args': vars(args), 'meta': meta, 'runs': runs}))  # each mode as it ends
    rows = [
        {
            'mode': mode,
            'final loss (mean of last 10 %)': f'{statistics.mean(r["losses"][-max(1, args.iters // 10) :]):.5f}',
            'held-out PSNR': f'{r["psnr"]:.3f}',
            'ms/step': f'{r["ms_per_step"]:.1f}',
            'first step s': f'{r["first_step_s"]:.1f}',
            'skipped': str(r['skipped']),
            'graph replays': str(r['graph_replays']),
        }
        for mode, r in runs.items()
    ]
    print_table(rows, list(rows[0]))
    print(f'losses: {target}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
