"""Selective scan at GSM's shapes: mamba-ssm's CUDA kernel, gsmsr's Triton kernel and (short L only) the PyTorch scan.

    python benchmarks/bench_scan.py [--lengths 288000,20480] [--dtypes fp32,bf16] [--repeats 10]
        [--seq-sweep] [--modes fwd,fwd+bwd,bwd] [--bwd-sweep] [--batch 1] [--only SUBSTR,...]

``seq-triton`` rows are gsmsr.ops.seq_scan_triton called directly (forward only, so no fwd+bwd rows); ``gsmsr
triton op`` rows are ``selective_scan(backend='triton')``: forward through gsmsr::scan_infer, fwd+bwd through
gsmsr::tscan_fwd / tscan_bwd (gsmsr.ops.seq_scan_triton_bwd, training segments); ``--seq-sweep`` adds its
configurations in SEQ_SWEEP, labelled ``d<block_d> w<num_warps> t<token_tile> seg<segments>|wpsm<warps per SM>``,
then ``out(t<tile> w<warps>)`` for the output pass's own options and ``maxnreg(sum <cap> out <cap>)``, the register
caps of the two launches (``off``: the compiler's choice), and ``stages<n>`` when the tile loop is software-pipelined
(``stages``).
``out_rel`` is the max abs difference from mamba-ssm relative to its max |output|.

Shapes: batch 1, D = 384 channels (d_inner of the release config, C = 192), N = 16 states, L = 5*180*320 = 288000
(a 5-frame window at REDS resolution) and L = 5*64*64 = 20480. Operands as BiMamba passes them: u, delta, z, B, C in
the input dtype, A = -exp(A_log) with Vim's A_log = log(1..16), D and delta_bias float32, softplus on.

Mode ``bwd`` times the backward alone, the number to compare with the training profile: mamba-ssm's through the
gsmsr::scan_bwd op, the Triton one (``seq-triton bwd`` rows) through ``selective_scan_bwd_triton`` from the
forward's segment states (training segments unless the config says otherwise); ``--bwd-sweep`` adds the
(token_tile, maxnreg, lane_sum, stages, segments) grid in BWD_SWEEP.

For every (L, dtype, pass) it prints: median ms (CUDA events, after warm-up), peak memory above the inputs, and the
max abs difference from mamba-ssm (output, and for fwd+bwd the largest gradient difference relative to that
gradient's max |value|). A configuration that fails or runs out of memory is listed with its error.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import cuda_time, print_table, selected  # noqa: E402  (this folder is on sys.path)

from gsmsr.ops.selective_scan_ref import selective_scan_ref  # noqa: E402
from gsmsr.ops.seq_scan_triton import selective_scan_fwd_triton  # noqa: E402
from gsmsr.ops.triton_jit import triton_available  # noqa: E402

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


class SeqConfig(NamedTuple):
    """One --seq-sweep configuration of selective_scan_fwd_triton; the defaults are the function's."""

    block_d: int = 32
    num_warps: int = 1
    token_tile: int = 8
    segments: int = 0  # 0: chosen from warps_per_sm
    warps_per_sm: int = 16
    out_tile: int = 0  # 0: as the summary pass
    out_warps: int = 0  # 0: as the summary pass
    out_maxnreg: int = 128  # 0: no cap (the compiler's choice)
    sum_maxnreg: int = 128  # 0: no cap
    stages: int = 1  # software pipelining of the tile loop (1: none)

    def label(self) -> str:
        name = f'seq-triton d{self.block_d} w{self.num_warps} t{self.token_tile} '
        name += f'seg{self.segments}' if self.segments else f'wpsm{self.warps_per_sm}'
        out = [f'{k}{v}' for k, v in (('t', self.out_tile), ('w', self.out_warps)) if v]
        name += f' out({" ".join(out)})' if out else ''
        name += f' maxnreg(sum {self.sum_maxnreg or "off"} out {self.out_maxnreg or "off"})'
        return name + (f' stages{self.stages}' if self.stages > 1 else '')

    def kwargs(self) -> Dict[str, Any]:
        # 0 -> None: chosen automatically, as the summary pass, or no register cap
        return {k: v or None for k, v in self._asdict().items()}


