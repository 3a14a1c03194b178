"""Where GSMNet spends GPU time: torch.profiler table for one release-config forward.

python benchmarks/profile_gsm.py [--frames 6] [--size 180x320] [--bf16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsmsr import GSMNet  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument('--frames', type=int, default=6)
    p.add_argument('--size', default='180x320')
    p.add_argument('--bf16', action='store_true')
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split('x'))
    torch.backends.cudnn.benchmark = True
    net = GSMNet().cuda().eval()
    lq = torch.rand(1, args.frames, 3, h, w, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', torch.bfloat16, enabled=args.bf16):
        net(lq)
        torch.cuda.synchronize()
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
        ) as prof:
            net(lq)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=25, max_name_column_width=60))
    return 0


if __name__ == '__main__':
    sys.exit(main())
