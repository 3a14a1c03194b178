"""Depthwise 3x3x3 conv + bias + GELU of the GSM MLP at its real shape: the Triton kernel against what ran before.

    python benchmarks/bench_dwconv.py [--shape 1,5,180,320,768] [--dtypes bf16,fp32] [--repeats 20] [--sweep]
        [--variants all | c64-w4,noreg,...] [--baseline prev_dwconv3d.py]

Input x (B, K, H, W, C) channels-last contiguous (fc1's output viewed as a volume), weight (C, 1, 3, 3, 3) and bias
float32. Rows, for every dtype:

* ``triton <config>``: gsmsr.ops.dwconv3d (fwd: conv + bias + GELU; fwd conv only: without the GELU, what the
  backward's input-gradient pass costs; bwd: GELU gradient with the conv recomputed, input gradient, weight and
  bias gradients). ``--sweep`` adds the tile configurations in SWEEP; ``--variants`` the ablations of the default
  in VARIANTS, each with fwd, fwd conv only and bwd rows.
* ``triton baseline``: with ``--baseline FILE``, a copy of an earlier gsmsr/ops/dwconv3d.py (``git show
  REV:gsmsr/ops/dwconv3d.py > FILE``; the previous default, the 9-tap loop with erff, is that file at 3aaafa3) timed
  with its own kernels and DEFAULT_CONFIG, so a change to the kernel is measured against what it replaced in one run.
* ``inductor shifted sum``: the 27 shifted multiply-adds + GELU under torch.compile (what compiled GSM blocks ran
  before the kernel), channels-last.
* ``conv3d NCDHW + gelu``: eager F.conv3d on a contiguous NCDHW copy (the transposes not timed), then F.gelu.
* ``copy``: ``y.copy_(x)``, the memory floor of a pass that reads x and writes y.

Backward rows time ``torch.autograd.grad`` of an already built graph (retain_graph), so the forward is not in them.
Every timed output is checked against the float64 reference (forward) or float32 autograd of the eager conv
(gradients) on a crop, the first few frames and rows; errors are max |diff| / max |ref|. Median ms of CUDA events.
With $OUT set, the table is also written to $OUT/bench_dwconv.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import cuda_time, print_table  # noqa: E402  (this folder is on sys.path)

from gsmsr.ops import dwconv3d  # noqa: E402
from gsmsr.ops.dwconv3d import DEFAULT_CONFIG, DWConvConfig, dwconv3d_gelu_ref  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
# (block_h, block_w, block_c, num_warps, num_stages) tried by --sweep besides the default (weight gradient unchanged)
SWEEP = [
    (4, 8, 64, 4, 2),
    (8, 8, 32, 4, 2),
    (4, 16, 32, 4, 2),
    (2, 8, 32, 1, 2),
    (4, 8, 16, 1, 2),
    (4, 8, 32, 4, 2),
    (4, 8, 32, 2, 1),
    (4, 8, 32, 2, 3),
]
# ablations of the default timed by --variants (DWConvConfig's docstring has the measured ones): the 64-channel,
# 4-warp tile it was first timed at, no register cap, bf16 widened channel by channel, and the tile halved again
VARIANTS = {
    'c64-w4': dataclasses.replace(DEFAULT_CONFIG, block_c=64, num_warps=4),
    'noreg': dataclasses.replace(DEFAULT_CONFIG, maxnreg=0),
    'no-pairs': dataclasses.replace(DEFAULT_CONFIG, bf16_pairs=False),
    'c16-w1': dataclasses.replace(DEFAULT_CONFIG, block_c=16, num_warps=1),
}
# (wgrad_block_h, wgrad_block_w, wgrad_block_c, wgrad_num_warps, wgrad_groups) tried by --sweep
WGRAD_SWEEP = [(8, 8, 64, 8, 0), (4, 8, 64, 4, 0), (4, 8, 64, 8, 64), (4, 16, 32, 8, 0)]


def shifted_sum_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The compile-friendly form GSM used before: 27 shifted multiply-adds on the padded channels-last volume."""
    k, h, w = x.shape[1:4]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1, 1, 1))
    wt = weight.reshape(weight.shape[0], 27).t().to(x.dtype)
    out = bias.to(x.dtype)
    for i in range(27):
        dk, dh, dw = i // 9, i // 3 % 3, i % 3
        out = out + xp[:, dk : dk + k, dh : dh + h, dw : dw + w] * wt[i]
    return F.gelu(out)


