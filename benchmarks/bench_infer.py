"""Streaming inference at a given size: frames/s and peak memory of ``gsmsr infer`` for N and 2N frames.

    python benchmarks/bench_infer.py --size 1080x1920 --frames 20 [--double] [--precision bf16]

Frames are a synthetic moving texture written as PNGs (no download); the network is the released
configuration with random weights (speed and memory do not depend on the weights). The output is a PNG
folder. One line per run, then a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsmsr import GSMNet  # noqa: E402
from gsmsr.inference import upscale_video  # noqa: E402


def write_frames(folder: str, n: int, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    canvas = cv2.GaussianBlur(rng.random((h + 64, w + 64 + 4 * n, 3), dtype=np.float32), (0, 0), 3)
    canvas = cv2.normalize(canvas, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    for t in range(n):
        cv2.imwrite(os.path.join(folder, f'{t:08d}.png'), canvas[32 : 32 + h, 4 * t : 4 * t + w])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--size', default='1080x1920', help='LR HxW')
    p.add_argument('--frames', type=int, default=20)
    p.add_argument('--double', action='store_true', help='also run 2x the frames')
    p.add_argument('--precision', default='bf16')
    p.add_argument('--chunk', type=int, default=None)
    p.add_argument('--tile', type=int, default=None)
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split('x'))
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    net = GSMNet().eval()
    extra = {k: v for k, v in (('chunk', args.chunk), ('tile', args.tile)) if v is not None}
    rows = []
    for n in [args.frames, 2 * args.frames] if args.double else [args.frames]:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, 'in')
            os.makedirs(src)
            write_frames(src, n, h, w)
            stats = upscale_video(
                src, os.path.join(tmp, 'out'), net, precision=args.precision, device=device, progress=False, **extra
            )
            print(stats.summary(), flush=True)
            rows.append((n, stats))
    dev = torch.cuda.get_device_name() if device == 'cuda' else 'CPU'
    print(f'\n{dev}, LR {h}x{w} -> {4 * h}x{4 * w}, {args.precision}, released config')
    print('frames | seconds | frames/s | peak GPU GiB | peak host GiB')
    for n, s in rows:
        gpu = f'{s.peak_device_bytes / 2**30:.2f}' if s.peak_device_bytes is not None else '-'
        print(f'{n} | {s.seconds:.1f} | {n / s.seconds:.3f} | {gpu} | {s.peak_host_bytes / 2**30:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
