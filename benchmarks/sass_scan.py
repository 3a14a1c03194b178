"""Compile the scan forward's ``_scan_kernel`` offline for sm_90a (no GPU needed) and count what its main token loop
issues per token: registers, spills, tile-load layouts, SASS instructions by kind and estimated pipe cycles.

    python benchmarks/sass_scan.py [VARIANT ...] [--length 288000] [--dim 384] [--dtype bf16] [--warps-per-sm 16]
        [--seg-len N] [--module gsmsr.ops.seq_scan_triton | path/to/copy.py] [--keep DIR]

A VARIANT is ``out<TILE>`` (output pass) or ``sum<TILE>`` (summary pass), optionally followed by ``r<maxnreg>``
(none: the compiler's choice), ``w<num_warps>`` and ``c<channels per thread>`` (32 * num_warps * c channels per
program), e.g. ``out8r128 sum8r128`` (the default call's two passes), ``out8`` (uncapped), ``out4r128w2``,
``out8c2`` (64 channels in one warp); a leading ``rev`` compiles the reverse scan (time walked from the end), e.g.
``revout8r128``; a trailing ``s<n>`` the tile loop software-pipelined over n stages (``stages``), e.g.
``out8r128s3``; ``g1`` no gate (BiMamba's ``GATE_OUTSIDE``), e.g. ``out8r128s3g1`` (the default inference call's output
pass).
The other parameters are the real call's: N = NP = 16; D, z, delta_bias and softplus on; u, delta, z and out in
``--dtype``; A, D, bias and the packed B|C in fp32. The kernel is specialised as Triton's launcher would specialise it
(16-byte aligned pointers; integers divisible by 16, or equal to 1, marked so), with the segment length the host code
chooses (``choose_segments`` and ``_split``, 132 SMs).

Per variant it prints, per token (one tile's loop body divided by TILE) and warp:

* ptxas registers, stack frame and spill bytes (``ptxas -v`` on the kernel's PTX), Triton's shared memory;
* the TTGIR layout (sizePerThread / threadsPerWarp) of the u tile load and of the out store in the main loop;
* SASS instructions of the main loop (the longest backward branch) by kind, and the median (min) distance, in
  instructions, from a global load to the first instruction that reads its result (wrapping around the loop: a
  load for the next iteration counts to its use there), for all 16-byte loads and apart for the u / delta / z tile
  loads and the B|C row pieces (told apart by their addresses: ``tile_loads``);
* issue cycles on one SM sub-partition for each pipe, from the per-SM rates of compute capability 9.0 (CUDA
  programming guide): MUFU 16 lanes a clock (8 cycles a warp instruction on a sub-partition), FP32 FFMA/FMUL/FADD 128
  (1 cycle), IMAD 64 (2), other integer, compare, select, move and permute 64 (2); one instruction issued a cycle;
* L1 wavefronts a token on the SM, assuming one per distinct 128-byte line that a warp instruction touches (a
  broadcast load: one), with the rows a tile instruction touches read from the TTGIR layouts;
* a one-warp in-order issue model: cycles a token when a warp runs alone, each instruction issuing one cycle after
  the previous one at the earliest, when its operands are ready and its pipe is free. Latencies assumed: FP32 and
  integer 4 cycles (IMAD.WIDE 5), MUFU and conversions 20, shared loads 30, shuffles 25, local loads 40, global
  loads 35 (L1 hits) or 300 (L2 hits), and a third row with the B|C rows at 300 and the u / delta / z tiles at
  600 (from DRAM: a 128-byte line holds 8 tiles of 8 bf16 tokens, so 1 tile in 8 misses L2 when the lines stay in
  L1, every tile when they do not). With W warps on a sub-partition, cycles a token are at least
  max(issue, MUFU, in-order / W).

Needs Triton with its bundled CUDA tools (ptxas, cuobjdump); torch only for placeholder tensors. About 10 s a
variant on a CPU.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

TARGET = GPUTarget('cuda', 90, 32)
SM_COUNT = 132
BIN = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin'
TORCH_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
VARIANT = re.compile(r'(rev)?(out|sum)(\d+)((?:[rwcsg]\d+)*)$')
Instr = Tuple[int, str, str, str]  # address, predicate guard, opcode, operands

# (table row, pipe, SASS opcodes before the first dot). Pipes: mufu, fma (FP32), fmah (IMAD), alu, lsu, ctrl;
# uniform-datapath instructions cost an issue slot only.
_INT, _FPC, _BR, _SH = 'int/address ALU', 'FP compare/min/select', 'branch/sync (BRA, BSSY, ...)', 'shared memory'
GROUPS = [
    ('FFMA', 'fma', 'FFMA'), ('FMUL', 'fma', 'FMUL'), ('FADD', 'fma', 'FADD'),
    ('other FP (HFMA2, ...)', 'fma', 'HFMA2 HADD2 HMUL2'),
    (_FPC, 'alu', 'FSETP FMNMX FSEL FCHK'),
    ('IMAD (FMA-heavy pipe)', 'fmah', 'IMAD'),
    (_INT, 'alu', 'IADD3 LEA SHF LOP3 ISETP SEL IMNMX IABS PLOP3 P2R R2P FLO POPC'),
    ('PRMT/MOV', 'alu', 'PRMT MOV'),
    ('conversions', 'alu', 'I2FP F2FP F2IP'), ('conversions', 'mufu', 'F2F I2F F2I FRND'),
    ('LDG', 'lsu', 'LDG'), ('STG', 'lsu', 'STG'), ('LDL/STL (spills)', 'lsu', 'LDL STL'),
    (_SH, 'lsu', 'LDS STS LDSM STSM LDGSTS'), ('SHFL', 'lsu', 'SHFL'), ('BAR', 'ctrl', 'BAR'),
    (_BR, 'ctrl', 'BRA BSSY BSYNC WARPSYNC BREAK'),
]  # fmt: skip
KIND = {op: (row, pipe) for row, pipe, ops in GROUPS for op in ops.split()}
ROWS = ['MUFU.EX2', 'MUFU.LG2', 'MUFU.RCP', 'MUFU other', 'FFMA', 'FMUL', 'FADD', 'other FP (HFMA2, ...)', _FPC,
        'LDG', 'STG', 'LDL/STL (spills)', _SH, 'SHFL', 'BAR', _BR, 'IMAD (FMA-heavy pipe)', _INT,
        'uniform datapath (U*)', 'conversions', 'PRMT/MOV', 'other', 'total']  # fmt: skip
CYCLES = {'fma': 1, 'fmah': 2, 'alu': 2, 'mufu': 8}  # a warp instruction's cycles on its sub-partition's pipe
NO_DEST = {'STG', 'STS', 'STL', 'STSM', 'RED', 'ATOM', 'BAR', 'BRA', 'BSSY', 'BSYNC', 'NOP', 'EXIT', 'WARPSYNC',
           'BREAK', 'LDGSTS', 'DEPBAR', 'LDGDEPBAR'}  # fmt: skip
# (latency of global loads, of the u / delta / z tile loads if other) of the one-warp model's rows
IN_ORDER = [(35, None), (300, None), (300, 600)]
SASS_LINE = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);')


def load_module(name: str):
    """The scan module by import name, or a copy of it by file path (to scan a patched kernel)."""
    if not name.endswith('.py'):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(Path(name).stem, name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse_variant(text: str) -> Dict[str, int]:
    m = VARIANT.match(text)
    if not m:
        expected = '[rev]out<TILE> or [rev]sum<TILE>, then r<maxnreg> w<warps> c<channels per thread> s<stages> g1'
        raise SystemExit(f'bad variant {text!r}: expected {expected}')
    extra = {k: int(v) for k, v in re.findall(r'([rwcsg])(\d+)', m.group(4))}
    return dict(
        reverse=bool(m.group(1)),
        summary=m.group(2) == 'sum',
        tile=int(m.group(3)),
        maxnreg=extra.get('r', 0),
        warps=extra.get('w', 1),
        channels=extra.get('c', 1),
        stages=extra.get('s', 1),
        gate=not extra.get('g', 0),  # g1: no gate (BiMamba's GATE_OUTSIDE)
    )


def compile_variant(mod, v: Dict[str, int], args):
    """(compiled kernel, segment length used), specialised through Triton's own launcher code."""
    fn = mod._KERNELS(False).scan_kernel.jit
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    out_tile, warps = (8, 1) if v['summary'] else (v['tile'], v['warps'])  # the summary runs at the default output
    block_d = 32 * v['warps'] * v['channels']
    seg_len = args.seg_len
    if not seg_len:
        block = 32 * warps * v['channels']
        segments = mod.choose_segments(1, args.dim, args.length, block, warps, SM_COUNT, args.warps_per_sm)
        seg_len, _ = mod._split(args.length, segments, max(8, out_tile))
    L, D = args.length, args.dim
    act = lambda: torch.empty(16, dtype=TORCH_DTYPES[args.dtype])  # noqa: E731  (placeholders: dtype, alignment)
    f32 = lambda: torch.empty(16, dtype=torch.float32)  # noqa: E731
    call = (act(), act(), act(), act(), f32(), f32(), f32(), f32(), f32(), f32(), D, L, seg_len, -(-L // seg_len) - 1)
    # strides (batch, channel) of u, delta, z and out; A (D, N) contiguous
    call += (D * L, L) * 4 + (16, 1)
    kwargs = dict(N=16, NP=16, BLOCK_D=block_d, TILE=v['tile'], SUMMARY=v['summary'], HAS_D=True, HAS_Z=v['gate'],
                  HAS_BIAS=True, SOFTPLUS=True, REVERSE=v['reverse'], STAGES=v['stages'],
                  num_warps=v['warps'])  # fmt: skip
    if v['maxnreg']:
        kwargs['maxnreg'] = v['maxnreg']
    bound, specialization, options = binder(*call, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    return compiled, seg_len


def ptxas_info(ptx: str) -> Dict[str, int]:
    """Registers, stack frame and spill store/load bytes from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'k.ptx'
        src.write_text(ptx)
        arch = re.search(r'^\.target\s+(\w+)', ptx, re.M).group(1)
        cmd = [str(BIN / 'ptxas'), '-lineinfo', '-v', f'--gpu-name={arch}', str(src), '-o', str(Path(tmp) / 'k.o')]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    grab = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    return dict(regs=grab(r'Used (\d+) registers'), stack=grab(r'(\d+) bytes stack frame'),
                spill_st=grab(r'(\d+) bytes spill stores'), spill_ld=grab(r'(\d+) bytes spill loads'))  # fmt: skip


def sass_text(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'k.cubin'
        path.write_bytes(cubin)
        cmd = [str(BIN / 'cuobjdump'), '-sass', str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> List[Instr]:
    """Instructions of the longest loop: from a backward branch's target to the branch."""
    ins = [(int(a, 16), p or '', op, rest.strip()) for a, p, op, rest in SASS_LINE.findall(sass)]
    spans = []
    for addr, _, op, rest in ins:
        m = re.search(r'0x([0-9a-f]+)', rest) if op.startswith('BRA') else None
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return [i for i in ins if lo <= i[0] <= hi]


def classify(op: str) -> Tuple[str, str]:
    base = op.split('.')[0]
    if base == 'MUFU':
        row = 'MUFU.' + op.split('.')[1]
        return (row if row in ROWS else 'MUFU other'), 'mufu'
    if base.startswith('U') and base not in KIND:
        return 'uniform datapath (U*)', 'uniform'
    return KIND.get(base, ('other', 'other'))


def _regs(operand: str) -> Set[str]:
    """Registers an operand names (R, UR, P, UP; a ``.64`` operand names two)."""
    out = set()
    for m in re.finditer(r'\b(U?R)(\d+)(\.64)?\b|\b(U?P)(\d)\b', operand):
        if m.group(1):
            out |= {f'{m.group(1)}{int(m.group(2)) + k}' for k in range(2 if m.group(3) else 1)}
        else:
            out.add(f'{m.group(4)}{m.group(5)}')
    return out


def dests_srcs(ins: Instr) -> Tuple[Set[str], Set[str]]:
    """(registers written, registers read) of an instruction, approximately: the first operand is the destination
    (all of a vector load's registers), plus the predicate after it for compares and carry-out adds."""
    _, pred, op, rest = ins
    ops = [o.strip() for o in rest.split(',')] if rest else []
    base = op.split('.')[0]
    n_dest = 0 if base in NO_DEST or not ops else 1
    if base in ('FSETP', 'ISETP', 'DSETP', 'PLOP3'):
        n_dest = 2
    elif base in ('IADD3', 'LEA', 'LOP3') and len(ops) > 1 and re.fullmatch(r'!?U?P[T0-9]', ops[1]):
        n_dest = 2
    dests = set()
    for i, o in enumerate(ops[:n_dest]):
        m = re.match(r'R(\d+)', o)
        width = 4 if '.128' in op else 2 if ('.64' in op or 'WIDE' in op) else 1
        dests |= {f'R{int(m.group(1)) + k}' for k in range(width)} if i == 0 and m else _regs(o)
    srcs = set().union(*map(_regs, ops[n_dest:])) | (_regs(pred) if pred else set())
    return dests - {'RZ', 'PT'}, srcs


def tile_loads(loop: List[Instr]) -> Set[int]:
    """Indices of the u, delta, z tile loads among the loop's LDGs: those whose base register serves fewer than four
    distinct offsets. The B|C rows are 16-byte broadcast pieces at offsets 0x10 apart from one base (four a row at
    least, and within a tile all rows from one base); a tile load is one vector at its own address."""
    offsets: Dict[str, Set[str]] = collections.defaultdict(set)
    bases = {}
    for k, (_, _, op, rest) in enumerate(loop):
        m = re.search(r'\]\[(R\d+)(?:\.64)?(\+0x[0-9a-f]+)?\]', rest) if op.startswith('LDG') else None
        if m:
            bases[k] = m.group(1)
            offsets[m.group(1)].add(m.group(2) or '')
    return {k for k, base in bases.items() if len(offsets[base]) < 4}


def load_to_use(loop: List[Instr]) -> List[Tuple[int, str, int]]:
    """(index, opcode, distance) for each LDG: instructions until the first that reads its result, wrapping around
    the loop (a prefetched load is read in the next iteration); none if it is overwritten first."""
    parsed = [dests_srcs(i) for i in loop]
    out = []
    for i, ins in enumerate(loop):
        if not ins[2].startswith('LDG') or not parsed[i][0]:
            continue
        for d in range(1, len(loop)):
            dests, srcs = parsed[(i + d) % len(loop)]
            if parsed[i][0] & srcs:
                out.append((i, ins[2], d))
                break
            if parsed[i][0] & dests:
                break
    return out


def in_order_cycles(
    loop: List[Instr], global_latency: int, iterations: int = 3, tile_latency: Optional[int] = None
) -> float:
    """Cycles an iteration of one warp issuing alone and in order (see the module docstring), averaged over all
    but the first of ``iterations`` back-to-back iterations. tile_latency: that of the u, delta, z tile loads
    (:func:`tile_loads`) where it differs from the other global loads'."""
    ready: Dict[str, int] = collections.defaultdict(int)
    pipe_free: Dict[str, int] = collections.defaultdict(int)
    parsed = [dests_srcs(i) for i in loop]
    tiles = tile_loads(loop) if tile_latency is not None else set()
    t = 0
    starts = []
    for _ in range(iterations):
        starts.append(t)
        for k, ((_, _, op, _), (dests, srcs)) in enumerate(zip(loop, parsed)):
            base, pipe = op.split('.')[0], classify(op)[1]
            t = max([t + 1, pipe_free[pipe]] + [ready[r] for r in srcs])
            pipe_free[pipe] = t + CYCLES.get(pipe, 1)
            ldg = tile_latency if k in tiles else global_latency
            latency = {'MUFU': 20, 'F2F': 20, 'I2F': 20, 'F2I': 20, 'FRND': 20, 'LDG': ldg, 'LDS': 30,
                       'LDSM': 30, 'LDL': 40, 'SHFL': 25}.get(base, 5 if 'WIDE' in op else 4)  # fmt: skip
            for r in dests:
                ready[r] = t + latency
    return (t - starts[1]) / (iterations - 1)


def ttgir_layouts(ttgir: str) -> Dict[str, Optional[Tuple[List[int], List[int]]]]:
    """(sizePerThread, threadsPerWarp) of the first masked tile load (u) and of the store in the main loop (the
    longest: the reverse scan walks the ragged end, token by token, first)."""
    blocked = re.findall(r'^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\]',
                         ttgir, re.M)  # fmt: skip
    layouts = {name: ([int(x) for x in spt.split(',')], [int(x) for x in tpw.split(',')]) for name, spt, tpw in blocked}
    body = max((loop.split('scf.yield', 1)[0] for loop in ttgir.split('scf.for')[1:]), key=len)
    tile = r'tensor<\d+x\d+x!tt\.ptr<\w+>, (#\w+)>'
    found = {}
    for key, pat in (('load', r'tt\.load %\w+, %\w+, %\w+ : ' + tile), ('store', r'tt\.store [^:]*: ' + tile)):
        m = re.search(pat, body)
        found[key] = layouts.get(m.group(1)) if m else None
    return found


def analyse(name: str, mod, args) -> Dict[str, object]:
    v = parse_variant(name)
    compiled, seg_len = compile_variant(mod, v, args)
    asm = compiled.asm
    sass = sass_text(asm['cubin'])
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        for key in ('ttgir', 'ptx'):
            (keep / f'{name}.{key}').write_text(asm[key])
        (keep / f'{name}.sass').write_text(sass)
    loop = main_loop(sass)
    tile = v['tile']
    rows: Dict[str, float] = collections.Counter()
    widths: Dict[str, float] = collections.Counter()
    pipes: Dict[str, float] = collections.Counter()
    for _, _, op, _ in loop:
        row, pipe = classify(op)
        rows[row] += 1 / tile
        rows['total'] += 1 / tile
        pipes[pipe] += CYCLES.get(pipe, 0) / tile
        if row in ('LDG', 'STG'):
            width = op.rsplit('.', 1)[-1] if op.count('.') >= 2 else '32'  # LDG.E.128 -> 128; LDG.E -> 32
            widths[f'{row}.{width}'] += 1 / tile
    lay = ttgir_layouts(asm['ttgir'])
    rows_per = lambda key: lay[key][1][0] if lay[key] else 32  # noqa: E731  (rows a tile instruction touches)
    bc_loads = (1 if v['summary'] else 2) * 16 // 4  # 16-byte broadcast loads of the B (and C) row a token
    if rows['LDG']:
        # 16-byte tile loads touch a line per row of the layout; a narrower one counts one line (a warp's channels in
        # one line)
        narrow = rows['LDG'] - widths['LDG.128']
        l1 = max(widths['LDG.128'] - bc_loads, 0) * rows_per('load') + narrow + rows['STG'] * rows_per('store')
        l1 += bc_loads
        l1 += rows[_SH] + rows['LDL/STL (spills)'] + rows['SHFL']
    else:
        l1 = None  # loads went through shared memory (cp.async): not modelled
    dists = load_to_use(loop)
    tiles = tile_loads(loop)
    median = lambda xs: f'{statistics.median(xs):.0f} ({min(xs)})' if xs else '-'  # noqa: E731
    fmt = lambda x: '-' if x is None else f'{x[0]} / {x[1]}'  # noqa: E731
    return dict(
        name=name, seg_len=seg_len, info=ptxas_info(asm['ptx']), shared=compiled.metadata.shared, rows=rows,
        widths=widths, pipes=pipes, l1=l1, load=fmt(lay['load']), store=fmt(lay['store']), loop_len=len(loop),
        dist_wide=median([d for _, op, d in dists if op.endswith('.128')]),
        dist_narrow=median([d for _, op, d in dists if not op.endswith('.128')]),
        dist_tile=median([d for k, _, d in dists if k in tiles]),
        dist_bc=median([d for k, _, d in dists if k not in tiles]),
        in_order=[in_order_cycles(loop, lat, 3, at) / tile for lat, at in IN_ORDER],
    )  # fmt: skip


def table(results: List[Dict[str, object]]) -> str:
    lines = ['| per token (one warp) | ' + ' | '.join(r['name'] for r in results) + ' |',
             '|' + ' --- |' * (len(results) + 1)]  # fmt: skip
    add = lambda label, vals: lines.append(f'| {label} | ' + ' | '.join(vals) + ' |')  # noqa: E731
    num = lambda x: '-' if x is None else f'{x:.3g}' if x else '0'  # noqa: E731
    add('segment length', [str(r['seg_len']) for r in results])
    add('registers', [str(r['info']['regs']) for r in results])
    add('stack / spill st / spill ld (bytes)',
        [f"{r['info']['stack']} / {r['info']['spill_st']} / {r['info']['spill_ld']}" for r in results])  # fmt: skip
    add('shared memory (bytes)', [str(r['shared']) for r in results])
    add('u load layout (sizePerThread / threadsPerWarp)', [r['load'] for r in results])
    add('out store layout', [r['store'] for r in results])
    add('loop body (instructions a tile)', [str(r['loop_len']) for r in results])
    for row in ROWS:
        if row in ('LDG', 'STG'):
            for w in sorted({w for r in results for w in r['widths'] if w.startswith(row)}):
                add(w, [num(r['widths'][w]) for r in results])
        elif any(r['rows'][row] for r in results):
            add(row, [num(r['rows'][row]) for r in results])
    add('load-to-use, LDG.128 (median (min) instructions)', [r['dist_wide'] for r in results])
    add('load-to-use, narrower LDG', [r['dist_narrow'] for r in results])
    add('load-to-use, u / delta / z tiles', [r['dist_tile'] for r in results])
    add('load-to-use, B|C rows', [r['dist_bc'] for r in results])
    add('**cycles / sub-partition: issue**', [num(r['rows']['total']) for r in results])
    add('cycles: MUFU (8 a warp instruction)', [num(r['pipes']['mufu']) for r in results])
    add('cycles: FMA pipe (FP32 1, IMAD 2)', [num(r['pipes']['fma'] + r['pipes']['fmah']) for r in results])
    add('cycles: ALU (2 a warp instruction)', [num(r['pipes']['alu']) for r in results])
    add('L1 wavefronts (SM-wide)', [num(r['l1']) for r in results])
    add('one warp in order: cycles, L1-hit loads', [num(r['in_order'][0]) for r in results])
    add('one warp in order: cycles, L2-hit loads', [num(r['in_order'][1]) for r in results])
    add('one warp in order: cycles, L2-hit B|C, u/dt/z at 600', [num(r['in_order'][2]) for r in results])
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('variants', nargs='*', default=['out8r128', 'sum8r128', 'out4r128', 'out8', 'sum8'])
    parser.add_argument('--length', type=int, default=288000)
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--dtype', choices=sorted(TORCH_DTYPES), default='bf16')
    parser.add_argument('--warps-per-sm', type=int, default=16, help='as selective_scan_fwd_triton (sets seg_len)')
    parser.add_argument('--seg-len', type=int, default=0, help='segment length (0: the one the host code picks)')
    parser.add_argument('--module', default='gsmsr.ops.seq_scan_triton', help='import name, or a .py copy to scan')
    parser.add_argument('--keep', default='', help="folder for each variant's TTGIR, PTX and SASS")
    args = parser.parse_args()
    mod = load_module(args.module)
    print(f'Triton {triton.__version__}, sm_90a, L = {args.length}, D = {args.dim}, {args.dtype}\n')
    print(table([analyse(name, mod, args) for name in args.variants]))


if __name__ == '__main__':
    main()
