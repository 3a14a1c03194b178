"""GSMNet speed and memory on one GPU, against BasicSR's BasicVSR++ on the same inputs.

    python benchmarks/bench_gsm.py [--sizes 20x180x320,100x180x320,7x64x112 | --clips DIR] [--repeats 5] [--train]
                                   [--only SUBSTR,...] [--mamba-scan] [--variants 'slab=12;out_tile=4']
                                   [--no-basicvsrpp] [--compile-cache FILE] [--set MODULE.NAME=VALUE]

GSMNet rows: the whole-clip schedule in fp32 with mamba-ssm's scan (every layer on the whole clip, as the official code
runs it), the streaming schedule (``streaming_eval``, the default without autograd) in fp32 and under bf16 autocast, the
compiled network (``compile_blocks``, the default GPU path in bf16) in fp32 and bf16, the compiled fp32 network with
cuBLAS's fp32 GEMMs (``fp32_matmul='ieee'``) and with its larger GEMMs as three TF32 products each (the default
``fp32_matmul='3xtf32'``, gsmsr.ops.matmul3x), and with --mamba-scan the compiled bf16 network with mamba-ssm's scan
instead of gsmsr's Triton scan, and with --variants one compiled row per variant (bf16 unless ``fp32=1``, which runs it
in fp32 with the default ``fp32_matmul``): ``slab=N`` sets ``GSMNet.stream_slab``, ``dwconv_<field>=N`` sets that
``DWConvConfig`` field of the MLP stencil (``dwconv3d.OP_CONFIG``), ``flipfree=1`` runs BiMamba's backward branch
without flips (``bimamba.FLIP_FREE``; 0 for the flipped form), ``gate=0`` the gate inside each scan instead of once on
the two branches' sum (``bimamba.GATE_OUTSIDE``), ``iwarp=0`` the implicit warp's PyTorch ops instead of its fused
kernels (``implicit_warp.FUSED_ATTENTION``), ``fscatter=0`` the GSM block's scatter warps through cuDNN's sampler
instead of one kernel (``gsm_block.FUSED_SCATTER``), ``sdpa=0`` SWSA's explicit softmax instead of SDPA
(``swsa.SDPA_ATTENTION``), ``split=1`` fp32 GEMMs split in registers
(``matmul3x.SPLIT_IN_REGISTERS``), ``buffers=0`` the streaming sweep's stacked windows instead of window buffers
(``GSMNet.stream_buffers``; these switches compile the window step again), ``swsac=0`` SWSA's attention residual eager
(``swsa.COMPILE_ATTENTION``; a network of its own, compiled at that row's first call), other keys go to the Triton scan
(``selective_scan.INFER_TRITON_CONFIG``: out_tile, out_warps, out_maxnreg, token_tile, warps_per_sm, stages, ...; over
its defaults, so ``stages=1`` is the unpipelined scan; 0 for a register cap turns it off), e.g. ``--variants
'slab=12;dwconv_block_c=64,dwconv_num_warps=4;flipfree=0;out_tile=4'``.
Inputs: random frames of each --sizes, or with --clips the real LR clips under DIR (one folder of PNG frames a clip,
BasicSR's layout, e.g. the ``LR_bicubic_X4`` folder of ``gsmsr.data.samples``), each clip one input.
Prints one table: median ms per clip and per frame (CUDA events), the first call's seconds (compilation included), peak
memory (of that row alone: the reference output waits on the host), and the max abs / PSNR difference of each GSMNet row
against the first one that ran. --train adds training steps (16x64x64, batch 1, checkpointing on), eager and compiled,
fp32 and bf16, and the fast step (compiled, CUDA graphs, MLP checkpointing); --train-scans kernel,triton,ref runs
each of them with each scan backend (GSMNet's ``scan_backend``). A case that runs out of memory or fails
says so. --memory-peak runs each inference row once more after its timing, with CUDA's allocation history recorded, and
prints what was alive at that call's peak, grouped by the line that allocated it (a compiled graph's lines are in its
generated code).
--phase-peaks runs each GSMNet row once more and prints the peak memory of each phase of the call (the forward, flows,
conv_first, propagation layers, SWSA slabs, groups, blocks and their attention and merge, window steps, the
reconstruction; every call synchronised), with what was allocated when the call with that peak began.
``--set MODULE.NAME=VALUE`` sets a module attribute before anything runs: an Inductor setting
(``torch._inductor.config.triton.autotune_pointwise=False``) or one of gsmsr's switches, for every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_utils import (  # noqa: E402  (this folder is on sys.path)
    BenchCompileCache,
    PhasePeaks,
    add_compile_cache_option,
    add_set_option,
    apply_settings,
    cuda_time,
    live_at_peak,
    parse_settings,
    parse_variant,
    print_table,
    selected,
    train_step,
)

import gsmsr  # noqa: E402,F401  (applies the BasicSR compatibility fixes)
from gsmsr import GSMNet  # noqa: E402

SCAN = importlib.import_module('gsmsr.ops.selective_scan')
SWSA = importlib.import_module('gsmsr.archs.swsa')
DWCONV = importlib.import_module('gsmsr.ops.dwconv3d')
BIMAMBA = importlib.import_module('gsmsr.archs.bimamba')
IWARP = importlib.import_module('gsmsr.archs.implicit_warp')
GSM_BLOCK = importlib.import_module('gsmsr.archs.gsm_block')
MATMUL3X = importlib.import_module('gsmsr.ops.matmul3x')


def phase_targets() -> List[tuple]:
    """What ``--phase-peaks`` watches: GSMNet's stages, the streaming schedule's copies, the SWSA group, block and its
    large-volume paths, and the window step (the compiled pieces run inside these)."""
    swsa_block, group = SWSA.SWSABlock, SWSA.SWSAGroup
    return [
        (GSMNet, 'forward', 'forward'), (GSMNet, 'get_flows', 'flows (SpyNet)'),
        (GSMNet, 'shallow_features', 'conv_first'), (GSMNet, 'stream_layer', 'propagation layer'),
        (GSMNet, 'slab_of', 'SWSA slab copy'), (GSMNet, 'window_buffer', 'window buffer'),
        (GSMNet, 'reconstruct', 'reconstruction'), (group, 'consume', 'SWSA group'),
        (swsa_block, 'forward', 'SWSA block'), (swsa_block, 'attend_in_parts', 'SWSA attention in parts'),
        (swsa_block, 'attend_in_chunks', 'SWSA attention in steps'), (swsa_block, '_merge_into', 'SWSA merge'),
        (GSM_BLOCK.GSMBlock, '__call__', 'window step'),
    ]  # fmt: skip


def print_phase_peaks(name: str, call: Callable[[], object]) -> None:
    """One more (warm) call with the peak memory of each phase recorded (:class:`bench_utils.PhasePeaks`)."""
    with PhasePeaks(phase_targets()) as peaks:
        call()
    print(f'\n# {name}: peak memory by phase (one more call; a forward peak above every phase lies between them)')
    print_table(peaks.rows(), ['phase', 'calls', 'peak_GiB', 'at_start_GiB', 'largest_rise_GiB'])


def print_memory_peak(name: str, call: Callable[[], object]) -> None:
    """One more (warm) call with the allocation history on: the traced peak and what it holds, by line."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks='python')
    try:
        call()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    except Exception as err:  # the trace is an extra: its failure must not turn the timed row into one
        print(f'\n# {name}: no memory trace: {type(err).__name__}: {str(err)[:300]}')
        return
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, table = live_at_peak(snapshot['device_traces'][torch.cuda.current_device()])
    print(f'\n# {name}: {peak / 2**30:.2f} GiB allocated within the call at its peak, by where it was allocated')
    print_table(table, ['GiB', 'count', 'made at'])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1).double() - b.clamp(0, 1).double()).square().mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else float('inf')


