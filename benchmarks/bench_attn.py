"""SWSA window attention core at the release shape: explicit softmax, SDPA with a float mask, FlexAttention.

    python benchmarks/bench_attn.py [--windows 3680] [--dtypes bf16,fp32] [--repeats 20] [--sweep] [--module]

Shape: 3,680 windows (an 8-frame 180x320 LR clip, padded to 184x320, in 2x8x8 windows) x 8 heads x 128 tokens x head
dim 24 (C = 192), the relative position bias (8, 128, 128) in fp32 (as the table gathers it under autocast) and, for
shifted windows, the region labels of that clip with the (1, 4, 4) shift. Every implementation is compiled
(``torch.compile``, static shapes); bf16 rows run under autocast as the network does.

- explicit: :func:`gsmsr.archs.swsa.window_attention_ref` (scores, + bias, + mask built from the labels, softmax, @ v)
- sdpa: ``F.scaled_dot_product_attention`` with the bias (unshifted: broadcast (1, 8, n, n)) or bias + shift mask
  materialised as (w, 8, n, n) in the input dtype
- flex: :func:`gsmsr.archs.swsa.window_attention_flex` (bias and mask in ``score_mod``); "flex, bias frozen" is the
  same with the bias detached (what its gradient costs); ``--sweep`` adds forward rows with other ``kernel_options``
- ``--module``: instead, the whole compiled ``WindowAttention`` (projections included, as in the network), bf16, with
  FlexAttention off and on; error against the eager fp32 module

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
    window_attention_flex,
    window_attention_ref,
)

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
HEADS, N, HEAD_DIM = 8, 128, 24
# forward kernel_options tried by --sweep besides flex's defaults
SWEEP = [
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=1),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=1),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=1),
]
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


CORES: Dict[str, Core] = {'explicit': window_attention_ref, 'sdpa': sdpa_core, 'flex': window_attention_flex}


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


def module_rows(windows: int, repeats: int) -> List[Dict[str, str]]:
    """The whole ``WindowAttention`` module (qkv projection, bias gathered from its table, core, output
    projection), compiled in place as ``compile_blocks`` compiles the SWSA blocks, bf16 autocast, no autograd,
    with ``FLEX_ATTENTION`` off and on: inside the network flex lost although its bare core wins (NOTES.md)."""
    from gsmsr.archs import swsa

    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    x = torch.randn(windows, N, dim, device='cuda')
    labels = clip_labels(windows, x.device)
    ref_module = swsa.WindowAttention(dim, HEADS).cuda().eval()
    rows = []
    for shifted in (False, True):
        lab = labels if shifted else None
        with torch.no_grad():
            want = ref_module(x, lab)  # eager fp32, explicit
        for flex in (False, True):
            row = {'dtype': 'bf16', 'windows': 'shifted' if shifted else 'plain', 'pass': 'fwd'}
            row['impl'] = 'module ' + ('flex' if flex else 'explicit')
            module = swsa.WindowAttention(dim, HEADS).cuda().eval()
            module.load_state_dict(ref_module.state_dict())
            module.compile(dynamic=False)

            def fn(module=module, flex=flex, lab=lab) -> Tuple[Tensor, None]:
                swsa.FLEX_ATTENTION = flex  # read when the module is traced
                try:
                    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                        return module(x, lab), None
                finally:
                    swsa.FLEX_ATTENTION = False

            try:
                fn(), fn()
                torch.cuda.synchronize()
                ms, (out, _) = cuda_time(fn, repeats, warmup=1)
                row.update(ms=f'{ms:.3f}', rel_err=f'{rel_err(out, want):.1e}')
            except Exception as err:
                traceback.print_exc()
                row['error'] = f'{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ""}'
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--windows', type=int, default=3680)
    parser.add_argument('--dtypes', default='bf16,fp32')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--sweep', action='store_true', help='also time flex forward with the kernel_options in SWEEP')
    parser.add_argument(
        '--module', action='store_true', help='only the compiled WindowAttention module, explicit against flex (bf16)'
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench_attn: needs a CUDA GPU (none found); nothing timed.')
        return 0
    # one graph per (core, dtype, shifted, grad mode, sweep config): past the default limit dynamo runs eagerly
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}')
    print(f'# {args.windows} windows x {HEADS} heads x {N} tokens x head dim {HEAD_DIM}')
    if args.module:
        print_table(
            module_rows(args.windows, args.repeats), ['dtype', 'windows', 'impl', 'pass', 'ms', 'rel_err', 'error']
        )
        return 0
    cases: List[Tuple[str, Core]] = [(name, torch.compile(core, dynamic=False)) for name, core in CORES.items()]
    # the bias gradient of flex is a scatter-add of every window's score gradient into (8, n, n): this row, with the
    # bias held constant, shows what that reduction costs
    cases.append(
        (
            'flex, bias frozen',
            torch.compile(
                lambda q, k, v, b, lab, sc: window_attention_flex(q, k, v, b.detach(), lab, sc), dynamic=False
            ),
        )
    )
    if args.sweep:
        for opts in SWEEP:
            tag = ' '.join(f'{k.replace("BLOCK_", "").replace("num_", "")}{v}' for k, v in opts.items())
            cases.append(
                (f'flex {tag}', torch.compile(lambda *a, opts=opts: window_attention_flex(*a, opts), dynamic=False))
            )

    rows: List[Dict[str, str]] = []
    for dname in args.dtypes.split(','):
        inp = make_inputs(args.windows, DTYPES[dname], torch.device('cuda'))
        for shifted in (False, True):
            want = reference(inp, shifted)
            for mode in ('fwd', 'fwd+bwd'):
                for name, core in cases:
                    if mode == 'fwd+bwd' and name.startswith('flex '):
                        continue  # sweep rows are forward kernels
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