# Timed on an H200 at L = 288k bf16 (ms a call; mamba-ssm 3.62): the default 1.91. Configurations of earlier sweeps
# that lost to the default are left out (uncapped at 12 per SM 3.09; capped at 12 / 20 / 24 per SM 2.04 / 2.20 /
# 1.97), so that the sweep fits one device call.
SEQ_SWEEP = [
    SeqConfig(),  # the default: 128 registers, 16 one-warp programs per SM, one wave
    # programs of several warps (one channel a thread), so that warps sharing B|C rows share an SM and its L1 (the
    # idea; not profiled): out(w2) 1.80 / 1.85 against 1.99 / 1.91 ms in two calls, nothing in the network
    # (2026-12-03); two channels a thread lost: 2.21 uncapped, 3.43 capped at 128 registers
    SeqConfig(out_warps=2),
    SeqConfig(out_warps=4),
    SeqConfig(out_warps=8),
    SeqConfig(block_d=64, num_warps=2, out_warps=2),
    SeqConfig(block_d=64, num_warps=2, out_warps=4),
    SeqConfig(block_d=128, num_warps=4, out_warps=4),
    SeqConfig(out_tile=4, out_warps=2),
    # the loads as async copies two tiles ahead (NOTES "Scan forward: pipelined loads"); at 96 registers, no spills
    SeqConfig(stages=3),
    SeqConfig(stages=3, warps_per_sm=20, sum_maxnreg=96, out_maxnreg=96),
    # (programs of 2 or 4 warps lose offline when pipelined: 198 instructions a token against 154 in the output pass,
    # the B|C row spread over the program's warps and gathered again through 38 shared loads a token against 10)
    SeqConfig(stages=4),
    SeqConfig(stages=3, token_tile=16),
    SeqConfig(stages=3, warps_per_sm=20, out_maxnreg=96),
    # offline SASS (Triton 3.6): no spills at 80 registers in either pass (24 programs an SM); at 64 the output
    # pass spills 44 bytes, the summary none
    SeqConfig(stages=3, warps_per_sm=24, sum_maxnreg=80, out_maxnreg=80),
    # whole extra waves of shorter segments: the hardware hands a finished program's slot to the next one, so SMs
    # whose programs run fast take more of them (Nsight Compute, pipelined: 11.8 / 12.8 of 16 warps active on average
    # in the summary / output pass, unpipelined 12.4 / 15.3: a tail of programs finishing late is one reading)
    SeqConfig(stages=3, warps_per_sm=32),
    SeqConfig(stages=3, warps_per_sm=48),  # 3 waves (64 would cut segments below MIN_SEGMENT: 3.2 waves)
    SeqConfig(stages=3, warps_per_sm=48, sum_maxnreg=80, out_maxnreg=80),
]

# (token_tile, maxnreg (0: the compiler's choice), lane_sum, stages, segments (0: the training choice)) of --bwd-sweep
BWD_SWEEP = [
    (2, 168, True, 1, 0),  # the default: 12 one-warp programs per SM
    (2, 168, False, 1, 0),
    (2, 168, True, 2, 0),  # the next tile's loads in flight (cp.async)
    (4, 0, True, 1, 0),  # 255 registers, 8 programs per SM
    (4, 0, True, 2, 0),
    (2, 0, True, 1, 0),
    (4, 168, True, 1, 0),
    (1, 128, True, 1, 0),
    (2, 168, True, 1, 64),
    (2, 168, True, 1, 256),
]


def worst_grad(grads, baseline) -> str:
    """The gradient furthest from the baseline's, as max abs difference over the baseline's max abs, and its name."""
    worst, which = 0.0, ''
    for key, a, b in zip(NAMES, grads, baseline):
        if a is None or b is None or b.numel() == 0:
            continue
        rel = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
        if rel >= worst:
            worst, which = rel, key
    return f'{worst:.2e} (d{which})'