def bench_inputs(args: argparse.Namespace, dev: torch.device) -> Iterator[Tuple[str, torch.Tensor]]:
    """(label, lq (1, T, 3, H, W) in [0, 1]) for each input: random frames of each size, or each clip under
    ``args.clips`` (RGB, as BasicSR's datasets load BGR PNGs), labelled ``<clip> TxHxW``."""
    if not args.clips:
        for size in args.sizes.split(','):
            t, h, w = (int(v) for v in size.split('x'))
            yield size, torch.rand(1, t, 3, h, w, device=dev)
        return
    from gsmsr.data.samples import read_frames

    folders = sorted(p for p in Path(args.clips).iterdir() if p.is_dir())
    if not folders:
        raise SystemExit(f'bench_gsm: no clip folders under {args.clips}')
    for folder in folders:
        frames = torch.from_numpy(read_frames(folder)[..., ::-1].copy())  # (T, H, W, 3) RGB uint8
        t, h, w, _ = frames.shape
        yield f'{folder.name} {t}x{h}x{w}', frames.permute(0, 3, 1, 2)[None].to(dev).float() / 255


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='20x180x320,100x180x320,7x64x112', help='comma list of TxHxW (LR)')
    parser.add_argument(
        '--clips', metavar='DIR', help='real LR clips instead of --sizes: one folder of PNG frames a clip under DIR'
    )
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--train', action='store_true', help='also time a training step (16x64x64, batch 1)')
    parser.add_argument(
        '--train-scans',
        default='auto',
        help='comma list of GSMNet scan_backend values for the training rows (auto, kernel, triton, ref); a row '
        "other than auto's is named with its backend",
    )
    parser.add_argument('--no-basicvsrpp', action='store_true')
    parser.add_argument('--mamba-scan', action='store_true', help="also the compiled bf16 row on mamba-ssm's scan")
    parser.add_argument('--variants', default='', help="';' list of 'key=int,...': compiled rows (see above)")
    parser.add_argument(
        '--only', default='', help='comma list of substrings: run only rows whose name has one ("$" ends a name)'
    )
    parser.add_argument(
        '--memory-peak', action='store_true', help="after each inference row's timing: what its peak holds, by line"
    )
    parser.add_argument(
        '--phase-peaks', action='store_true', help="after each inference row's timing: its peak memory by phase"
    )
    add_compile_cache_option(parser)
    add_set_option(parser, 'before anything runs')
    args = parser.parse_args()
    apply_settings(parse_settings(args.set))

    if not torch.cuda.is_available():
        print('bench_gsm: needs a CUDA GPU')
        return 0
    dev = torch.device('cuda')
    torch.backends.cudnn.benchmark = True
    print(f'# {torch.cuda.get_device_name()}, torch {torch.__version__}, scan on CUDA: {gsmsr.ops.kernel_status()}')
    cache = BenchCompileCache(args.compile_cache)
    torch.manual_seed(0)
    gsm = GSMNet().to(dev).eval()
    rows: List[Dict[str, str]] = []

    def variant_net(**kwargs) -> GSMNet:
        net = GSMNet(**kwargs).to(dev).eval()
        net.load_state_dict(gsm.state_dict())
        return net

    gsm_compiled = variant_net(compile_blocks=True)
    # the faithful row runs mamba-ssm's kernel whatever the no-grad scan default is
    gsm_faithful = variant_net(scan_backend='kernel') if SCAN.cuda_kernel() else gsm

    flip_free_default, gate_default = BIMAMBA.FLIP_FREE, BIMAMBA.GATE_OUTSIDE
    infer_config_default = dict(SCAN.INFER_TRITON_CONFIG)
    fused_warp_default, fused_scatter_default = IWARP.FUSED_ATTENTION, GSM_BLOCK.FUSED_SCATTER
    sdpa_default, swsa_compile_default = SWSA.SDPA_ATTENTION, SWSA.COMPILE_ATTENTION
    split_default = MATMUL3X.SPLIT_IN_REGISTERS

    def gsm_run(streaming: bool, dtype=None, net: GSMNet = gsm, variant: Dict[str, int] = {}):  # noqa: B006
        dwconv = {k.removeprefix('dwconv_'): v for k, v in variant.items() if k.startswith('dwconv_')}
        switches = 'slab flipfree gate buffers iwarp fscatter sdpa swsac split fp32'.split()
        scan = {k: v for k, v in variant.items() if k not in switches and not k.startswith('dwconv_')}
        stencil = dataclasses.replace(DWCONV.DEFAULT_CONFIG, **dwconv)

        def run(x):
            net.streaming_eval, net.stream_slab = streaming, variant.get('slab', GSMNet.stream_slab)
            net.stream_buffers = bool(variant.get('buffers', GSMNet.stream_buffers))
            SCAN.INFER_TRITON_CONFIG.clear()
            SCAN.INFER_TRITON_CONFIG.update(infer_config_default, **scan)
            DWCONV.OP_CONFIG = stencil
            BIMAMBA.FLIP_FREE = bool(variant.get('flipfree', BIMAMBA.FLIP_FREE))
            BIMAMBA.GATE_OUTSIDE = bool(variant.get('gate', BIMAMBA.GATE_OUTSIDE))
            IWARP.FUSED_ATTENTION = bool(variant.get('iwarp', IWARP.FUSED_ATTENTION))
            GSM_BLOCK.FUSED_SCATTER = bool(variant.get('fscatter', GSM_BLOCK.FUSED_SCATTER))
            SWSA.SDPA_ATTENTION = bool(variant.get('sdpa', SWSA.SDPA_ATTENTION))
            SWSA.COMPILE_ATTENTION = bool(variant.get('swsac', SWSA.COMPILE_ATTENTION))
            MATMUL3X.SPLIT_IN_REGISTERS = bool(variant.get('split', MATMUL3X.SPLIT_IN_REGISTERS))
            try:
                with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
                    return net(x).float()
            finally:
                SCAN.INFER_TRITON_CONFIG.clear()
                SCAN.INFER_TRITON_CONFIG.update(infer_config_default)
                DWCONV.OP_CONFIG = DWCONV.DEFAULT_CONFIG
                BIMAMBA.FLIP_FREE = flip_free_default
                BIMAMBA.GATE_OUTSIDE = gate_default
                IWARP.FUSED_ATTENTION = fused_warp_default
                GSM_BLOCK.FUSED_SCATTER = fused_scatter_default
                SWSA.SDPA_ATTENTION = sdpa_default
                SWSA.COMPILE_ATTENTION = swsa_compile_default
                MATMUL3X.SPLIT_IN_REGISTERS = split_default

        return run

    models: Dict[str, Callable] = {
        'GSMNet fp32 whole-clip': gsm_run(False, net=gsm_faithful),
        'GSMNet fp32 streaming': gsm_run(True),
        'GSMNet bf16 streaming': gsm_run(True, torch.bfloat16),
        'GSMNet fp32 compiled': gsm_run(True, net=variant_net(compile_blocks=True, fp32_matmul='ieee')),
        'GSMNet fp32 compiled 3xtf32': gsm_run(True, net=gsm_compiled),
        'GSMNet bf16 compiled': gsm_run(True, torch.bfloat16, net=gsm_compiled),
    }
    for spec in (v.strip() for v in args.variants.split(';') if v.strip()):
        variant = parse_variant(spec)
        net = variant_net(compile_blocks=True) if 'swsac' in variant else gsm_compiled  # read when it compiles
        dtype, label = (None, 'fp32') if variant.get('fp32') else (torch.bfloat16, 'bf16')
        models[f'GSMNet {label} compiled [{spec}]'] = gsm_run(True, dtype, net=net, variant=variant)
    if args.mamba_scan:
        mamba_net = variant_net(scan_backend='kernel', compile_blocks=True)
        models['GSMNet bf16 compiled+mamba-ssm scan'] = gsm_run(True, torch.bfloat16, net=mamba_net)
    if not args.no_basicvsrpp:
        from basicsr.archs.basicvsrpp_arch import BasicVSRPlusPlus

        bvpp = BasicVSRPlusPlus(mid_channels=64, num_blocks=7).to(dev).eval()
        models['BasicVSR++ fp32'] = lambda x: bvpp(x)

    for size, lq in bench_inputs(args, dev):
        t = lq.shape[1]
        ref = None
        for name, fn in models.items():
            if not selected(args.only, name):
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {'model': name, 'input': size}
            try:
                with torch.no_grad():
                    start = time.perf_counter()
                    fn(lq)
                    torch.cuda.synchronize()
                    row['first_s'] = f'{time.perf_counter() - start:.1f}'
                    ms, out = cuda_time(lambda: fn(lq), args.repeats, warmup=0)
                row.update(
                    ms=f'{ms:.0f}',
                    ms_per_frame=f'{ms / t:.1f}',
                    peak_GiB=f'{torch.cuda.max_memory_allocated() / 2**30:.2f}',
                )
                if args.memory_peak:
                    print_memory_peak(name, lambda: fn(lq))
                if args.phase_peaks and name.startswith('GSMNet'):
                    print_phase_peaks(name, lambda: fn(lq))
                # the reference waits on the host, so that no row's peak holds another row's output
                if name.startswith('GSMNet') and ref is None:
                    ref = out.cpu()
                elif name.startswith('GSMNet'):
                    base = ref.to(dev)
                    row.update(max_abs=f'{(out - base).abs().max().item():.2e}', dPSNR=f'{psnr(out, base):.1f}')
                    del base
                del out
            except torch.cuda.OutOfMemoryError:
                row.update(ms='OOM')
            except Exception as err:  # e.g. Triton missing: report, keep going
                row.update(ms=f'failed: {type(err).__name__}: {str(err)[:60]}')
            rows.append(row)
            print(row, flush=True)
            del row
            if 'compiled' in name:
                cache.save()
        del lq, ref

    if args.train:
        lq = torch.rand(1, 16, 3, 64, 64, device=dev)
        gt = torch.rand(1, 16, 3, 256, 256, device=dev)
        # (name, autocast dtype, compile_blocks, CUDA graphs + MLP checkpointing)
        steps = (
            ('train step fp32', None, False, False),
            ('train step bf16', torch.bfloat16, False, False),
            ('train step bf16 compiled', torch.bfloat16, True, False),
            ('train step fp32 compiled', None, True, False),
            ('train step bf16 compiled+graphs', torch.bfloat16, True, True),
            ('train step fp32 compiled+graphs', None, True, True),
        )
        for (name, dtype, compiled, fast), scan in itertools.product(steps, args.train_scans.split(',')):
            name = name if scan == 'auto' else f'{name} [{scan} scan]'
            if not selected(args.only, name):
                continue
            torch.manual_seed(0)
            net = GSMNet(
                use_checkpoint_attn=True,
                use_checkpoint_ffn=True,
                use_checkpoint_mlp=fast,
                compile_blocks=compiled,
                scan_backend=scan,
            )
            net = net.to(dev).train()
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)

            step = train_step(net, opt, lq, gt, dtype, cuda_graph=fast)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {'model': name, 'input': '16x64x64'}
            try:
                start = time.perf_counter()
                step()
                torch.cuda.synchronize()
                row['first_s'] = f'{time.perf_counter() - start:.1f}'
                ms, loss = cuda_time(step, max(2, args.repeats // 2))
                row.update(
                    ms=f'{ms:.0f}',
                    peak_GiB=f'{torch.cuda.max_memory_allocated() / 2**30:.2f}',
                    max_abs=f'loss {loss.item():.5f}',
                )
            except torch.cuda.OutOfMemoryError:
                row.update(ms='OOM')
            except Exception as err:
                row.update(ms=f'failed: {type(err).__name__}: {str(err)[:60]}')
                traceback.print_exc()
            rows.append(row)
            print(row, flush=True)
            del net, opt
            if compiled:
                cache.save()

    print_table(rows, ['model', 'input', 'ms', 'ms_per_frame', 'peak_GiB', 'max_abs', 'dPSNR', 'first_s'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
