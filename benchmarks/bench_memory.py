"""Peak memory of one GSMNet forward against clip length, for both evaluation schedules.

    python benchmarks/bench_memory.py [--frames 10,20,40] [--size 64x64] [--embed-dims 192] [--device cuda]

Each case runs in a fresh process. On CUDA it reports ``torch.cuda.max_memory_allocated`` beyond the model and
input; on CPU the peak of the bytes held by tensors created during the forward, counted per storage by a dispatch
mode (allocator slack excluded, same accounting as the CUDA number). The last column is the growth per added frame.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def live_tensor_bytes():
    """A dispatch mode that tracks the bytes of live tensor storages created under it, and their peak."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = self.peak = 0
            self.seen: set = set()

        def _track(self, t: torch.Tensor) -> None:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.seen or size == 0:  # a view, or an in-place result
                return
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)

            def free() -> None:
                self.live -= size
                self.seen.discard(key)

            weakref.finalize(storage, free)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t)
            return out

    return LiveBytes()


def one_case(args: argparse.Namespace) -> None:
    """Child process: build, measure, print one JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    from gsmsr import GSMNet

    torch.manual_seed(0)
    dev = torch.device(args.device)
    h, w = (int(v) for v in args.size.split('x'))
    net = GSMNet(embed_dims=args.embed_dims, streaming_eval=args.schedule == 'streaming').to(dev).eval()
    lq = torch.rand(1, args.case_frames, 3, h, w, device=dev)
    with torch.no_grad():
        if dev.type == 'cuda':
            net(lq[:, :2])  # cuDNN/cuBLAS workspaces outside the measurement
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            net(lq)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with live_tensor_bytes() as mode:
                net(lq)
            peak = mode.peak
    print(json.dumps({'peak': peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--frames', default='10,20,40')
    parser.add_argument('--size', default='64x64', help='LR HxW')
    parser.add_argument('--embed-dims', type=int, default=192)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--schedule', choices=('whole', 'streaming'), help=argparse.SUPPRESS)
    parser.add_argument('--case-frames', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.schedule:
        one_case(args)
        return 0
    frames = [int(v) for v in args.frames.split(',')]
    print(
        f'# GSMNet embed_dims={args.embed_dims}, LR {args.size}, device {args.device}; '
        f'peak memory of one forward (GiB) beyond model and input'
    )
    print(f'{"schedule":<10} {"T":>5} {"peak_GiB":>9} {"GiB/frame":>10}')
    for schedule in ('whole', 'streaming'):
        prev = None
        for t in frames:
            cmd = [
                sys.executable,
                __file__,
                '--schedule',
                schedule,
                '--case-frames',
                str(t),
                '--size',
                args.size,
                '--embed-dims',
                str(args.embed_dims),
                '--device',
                args.device,
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ['?'])[-1]
                print(f'{schedule:<10} {t:>5} {"failed":>9}  {last[:80]}')
                prev = None
                continue
            peak = json.loads(res.stdout.strip().splitlines()[-1])['peak'] / 2**30
            growth = f'{(peak - prev[1]) / (t - prev[0]):.3f}' if prev else ''
            print(f'{schedule:<10} {t:>5} {peak:>9.2f} {growth:>10}', flush=True)
            prev = (t, peak)
    return 0


if __name__ == '__main__':
    sys.exit(main())
