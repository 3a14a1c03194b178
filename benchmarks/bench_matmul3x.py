"""fp32-accurate GEMMs of the fp32 path, one per network shape: cuBLAS fp32, cuBLAS 3xTF32 on concatenated operands
(what runs today), and one Triton GEMM splitting in registers (``tl.dot(input_precision='tf32x3')``).

    python benchmarks/bench_matmul3x.py [--rows 288000] [--repeats 10] [--configs all|default]

Shapes: the window step's GEMMs at 180x320 (rows = 5 frames x 57,600 tokens), (N, K) of GSM's MLP fc1 / fc2, Mamba's
in_proj / out_proj and SWSA's qkv, as ``F.linear(x (rows, K), w (N, K), bias)``. Rows of the table:

* ``cuBLAS fp32``: TF32 off, the FMA pipe (what the narrowing GEMMs fc2 / out_proj run on today: ``worth_splitting``).
* ``cuBLAS 3xTF32 GEMM``: ``tf32_linear`` on operands concatenated beforehand (3K): the GEMM alone. In the compiled
  network the concatenation is fused into the kernel that produces x, which then writes 3K floats a row instead of K:
  ``+ producer`` adds a measured write of 2K floats a row (a fill), the least that costs.
* ``Triton tf32x3 BMxBNxBK wW sS``: :func:`gsmsr.ops.matmul3x.linear_triton`, one config each.
* ``Triton tf32``: one TF32 product (not accurate enough for the fp32 path; the speed bound of the split).

Error: max |y - y64| / max |y64| against float64 on the first 4,096 rows. Times: CUDA events, median of the repeats.
With $OUT set the table is also written there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, List

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import cuda_time, print_table  # noqa: E402  (this folder is on sys.path)

from gsmsr.ops.matmul3x import LINEAR_CONFIG, linear_triton, split_tf32, tf32_linear  # noqa: E402

SHAPES = [  # (name, N, K)
    ('MLP fc2', 192, 768),
    ('Mamba out_proj', 192, 384),
    ('MLP fc1', 768, 192),
    ('Mamba in_proj', 384, 192),
    ('SWSA qkv', 576, 192),
]
CONFIGS = [LINEAR_CONFIG, (128, 64, 32, 8, 3), (128, 128, 32, 8, 3), (64, 64, 32, 4, 4), (256, 64, 32, 8, 3)]
CHECK_ROWS = 4096


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y[:CHECK_ROWS].double() - ref).abs().max() / ref.abs().max()).item()


def bench_shape(name: str, n: int, k: int, count: int, repeats: int, configs: List[tuple]) -> List[dict]:
    """The table's rows for ``F.linear`` of (count, k) by (n, k)."""
    gen = torch.Generator(device='cuda').manual_seed(0)
    x = torch.randn(count, k, device='cuda', generator=gen)
    w = torch.randn(n, k, device='cuda', generator=gen) / k**0.5
    b = torch.randn(n, device='cuda', generator=gen)
    ref = x[:CHECK_ROWS].double() @ w.double().T + b.double()
    flop = 2 * count * n * k
    rows = []

    def row(label: str, fn: Callable[[], torch.Tensor], note: str = '') -> float:
        ms, y = cuda_time(fn, repeats, warmup=3)
        rows.append(
            dict(shape=f'{name} {n}x{k}', path=label, ms=f'{ms:.3f}', TFLOPs=f'{flop / ms / 1e9:.0f}',
                 rel_err=f'{rel_error(y, ref):.1e}', note=note)
        )  # fmt: skip
        return ms

    row('cuBLAS fp32', lambda: F.linear(x, w, b))
    x_hi, x_lo = split_tf32(x)
    w_hi, w_lo = split_tf32(w)
    x3, w3 = torch.cat((x_hi, x_hi, x_lo), -1), torch.cat((w_hi, w_lo, w_hi), -1)
    producer = torch.empty(count, 2 * k, device='cuda')
    fill, _ = cuda_time(lambda: producer.fill_(1.0), repeats, warmup=3)
    gemm = row('cuBLAS 3xTF32 GEMM', lambda: tf32_linear(x3, w3, b))
    rows[-1]['note'] = f'+ producer {gemm + fill:.3f} ms'
    for config in configs:
        bm, bn, bk, warps, stages = config
        row(f'Triton tf32x3 {bm}x{bn}x{bk} w{warps} s{stages}', lambda c=config: linear_triton(x, w, b, 'tf32x3', c))
    row('Triton tf32 (one product)', lambda: linear_triton(x, w, b, 'tf32', LINEAR_CONFIG))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=288000)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--configs', choices=['all', 'default'], default='all')
    args = p.parse_args()
    if not torch.cuda.is_available():
        print('bench_matmul3x: needs a CUDA device', file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = CONFIGS if args.configs == 'all' else [LINEAR_CONFIG]
    rows: List[dict] = []
    for name, n, k in SHAPES:
        rows += bench_shape(name, n, k, args.rows, args.repeats, configs)
        torch.cuda.empty_cache()
    head = f'# {torch.cuda.get_device_name()}, torch {torch.__version__}: F.linear, {args.rows} rows, fp32'
    print(head)
    cols = ['shape', 'path', 'ms', 'TFLOPs', 'rel_err', 'note']
    print_table(rows, cols)
    out = os.environ.get('OUT')
    if out:
        with open(Path(out) / 'bench_matmul3x.txt', 'w') as f:
            f.write(head + '\n')
            for r in rows:
                f.write(' | '.join(r[c] for c in cols) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
