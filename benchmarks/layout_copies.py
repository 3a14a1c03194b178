"""What feeds the selective scan in Inductor's code for BiMamba's compiled window step, on CPU.

    python benchmarks/layout_copies.py [--flip-free] [--bmm] [--train] [--tokens 60] [--code FILE | --parse FILE]

Compiles LayerNorm + BiMamba at the release width (C = 192, Di = 384, R = 12, N = 16) on the token layout of the GSM
window step with Inductor on CPU (the Triton scan interpreted, as the tests run it), without autograd or, with
--train, through a backward. --flip-free sets ``bimamba.FLIP_FREE``, --bmm ``bimamba.BMM_PROJECTIONS``. For every
scan op in the generated code (``gsmsr::scan_infer`` / ``tscan_fwd``, and ``tscan_bwd`` in the backward) it says
which kernel wrote each sequence operand (u, delta, B, C, z, and the backward's dout): a GEMM, an input of the graph
(in the backward: a tensor the forward saved), or a fused kernel. A delta, B, C, z or dout buffer that a fused
kernel wrote is a copy (of a GEMM's output, or the flipped form's flip), which the scan, an opaque custom op, reads
once more; the shape of the buffer gives its traffic at other sizes (channels x L x bytes, written and read).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gsmsr.archs import bimamba  # noqa: E402

OPERANDS = {
    'scan_infer': ('u', 'delta', 'A', 'B', 'C', 'D', 'z'),
    'tscan_fwd': ('u', 'delta', 'A', 'B', 'C', 'D', 'z'),
    'tscan_bwd': ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias', 'dout'),
}
SEQUENCE = ('u', 'delta', 'B', 'C', 'z', 'dout')  # operands with L tokens; A, D and the bias are parameter-sized
SEPARATOR = '\n\n# ---- next graph\n\n'


class Mix(nn.Module):
    """GSMBlock.mamba_mix: (B, C, K, H, W) -> tokens (y, x, k) -> LN -> BiMamba -> back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = bimamba.BiMamba(dim, scan_backend='triton')

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        b, c, k, h, w = g.shape
        tok = g.permute(0, 3, 4, 2, 1).reshape(b, h * w * k, c)
        return self.mamba(self.norm(tok)).view(b, h, w, k, c).permute(0, 4, 3, 1, 2)


def _buffer(arg: str) -> str:
    m = re.match(r'\s*reinterpret_tensor\((\w+)', arg)
    return m.group(1) if m else arg.strip()


def _split_args(s: str) -> List[str]:
    """Top-level comma split of a call's argument text."""
    out, depth, cur = [], 0, ''
    for ch in s:
        if ch == ',' and depth == 0:
            out.append(cur)
            cur = ''
            continue
        depth += ch in '(['
        depth -= ch in ')]'
        cur += ch
    return out + [cur] if cur.strip() else out


def _shape(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(',') if v.strip())


def scan_feeds(code: str) -> List[Tuple[str, str, str, str, Tuple[int, ...]]]:
    """(scan op, operand, producer, buffer, buffer's shape) for every sequence operand of every scan op in one
    graph's code; producer: ``GEMM (mm|bmm)``, ``input`` (of the graph, or saved by the forward) or a kernel name
    with its line number."""
    outputs = {}  # kernel name -> indices of the pointer arguments it writes
    for name, types in re.findall(r'^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(\[([^\]]*)\]', code, re.M):
        outputs[name] = [i for i, t in enumerate(types.split(',')) if 'const' not in t]
    body = code[code.index('def call(') :]
    shapes: Dict[str, Tuple[int, ...]] = {}
    base: Dict[str, str] = {}  # alias -> the buffer it views
    writer: Dict[str, str] = {}
    feeds = []
    for n, line in enumerate(body.split('\n')):
        line = line.strip()
        m = re.match(r'(\w+) = empty_strided_cpu\(\(([^)]*)\)', line)
        if m:
            shapes[m.group(1)] = _shape(m.group(2))
            continue
        m = re.match(r'(\w+) = reinterpret_tensor\((\w+), \(([^)]*)\).*# (alias|reuse)', line)
        m = m or re.match(r'(\w+) = (\w+)(); del \w+  # (reuse)', line)
        if m and m.group(4) == 'alias':
            base[m.group(1)] = base.get(m.group(2), m.group(2))
        elif m:  # a new buffer in freed memory
            shapes[m.group(1)] = _shape(m.group(3)) if m.group(3) else shapes.get(m.group(2), ())
        elif m := re.match(r'(cpp_fused_\w+)\((.*)\)$', line):
            args = [_buffer(a) for a in _split_args(m.group(2))]
            for i in outputs.get(m.group(1), []):
                writer[base.get(args[i], args[i])] = f'{m.group(1)} (line {n})'
        elif m := re.match(r'extern_kernels\.(\w+)\(.*out=(\w+)\)', line):
            writer[base.get(m.group(2), m.group(2))] = f'GEMM ({m.group(1)})'
        elif (m := re.match(r'\w+ = torch\.ops\.gsmsr\.(\w+)\.default\((.*)\)$', line)) and m.group(1) in OPERANDS:
            for operand, arg in zip(OPERANDS[m.group(1)], (_buffer(a) for a in _split_args(m.group(2)))):
                if operand in SEQUENCE:
                    buf = base.get(arg, arg)
                    feeds.append((m.group(1), operand, writer.get(buf, f'input ({arg})'), buf, shapes.get(buf, ())))
    return feeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--flip-free', action='store_true')
    parser.add_argument('--bmm', action='store_true')
    parser.add_argument('--train', action='store_true')
    parser.add_argument('--tokens', type=int, default=60, help='K*H*W of the window (K = 5)')
    parser.add_argument('--code', default='', help='write the generated code there')
    parser.add_argument('--parse', default='', help='read code that --code wrote instead of compiling')
    args = parser.parse_args()
    if args.parse:
        codes = Path(args.parse).read_text().split(SEPARATOR)
    else:
        codes = compiled_code(args.flip_free, args.bmm, args.train, args.tokens)
    if args.code:
        Path(args.code).write_text(SEPARATOR.join(codes))
    copies, kernels = 0, set()
    for i, code in enumerate(codes):
        feeds = scan_feeds(code)
        print(f'# graph {i}: {len(feeds)} sequence operands of scan ops')
        seen = set()
        for op, operand, producer, buf, shape in feeds:
            copy = operand != 'u' and not producer.startswith(('GEMM', 'input')) and buf not in seen
            seen.add(buf)
            copies += copy
            if copy:
                kernels.add((i, producer))
            note = f'  <- a copy, {shape}' if copy else ''
            print(f'  {op:10} {operand:6} <- {producer}{note}')
    print(
        f'copies feeding the scans: {copies} buffers (delta, B, C, z, dout not from a GEMM) in {len(kernels)} kernels'
    )
    return 0


def compiled_code(flip_free: bool, bmm: bool, train: bool, tokens: int) -> List[str]:
    from torch._inductor.utils import run_and_get_code

    bimamba.FLIP_FREE, bimamba.BMM_PROJECTIONS = flip_free, bmm
    torch.manual_seed(0)
    dim = 192
    f = torch.compile(Mix(dim), fullgraph=True, dynamic=False)
    g = torch.randn(1, dim, 5, 1, tokens // 5)
    if train:
        return run_and_get_code(lambda: f(g).square().sum().backward())[1]
    with torch.no_grad():
        return run_and_get_code(f, g)[1]


if __name__ == '__main__':
    raise SystemExit(main())
