"""Where GSMNet spends GPU time: a kernel table (torch.profiler) for one warm release-config call.

python benchmarks/profile_gsm.py [--frames 20] [--size 180x320] [--bf16] [--compile] [--train] [--rows 30]
    [--compile-cache FILE] [--scan-configs 'stages=2;warps_per_sm=48' [--rounds 3]]

Inference profiles one forward of the streaming schedule (the default without autograd); --train one training step
(16x64x64 LR, batch 1, checkpointing on, Adam). --compile sets ``compile_blocks`` (the default GPU path with --bf16).
Prints the CUDA kernels grouped by name: total ms, ms per frame, launches and share of the kernel time, plus the
kernel time against the wall time of the profiled call. With $OUT set, the table is also written there.

--scan-configs (inference): after the table, the same call profiled again under each ';'-separated set of Triton
scan keywords over ``selective_scan.INFER_TRITON_CONFIG`` (read at every call, so nothing is compiled again but the
scan's own kernels), interleaved with the default over --rounds rounds, and one line each: ``_scan_kernel``'s ms per
frame (the table's row: both passes) and the kernel time per frame. Same process, same compiled graphs: the
comparison a scan change needs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import BenchCompileCache, add_compile_cache_option, parse_variant, train_step  # noqa: E402  (this folder is on sys.path)

from gsmsr import GSMNet  # noqa: E402

SCAN = importlib.import_module('gsmsr.ops.selective_scan')


def profile_call(call) -> Tuple[Dict[str, Tuple[float, int]], float]:
    """CUDA kernel times of one call: {kernel name: (ms, launches)}, and the call's wall ms."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    kernels: Dict[str, Tuple[float, int]] = {}
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.self_device_time_total > 0:
            total, count = kernels.get(evt.key, (0.0, 0))
            kernels[evt.key] = (total + evt.self_device_time_total / 1e3, count + evt.count)
    return kernels, wall


def compare_scan_configs(call, specs: List[str], rounds: int, frames: int) -> List[str]:
    """Lines of the scan kernels' and all kernels' ms per frame under each scan config (default first), interleaved."""
    default = dict(SCAN.INFER_TRITON_CONFIG)
    lines = [f'{"_scan_kernel ms/frame":>21} {"kernels ms/frame":>17}  round  scan config over {default}']
    try:
        for r in range(rounds):
            for spec in [''] + specs:
                extra = parse_variant(spec)
                SCAN.INFER_TRITON_CONFIG.clear()
                SCAN.INFER_TRITON_CONFIG.update(default, **extra)
                call()  # compiles the config's scan kernels on its first round
                torch.cuda.synchronize()
                kernels, _ = profile_call(call)
                scan = kernels.get('_scan_kernel', (0.0, 0))[0]  # the table's row
                busy = sum(t for t, _ in kernels.values())
                lines.append(f'{scan / frames:21.3f} {busy / frames:17.2f}  {r:5d}  {spec or "(default)"}')
                print(lines[-1], flush=True)
    finally:
        SCAN.INFER_TRITON_CONFIG.clear()
        SCAN.INFER_TRITON_CONFIG.update(default)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--frames', type=int, default=20)
    p.add_argument('--size', default='180x320')
    p.add_argument('--bf16', action='store_true')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--train', action='store_true')
    p.add_argument('--rows', type=int, default=30)
    p.add_argument('--scan-configs', default='', help="';' list of 'key=int,...' Triton scan configs to compare")
    p.add_argument('--rounds', type=int, default=3, help='rounds of --scan-configs')
    add_compile_cache_option(p)
    args = p.parse_args()
    cache = BenchCompileCache(args.compile_cache)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else None
    if args.train:
        frames, h, w = 16, 64, 64
        net = GSMNet(use_checkpoint_attn=True, use_checkpoint_ffn=True, compile_blocks=args.compile).cuda().train()
        lq = torch.rand(1, frames, 3, h, w, device='cuda')
        gt = torch.rand(1, frames, 3, 4 * h, 4 * w, device='cuda')
        call = train_step(net, torch.optim.Adam(net.parameters(), lr=1e-4), lq, gt, dtype)
    else:
        frames = args.frames
        h, w = (int(v) for v in args.size.split('x'))
        net = GSMNet(compile_blocks=args.compile).cuda().eval()
        lq = torch.rand(1, frames, 3, h, w, device='cuda')

        def call():
            with torch.no_grad(), torch.autocast('cuda', torch.bfloat16, enabled=dtype is not None):
                return net(lq)

    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    print(f'first call {time.perf_counter() - start:.1f} s', flush=True)
    cache.save()
    call()  # a second warm-up: cuDNN autotuning, allocator growth
    torch.cuda.synchronize()
    kernels, wall = profile_call(call)
    busy = sum(t for t, _ in kernels.values())
    what = ('train step 16x64x64' if args.train else f'{frames}x{h}x{w}') + (' bf16' if args.bf16 else ' fp32')
    lines = [
        f'# {torch.cuda.get_device_name()}, torch {torch.__version__}: {what}, compiled={args.compile}',
        f'# CUDA kernel time {busy:.1f} ms of {wall:.1f} ms wall ({100 * busy / wall:.0f} % busy);'
        f' {busy / frames:.2f} ms per frame',
        f'{"ms":>9} {"ms/frame":>9} {"calls":>6} {"share":>6}  kernel',
    ]
    for name, (total, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.rows]:
        lines.append(f'{total:9.2f} {total / frames:9.3f} {count:6d} {100 * total / busy:5.1f}%  {name[:110]}')
    lines.append(f'({len(kernels)} distinct kernels)')
    print('\n'.join(lines), flush=True)
    specs = [v.strip() for v in args.scan_configs.split(';') if v.strip()]
    if specs and not args.train:
        lines += compare_scan_configs(call, specs, args.rounds, frames)
    out = os.environ.get('OUT')
    if out:
        tag = ('train' if args.train else 'infer') + ('_bf16' if args.bf16 else '_fp32') + ('_compiled' * args.compile)
        Path(out, f'profile_{tag}.txt').write_text('\n'.join(lines) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
