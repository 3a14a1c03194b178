"""The implicit warp's pieces at the network's shape: the fused Triton kernels against the compiled reference.

    python benchmarks/bench_iwarp.py [--batch 5] [--size 180,320] [--dim 192] [--heads 8] [--dtype bf16]
        [--repeats 50]

One call of ImplicitWarp in the GSM window step aligns all K = 5 slots of a window at once, so its batch is 5 at
batch size 1 (--batch). Inputs: source and target (B, C, H, W) channels-first, as GSMBlock.gather passes them
(target is one frame expanded over the slots), random flows of a few pixels; parameters in the benchmark dtype.
Rows (median ms of CUDA events, no autograd):

* ``module reference, compiled``: ImplicitWarp.forward with FUSED_ATTENTION off under torch.compile (fullgraph),
  what the compiled window step runs today; ``module fused, compiled``: the same with the switch on.
* ``query input, compiled reference``: transpose + sine encoding + add, under torch.compile; ``query input, triton``:
  gsmsr.ops.implicit_attn.query_input_triton.
* ``attention, compiled reference``: gather + scores + softmax + mix (implicit_attention_ref) under torch.compile;
  ``attention, triton``: implicit_attention_triton.
* ``copy (B, HW, 2C)``: a copy of a kv_src-sized tensor, the memory floor of one pass over k|v.

Every timed output is checked (max |diff| / max |ref|): the pieces against their float64 reference, the module rows
against the module's eager fp32 reference path.
With $OUT set, the table is also written to $OUT/bench_iwarp.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import cuda_time, print_table  # noqa: E402  (this folder is on sys.path)

from gsmsr.archs import implicit_warp  # noqa: E402
from gsmsr.archs.implicit_warp import ImplicitWarp, sampling_geometry  # noqa: E402
from gsmsr.ops import implicit_attn  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


def _err(got: torch.Tensor, want: torch.Tensor) -> str:
    return f'{float((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)):.1e}'


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=5)
    parser.add_argument('--size', default='180,320')
    parser.add_argument('--dim', type=int, default=192)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--dtype', choices=list(DTYPES), default='bf16')
    parser.add_argument('--repeats', type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('needs CUDA')
        return 1
    dtype = DTYPES[args.dtype]
    b, c, heads = args.batch, args.dim, args.heads
    h, w = (int(v) for v in args.size.split(','))
    g = torch.Generator(device='cuda').manual_seed(0)
    dev = 'cuda'
    m = ImplicitWarp(c, heads).to(dev, dtype)
    source = torch.randn(b, c, h, w, device=dev, generator=g).to(dtype)
    target = torch.randn(1, c, h, w, device=dev, generator=g).to(dtype).expand(b, c, h, w)
    flow = 3 * torch.randn(b, 2, h, w, device=dev, generator=g)

    torch.set_grad_enabled(False)
    with torch.no_grad():
        # the module's reference is itself in fp32, not float64: its sine encoding's high frequencies (angles up to
        # ~314 rad) turn fp32's rounding of the sampling positions into ~1e-3 relative at this size, in any path
        want32 = m.float()(source.float(), target.float(), flow)
        m.to(dtype)
        # the pieces' operands, as the module forms them
        index, offset = sampling_geometry(flow, h, w, torch.float32)
        scaled = offset / (2 + 1e-6) * (2 * math.pi)
        src = source.flatten(2).transpose(1, 2)
        kv_src = torch.nn.functional.linear(src, torch.cat([m.k.weight, m.v.weight])).contiguous()
        kv_pe = torch.cat([m.k(m.position_bias), m.v(m.position_bias)], dim=-1)[0]
        q = m.q(implicit_attn.query_input_ref(target, scaled)).contiguous()
        q_in64 = implicit_attn.query_input_ref(target.double(), scaled.double())
        attn64 = implicit_attn.implicit_attention_ref(
            q.double(), kv_src.double(), index, kv_pe.double(), heads, m.scale
        )

    rows: List[Dict[str, str]] = []

    def row(name: str, fn, want=None) -> None:
        ms, out = cuda_time(fn, args.repeats, warmup=3)
        rows.append({'row': name, 'ms': f'{ms:.3f}', 'err': '' if want is None else _err(out, want)})

    compiled = torch.compile(m, fullgraph=True)
    implicit_warp.FUSED_ATTENTION = False
    row('module reference, compiled', lambda: compiled(source, target, flow), want32)
    torch._dynamo.reset()
    implicit_warp.FUSED_ATTENTION = True
    compiled = torch.compile(m, fullgraph=True)
    row('module fused, compiled', lambda: compiled(source, target, flow), want32)
    implicit_warp.FUSED_ATTENTION = False

    q_ref = torch.compile(implicit_attn.query_input_ref, fullgraph=True)
    row('query input, compiled reference', lambda: q_ref(target, scaled), q_in64)
    row('query input, triton', lambda: implicit_attn.query_input_triton(target, scaled), q_in64)
    a_ref = torch.compile(implicit_attn.implicit_attention_ref, fullgraph=True)
    row('attention, compiled reference', lambda: a_ref(q, kv_src, index, kv_pe, heads, m.scale), attn64)
    row(
        'attention, triton',
        lambda: implicit_attn.implicit_attention_triton(q, kv_src, index, kv_pe, heads, m.scale),
        attn64,
    )
    dst = torch.empty_like(kv_src)
    row(f'copy {tuple(kv_src.shape)}', lambda: dst.copy_(kv_src))

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(f'implicit warp, B={b} C={c} heads={heads} {h}x{w} {args.dtype}, {torch.cuda.get_device_name()}')
        print_table(rows, ['row', 'ms', 'err'])
    print(buf.getvalue(), end='')
    if os.environ.get('OUT'):
        Path(os.environ['OUT'], 'bench_iwarp.txt').write_text(buf.getvalue())
    return 0


if __name__ == '__main__':
    sys.exit(main())
