"""SWSA window attention core at the release shape: explicit softmax, SDPA with a float mask.

    python benchmarks/bench_attn.py [--windows 3680] [--dtypes bf16,fp32] [--repeats 20]

Shape: 3,680 windows (an 8-frame 180x320 LR clip, padded to 184x320, in 2x8x8 windows) x 8 heads x 128 tokens x head
dim 24 (C = 192), the relative position bias (8, 128, 128) in fp32 (as the table gathers it under autocast) and, for
shifted windows, the region labels of that clip with the (1, 4, 4) shift. Every implementation is compiled
(``torch.compile``, static shapes); bf16 rows run under autocast as the network does.

- explicit: :func:`gsmsr.archs.swsa.window_attention_ref` (scores, + bias, + mask built from the labels, softmax, @ v)
- sdpa: ``F.scaled_dot_product_attention`` with the bias (unshifted: broadcast (1, 8, n, n)) or bias + shift mask
  materialised as (w, 8, n, n) in the input dtype

Per row: median ms (CUDA events), peak memory above the inputs, and the output's relative error against an fp64
explicit reference. fwd runs without autograd; fwd+bwd also returns the q, k, v and bias gradients.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench_utils import cuda_time, print_table  # noqa: E402  (this folder is on sys.path)

from gsmsr.archs.swsa import (  # noqa: E402
    SHIFT,
    WINDOW,
    label_mask,
    shift_labels,
    window_attention_ref,
)

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
HEADS, N, HEAD_DIM = 8, 128, 24
Core = Callable[[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], float], Tensor]


def sdpa_core(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, labels: Optional[Tensor], scale: float) -> Tensor:
    """SDPA with the bias (and shift mask) as one float ``attn_mask`` in the input dtype; same values as the
    reference up to that rounding. labels: (L, n), window i uses labels[i % L]."""
    mask = bias.unsqueeze(0)
    if labels is not None:
        if q.shape[0] > labels.shape[0]:
            labels = labels.repeat(q.shape[0] // labels.shape[0], 1)
        mask = mask + label_mask(labels, bias.dtype).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)


CORES: Dict[str, Core] = {'explicit': window_attention_ref, 'sdpa': sdpa_core}


def clip_labels(windows: int, device: torch.device) -> Tensor:
    """(windows, 128) shift-region labels of 2x8x8 windows over 2-frame slabs of a 184x320 LR volume."""
    slabs = max(1, windows // (23 * 40))
    padded = (2 * slabs, 184, 320)
    labels = shift_labels(padded, WINDOW, SHIFT, device)
    reps = -(-windows // labels.shape[0])
    return labels.repeat(reps, 1)[:windows]


def make_inputs(windows: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    """q, k, v (windows, 8, 128, 24) in ``dtype``, bias (8, 128, 128) fp32, labels, output gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    return dict(
        q=r(windows, HEADS, N, HEAD_DIM).to(dtype),
        k=r(windows, HEADS, N, HEAD_DIM).to(dtype),
        v=r(windows, HEADS, N, HEAD_DIM).to(dtype),
        bias=r(HEADS, N, N),
        labels=clip_labels(windows, device),
        dout=r(windows, HEADS, N, HEAD_DIM).to(dtype),
    )


def run_once(
    core: Core, inp: Dict[str, Tensor], shifted: bool, backward: bool
) -> Tuple[Tensor, Optional[List[Tensor]]]:
    """Forward (no autograd) or forward + backward, under autocast for half dtypes; returns (out, grads)."""
    dtype = inp['q'].dtype
    labels = inp['labels'] if shifted else None
    with torch.autocast(inp['q'].device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16)):
        if not backward:
            with torch.no_grad():
                return core(inp['q'], inp['k'], inp['v'], inp['bias'], labels, HEAD_DIM**-0.5), None
        x = [inp[name].detach().requires_grad_() for name in ('q', 'k', 'v', 'bias')]
        out = core(*x, labels, HEAD_DIM**-0.5)
    return out.detach(), list(torch.autograd.grad(out, x, inp['dout'], allow_unused=True))


def reference(inp: Dict[str, Tensor], shifted: bool, chunk: int = 512) -> Tensor:
    """fp64 explicit attention, in chunks of windows (bounded memory)."""
    labels = inp['labels'] if shifted else None
    q, k, v, bias = (inp[name].double() for name in ('q', 'k', 'v', 'bias'))
    return torch.cat(
        [
            window_attention_ref(
                q[s : s + chunk],
                k[s : s + chunk],
                v[s : s + chunk],
                bias,
                None if labels is None else labels[s : s + chunk],
                HEAD_DIM**-0.5,
            )
            for s in range(0, q.shape[0], chunk)
        ]
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--windows', type=int, default=3680)
    parser.add_argument('--dtypes', default='bf16,fp32')
    parser.add_argument('--repeats', type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench_attn: needs a CUDA GPU (none found); nothing timed.')
        return 0
    # one graph per (core, dtype, shifted, grad mode): past the default limit dynamo runs eagerly
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}')
    print(f'# {args.windows} windows x {HEADS} heads x {N} tokens x head dim {HEAD_DIM}')
    cases: List[Tuple[str, Core]] = [(name, torch.compile(core, dynamic=False)) for name, core in CORES.items()]

    rows: List[Dict[str, str]] = []
    for dname in args.dtypes.split(','):
        inp = make_inputs(args.windows, DTYPES[dname], torch.device('cuda'))
        for shifted in (False, True):
            want = reference(inp, shifted)
            for mode in ('fwd', 'fwd+bwd'):
                for name, core in cases:
                    row = {'dtype': dname, 'windows': 'shifted' if shifted else 'plain', 'impl': name, 'pass': mode}
                    try:
                        fn = lambda: run_once(core, inp, shifted, mode == 'fwd+bwd')  # noqa: E731
                        fn(), fn()  # compilation and autotuning stay out of the time and the peak
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        ms, (out, _) = cuda_time(fn, args.repeats, warmup=1)
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                        row.update(ms=f'{ms:.3f}', peak_MiB=f'{peak:.0f}', rel_err=f'{rel_err(out, want):.1e}')
                    except Exception as err:  # an unsupported case or out of memory: listed, the rest still runs
                        traceback.print_exc()
                        row['error'] = f'{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ""}'
                    rows.append(row)
                    print(row, flush=True)
            del want
    print_table(rows, ['dtype', 'windows', 'impl', 'pass', 'ms', 'peak_MiB', 'rel_err', 'error'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