def conv_ncdhw_gelu(x_cf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(F.conv3d(x_cf, weight.to(x_cf.dtype), bias.to(x_cf.dtype), padding=1, groups=x_cf.shape[1]))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def crop(t: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """The part of an output checked against the reference: 2 frames, 16 rows, all columns and channels. Border
    effects are included (frame 0, row 0); the reference of the crop is computed from a 2-frame margin."""
    return t[:, :, :2, :16] if channels_first else t[:, :2, :16]


class Checker:
    """Float64 forward reference and float32 eager gradients on a crop of the input with enough margin."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dout: torch.Tensor) -> None:
        sub = lambda t: t[:, :3, :17].double()  # noqa: E731  (one frame / row of margin beyond the crop)
        self.fwd = {g: crop(dwconv3d_gelu_ref(sub(x), weight.double(), bias.double(), g)) for g in (True, False)}
        xs, ws, bs = sub(x).requires_grad_(), weight.double().requires_grad_(), bias.double().requires_grad_()
        y = dwconv3d_gelu_ref(xs, ws, bs, True)
        # with dout zero outside the crop (the checked call gets the same masked dout), every gradient only reads
        # x and dout inside the margin: dx is exact on the whole sub-volume, dweight and dbias exactly
        d = torch.zeros_like(y)
        d[:, :2, :16] = crop(dout).double()
        self.dx, self.dw, self.db = torch.autograd.grad(y, (xs, ws, bs), d)

    def forward(self, y: torch.Tensor, gelu: bool) -> float:
        return rel_err(crop(y), self.fwd[gelu])

    def grads(self, dx: torch.Tensor, dw: torch.Tensor, db: torch.Tensor) -> float:
        return max(rel_err(dx[:, :3, :17], self.dx), rel_err(dw, self.dw), rel_err(db, self.db))


def masked_dout(dout: torch.Tensor) -> torch.Tensor:
    d = torch.zeros_like(dout)
    d[:, :2, :16] = crop(dout)
    return d


def parse_variants(text: str) -> Dict[str, DWConvConfig]:
    """VARIANTS by comma-separated names, or all of them; none for an empty string."""
    names = list(VARIANTS) if text == 'all' else [n for n in text.split(',') if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f'unknown variants {unknown}: choose from {list(VARIANTS)} or all')
    return {n: VARIANTS[n] for n in names}


def load_baseline(path: str) -> ModuleType:
    """A copy of an earlier gsmsr/ops/dwconv3d.py as a module of its own. Loading it registers the gsmsr ops again
    with its implementations (torch lets a later definition replace one); this script calls launchers, not ops."""
    spec = importlib.util.spec_from_file_location(f'baseline_{Path(path).stem}', path)
    if spec is None:
        raise SystemExit(f'--baseline {path}: not a Python file')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


Stencil = Tuple[ModuleType, DWConvConfig]  # a dwconv3d module and the config its launchers get


def stencils(variants: Dict[str, DWConvConfig], baseline: Optional[ModuleType]) -> Dict[str, Stencil]:
    """Rows timed in every pass, by label: the baseline's default, today's default, the variants."""
    rows: Dict[str, Stencil] = {}
    if baseline is not None:
        rows['baseline'] = (baseline, baseline.DEFAULT_CONFIG)
    rows['default'] = (dwconv3d, DEFAULT_CONFIG)
    rows.update((label, (dwconv3d, cfg)) for label, cfg in variants.items())
    return rows


def bench_dtype(
    shape,
    dtype: torch.dtype,
    repeats: int,
    sweep: bool,
    name: str,
    variants: Optional[Dict[str, DWConvConfig]] = None,
    baseline: Optional[ModuleType] = None,
) -> List[Dict[str, str]]:
    g = torch.Generator(device='cuda').manual_seed(0)
    b, k, h, w, c = shape
    x = torch.randn(*shape, device='cuda', generator=g).to(dtype)
    weight = 0.2 * torch.randn(c, 1, 3, 3, 3, device='cuda', generator=g)
    bias = 0.1 * torch.randn(c, device='cuda', generator=g)
    dout = torch.randn(*shape, device='cuda', generator=g).to(dtype)
    check = Checker(x, weight, bias, dout)
    dcheck = masked_dout(dout)  # gradients are checked on a second, untimed call with dout zero outside the crop
    gbytes = x.numel() * x.element_size() / 1e9
    rows: List[Dict[str, str]] = []

    def add(impl: str, pass_: str, fn: Callable[[], object], err: Callable[[object], float], io_tensors: float):
        row = {'impl': impl, 'dtype': name, 'pass': pass_}
        try:
            ms, out = cuda_time(fn, repeats, warmup=2)
            row.update(ms=f'{ms:.3f}', GBps=f'{io_tensors * gbytes / ms:.0f}', err=f'{err(out):.1e}')
        except Exception as e:  # a config that fails is listed, the others still run
            row['err'] = f'{type(e).__name__}: {str(e).splitlines()[0][:60]}'
            traceback.print_exc()
        rows.append(row)
        torch.cuda.empty_cache()

    timed = stencils(variants or {}, baseline)
    configs = dict(timed)
    if sweep:
        for bh, bw, bc, nw, ns in SWEEP:
            cfg = DWConvConfig(block_h=bh, block_w=bw, block_c=bc, num_warps=nw, num_stages=ns)
            configs[f'{bh}x{bw}x{bc} w{nw} s{ns}'] = (dwconv3d, cfg)
    for label, (mod, cfg) in configs.items():
        add(
            f'triton {label}',
            'fwd',
            lambda: mod.dwconv3d_gelu_triton(x, weight, bias, True, cfg),
            lambda y: check.forward(y, True),
            2,
        )
    for label, (mod, cfg) in timed.items():
        add(
            f'triton {label}',
            'fwd conv only',
            lambda: mod.dwconv3d_gelu_triton(x, weight, bias, False, cfg),
            lambda y: check.forward(y, False),
            2,
        )

    compiled = torch.compile(shifted_sum_gelu, fullgraph=True)
    add('inductor shifted sum', 'fwd', lambda: compiled(x, weight, bias), lambda y: check.forward(y, True), 2)
    x_cf = x.permute(0, 4, 1, 2, 3).contiguous()
    add(
        'conv3d NCDHW + gelu',
        'fwd',
        lambda: conv_ncdhw_gelu(x_cf, weight, bias),
        lambda y: check.forward(y.permute(0, 2, 3, 4, 1), True),
        2,
    )
    copy_out = torch.empty_like(x)
    add('copy', 'fwd', lambda: copy_out.copy_(x), lambda out: rel_err(out, x), 2)

    # backward: read x and dout, write g; read g, write dx; read g and x (weight gradient)
    def grads_of(fn: Callable[..., torch.Tensor], inp: torch.Tensor, channels_first: bool = False):
        xs, ws, bs = inp.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach().requires_grad_()
        out = fn(xs, ws, bs)
        dd = dout.permute(0, 4, 1, 2, 3) if channels_first else dout
        dm = dcheck.permute(0, 4, 1, 2, 3) if channels_first else dcheck

        def run():
            return torch.autograd.grad(out, (xs, ws, bs), dd, retain_graph=True)

        def err(_):
            dx, dw, db = torch.autograd.grad(out, (xs, ws, bs), dm, retain_graph=True)
            return check.grads(dx.permute(0, 2, 3, 4, 1) if channels_first else dx, dw, db)

        return run, err

    bwd_configs = dict(timed)
    if sweep:
        for bh, bw, bc, nw, gr in WGRAD_SWEEP:
            cfg = DWConvConfig(
                wgrad_block_h=bh, wgrad_block_w=bw, wgrad_block_c=bc, wgrad_num_warps=nw, wgrad_groups=gr
            )
            bwd_configs[f'wgrad {bh}x{bw}x{bc} w{nw} g{gr}'] = (dwconv3d, cfg)
    for label, (mod, cfg) in bwd_configs.items():
        add(
            f'triton {label}',
            'bwd',
            lambda: mod.dwconv3d_gelu_backward_triton(dout, x, weight, bias, True, cfg),
            lambda _: check.grads(*mod.dwconv3d_gelu_backward_triton(dcheck, x, weight, bias, True, cfg)),
            7,
        )
    run, err = grads_of(compiled, x)
    add('inductor shifted sum', 'bwd', run, err, 7)
    del run, err
    run, err = grads_of(conv_ncdhw_gelu, x_cf, channels_first=True)
    add('conv3d NCDHW + gelu', 'bwd', run, err, 7)
    del run, err
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shape', default='1,5,180,320,768', help='B,K,H,W,C')
    parser.add_argument('--dtypes', default='bf16,fp32')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--sweep', action='store_true', help='also time the tile configs in SWEEP and WGRAD_SWEEP')
    parser.add_argument('--variants', default='', help=f'also time these of {list(VARIANTS)} (or all)')
    parser.add_argument('--baseline', default='', help='a copy of an earlier gsmsr/ops/dwconv3d.py to time too')
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    if not torch.cuda.is_available():
        print('bench_dwconv needs a CUDA device')
        return 1
    shape = tuple(int(s) for s in args.shape.split(','))
    torch.backends.cudnn.benchmark = True
    baseline = load_baseline(args.baseline) if args.baseline else None
    rows = []
    for name in args.dtypes.split(','):
        rows += bench_dtype(shape, DTYPES[name], args.repeats, args.sweep, name, variants, baseline)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(f'shape (B, K, H, W, C) = {shape}, {torch.cuda.get_device_name()}, torch {torch.__version__}')
        print('GBps: bytes a pass must move at least (fwd: x + y; bwd: 7 tensors) over the time')
        print_table(rows, ['impl', 'dtype', 'pass', 'ms', 'GBps', 'err'])
    print(buf.getvalue())
    if os.environ.get('OUT'):
        Path(os.environ['OUT'], 'bench_dwconv.txt').write_text(buf.getvalue())
    return 0


if __name__ == '__main__':
    sys.exit(main())
