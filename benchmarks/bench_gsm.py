"""GSMNet speed and memory on one GPU, against BasicSR's BasicVSR++ on the same inputs.

    python benchmarks/bench_gsm.py [--sizes 20x180x320,100x180x320,7x64x112] [--repeats 5] [--train]

GSMNet rows: the whole-clip schedule in fp32 (every layer on the whole clip, as the official code runs it), the
streaming schedule (``streaming_eval``, the default without autograd) in fp32 and under bf16 autocast, and the
streaming schedule with the Triton scan. Prints one table: median ms per clip and per frame (CUDA events, after
warm-up), peak memory, and the max abs / PSNR difference of each GSMNet row against the first one that ran.
A case that runs out of memory or fails says so.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gsmsr  # noqa: E402,F401  (applies the BasicSR compatibility fixes)
from gsmsr import GSMNet  # noqa: E402
from bench_utils import cuda_time, print_table  # noqa: E402  (this folder is on sys.path)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1).double() - b.clamp(0, 1).double()).square().mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else float('inf')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='20x180x320,100x180x320,7x64x112', help='comma list of TxHxW (LR)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--train', action='store_true', help='also time a training step (16x64x64, batch 1)')
    parser.add_argument('--no-basicvsrpp', action='store_true')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench_gsm: needs a CUDA GPU')
        return 0
    dev = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}, '
          f'scan on CUDA: {gsmsr.ops.kernel_status()}')
    torch.manual_seed(0)
    gsm = GSMNet().to(dev).eval()
    rows: List[Dict[str, str]] = []

    gsm_triton = GSMNet(scan_backend='triton').to(dev).eval()
    gsm_triton.load_state_dict(gsm.state_dict())

    def gsm_run(streaming: bool, dtype=None, net: GSMNet = gsm):
        def run(x):
            net.streaming_eval = streaming
            with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
                return net(x).float()
        return run
    models: Dict[str, Callable] = {
        'GSMNet fp32 whole-clip': gsm_run(False),
        'GSMNet fp32 streaming': gsm_run(True),
        'GSMNet bf16 streaming': gsm_run(True, torch.bfloat16),
        'GSMNet fp32 streaming+triton': gsm_run(True, net=gsm_triton),
    }
    if not args.no_basicvsrpp:
        from basicsr.archs.basicvsrpp_arch import BasicVSRPlusPlus
        bvpp = BasicVSRPlusPlus(mid_channels=64, num_blocks=7).to(dev).eval()
        models['BasicVSR++ fp32'] = lambda x: bvpp(x)

    for size in args.sizes.split(','):
        t, h, w = (int(v) for v in size.split('x'))
        lq = torch.rand(1, t, 3, h, w, device=dev)
        ref = None
        for name, fn in models.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {'model': name, 'input': size}
            try:
                with torch.no_grad():
                    ms, out = cuda_time(lambda: fn(lq), args.repeats)
                row.update(ms=f'{ms:.0f}', ms_per_frame=f'{ms / t:.1f}',
                           peak_GiB=f'{torch.cuda.max_memory_allocated() / 2**30:.2f}')
                if name.startswith('GSMNet') and ref is None:
                    ref = out
                elif name.startswith('GSMNet'):
                    row.update(max_abs=f'{(out - ref).abs().max().item():.2e}',
                               dPSNR=f'{psnr(out, ref):.1f}')
            except torch.cuda.OutOfMemoryError:
                row.update(ms='OOM')
            except Exception as err:  # e.g. Triton missing: report, keep going
                row.update(ms=f'failed: {type(err).__name__}: {str(err)[:60]}')
            rows.append(row)
            print(row, flush=True)
            del row
        del lq, ref

    if args.train:
        net = GSMNet(use_checkpoint_attn=True, use_checkpoint_ffn=True).to(dev).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        lq = torch.rand(1, 16, 3, 64, 64, device=dev)
        gt = torch.rand(1, 16, 3, 256, 256, device=dev)
        for name, dtype in (('train step fp32', None), ('train step bf16', torch.bfloat16)):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = net(lq)
                loss = torch.sqrt((out.float() - gt) ** 2 + 1e-12).mean()
                loss.backward()
                opt.step()
                return loss
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {'model': name, 'input': '16x64x64'}
            try:
                ms, _ = cuda_time(step, max(2, args.repeats // 2))
                row.update(ms=f'{ms:.0f}', peak_GiB=f'{torch.cuda.max_memory_allocated() / 2**30:.2f}')
            except torch.cuda.OutOfMemoryError:
                row.update(ms='OOM')
            rows.append(row)
            print(row, flush=True)

    print_table(rows, ['model', 'input', 'ms', 'ms_per_frame', 'peak_GiB', 'max_abs', 'dPSNR'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