def make_inputs(
    batch: int, dim: int, state: int, length: int, dtype: torch.dtype, seed: int = 0
) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device='cuda').manual_seed(seed)
    r = lambda *s: torch.randn(*s, device='cuda', generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(dim, device='cuda', generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dict(
        u=r(batch, dim, length).to(dtype),
        delta=(0.5 * r(batch, dim, length)).to(dtype),
        A=-torch.arange(1, state + 1, device='cuda', dtype=torch.float32).repeat(dim, 1),
        B=r(batch, state, length).to(dtype),
        C=r(batch, state, length).to(dtype),
        D=torch.ones(dim, device='cuda'),
        z=r(batch, dim, length).to(dtype),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),
    )


def run_once(
    scan: Callable, inp: Dict[str, torch.Tensor], dout: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[List[Optional[torch.Tensor]]]]:
    """Forward only (dout None, no autograd) or forward + backward; returns (out, grads)."""
    if dout is None:
        with torch.no_grad():
            return scan(**inp, delta_softplus=True), None
    x = {k: v.detach().requires_grad_() for k, v in inp.items()}
    out = scan(**x, delta_softplus=True)
    grads = torch.autograd.grad(out, list(x.values()), dout)
    return out.detach(), list(grads)


def bwd_rows(
    args: argparse.Namespace, length: int, dname: str, inp: Dict[str, torch.Tensor], dout: torch.Tensor
) -> List[Dict[str, str]]:
    """Backward-only timings (mode bwd): mamba-ssm's kernel op, then the Triton backward's configurations."""
    from gsmsr.ops.selective_scan import cuda_kernel, scan_bwd, scan_fwd, triton_train_segments
    from gsmsr.ops.seq_scan_triton_bwd import selective_scan_bwd_triton

    args_in = [inp[k] for k in NAMES]
    rows, baseline = [], None
    configs: List[Tuple[str, Optional[Callable]]] = []
    if cuda_kernel():
        _, pre, x = scan_fwd(*args_in, True)  # pre: the output before the z gate, x: the chunk states
        configs.append(('mamba-ssm bwd (gsmsr op)', lambda: scan_bwd(*args_in, dout, x, pre, True)))
    grid = BWD_SWEEP if args.bwd_sweep else BWD_SWEEP[:1]
    for tile, maxnreg, lane_sum, stages, segments in grid:
        seg = segments or triton_train_segments(inp['u'])
        with torch.no_grad():
            _, states, seg_len = selective_scan_fwd_triton(
                **inp, delta_softplus=True, segments=seg, token_tile=8, return_states=True
            )
        kind = 'lanesum' if lane_sum else 'reduce'
        name = f'seq-triton bwd t{tile} r{maxnreg} {kind} s{stages} seg{-(-length // seg_len)}'
        options = dict(token_tile=tile, maxnreg=maxnreg or None, lane_sum=lane_sum, stages=stages)
        configs.append((name, partial(selective_scan_bwd_triton, *args_in, dout, states, seg_len, True, **options)))
    for name, fn in configs:
        row = {'impl': name, 'L': str(length), 'dtype': dname, 'pass': 'bwd'}
        try:
            torch.cuda.empty_cache()
            base_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            grads = fn()
            peak = torch.cuda.max_memory_allocated() - base_mem
            ms, _ = cuda_time(fn, args.repeats, warmup=2)
            row.update(ms=f'{ms:.3f}', peak_GiB=f'{peak / 2**30:.2f}')
            if baseline is None and name.startswith('mamba'):
                baseline = grads
            elif baseline is not None:
                row['grad_rel_maxabs'] = worst_grad(grads, baseline)
            del grads
        except torch.cuda.OutOfMemoryError:
            row['ms'] = 'OOM'
        except Exception as err:  # reported in the table, not skipped
            row['ms'] = f'FAILED {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ""}'
            traceback.print_exc()
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--lengths', default='288000,20480', help='comma list of L')
    parser.add_argument('--dtypes', default='fp32,bf16')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--state', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--ref-max-len', type=int, default=20480, help='time the PyTorch scan only up to this L')
    parser.add_argument('--seq-sweep', action='store_true', help='also time the seq-triton configs in SEQ_SWEEP')
    parser.add_argument('--modes', default='fwd,fwd+bwd', help='comma list of passes: fwd, fwd+bwd, bwd')
    parser.add_argument('--bwd-sweep', action='store_true', help='mode bwd: also the Triton configs in BWD_SWEEP')
    parser.add_argument(
        '--only', default='', help='comma list of substrings: run only impls whose name has one ("$" ends a name)'
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print('bench_scan: needs a CUDA GPU (none found); nothing timed.')
        return 0
    print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton available: {triton_available()}')

    scans: Dict[str, Callable] = {}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        scans['mamba-ssm'] = selective_scan_fn
    except Exception as err:  # ImportError or a broken extension: reported, the rest still runs
        print(f'# mamba-ssm unavailable ({type(err).__name__}: {err}); no differences reported')
    if 'mamba-ssm' in scans:
        from gsmsr.ops import selective_scan

        # the gsmsr dispatch of mamba-ssm's kernel: the custom ops (what GSMNet trains with)
        scans['gsmsr kernel op'] = lambda *a, **k: selective_scan(*a, **k, backend='kernel')
    if triton_available():
        from gsmsr.ops import selective_scan

        # the Triton scan with its backward, as backend='triton' trains
        scans['gsmsr triton op'] = lambda *a, **k: selective_scan(*a, **k, backend='triton')
    forward_only = set()
    seq_configs = [('seq-triton', {})]
    if args.seq_sweep:
        seq_configs += [(c.label(), c.kwargs()) for c in SEQ_SWEEP]
    for name, kw in seq_configs:
        scans[name] = lambda *a, kw=kw, **k: selective_scan_fwd_triton(*a, **k, **kw)
        forward_only.add(name)

    rows: List[Dict[str, str]] = []
    for length in (int(v) for v in args.lengths.split(',')):
        for dname in args.dtypes.split(','):
            dtype = DTYPES[dname]
            inp = make_inputs(args.batch, args.dim, args.state, length, dtype)
            dout = torch.randn(
                args.batch, args.dim, length, device='cuda', generator=torch.Generator(device='cuda').manual_seed(1)
            ).to(dtype)
            cases = dict(scans)
            if length <= args.ref_max_len:
                cases['torch ref'] = selective_scan_ref
            # mamba-ssm stays: the baseline of the differences
            cases = {k: v for k, v in cases.items() if k == 'mamba-ssm' or selected(args.only, k)}
            for mode in args.modes.split(','):
                if mode == 'bwd':
                    rows += bwd_rows(args, length, dname, inp, dout)
                    continue
                baseline = None
                for name, scan in cases.items():
                    if mode != 'fwd' and name in forward_only:
                        continue
                    row = {'impl': name, 'L': str(length), 'dtype': dname, 'pass': mode}
                    try:
                        torch.cuda.empty_cache()
                        base_mem = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                        out, grads = run_once(scan, inp, dout if mode == 'fwd+bwd' else None)
                        peak = torch.cuda.max_memory_allocated() - base_mem
                        grad_out = dout if mode == 'fwd+bwd' else None
                        ms, _ = cuda_time(lambda s=scan, i=inp, g=grad_out: run_once(s, i, g), args.repeats, warmup=2)
                        row.update(ms=f'{ms:.3f}', peak_GiB=f'{peak / 2**30:.2f}')
                        if name == 'mamba-ssm':
                            baseline = (out, grads)
                        elif baseline is not None:
                            diff = (out.float() - baseline[0].float()).abs().max().item()
                            row['out_maxabs'] = f'{diff:.2e}'
                            row['out_rel'] = f'{diff / baseline[0].float().abs().max().item():.2e}'
                            if grads is not None:
                                row['grad_rel_maxabs'] = worst_grad(grads, baseline[1])
                        del out, grads
                    except torch.cuda.OutOfMemoryError:
                        row['ms'] = 'OOM'
                    except Exception as err:  # reported in the table, not skipped
                        row['ms'] = f'FAILED {type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ""}'
                        traceback.print_exc()
                    rows.append(row)
                    print(row, flush=True)
                del baseline
            del inp, dout

    print_table(rows, ['impl', 'L', 'dtype', 'pass', 'ms', 'peak_GiB', 'out_maxabs', 'out_rel', 'grad_rel_maxabs'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
